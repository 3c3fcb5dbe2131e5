"""Files out and paths in: writes are atomic (a killed run never leaves a half-written output behind) and a path
that cannot be resolved is a one-line error."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import UserError, first_line

_UMASK = os.umask(0)  # reading the umask means setting it: set it back at once, before any file is made
os.umask(_UMASK)


def resolved(path: str | Path) -> Path:
    """``Path.resolve`` with a one-line error: on a symlink loop Python raises RuntimeError (a traceback)."""
    try:
        return Path(path).resolve()
    except RuntimeError:
        raise UserError(f"{path} leads into a symlink loop") from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path`` and rename it into place. A file system that refuses
    (an immutable or read-only file, a folder of that name, a full disk) is a one-line error naming the file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        write(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or first_line(e)})") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files that killed runs (SIGKILL: no cleanup) left in ``folder`` and its subfolders' first
    level; called after a successful run, when no write of this run is in flight."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for pattern in (".*.tmp", "*/.*.tmp") for p in folder.glob(pattern) if _STALE.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


_STALE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # atomic_write's mkstemp names: .NAME.XXXXXXXX.tmp


def save_json(obj: Any, path: str | Path) -> Path:
    """JSON, atomically; paths and tensor or numpy scalars written as their values."""
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n"))


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save``, atomically: a checkpoint is whole or absent."""
    return atomic_write(path, lambda p: torch.save(obj, p))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
