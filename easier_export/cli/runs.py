"""A command's run around its work: the output folder (no empty one left by bad input, no temp files left by a
good run), resuming after Ctrl-C or SIGTERM, and torch.distributed under torchrun."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from easier_export.core.errors import Interrupted, Terminated, UserError
from easier_export.loop.saved_rounds import rounds_kept
from easier_export.loop.state import STATE_FILE


@contextlib.contextmanager
def no_empty_out(out: Path) -> Iterator[None]:
    """Bad input found once ``out`` was made (an unknown --device, no activation of --rectifiers, an untraceable
    model) leaves no empty ``out`` behind."""
    existed = out.exists()
    try:
        yield
    except UserError:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


@contextlib.contextmanager
def resumable(out: Path) -> Iterator[None]:
    """Ctrl-C or SIGTERM in a resumable command: exit 130 or 143 saying how many rounds ``out``'s state file
    keeps. A state file that cannot be read is refused before any work."""
    if rounds_kept(out) is None:
        raise UserError(f"{out / STATE_FILE} is unreadable; delete it to start over")
    try:
        yield
    except KeyboardInterrupt as e:
        raise Interrupted(rounds_kept(out), isinstance(e, Terminated)) from None


def tidy(out: Path) -> None:
    """A successful run leaves no temp files behind, also none of an earlier run killed without cleanup."""
    from easier_export.core.dist import is_main_process
    from easier_export.core.io import remove_stale_temps

    if is_main_process():
        remove_stale_temps(out)


@contextlib.contextmanager
def distributed(device: str) -> Iterator[None]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE set), tear it down after."""
    import torch
    import torch.distributed as dist

    owner = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if owner:
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    try:
        yield
    finally:
        if owner:
            dist.destroy_process_group()
