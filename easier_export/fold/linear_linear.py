"""Merge Linear -> Linear with nothing non-linear between them.

    W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)

Hugging Face GPT-2's ``Conv1D`` is a linear layer with its weight stored transposed, (in, out):
``y = x W + b``; :func:`linear_from_conv1d` turns it into the ``nn.Linear`` with weight Wᵀ, so the same merge
applies across a removed GPT-2 MLP activation.

Linear acts on the last dim only, so this holds for any leading dims ((B, C), ViT/Swin (B, N, C) or
(B, H, W, C)); it is exact algebra, with no border effects. Whether it is *faster* depends on the widths
(an MLP 96 -> 384 -> 96 becomes one 96 x 96 matmul; a bottleneck 512 -> 64 -> 512 grows): the planner decides.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ._common import Candidate, FoldRecord, Merge, bias64, fold_to_fixpoint, match_pair


def compose_linears(first: nn.Linear, second: nn.Linear) -> Merge:
    """One Linear equal to ``second(first(x))``, computed in float64."""
    w1, w2 = first.weight.detach().double(), second.weight.detach().double()
    merged = nn.Linear(first.in_features, second.out_features, dtype=first.weight.dtype)
    merged.weight.data.copy_(w2 @ w1)
    merged.bias.data.copy_(w2 @ bias64(first) + bias64(second))
    return Merge(merged)


def match_linear_pair(gm: GraphModule, node: Node, explain: bool = False) -> Candidate | None:
    return match_pair(gm, node, nn.Linear, "linear_linear", explain)


def build_linear_pair(cand: Candidate) -> Merge:
    return compose_linears(*cand.modules)


def fold_linear_linear(gm: GraphModule, example: Tensor) -> tuple[GraphModule, list[FoldRecord]]:
    """Merge every Linear -> Linear pair (chains merge step by step)."""
    return fold_to_fixpoint(gm, example, partial(match_linear_pair, explain=True), build_linear_pair)
