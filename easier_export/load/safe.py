"""Reading a PyTorch file without running its code: ``torch.load`` with ``weights_only`` unless the user trusts
the file, safetensors as well, and one-line errors that say what the file is not."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from easier_export.core.errors import UserError, first_line

_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a legacy pickle (protocol 2+)


class PickledObjects(UserError):
    """The file holds pickled Python objects, not only tensors: loading it runs code (refused without trust)."""


def _is_safetensors(head: bytes) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then the header."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` (or safetensors' loader, timm's usual format) with one-line errors that say what the file
    is not."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise UserError(f"cannot read {path}: the file is empty")
    if _is_safetensors(head):
        return _safetensors_load(path)
    if not head.startswith(_TORCH_MAGIC):
        raise UserError(f"{path} is not a PyTorch file (neither a torch.save zip archive, a pickle nor safetensors); "
                        "MODEL takes a state dict, a linearized.pt, a .pt2 archive or a pickled module")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if not trust_pickle and "Weights only load failed" in str(e) and "GLOBAL" in str(e):
            raise PickledObjects(
                f"{path} contains pickled Python objects (a whole nn.Module?), which can run arbitrary code when "
                "loaded, so files load with weights_only=True; re-run with --trust-pickle if you trust its source"
            ) from e
        raise UserError(f"cannot read {path}: not a valid PyTorch pickle ({first_line(e)})") from e
    except (ModuleNotFoundError, AttributeError) as e:  # trusted: unpickling imports the classes it names
        missing = _missing_class(path, e)
        if missing is None:
            raise UserError(f"cannot read {path}: damaged or not a PyTorch file ({type(e).__name__}: "
                            f"{first_line(e)})") from e
        raise UserError(f"{path} is a pickled module whose {missing} cannot be imported here: make its code "
                        "importable (PYTHONPATH), or save its state_dict() and pass that with --arch, or export a "
                        ".pt2 with torch.export") from e
    except Exception as e:  # a damaged archive or pickle raises RuntimeError, EOFError, KeyError, IndexError...
        raise UserError(f"cannot read {path}: damaged or not a PyTorch file ({type(e).__name__}: "
                        f"{first_line(e)})") from e


def _missing_class(path: Path, e: ModuleNotFoundError | AttributeError) -> str | None:
    """What an unpickling could not import ("class module.Name"), read from the error or, for a missing module,
    from the pickle's globals (listed without running it); None when the error is not about an import."""
    if isinstance(e, ModuleNotFoundError):
        module = e.name or "?"
        try:
            named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # a legacy (non-zip) pickle: its globals are not listed
            named = []
        classes = [n for n in named if n.startswith(f"{module}.")]
        return f"class {', '.join(classes)}" if classes else f"module {module!r}"
    found = re.match(r"Can't get attribute '([^']+)' on <module '([^']+)'", str(e))
    return f"class {found[2]}.{found[1]}" if found else None


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: damaged safetensors file ({first_line(e)})") from e
