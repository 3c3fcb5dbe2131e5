"""Fold normalisation affines into the adjacent linear op.

BatchNorm after a conv / linear (eval mode, running statistics)::

    y = W x + b,   BN(y) = gamma (y - mu) / sqrt(var + eps) + beta = s y + (beta - s mu),   s = gamma / std
    =>  W' = s[:, None...] W,   b' = s (b - mu) + beta   (a bias map M becomes s M)

LayerNorm affine before the Linear(s) that solely consume it::

    LN(x) = n(x) * g + beta,   W LN(x) + b = (W diag g) n(x) + (W beta + b)

so the LayerNorm keeps only its normalisation (``elementwise_affine=False``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ._common import (
    BiasMapConv2d,
    FoldRecord,
    bias64,
    calls_to,
    describe,
    finish,
    fresh_copy,
    module_of,
    private_module,
    propagate_shapes,
    replace_subgraph,
    shape_of,
    single_input,
    sole_user,
)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV = (nn.Conv1d, nn.Conv2d)


def batchnorm_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """float64 (s, t) with BN(y) = s * y + t per channel."""
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(std)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - scale * bn.running_mean.double()


def batchnorm_reason(gm: GraphModule, bn_node: Node) -> str:
    """Why the BatchNorm node cannot be folded into its producer, or ""."""
    bn = module_of(gm, bn_node)
    if bn.training or bn.running_mean is None:
        return "BatchNorm uses batch statistics (training mode or no running stats)"
    src = single_input(bn_node)
    producer = private_module(gm, src, (*_CONV, nn.Linear)) if src is not None else None
    if producer is None:
        return "input is not a private conv/linear"
    if sole_user(src) is not bn_node:
        return f"{src.name} output has other users"
    if isinstance(producer, _CONV) and producer.out_channels != bn.num_features:
        return "channel count mismatch"
    if isinstance(producer, nn.Linear) and (len(shape_of(src) or ()) != 2):
        return "BatchNorm1d on a >2-D Linear output normalises dim 1, not the out features"
    return ""


def fold_into(producer: nn.Module, scale: Tensor, shift: Tensor) -> nn.Module:
    """``scale * producer(x) + shift`` (per output channel) as a copy of the producer with new parameters."""
    out = copy.deepcopy(producer)
    w = producer.weight.detach().double()
    out.weight = nn.Parameter((w * scale.view(-1, *[1] * (w.dim() - 1))).to(producer.weight.dtype))
    out.bias = nn.Parameter((scale * bias64(producer) + shift).to(producer.weight.dtype))
    if isinstance(producer, BiasMapConv2d):
        out.bias_map = (producer.bias_map.double() * scale.view(-1, 1, 1)).to(producer.bias_map.dtype)
    return out


def fold_batchnorm(gm: GraphModule, example: Tensor) -> tuple[GraphModule, list[FoldRecord]]:
    """Fold every eval-mode BatchNorm into the conv/linear that solely feeds it."""
    gm = fresh_copy(gm)
    propagate_shapes(gm, example)
    records = []
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, _BN):
            continue
        reason = batchnorm_reason(gm, node)
        src = single_input(node)
        detail = f"{describe(module_of(gm, src)) if src is not None else '?'} + {type(bn).__name__}"
        names = [src.name, node.name] if src is not None else [node.name]
        records.append(FoldRecord("batchnorm", names, detail, applied=not reason, reason=reason))
        if not reason:
            folded = fold_into(module_of(gm, src), *batchnorm_scale_shift(bn))
            replace_subgraph(gm, [src, node], folded, src.args[0])
    return finish(gm), records


def layernorm_affine_reason(gm: GraphModule, ln_node: Node) -> str:
    ln = module_of(gm, ln_node)
    if ln.weight is None and ln.bias is None:
        return "no affine"
    if calls_to(gm, ln_node.target) != 1:
        return "LayerNorm module is called at several sites"
    if len(ln.normalized_shape) != 1:
        return f"normalized_shape {tuple(ln.normalized_shape)} is not the last dim only"
    for user in ln_node.users:
        lin = private_module(gm, user, nn.Linear)
        if lin is None:
            return f"output feeds {user.name}, not only private Linears"
    return ""


def fold_layernorm_affine(gm: GraphModule) -> tuple[GraphModule, list[FoldRecord]]:
    """Move each LayerNorm's (gamma, beta) into the Linear(s) that are its only users."""
    gm = fresh_copy(gm)
    records = []
    for node in list(gm.graph.nodes):
        ln = module_of(gm, node)
        if not isinstance(ln, nn.LayerNorm):
            continue
        reason = layernorm_affine_reason(gm, node)
        users = list(node.users)
        detail = f"LayerNorm {ln.normalized_shape[0]} -> {len(users)} Linear"
        records.append(FoldRecord("layernorm_affine", [node.name, *(u.name for u in users)], detail,
                                  applied=not reason, reason=reason))
        if reason:
            continue
        dim = ln.normalized_shape[0]
        gamma = ln.weight.detach().double() if ln.weight is not None else torch.ones(dim, dtype=torch.float64)
        beta = ln.bias.detach().double() if ln.bias is not None else torch.zeros(dim, dtype=torch.float64)
        for user in users:
            gm.set_submodule(user.target, _absorb_affine(module_of(gm, user), gamma, beta))
        plain = nn.LayerNorm(dim, eps=ln.eps, elementwise_affine=False)
        gm.set_submodule(node.target, plain)
    return finish(gm), records


def _absorb_affine(lin: nn.Linear, gamma: Tensor, beta: Tensor) -> nn.Linear:
    """``lin(gamma * n + beta)`` as a Linear of ``n``."""
    w = lin.weight.detach().double()
    out = nn.Linear(lin.in_features, lin.out_features, bias=True, dtype=lin.weight.dtype)
    out.weight.data.copy_(w * gamma)
    out.bias.data.copy_(w @ beta + bias64(lin))
    return out
