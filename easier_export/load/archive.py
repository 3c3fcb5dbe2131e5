"""Inspect a ``torch.export`` archive (.pt2) *before* loading it: refuse anything that would run code.

``torch.export.load`` unpickles with ``weights_only=False`` every weight or constant that the archive's payload
config marks ``use_pickle``, unpickles "opaque" and torchbind constants, falls back to an unsafe load for sample
inputs and legacy weight files that a safe load rejects, and loads AOTInductor shared libraries. A file from
elsewhere can therefore run arbitrary code when opened. This module reads only the zip directory, the JSON
configs and (with ``weights_only=True``) the sample inputs, and says which entry would execute code.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import torch

from easier_export.core.errors import UserError, first_line

# Entries a plain ``torch.export.save`` writes, relative to the archive's root folder. Anything else is refused
# without trust: the loader gives legacy, AOTInductor and ExecuTorch entries code-running paths.
_SAFE = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/[^/]+\.json|data/weights/[^/]+_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/[^/]+_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/[^/]+\.pt|extra/.*)"
)


def pickled_entries(path: Path) -> list[str]:
    """Entries of the archive at ``path`` that loading it would unpickle or execute (empty for a plain export).

    Raises UserError when the file is not a readable zip archive.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            roots = {n.split("/", 1)[0] for n in names}
            if len(roots) != 1 or any("/" not in n for n in names):
                return ["<archive layout: not written by torch.export.save>"]
            root = roots.pop() + "/"
            found = [n[len(root):] for n in names if not _SAFE.fullmatch(n[len(root):])]
            for name in names:
                rel = name[len(root):]
                if rel.endswith(("_weights_config.json", "_constants_config.json")):
                    found += [f"{rel}: {key}" for key in _pickled_payloads(zf.read(name), rel)]
                elif rel.startswith("data/sample_inputs/") and not _loads_safely(zf.read(name)):
                    found.append(rel)
            return found
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path} is not a torch.export archive (.pt2 is a zip file): {first_line(e)}") from None


def _pickled_payloads(raw: bytes, name: str) -> list[str]:
    """Keys whose payload the loader would unpickle: ``use_pickle`` or a non-tensor constant file."""
    try:
        config = json.loads(raw)["config"]
        return [key for key, meta in config.items()
                if meta.get("use_pickle") or not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name")))]
    except (ValueError, KeyError, TypeError, AttributeError):
        return [f"<unreadable {name}>"]


def _loads_safely(raw: bytes) -> bool:
    """Sample inputs: the loader retries a failed safe load unsafely, so only a safe load may succeed here."""
    try:
        torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError):
        return False
    return True


def check_archive(path: Path, trust_pickle: bool) -> None:
    """Refuse (exit 2, naming --trust-pickle) an archive that would run code when loaded, unless trusted."""
    if trust_pickle:
        return
    found = pickled_entries(path)
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(f"{path} holds pickled or executable entries ({shown}), which can run arbitrary code when "
                        "loaded; re-run with --trust-pickle if you trust its source")
