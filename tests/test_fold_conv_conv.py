"""conv -> conv merge: exact in float64 whenever applied, refused at padding borders, bias maps exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _fold_util import Fork, assert_same, count_modules, traced
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from easier_export.fold import PADDING_REASON, BiasMapConv2d, rule
from easier_export.fold.rules.conv_conv import compose_convs, compose_weights

fold_conv_conv = rule("conv_conv").apply


@st.composite
def conv_specs(draw: st.DrawFn, in_ch: int) -> dict:
    k = draw(st.sampled_from([1, 3, 5, 7]))
    d = draw(st.sampled_from([1, 2])) if k > 1 else 1
    out_ch = draw(st.sampled_from([2, 4, 6]))
    groups = draw(st.sampled_from(["1", "2", "dw"]))
    if groups == "dw":
        out_ch, g = in_ch, in_ch
    else:
        g = int(groups) if in_ch % int(groups) == 0 and out_ch % int(groups) == 0 else 1
    pad = draw(st.sampled_from([0, d * (k - 1) // 2]))
    return dict(in_channels=in_ch, out_channels=out_ch, kernel_size=k, stride=draw(st.sampled_from([1, 2])),
                padding=pad, dilation=d, groups=g, bias=draw(st.booleans()))


@st.composite
def conv_pairs(draw: st.DrawFn) -> tuple[dict, dict, int]:
    first = draw(conv_specs(draw(st.sampled_from([2, 4]))))
    second = draw(conv_specs(first["out_channels"]))
    return first, second, draw(st.integers(37, 41))  # room for 13x13 (k7 d2) at stride 2


def _pair(first: dict, second: dict) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(**first), nn.Conv2d(**second))
    for p in model.parameters():
        p.data.normal_()
    return model


def _weight_part_exact(first: dict, second: dict) -> bool:
    """The zero padding between the convs hides no real pixel: first conv is pointwise, or second unpadded."""
    pointwise = first["kernel_size"] == 1 and first["stride"] == 1 and first["padding"] == 0
    return pointwise or second["padding"] == 0


@settings(max_examples=40, deadline=None)
@given(conv_pairs())
def test_applied_merges_are_exact_in_float64(spec: tuple[dict, dict, int]) -> None:
    first, second, size = spec
    gm = traced(_pair(first, second))
    x = torch.randn(3, first["in_channels"], size, size, dtype=torch.float64)
    folded, [record] = fold_conv_conv(gm, x[:1])
    if record.applied:
        assert count_modules(folded, nn.Conv2d) == 1
        assert_same(gm, folded, x, 1e-10)
    else:
        assert record.reason == PADDING_REASON
        assert count_modules(folded, nn.Conv2d) == 2
    assert record.applied or not _weight_part_exact(first, second)


@settings(max_examples=25, deadline=None)
@given(conv_pairs())
def test_float32_merge_within_1e4_of_output_scale(spec: tuple[dict, dict, int]) -> None:
    first, second, size = spec
    gm = traced(_pair(first, second), torch.float32)
    x = torch.randn(2, first["in_channels"], size, size)
    folded, _ = fold_conv_conv(gm, x[:1])
    assert_same(gm, folded, x, 1e-4)
    assert next(folded.parameters()).dtype == torch.float32


def test_depthwise_pair_stays_depthwise() -> None:
    gm = traced(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=8, stride=2)))
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    folded, [record] = fold_conv_conv(gm, x[:1])
    (conv,) = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert record.applied and conv.groups == 8 and conv.kernel_size == (5, 5) and conv.stride == (2, 2)
    assert_same(gm, folded, x, 1e-10)


def test_padding_border_case_is_refused_and_naive_merge_differs() -> None:
    torch.manual_seed(0)
    a, b = nn.Conv2d(4, 6, 3, padding=1).double(), nn.Conv2d(6, 5, 3, padding=1).double()
    gm = traced(nn.Sequential(a, b))
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    folded, [record] = fold_conv_conv(gm, x[:1])
    assert not record.applied and record.reason == PADDING_REASON
    assert count_modules(folded, nn.Conv2d) == 2
    # the naive merge: composed kernel, padding s1*P2 + P1 = 2, constant part f(0) as a bias map
    naive_w = compose_weights(a.weight.detach(), b.weight.detach(), 1, (1, 1))
    const = gm(torch.zeros_like(x[:1]))
    naive = F.conv2d(x, naive_w, padding=2) + const
    assert (naive - gm(x)).abs().max() > 1e-3 * gm(x).abs().max()
    interior = (naive - gm(x))[..., 2:-2, 2:-2]
    assert interior.abs().max() < 1e-10 * gm(x).abs().max()  # only the border differs


def test_pointwise_then_padded_conv_with_bias_is_exact_by_bias_map() -> None:
    torch.manual_seed(1)
    a, b = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 5, 3, padding=1)
    a.bias.data.normal_(0, 2)
    gm = traced(nn.Sequential(a, b))
    x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
    folded, [record] = fold_conv_conv(gm, x[:1])
    (conv,) = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert record.applied and isinstance(conv, BiasMapConv2d)
    assert conv.bias_map.shape == (5, 10, 10)
    assert (conv.bias_map - conv.bias_map[:, 5:6, 5:6]).abs().max() > 1e-3  # border bias really differs
    assert_same(gm, folded, x, 1e-10)
    assert_same(gm, folded, torch.randn(5, 4, 10, 10, dtype=torch.float64), 1e-10)  # any batch


def test_chain_of_three_merges_step_by_step_and_input_untouched() -> None:
    pw, dw = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 12, 3, padding=1, groups=12)
    gm = traced(nn.Sequential(pw, dw, nn.Conv2d(12, 5, 1)))
    before = gm.code
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    folded, records = fold_conv_conv(gm, x[:1])
    assert [r.applied for r in records] == [True, True]
    assert count_modules(folded, nn.Conv2d) == 1 and count_modules(gm, nn.Conv2d) == 3
    assert gm.code == before
    assert_same(gm, folded, x, 1e-10)


def test_shared_intermediate_is_not_merged() -> None:
    gm = traced(Fork())
    folded, records = fold_conv_conv(gm, torch.randn(1, 3, 5, 5, dtype=torch.float64))
    assert [(r.nodes, r.applied, r.reason) for r in records] == [(["a", "b"], False, "fan-out: a output has 2 users")]
    assert count_modules(folded, nn.Conv2d) == 2


def test_shared_module_is_refused_with_reason() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.b(x)))

    gm = traced(Twice())
    folded, records = fold_conv_conv(gm, torch.randn(1, 3, 5, 5, dtype=torch.float64))
    assert records and all(not r.applied and r.reason == "module b is shared: called at 2 sites" for r in records)
    assert count_modules(folded, nn.Conv2d) == count_modules(gm, nn.Conv2d)


def test_compose_refuses_non_zero_padding_mode() -> None:
    a = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
    merge = compose_convs(a, nn.Conv2d(2, 2, 1), torch.Size([1, 2, 8, 8]))
    assert not merge.ok and "reflect" in merge.reason
