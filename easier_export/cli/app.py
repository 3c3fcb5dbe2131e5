"""The `easier-export` command line: thin wrappers over the Python API, one-line errors, exit codes.

Exit codes: ``EXIT_CODES``, also at the end of ``easier-export --help``.

One name per concept in every command (``--fold``, ``--bench-devices``, ``--bench-batches``, ``--bench-seconds``;
``--device`` is always the training device).
"""

from __future__ import annotations

import sys
import typing
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from easier_export.core.console import console
from easier_export.core.errors import EXIT_INTERRUPTED, EXIT_USAGE, Interrupted, UserError, VerificationError
from easier_export.core.signals import sigterm_as_interrupt

from .loop_commands import compress, demo, entropy, linearize
from .ship_commands import bench, export, fold

HELP = "Make trained networks shallower (EASIER) and ship them as verified, fast ONNX."
EXIT_CODES = ("Exit codes: 0 ok, 2 usage or bad input, 3 ONNX verification failed, 130 interrupted (Ctrl-C), 143 "
              "terminated (SIGTERM); both keep the state and remove temp files.")
COMMANDS = (compress, entropy, linearize, fold, export, bench, demo)  # in --help's order


class _Flags:
    """--help shown as the flag it is (no type), as every other flag."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Command(_Flags, TyperCommand):
    """A command whose --help shows no type."""


class Group(_Flags, TyperGroup):
    """The command group, whose --help shows no type."""


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False, help=HELP,
                  epilog=EXIT_CODES)
for command in COMMANDS:
    app.command(cls=Command)(command)


def _version(value: bool) -> None:
    if value:
        from easier_export import __version__

        console.print(f"easier-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version, metavar="",
                                                show_default=False, help="print the version and exit")] = False
          ) -> None:
    """The command group: its help is ``HELP``."""


def _usage_line(e: typer.TyperException) -> str:
    """The parser's message on one line, with where to look for help."""
    ctx = getattr(e, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "easier-export --help"
    message = _option_elsewhere(e, ctx) or e.format_message()
    return f"{' '.join(message.split())} (see '{where}')"


def _option_elsewhere(e: typer.TyperException, ctx: Any) -> str | None:
    """An unknown option that other commands take (``fold --data``): say which, instead of the parser's guesses at
    a similar spelling (``--atol``)."""
    name = getattr(e, "option_name", None)
    group = ctx.find_root().command if ctx is not None else None
    if name is None or not hasattr(group, "commands"):
        return None
    takers = sorted(cmd for cmd, command in group.commands.items()
                    if any(name in param.opts for param in command.params))
    if not takers:
        return None
    return f"{ctx.info_name} takes no {name} ({', '.join(takers)} {'take' if len(takers) > 1 else 'takes'} it)"


def main(argv: list[str] | None = None) -> None:
    """Maps errors to exit codes with one line, never a traceback; SIGTERM is handled as Ctrl-C is."""
    command = typer.main.get_command(app)
    with sigterm_as_interrupt() as received:
        try:
            code = command.main(args=argv, prog_name="easier-export", standalone_mode=False)
        except typer.TyperException as e:  # the parser's errors (typer's own click): bad option, value, argument
            _exit(f"[red]error:[/] {escape(_usage_line(e))}", EXIT_USAGE)
        except typer.Abort:  # end of input at a prompt
            code = EXIT_INTERRUPTED
        except (UserError, VerificationError) as e:
            _exit(f"[red]error:[/] {escape(str(e))}", e.exit_code)
        except Interrupted as e:
            _exit(f"[yellow]{escape(str(e))}[/]", e.exit_code)
    if code == EXIT_INTERRUPTED:  # Ctrl-C or SIGTERM outside a resumable loop (click turns both into this code)
        stopped = Interrupted(None, terminated=bool(received))
        _exit(f"[yellow]{escape(str(stopped))}[/]", stopped.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)


def _exit(line: str, code: int) -> typing.NoReturn:
    console.print(line, soft_wrap=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
