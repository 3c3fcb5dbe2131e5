"""The console entry point, kept light: Ctrl-C and SIGTERM are handled before the seconds of heavy imports (torch,
onnxruntime, transformers), so an early interrupt ends with one line, not a traceback."""

from __future__ import annotations

import importlib
import sys

from easier_export.core.errors import Interrupted
from easier_export.core.signals import sigterm_as_interrupt


def main(argv: list[str] | None = None) -> None:
    """``easier-export``: the command line, imported only once SIGTERM is handled."""
    with sigterm_as_interrupt() as received:
        try:
            cli = importlib.import_module("easier_export.cli.app")
        except KeyboardInterrupt:
            stopped = Interrupted(None, terminated=bool(received))
            print(stopped, flush=True)
            sys.exit(stopped.exit_code)
        cli.main(argv)
