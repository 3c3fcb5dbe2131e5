"""Helpers for the fold tests: erase activations the way the EASIER stage does, count ops, compare outputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule

from easier_export.fold.segments import SegmentSpec

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish)


def activation_nodes(gm: GraphModule) -> list:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ACTIVATIONS)]


def erase_activations(gm: GraphModule, names: list[str]) -> GraphModule:
    """Erase the named activation nodes in place: users rewired to the activation's input."""
    for n in list(gm.graph.nodes):
        if n.name in names:
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    gm.recompile()
    return gm


def count_modules(gm: GraphModule, kind: type[nn.Module]) -> int:
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def traced(module: nn.Module, dtype: torch.dtype = torch.float64) -> GraphModule:
    return torch.fx.symbolic_trace(module.to(dtype).eval())


def assert_same(gm: GraphModule, folded: GraphModule, x: torch.Tensor, rtol: float) -> float:
    """Folded equals unfolded to ``rtol`` of the output scale; returns the relative error."""
    with torch.no_grad():
        err = rel_err(folded(x), gm(x))
    assert err <= rtol, err
    return err


def randomize_batchnorms(model: nn.Module, gen: torch.Generator | None = None) -> nn.Module:
    """Non-trivial running statistics and affine, so a wrong BN fold shows."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=gen) * 0.5)
    return model


class Fork(nn.Module):
    """conv a feeds conv b and, past it, the output too: a fan-out no merge may rewrite."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) * y


class WeightCountTable:
    """Deterministic stand-in for measured latency: cost = weights + 1 per op (a dispatch), no noise."""

    def times(self, spec: SegmentSpec, merged: nn.Module) -> tuple[float, float, float]:
        ops = [*spec.ops, *([spec.skip] if spec.skip is not None else [])]
        before = sum(m.weight.numel() + 1 for m in ops) + spec.add
        return float(before), float(merged.weight.numel() + 1), 0.0

    def save(self) -> None:
        pass


class ReadTwice(nn.Module):
    """``conv(x) + x`` whose conv output is also read past the add: a fan-out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return (y + x) * y
