"""Merge two GCN convolutions once the ReLU between them is gone.

Layer 1: ``Y = Â^h1 X W1 + B1 + 1 b1ᵀ`` (B1: per-node bias, zero for a plain layer); layer 2 on Y:

    Â^h2 Y W2 + B2 + 1 b2ᵀ = Â^(h1+h2) X (W1 W2) + [Â^h2 (B1 + 1 b1ᵀ) W2 + B2] + 1 b2ᵀ

because the propagation Â (left) and the feature transforms W (right) commute. The merged layer propagates the
narrow output of one F x C transform twice instead of transforming F -> H, propagating H-wide, then H -> C: fewer
multiply-adds whenever C < H. Â1 is not 1 under symmetric normalization, so b1 becomes a per-node bias
(an N x C buffer), computed in float64; nothing is approximated.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from easier_export.load.arch.gcn import GCN, GCNConv


def merge_reason(model: GCN, gap: int) -> str:
    """Why the convolutions on either side of ``acts[gap]`` cannot merge ('' when they can)."""
    if not 0 <= gap < len(model.acts):
        return f"no activation gap {gap} (the model has {len(model.acts)})"
    if not isinstance(model.acts[gap], nn.Identity):
        return f"acts.{gap} is still a {type(model.acts[gap]).__name__}: only a removed activation is linear"
    first, second = model.convs[gap], model.convs[gap + 1]
    if not torch.equal(first.adj, second.adj):
        return "the two layers propagate over different graphs"
    return ""


def merge_convs(first: GCNConv, second: GCNConv) -> GCNConv:
    """One GCNConv equal to ``second(first(x))`` (no activation between), built in float64."""
    adj = first.adj.double()
    w1, w2 = first.lin.weight.detach().double().t(), second.lin.weight.detach().double().t()  # (in, out)
    nodes = adj.shape[0]
    bias1 = torch.zeros(nodes, w1.shape[1], dtype=torch.float64)
    if first.has_node_bias:
        bias1 = bias1 + first.node_bias.double()
    if first.lin.bias is not None:
        bias1 = bias1 + first.lin.bias.detach().double()
    carried = bias1 @ w2
    for _ in range(second.hops):
        carried = adj @ carried
    if second.has_node_bias:
        carried = carried + second.node_bias.double()
    dtype = first.lin.weight.dtype
    linear = nn.Linear(w1.shape[0], w2.shape[1], bias=second.lin.bias is not None, dtype=dtype)
    linear.weight.data.copy_((w1 @ w2).t())
    if second.lin.bias is not None:
        linear.bias.data.copy_(second.lin.bias.detach())
    return GCNConv(first.adj, linear, first.hops + second.hops, carried.to(dtype))


def fold_gcn(model: GCN) -> tuple[GCN, list[str]]:
    """A copy of ``model`` with every pair of convolutions around a removed ReLU merged (chains merge in turn);
    returns it and why each other gap (numbered in the merged model) was refused."""
    model = copy.deepcopy(model).eval()
    refused = []
    gap = 0
    while gap < len(model.acts):
        reason = merge_reason(model, gap)
        if reason:
            refused.append(f"gap {gap}: {reason}")
            gap += 1
            continue
        merged = merge_convs(model.convs[gap], model.convs[gap + 1])
        model.convs = nn.ModuleList([*model.convs[:gap], merged, *model.convs[gap + 2:]])
        model.acts = nn.ModuleList([*model.acts[:gap], *model.acts[gap + 1:]])
    return model, refused
