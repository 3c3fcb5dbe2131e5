"""Terminal output: one rich console, progress bars that stay quiet on non-zero ranks and in CI logs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .dist import is_main_process

console = Console(stderr=False, highlight=False)


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callback; draws a bar on rank 0 only."""
    if not is_main_process() or not console.is_terminal:
        yield lambda: None
        return
    bar = Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def info(message: str) -> None:
    """Print once per run: under torchrun every rank executes the same code, rank 0 speaks."""
    if is_main_process():
        console.print(message)
