"""Merge Linear -> Linear with nothing non-linear between them."""

from __future__ import annotations

import torch
from torch import nn

from ..numerics import bias64
from ..records import Merge
from ..rule import PairRule


def compose_linears(first: nn.Linear, second: nn.Linear) -> Merge:
    """One Linear equal to ``second(first(x))``, computed in float64."""
    w1, w2 = first.weight.detach().double(), second.weight.detach().double()
    merged = nn.Linear(first.in_features, second.out_features, dtype=first.weight.dtype)
    merged.weight.data.copy_(w2 @ w1)
    merged.bias.data.copy_(w2 @ bias64(first) + bias64(second))
    return Merge(merged)


class LinearLinearRule(PairRule):
    """``second(first(x))`` for two Linear::

        W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)

    Hugging Face GPT-2's ``Conv1D`` (weight stored transposed) is loaded as the ``nn.Linear`` with weight Wᵀ
    (``load.hf``), so the same merge applies across a removed GPT-2 MLP activation.

    Linear acts on the last dim only, so this holds for any leading dims ((B, C), ViT/Swin (B, N, C) or
    (B, H, W, C)); it is exact algebra, with no border effects. Whether it is *faster* depends on the widths
    (an MLP 96 -> 384 -> 96 becomes one 96 x 96 matmul; a bottleneck 512 -> 64 -> 512 grows): the planner decides.
    """

    kind = "linear_linear"
    op = nn.Linear

    def compose(self, first: nn.Module, second: nn.Module | None, in_shape: torch.Size) -> Merge:
        return compose_linears(first, second)
