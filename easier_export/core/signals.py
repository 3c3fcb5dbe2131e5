"""SIGTERM turned into an interrupt, so that a stopped run ends with one line; torch-free, because the console
entry point sets it up before the heavy imports."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from .errors import Terminated


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
