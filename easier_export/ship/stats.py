"""Per-sample size and cost of a model, counted from one forward pass: what the report compares before and
after compression."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from easier_export.trace.rectifiers import EAGER_RECTIFIERS

from .export import eval_copy

_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONV_TRANSPOSE = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_LINEAR = {F.linear}


class _StatsMode(TorchFunctionMode):
    """Sees every torch-level call of one forward: counts MACs and rectifiers, and tags each tensor with the
    longest conv/linear chain that produced it (functional ops, residual adds and reshapes included)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.macs = 0
        self.activations = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        depth = max((self.depth.get(t, 0) for t in _tensors((args, kwargs))), default=0)
        if func in _CONV or func in _CONV_TRANSPOSE or func in _LINEAR:
            depth += 1
            self.macs += _macs(func, args, kwargs, out)
        elif func in EAGER_RECTIFIERS:
            self.activations += 1
        for t in _tensors(out):
            self.depth[t] = depth
        return out


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _macs(func: Callable, args: tuple, kwargs: dict, out: Tensor) -> int:
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    if func in _LINEAR:
        return out.numel() * weight.shape[-1]
    # conv weight: (out, in/groups, *k), each output element takes in/groups * prod(k) MACs;
    # transposed conv weight: (in, out/groups, *k), each *input* element scatters that many.
    per_element = math.prod(weight.shape[1:])
    return (x if func in _CONV_TRANSPOSE else out).numel() * per_element


def model_stats(model: nn.Module, example: Tensor) -> dict:
    """Per-sample size and cost of ``model`` at ``example``'s input size.

    - ``params``: parameter count.
    - ``flops``: 2 x the multiply-accumulates of conv and linear ops (attention matmuls are not counted).
    - ``conv_linear_depth``: the longest chain of conv/linear ops on any path from input to output.
    - ``activations``: rectifier calls executed (ReLU, ReLU6, GELU, SiLU, LeakyReLU, Hardswish).
    """
    model = eval_copy(model, example.device)
    mode = _StatsMode()
    with torch.no_grad(), mode:
        out = model(example)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "flops": 2 * mode.macs // max(example.shape[0], 1),
        "conv_linear_depth": max((mode.depth.get(t, 0) for t in _tensors(out)), default=0),
        "activations": mode.activations,
    }
