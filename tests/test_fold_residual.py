"""Residual and parallel-conv adds into one conv: exact when aligned, refused with a reason otherwise."""

from __future__ import annotations

import torch
from _fold_util import ReadTwice, assert_same, count_modules, traced
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from easier_export.fold import rule

fold_conv_conv, fold_residual = rule("conv_conv").apply, rule("residual").apply


class Residual(nn.Module):
    def __init__(self, conv: nn.Conv2d, skip_first: bool = False) -> None:
        super().__init__()
        self.conv, self.skip_first = conv, skip_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.skip_first else torch.add(self.conv(x), x)


class Parallel(nn.Module):
    def __init__(self, a: nn.Conv2d, b: nn.Conv2d) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


@settings(max_examples=30, deadline=None)
@given(
    k=st.sampled_from([1, 3, 5, 7]),
    d=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 6]),
    bias=st.booleans(),
    skip_first=st.booleans(),
)
def test_identity_residual_exact(k: int, d: int, groups: int, bias: bool, skip_first: bool) -> None:
    conv = nn.Conv2d(6, 6, k, padding=d * (k - 1) // 2, dilation=d, groups=groups, bias=bias)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        gm = traced(Residual(conv, skip_first), dtype)
        x = torch.randn(2, 6, 15, 15, dtype=dtype)
        folded, [record] = fold_residual(gm, x[:1])
        assert record.applied and count_modules(folded, nn.Conv2d) == 1
        assert not any(n.op == "call_function" for n in folded.graph.nodes)
        assert_same(gm, folded, x, rtol)


def test_identity_lands_on_centre_tap() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
    folded, _ = fold_residual(traced(Residual(conv)), torch.randn(1, 4, 6, 6, dtype=torch.float64))
    (merged,) = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    delta = merged.weight.detach() - conv.weight.detach()
    assert torch.equal(delta[:, :, 1, 1], torch.eye(4, dtype=torch.float64))
    delta[:, :, 1, 1] = 0
    assert not delta.any()


@settings(max_examples=30, deadline=None)
@given(
    ka=st.sampled_from([1, 3, 5]),
    kb=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([(1, 1), (2, 1), (4, 4)]),
)
def test_parallel_convs_exact(ka: int, kb: int, stride: int, groups: tuple[int, int]) -> None:
    a = nn.Conv2d(4, 8 if groups[0] != 4 else 4, ka, stride=stride, padding=ka // 2, groups=groups[0])
    b = nn.Conv2d(4, a.out_channels, kb, stride=stride, padding=kb // 2, groups=groups[1], bias=False)
    gm = traced(Parallel(a, b))
    x = torch.randn(2, 4, 14, 14, dtype=torch.float64)
    folded, [record] = fold_residual(gm, x[:1])
    assert record.applied and count_modules(folded, nn.Conv2d) == 1
    assert_same(gm, folded, x, 1e-10)


def test_other_kernel_shapes_align_exactly() -> None:
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for a, b in (
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 2, stride=2)),  # 2x2 at offset 1 of 3x3
        (nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2)),
    ):
        gm = traced(Parallel(a, b))
        folded, [record] = fold_residual(gm, x[:1])
        assert record.applied
        assert_same(gm, folded, x, 1e-10)


def test_different_strides_are_refused() -> None:
    # 3x3 stride 2 pad 1 and 5x5 stride 1 both map 9x9 -> 5x5, but sample different pixels
    gm = traced(Parallel(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 5)))
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    folded, [record] = fold_residual(gm, x)
    assert not record.applied and "strides differ" in record.reason
    assert count_modules(folded, nn.Conv2d) == 2


def test_broadcast_skip_with_other_channel_count_is_refused() -> None:
    gm = traced(Residual(nn.Conv2d(1, 4, 3, padding=1)))
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    folded, [record] = fold_residual(gm, x[:1])
    assert not record.applied and "in == out" in record.reason
    assert_same(gm, folded, x, 0.0)


def test_residual_over_merged_chain_with_bias_map() -> None:
    """MobileNetV2-like pw -> dw -> pw + x with the activations erased: one 3x3 conv with a bias map."""
    body = nn.Sequential(nn.Conv2d(4, 12, 1), nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.Conv2d(12, 4, 1))
    for p in body.parameters():
        p.data.normal_()

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    gm = traced(Block())
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    folded, _ = fold_conv_conv(gm, x[:1])
    folded, [record] = fold_residual(folded, x[:1])
    assert record.applied and "+map" in record.detail
    assert count_modules(folded, nn.Conv2d) == 1
    assert_same(gm, folded, x, 1e-10)


def test_fanned_out_branch_is_refused_with_reason() -> None:
    gm = traced(ReadTwice())
    folded, [record] = fold_residual(gm, torch.randn(1, 4, 6, 6, dtype=torch.float64))
    assert not record.applied and record.reason == "fan-out: conv output has 2 users"
    assert count_modules(folded, nn.Conv2d) == 1
