import math

import pytest
import torch
from torch import nn

from easier_export.loop.entropy import binary_entropy, measure
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


def test_binary_entropy_values():
    h = binary_entropy(torch.tensor([0.0, 1.0, 0.5, 0.25]))
    expected = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert h.tolist() == pytest.approx([0.0, 0.0, 1.0, expected])


class Shift(nn.Module):
    """x -> relu(x + b): b sets how often each channel is ON."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(len(bias), len(bias), 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(len(bias)).view(len(bias), len(bias), 1, 1))
            self.conv.bias.copy_(bias)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


def _stats(model, x):
    gm = trace(model)
    return measure(gm, find_call_sites(gm), [(x, None)], torch.device("cpu"), train_mode=False)


def test_always_on_is_zero_entropy_and_balanced_is_one():
    x = torch.rand(4, 2, 8, 8)  # in [0, 1)
    stats = _stats(Shift(torch.tensor([1.0, -2.0])), x)["act"]  # channel 0 always ON, channel 1 always OFF
    assert stats.p_on.tolist() == [1.0, 0.0]
    assert stats.entropy == 0.0
    half = torch.cat([torch.ones(2, 2, 4, 8), -torch.ones(2, 2, 4, 8)], dim=2)  # half the positions ON
    stats = _stats(Shift(torch.zeros(2)), half)["act"]
    assert stats.p_on.tolist() == [0.5, 0.5]
    assert stats.entropy == pytest.approx(1.0)


def test_layer_score_is_mean_over_channels():
    x = torch.cat([torch.ones(1, 2, 2, 2), -torch.ones(1, 2, 2, 2)], dim=3)  # 50 % ON everywhere
    stats = _stats(Shift(torch.tensor([0.0, 5.0])), x)["act"]  # ch0 balanced (H=1), ch1 always ON (H=0)
    assert stats.entropy == pytest.approx(0.5)


def test_tokens_use_last_dim_as_units():
    model = nn.Sequential(nn.Linear(3, 3), nn.GELU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.copy_(torch.tensor([10.0, -10.0, 0.0]))
    x = torch.cat([torch.ones(2, 5, 3), -torch.ones(2, 5, 3)], dim=1)  # (B, N, C) tokens, half negative
    (stats,) = _stats(model, x).values()
    assert stats.units == 3
    assert stats.p_on.tolist() == [1.0, 0.0, 0.5]


def test_train_mode_measurement_leaves_batchnorm_stats_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    gm = trace(model)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    measure(gm, find_call_sites(gm), [(torch.randn(2, 3, 8, 8), None)], torch.device("cpu"), train_mode=True)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
