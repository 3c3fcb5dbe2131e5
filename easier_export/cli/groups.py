"""Options that a command takes as one object: a dataclass's fields become options, their parsed values the
object, so commands share one declaration of the model, data and loop options."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from easier_export.core.errors import UserError
from easier_export.loop.config import LoopConfig

from .options import LOOP, chosen, flag, typed

KEYWORD = inspect.Parameter.KEYWORD_ONLY


@dataclass(frozen=True)
class OptionGroup:
    """``params`` shown and parsed as options; ``build`` makes the command's object from their values."""

    params: tuple[inspect.Parameter, ...]
    build: Callable[[dict[str, Any]], Any]


def grouped(**groups: OptionGroup) -> Callable[[Callable], Callable]:
    """Replace each named parameter of a command by its group's options, in its place (the --help panels follow
    the signature's order), and call the command with the object the group builds from them."""
    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        params = [q for p in signature.parameters.values()
                  for q in (groups[p.name].params if p.name in groups else (p.replace(kind=KEYWORD),))]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: {p.name: kwargs.pop(p.name) for p in group.params} for name, group in groups.items()}
            return command(**kwargs, **{name: groups[name].build(v) for name, v in values.items()})

        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


def options_of(cls: type, *only: str) -> OptionGroup:
    """The fields of ``cls`` (``only`` those, when named), annotated with their options, as one group; the
    fields left out keep their defaults."""
    hints = typing.get_type_hints(cls, include_extras=True)
    params = tuple(inspect.Parameter(f.name, KEYWORD, annotation=hints[f.name], default=(
        inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default))
                   for f in dataclasses.fields(cls) if not only or f.name in only)
    return OptionGroup(params, lambda values: cls(**values))


def loop_options(*only: str, exclude: tuple[str, ...] = (), **defaults: Any) -> OptionGroup:
    """One option per LoopConfig field (``only`` those, when named; not the ``exclude``d ones), built into a
    LoopConfig; ``defaults`` overrides a field's default for this command.

    Help, choices and bounds live in the fields' metadata (``loop.config.option``), so a new LoopConfig field
    reaches `compress` and `linearize` without touching this module. A ``tuple[str, ...]`` field is a comma list.
    """
    hints = typing.get_type_hints(LoopConfig)
    fields = [f for f in dataclasses.fields(LoopConfig) if (not only or f.name in only) and f.name not in exclude]
    params = tuple(_loop_option(f, hints[f.name], defaults.get(f.name, f.default)) for f in fields)
    return OptionGroup(params, lambda values: LoopConfig(**{f.name: _loop_value(f, hints[f.name], values[f.name])
                                                      for f in fields}))


def _loop_option(f: dataclasses.Field, hint: Any, default: Any) -> inspect.Parameter:
    meta = f.metadata
    help_, choices = meta["help"], tuple(meta.get("choices", ()))
    bounds = {key: meta[key] for key in ("min", "max", "positive") if key in meta}
    if hint is bool:
        annotated = Annotated[bool, flag(f.name.replace("_", "-"), help_, LOOP)]
    elif hint == tuple[str, ...]:  # a comma list, checked item by item in _loop_value
        help_ += f", comma list of {', '.join(choices)}" if choices else ", comma list"
        annotated = typed(str, help_, LOOP, show_default=", ".join(default))
        default = ",".join(default)
    elif choices:
        annotated = chosen(choices, help_, LOOP)
    else:
        annotated = typed(hint, help_, LOOP, **bounds)
    return inspect.Parameter(f.name, KEYWORD, default=default, annotation=annotated)


def _loop_value(f: dataclasses.Field, hint: Any, value: Any) -> Any:
    if hint != tuple[str, ...]:
        return value
    items = tuple(sorted(v.strip() for v in value.split(",")))  # sorted: the resume fingerprint ignores order
    unknown = sorted(set(items) - set(f.metadata.get("choices", items)))
    if unknown:
        raise UserError(f"--{f.name.replace('_', '-')} takes {','.join(f.metadata['choices'])}, "
                        f"not {','.join(unknown)}")
    return items
