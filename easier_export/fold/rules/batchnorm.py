"""Fold an eval-mode BatchNorm into the conv / linear that solely feeds it."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ..fx import module_of, private_module, shape_of, single_input, sole_user
from ..numerics import BiasMapConv2d, bias64, describe
from ..records import Candidate, Merge
from ..rule import Rule

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV = (nn.Conv1d, nn.Conv2d)


def batchnorm_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """float64 (s, t) with BN(y) = s * y + t per channel."""
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(std)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - scale * bn.running_mean.double()


def fold_into(producer: nn.Module, scale: Tensor, shift: Tensor) -> nn.Module:
    """``scale * producer(x) + shift`` (per output channel) as a copy of the producer with new parameters."""
    out = copy.deepcopy(producer)
    w = producer.weight.detach().double()
    out.weight = nn.Parameter((w * scale.view(-1, *[1] * (w.dim() - 1))).to(producer.weight.dtype))
    out.bias = nn.Parameter((scale * bias64(producer) + shift).to(producer.weight.dtype))
    if isinstance(producer, BiasMapConv2d):
        out.bias_map = (producer.bias_map.double() * scale.view(-1, 1, 1)).to(producer.bias_map.dtype)
    return out


class BatchNormRule(Rule):
    """BatchNorm (eval mode, running statistics) after a conv / linear ``y = W x + b``::

        BN(y) = gamma (y - mu) / sqrt(var + eps) + beta = s y + (beta - s mu),   s = gamma / std
        =>  W' = s[:, None...] W,   b' = s (b - mu) + beta   (a bias map M becomes s M)
    """

    kind = "batchnorm"

    def match(self, gm: GraphModule, node: Node) -> Candidate | None:
        bn = module_of(gm, node)
        if not isinstance(bn, _BN):
            return None
        src = single_input(node)
        if src is None:
            return Candidate([node], None, [None, bn], f"? + {type(bn).__name__}")
        producer = module_of(gm, src)
        detail = f"{describe(producer)} + {type(bn).__name__}"
        return Candidate([src, node], src.args[0] if src.args else None, [producer, bn], detail)

    def check(self, gm: GraphModule, cand: Candidate) -> str | None:
        bn_node = cand.nodes[-1]
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
        return None

    def build(self, cand: Candidate) -> Merge:
        producer, bn = cand.modules
        return Merge(fold_into(producer, *batchnorm_scale_shift(bn)))
