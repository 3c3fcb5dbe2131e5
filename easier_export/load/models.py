"""Every MODEL form the CLI accepts, loaded in one place, with one-line errors for bad input.

Forms: ``timm:NAME``, ``torchvision:NAME``, a builtin name (``cifar_resnet20``...), a state-dict file with an
``--arch``, a ``torch.export`` archive (``.pt2``), a linearized checkpoint written by this tool, a pickled
``nn.Module`` (only with ``trust_pickle``: unpickling runs arbitrary code), and a Hugging Face model directory
(``config.json`` + weights; see ``hf.py``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from easier_export.core.errors import UserError, first_line
from easier_export.trace.edits import remove_sites
from easier_export.trace.tracing import trace

from .arch import BUILTINS
from .archive import check_archive
from .hf import is_hf_dir, load_hf
from .safe import torch_load
from .task import IMAGENET_MEAN, IMAGENET_STD, ImageTask, TaskConfig, TextTask

LINEARIZED_FORMAT = "easier-export/linearized-v1"


@dataclass
class LoadedModel:
    model: nn.Module
    source: str
    input_size: tuple[int, ...] = (3, 224, 224)  # (C, H, W), or (sequence length,) for a text model
    task: TaskConfig = field(default_factory=ImageTask)
    removed: list[str] = field(default_factory=list)  # call sites already linearized (linearized checkpoints)
    relocate_padding: bool = False  # how those were linearized
    notes: list[str] = field(default_factory=list)
    size_declared: bool = True  # False: the model says nothing about its input size (224x224 is a guess)
    reheadable: bool = False  # built from an architecture name: --num-classes gives it a fresh head

    @property
    def num_classes(self) -> int | None:
        return head_classes(self.model)

    @property
    def rehead_advice(self) -> str:
        """How this model gets another number of classes: --num-classes re-heads only a named architecture."""
        if self.reheadable:
            return "pass --num-classes to re-head it"
        return ("its head is fixed in this form: replace the head in PyTorch and save it again, or pass the state "
                "dict with --arch and --num-classes")


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def build_arch(arch: str, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None) -> nn.Module:
    """Instantiate an architecture by name with random weights (nothing is ever downloaded).

    ``img_size`` reaches timm models built for a fixed input size (Swin, ViT), so they run at e.g. 32x32.
    """
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    prefix, _, name = arch.partition(":")
    if not name:
        prefix, name = "builtin", arch
    if prefix == "timm":
        import timm

        if not timm.is_model(name):
            raise UserError(f"unknown timm model '{name}'.{_suggest(name, timm.list_models())}")
        if img_size is not None:
            try:
                return timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
            except TypeError:  # convolutional nets take any size and no img_size argument
                pass
        return timm.create_model(name, pretrained=False, **kwargs)
    if prefix == "torchvision":
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            raise UserError(f"unknown torchvision model '{name}'.{_suggest(name, names)}")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if prefix == "builtin" and name in BUILTINS:
        return BUILTINS[name](**kwargs)
    known = [f"timm:NAME, torchvision:NAME, {', '.join(BUILTINS)}"]
    raise UserError(f"unknown model '{arch}' (expected {known[0]}).{_suggest(name, list(BUILTINS))}")


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError("the weights file holds no state dict (expected tensors under 'state_dict'/'model')")
    prefix = "module."
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_state_dict(model: nn.Module, obj: Any, what: str, rehead: bool = False) -> list[str]:
    """Strict load with a readable mismatch message (which keys are missing, which unexpected).

    ``rehead`` (--num-classes given): a classifier head of another size is not loaded but left at the fresh
    initialisation of the right size, the rest of the weights load as usual; returns a note saying so.
    """
    state = _unwrap_state_dict(obj)
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    notes = []
    if rehead and wrong and set(wrong) <= head_keys(model):
        was = state[sorted(wrong)[-1]].shape[0]
        notes.append(f"{what}: the {was}-class head ({', '.join(sorted(wrong))}) is replaced by a freshly "
                     f"initialised {head_classes(model)}-class one: finetune before trusting its accuracy")
        state = {k: v for k, v in state.items() if k not in wrong}
    elif wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]
        hint = "only the classifier head may differ" if rehead else "a different head needs --num-classes"
        raise UserError(f"{what} does not match the architecture: {len(wrong)} tensors differ in shape "
                        f"({_short(shapes, 2)}); {hint}")
    result = model.load_state_dict(state, strict=False)
    problems = []
    missing = [k for k in result.missing_keys if k not in wrong]
    if missing:
        problems.append(f"missing {len(missing)} keys ({_short(missing)})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys ({_short(result.unexpected_keys)})")
    if problems:
        raise UserError(f"{what} does not match the architecture: {'; '.join(problems)}")
    return notes


def _short(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _finish(model: nn.Module, source: str, num_classes: int | None, removed: list[str] | None = None,
            notes: list[str] | None = None, reheadable: bool = False) -> LoadedModel:
    if num_classes is not None and head_classes(model) not in (None, num_classes):
        raise UserError(f"{source} has {head_classes(model)} output classes but --num-classes is {num_classes} "
                        "(re-heading works for a named architecture with --weights or a state dict with --arch)")
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    task = ImageTask(tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)),
                     cfg.get("crop_pct"), cfg.get("interpolation") or "bilinear")
    return LoadedModel(model.eval(), source, tuple(cfg.get("input_size", (3, 224, 224))), task,
                       removed=removed or [], notes=notes or [], size_declared="input_size" in cfg,
                       reheadable=reheadable)


def load_model(source: str, num_classes: int | None = None, weights: str | Path | None = None,
               arch: str | None = None, trust_pickle: bool = False,
               img_size: int | tuple[int, ...] | None = None) -> LoadedModel:
    """Resolve any MODEL form into an eval-mode nn.Module plus its preprocessing config.

    ``img_size``: H, (H, W) or (C, H, W), like timm's ``input_size``.
    """
    size = (img_size,) * 2 if isinstance(img_size, int) else tuple(img_size or ())
    if is_hf_dir(Path(source)):
        return _load_text(Path(source), size[-1] if size else None)
    hw = size[-2:] or None
    loaded = _load_any(source, num_classes, weights, arch, trust_pickle,
                       hw if hw is None or hw[0] != hw[1] else hw[0])
    if Path(source).suffix == ".pt2":
        loaded.size_declared = True  # an exported program fixes its input shape
    if hw is not None:
        channels = size[0] if len(size) == 3 else loaded.input_size[0]
        loaded.input_size, loaded.size_declared = (channels, *hw), True  # type: ignore[assignment]
    task = loaded.task
    if isinstance(task, ImageTask):
        task.mean, task.std = (_per_channel(v, loaded.input_size[0]) for v in (task.mean, task.std))
    return loaded


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """A normalization given for another channel count (the ImageNet default on a one-channel .pt2): its mean on
    every channel, so that a model that declares none loads at any channel count (--mean/--std still override)."""
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def _load_text(path: Path, seq_len: int | None) -> LoadedModel:
    """A Hugging Face directory; ``seq_len`` (``--input-size``) defaults to 128 or the model's positions."""
    model, spec, notes = load_hf(path)
    seq_len = seq_len or min(128, spec.max_positions)
    if seq_len > spec.max_positions:
        raise UserError(f"sequence length {seq_len} (--input-size) exceeds the model's {spec.max_positions} positions")
    return LoadedModel(model, str(path.resolve()), (seq_len,), TextTask(spec), notes=notes)


