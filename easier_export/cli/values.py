"""Option values the parser takes as text (comma lists, sizes, devices), read with one-line usage errors."""

from __future__ import annotations

from easier_export.core.errors import UserError
from easier_export.core.ort import DEVICES, cuda_usable


def floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """``--what`` as comma-separated numbers (``None`` when not given)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{what} takes comma-separated numbers, got '{text}'") from None


def ints(text: str, what: str) -> tuple[int, ...]:
    """``--what`` as comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--{what} takes comma-separated integers, got '{text}'") from None
    if min(values) < 1:
        raise UserError(f"--{what} takes positive integers, got '{text}'")
    return values


def size(text: str | None) -> tuple[int, ...] | None:
    """``H``, ``HxW`` or ``CxHxW`` (timm's input_size is (C, H, W))."""
    if text is None:
        return None
    try:
        parts = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        parts = ()
    if not 1 <= len(parts) <= 3 or min(parts) < 1:
        raise UserError(f"--input-size takes H, HxW or CxHxW with positive integers, got '{text}'")
    return parts * 2 if len(parts) == 1 else parts


def usable(devices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """A CUDA request without a usable GPU is a usage error everywhere (no silently empty result)."""
    unknown = sorted(set(devices) - set(DEVICES))
    if unknown:
        raise UserError(f"--{what} takes {','.join(DEVICES)}, not {','.join(unknown)}")
    if "cuda" in devices and not cuda_usable():
        raise UserError(f"--{what} cuda needs a usable GPU (torch.cuda and onnxruntime's CUDA provider)")
    return devices


def target(name: str) -> str:
    """``--target``, usable here."""
    return usable((name,), "target")[0]


def bench_devices(text: str) -> tuple[str, ...]:
    """``--bench-devices``, each usable here."""
    return usable(tuple(d.strip() for d in text.split(",")), "bench-devices")
