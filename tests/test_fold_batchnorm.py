"""BatchNorm into conv/linear and LayerNorm affine into Linear: exact, refused where the algebra breaks."""

from __future__ import annotations

import torch
from _fold_util import assert_same, count_modules, randomize_batchnorms, traced
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from easier_export.fold import BiasMapConv2d, rule
from easier_export.fold.rules.batchnorm import batchnorm_scale_shift, fold_into

fold_batchnorm = rule("batchnorm").apply
fold_layernorm_affine = rule("layernorm_affine").apply


@settings(max_examples=30, deadline=None)
@given(
    k=st.sampled_from([1, 3, 5, 7]),
    stride=st.sampled_from([1, 2]),
    dw=st.booleans(),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv_bn_fold_exact(k: int, stride: int, dw: bool, bias: bool, affine: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(4, 4 if dw else 6, k, stride=stride, padding=k // 2, groups=4 if dw else 1, bias=bias)
    model = randomize_batchnorms(nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels, affine=affine)), gen)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        gm = traced(model, dtype)
        x = torch.randn(3, 4, 11, 11, dtype=dtype, generator=gen)
        folded, [record] = fold_batchnorm(gm, x[:1])
        assert record.applied and count_modules(folded, nn.BatchNorm2d) == 0
        assert_same(gm, folded, x, rtol)


@settings(max_examples=25, deadline=None)
@given(bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_and_conv1d_bn1d_fold_exact(bias: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for model, shape in (
        (nn.Sequential(nn.Linear(5, 7, bias=bias), nn.BatchNorm1d(7)), (4, 5)),
        (nn.Sequential(nn.Conv1d(3, 6, 3, bias=bias), nn.BatchNorm1d(6)), (4, 3, 9)),
    ):
        gm = traced(randomize_batchnorms(model, gen))
        x = torch.randn(shape, dtype=torch.float64, generator=gen)
        folded, [record] = fold_batchnorm(gm, x[:1])
        assert record.applied
        assert_same(gm, folded, x, 1e-10)


def test_bn1d_after_3d_linear_is_refused() -> None:
    gm = traced(randomize_batchnorms(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(4))))
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    folded, [record] = fold_batchnorm(gm, x)
    assert not record.applied and "dim 1" in record.reason
    assert_same(gm, folded, x, 0.0)


def test_bn_after_shared_conv_output_is_refused() -> None:
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    gm = traced(randomize_batchnorms(Fork()))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    folded, [record] = fold_batchnorm(gm, x[:1])
    assert not record.applied and "other users" in record.reason
    assert_same(gm, folded, x, 0.0)


def test_training_bn_is_refused() -> None:
    gm = traced(randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))))
    gm.get_submodule("1").train()
    _, [record] = fold_batchnorm(gm, torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert not record.applied and "batch statistics" in record.reason


def test_bn_scales_a_bias_map() -> None:
    bias_map = torch.randn(4, 6, 6, dtype=torch.float64)
    conv = BiasMapConv2d(3, 4, 3, padding=1, bias_map=bias_map, dtype=torch.float64)
    bn = randomize_batchnorms(nn.BatchNorm2d(4)).double().eval()
    folded = fold_into(conv, *batchnorm_scale_shift(bn))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(folded(x), bn(conv(x)), rtol=0, atol=1e-12)


class LNBlock(nn.Module):
    def __init__(self, to_linear_only: bool) -> None:
        super().__init__()
        self.norm, self.fc_a, self.fc_b = nn.LayerNorm(8), nn.Linear(8, 5), nn.Linear(8, 3, bias=False)
        self.to_linear_only = to_linear_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        out = self.fc_a(y).sum(-1) + self.fc_b(y).sum(-1)
        return out if self.to_linear_only else out + y.sum(-1)


def test_layernorm_affine_into_linears_exact() -> None:
    block = LNBlock(to_linear_only=True)
    block.norm.weight.data.normal_(1, 0.5)
    block.norm.bias.data.normal_(0, 0.5)
    gm = traced(block)
    folded, [record] = fold_layernorm_affine(gm)
    assert record.applied and folded.norm.weight is None
    assert_same(gm, folded, torch.randn(2, 6, 8, dtype=torch.float64), 1e-10)


def test_layernorm_with_non_linear_user_is_refused() -> None:
    gm = traced(LNBlock(to_linear_only=False))
    folded, [record] = fold_layernorm_affine(gm)
    assert not record.applied and "not only private Linears" in record.reason
    assert folded.norm.weight is not None