def _load_any(source: str, num_classes: int | None, weights: str | Path | None, arch: str | None,
              trust_pickle: bool, img_size: int | tuple[int, int] | None) -> LoadedModel:
    path = Path(source)
    looks_like_file = (path.suffix in {".pt", ".pth", ".th", ".pt2", ".bin", ".ckpt", ".safetensors"}
                       or path.exists() or path.is_symlink())
    if not looks_like_file:
        model = build_arch(source, num_classes, img_size)
        notes = []
        if weights is not None:
            obj = torch_load(_existing(weights), trust_pickle)
            state = obj.state_dict() if isinstance(obj, nn.Module) else obj  # a pickled module, if trusted
            notes += load_state_dict(model, state, f"weights file {weights}", rehead=num_classes is not None)
        else:
            notes.append(f"{source}: no --weights given, using random initialisation")
        return _finish(model, source, num_classes, notes=notes, reheadable=True)

    if path.is_dir():
        raise UserError(f"{path} is a directory without config.json (a Hugging Face model directory needs "
                        "config.json and its weights; other MODELs are files)")
    path = _existing(path)
    if path.suffix == ".pt2":
        check_archive(path, trust_pickle)  # torch.export.load unpickles marked entries: inspect first
        try:
            program = torch.export.load(path)
        except Exception as e:  # torch raises many types for a bad archive
            raise UserError(f"cannot load torch.export archive {path}: {first_line(e)}") from e
        unlifted = program.module()
        # A plain GraphModule: the unlifted module refuses .train()/.eval(), which every stage calls.
        loaded = _finish(fx.GraphModule(unlifted, unlifted.graph), str(path.resolve()), num_classes)
        loaded.input_size = _program_input_size(program, path)
        return loaded

    obj = torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return _finish(obj, str(path.resolve()), num_classes)
    if isinstance(obj, dict) and obj.get("format") == LINEARIZED_FORMAT and "recipe" in obj:
        try:
            return _linearized(obj, path, num_classes, trust_pickle)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"{path} is a damaged linearized checkpoint ({type(e).__name__}: {first_line(e)})") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a model, a state dict or a linearized checkpoint")
    if arch is None:
        raise UserError(f"{path} is a state dict: say which architecture it belongs to with --arch "
                        "(e.g. --arch timm:resnet18)")
    model = build_arch(arch, num_classes, img_size)
    notes = load_state_dict(model, obj, f"state dict {path}", rehead=num_classes is not None)
    return _finish(model, arch, num_classes, notes=notes, reheadable=True)


