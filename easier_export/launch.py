"""The console entry point, kept light: Ctrl-C and SIGTERM are handled before the seconds of heavy imports (torch,
onnxruntime, transformers), so an early interrupt ends with one line, not a traceback."""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator

from .errors import Interrupted, Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread; yields the list
    of signals received, so that code which only sees the interrupt can tell SIGTERM from Ctrl-C."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """``easier-export``: the command line, imported only once SIGTERM is handled."""
    with sigterm_as_interrupt() as received:
        try:
            cli = importlib.import_module("easier_export.cli")
        except KeyboardInterrupt:
            stopped = Interrupted(None, terminated=bool(received))
            print(stopped, flush=True)
            sys.exit(stopped.exit_code)
        cli.main(argv)
