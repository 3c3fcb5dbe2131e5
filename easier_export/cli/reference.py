"""The command-line reference, docs/cli.md, written from the option declarations themselves (run
``python -m easier_export.cli.reference``), so that it cannot drift from ``--help``."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import typer

from .app import EXIT_CODES, app

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
REGENERATE = "python -m easier_export.cli.reference"
WIDTH = 120  # the longest Markdown line
ARGUMENTS, OPTIONS = "Arguments", "Options"


def reference() -> str:
    """docs/cli.md's text: every command with its arguments and options by --help panel."""
    group = typer.main.get_command(app)
    lines = ["# Command-line reference", "",
             *_wrap(f"Generated from the option declarations by `{REGENERATE}`: edit those, not this file. "
                    "`easier-export --version` prints the version; every command takes `--help`."), "",
             *_wrap(EXIT_CODES), ""]
    for name, command in group.commands.items():
        lines += _command(name, command)
    return "\n".join(lines).rstrip() + "\n"


def _command(name: str, command: Any) -> list[str]:
    usage = " ".join(["easier-export", name, "[OPTIONS]", *(p.metavar + ("..." if p.nargs == -1 else "")
                                                           for p in command.params if p.param_type_name == "argument")])
    lines = [f"## {name}", "", f"`{usage}`", "", *_wrap(command.help), ""]
    panels: dict[str, list[Any]] = {ARGUMENTS: [], OPTIONS: []}
    for param in command.params:
        default_panel = ARGUMENTS if param.param_type_name == "argument" else OPTIONS
        panels.setdefault(getattr(param, "rich_help_panel", None) or default_panel, []).append(param)
    for panel, params in panels.items():
        if params:
            lines += [f"### {panel}", "", *(line for p in params for line in _wrap(_entry(p), "- ", "  ")), ""]
    return lines


def _entry(param: Any) -> str:
    """One option: its spelling with the value it takes, its help, whether it is required or its default."""
    if param.param_type_name == "argument":
        spelling = param.metavar + ("..." if param.nargs == -1 else "")
    else:
        spelling = " ".join(filter(None, [param.opts[0], param.metavar]))
    text = f"`{spelling}`: {param.help}"
    if param.required:
        return f"{text} (required)"
    default = _default(param)
    return f"{text} (default: `{default}`)" if default else text


def _default(param: Any) -> str | None:
    """The default --help shows (``show_default`` as a string: those words)."""
    if isinstance(param.show_default, str):
        return param.show_default
    if not param.show_default or param.default is None:
        return None
    return str(param.default)


def _wrap(text: str, first: str = "", rest: str = "") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                         break_on_hyphens=False)


def main(argv: list[str] | None = None) -> None:
    """Write docs/cli.md (``--check``: only say whether it is up to date, exit 1 if not)."""
    text = reference()
    if "--check" in (sys.argv[1:] if argv is None else argv):
        if DOC.read_text() != text:
            sys.exit(f"{DOC} is out of date: run `{REGENERATE}`")
        return
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
