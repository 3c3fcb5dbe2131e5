"""The one table of rectifiers: which modules, functions and methods run one, and of which kind.

Tracing reads it to find call sites in an fx graph; the model statistics read :data:`EAGER_RECTIFIERS` to count
the rectifiers one eager forward runs; the rectifier ablation builds a fresh module of a kind from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RECTIFIER_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.SiLU: "silu",
    nn.Hardswish: "hardswish",
}
MODULE_OF_KIND: dict[str, type[nn.Module]] = {kind: cls for cls, kind in RECTIFIER_MODULES.items()}
ALL_RECTIFIERS = frozenset(RECTIFIER_MODULES.values())

FUNCTIONAL_RECTIFIERS: dict[object, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6",
    F.leaky_relu: "leaky_relu", F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish",
}
_aten = torch.ops.aten
ATEN_RECTIFIERS: dict[object, str] = {
    _aten.relu.default: "relu", _aten.relu_.default: "relu", _aten.gelu.default: "gelu",
    _aten.silu.default: "silu", _aten.silu_.default: "silu", _aten.leaky_relu.default: "leaky_relu",
    _aten.hardtanh.default: "relu6", _aten.hardswish.default: "hardswish",
}
RECTIFIER_FUNCTIONS: dict[object, str] = {**FUNCTIONAL_RECTIFIERS, **ATEN_RECTIFIERS}
RECTIFIER_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu"}

EAGER_RECTIFIERS: frozenset[object] = frozenset([
    *FUNCTIONAL_RECTIFIERS, *(getattr(torch.Tensor, m) for m in RECTIFIER_METHODS),
    F.hardtanh, F.hardtanh_, F.leaky_relu_,
])
"""What a rectifier calls at the torch-function level of an eager forward (a ``TorchFunctionMode`` sees these):
the functional forms, the Tensor methods, and ``F.hardtanh``, which ``nn.ReLU6`` runs as."""
