"""One process or many under torchrun: which device this rank uses, whether it speaks for the run."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU if there is one (this rank's GPU under torchrun), else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", dist.get_rank() % torch.cuda.device_count() if is_distributed() else 0)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device '{name}' (use auto, cpu or cuda[:N])") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here (use auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def is_distributed() -> bool:
    """Under torchrun with its process group up (not merely launched by it)."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0