def _linearized(obj: dict, path: Path, num_classes: int | None, trust_pickle: bool) -> LoadedModel:
    """Rebuild a linearized checkpoint from its recipe: architecture, removed call sites, preprocessing."""
    recipe = obj["recipe"]
    size = tuple(int(d) for d in recipe["input_size"])
    inner = load_model(recipe["arch"], recipe["num_classes"], trust_pickle=trust_pickle, img_size=size)
    model = inner.model
    gm = remove_sites(trace(model), recipe["removed"], recipe["relocate_padding"])
    load_state_dict(gm, obj["state_dict"], f"linearized checkpoint {path}")
    loaded = _finish(gm, recipe["arch"], num_classes, removed=list(recipe["removed"]))
    loaded.relocate_padding = recipe["relocate_padding"]
    loaded.input_size, loaded.task = size, inner.task.from_recipe(recipe)
    return loaded


def _program_input_size(program: torch.export.ExportedProgram, path: Path) -> tuple[int, int, int]:
    """(C, H, W) of the archive's image input; every stage runs several batch sizes, so batch must be dynamic."""
    shapes = [node.meta["val"].shape for node in program.graph.nodes
              if node.op == "placeholder" and node.name in program.graph_signature.user_inputs]
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise UserError(f"{path}: expected one image input (N, C, H, W), found {[tuple(s) for s in shapes]}")
    batch, *chw = shapes[0]
    if isinstance(batch, int):
        raise UserError(f"{path} was exported with a static batch size ({batch}); re-export it from an example batch "
                        "of 2 or more with dynamic_shapes=({0: torch.export.Dim('batch')},) (positional: it holds for "
                        "any argument name)")
    return tuple(int(d) for d in chw)  # type: ignore[return-value]


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path} is a symlink to nothing (a loop or a missing target)")
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    return path


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier head: the last Linear's parameters (empty when there is none)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {f"{names[-1]}.{p}" for p, _ in model.get_submodule(names[-1]).named_parameters()} if names else set()


def head_classes(model: nn.Module) -> int | None:
    """Number of classes: rows of the last Linear, else of the last 2-D weight (exported programs)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    weights = [p for name, p in model.named_parameters() if name.endswith("weight") and p.dim() == 2]
    return weights[-1].shape[0] if weights else None
