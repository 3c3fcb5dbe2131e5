"""Merge a residual / parallel-branch add into the conv: ``conv(x) + x`` and ``convA(x) + convB(x)``."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..fx import add_operands, module_of, single_input
from ..numerics import as_float64, describe, dilated_weight, expand_groups, plain_conv2d_reason, verified_conv
from ..records import Candidate, Merge, refuse
from ..rule import MergeRule


def identity_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """The skip connection of ``conv`` as a 1x1 conv with the same groups (an identity per group)."""
    channels, groups = conv.in_channels, conv.groups
    ident = nn.Conv2d(channels, channels, 1, groups=groups, bias=False, dtype=conv.weight.dtype)
    per_group = channels // groups
    ident.weight.data.zero_()
    ident.weight.data[torch.arange(channels), torch.arange(channels) % per_group] = 1.0
    return ident


def merge_parallel(a: nn.Conv2d, b: nn.Conv2d | None, in_shape: torch.Size) -> Merge:
    """One conv equal to ``a(x) + b(x)`` (``b=None``: ``a(x) + x``), or the reason there is none."""
    reason = plain_conv2d_reason(a) or (plain_conv2d_reason(b) if b is not None else "")
    if reason:
        return refuse(reason)
    if b is None:
        if a.in_channels != a.out_channels:
            return refuse(f"identity skip needs in == out channels ({a.in_channels} -> {a.out_channels})")
        b = identity_conv(a)
    if a.stride != b.stride:
        return refuse(f"strides differ: {a.stride[0]} vs {b.stride[0]}")
    wa, wb = dilated_weight(a), dilated_weight(b)
    groups = a.groups if a.groups == b.groups else 1
    if groups == 1:
        wa, wb = expand_groups(wa, a.groups), expand_groups(wb, b.groups)
    pad = (max(a.padding[0], b.padding[0]), max(a.padding[1], b.padding[1]))
    offsets = [(pad[0] - c.padding[0], pad[1] - c.padding[1]) for c in (a, b)]
    size = [max(off[d] + w.shape[2 + d] for off, w in zip(offsets, (wa, wb), strict=True)) for d in (0, 1)]
    weight = wa.new_zeros(wa.shape[0], wa.shape[1], *size)
    for (oh, ow), w in zip(offsets, (wa, wb), strict=True):
        weight[:, :, oh : oh + w.shape[2], ow : ow + w.shape[3]] += w
    a64, b64 = as_float64(a), as_float64(b)
    return verified_conv(lambda x: a64(x) + b64(x), weight, a.stride, pad, groups, in_shape,
                         a.weight.dtype, "branches do not align (different output positions)")


class ResidualRule(MergeRule):
    """``add(conv(x), x)``, ``add(x, conv(x))`` or ``add(convA(x), convB(x))``, each conv feeding only the add.

    Two convs reading the same zero-padded input with the same stride sum to one conv (per spatial dim, dilations
    written into the kernels)::

        convA(x)[o,p] + convB(x)[o,p] = sum_{i,c} (A'[o,i,c] + B'[o,i,c]) x[i, s p + c - P],   P = max(PA, PB)

    where A' is A's kernel placed at offset P - PA inside the merged kernel (likewise B'). Both branches zero-pad
    the *same* input, so there is no border effect, only alignment: both must have the same stride and output
    size. The skip ``x`` is the 1x1 identity conv (stride 1, in == out channels), which lands as +1 on the centre
    tap of the identity channel when the conv has "same" padding. Biases (and bias maps) add.
    """

    kind = "residual"

    def match(self, gm: GraphModule, node: Node) -> Candidate | None:
        operands = add_operands(node)
        if operands is None:
            return None
        for body, skip in (operands, operands[::-1]):
            conv = _conv_of(gm, body)
            if conv is None:
                continue
            if single_input(body) is skip:
                return Candidate([body, node], skip, [conv, None], f"{describe(conv)} + identity")
            other = _conv_of(gm, skip)
            if other is not None and single_input(skip) is single_input(body) and skip is not body:
                return Candidate([body, skip, node], single_input(body), [conv, other],
                                 f"{describe(conv)} + {describe(other)}")
        return None

    def compose(self, first: nn.Module, second: nn.Module | None, in_shape: torch.Size) -> Merge:
        return merge_parallel(first, second, in_shape)


def _conv_of(gm: GraphModule, node: Node) -> nn.Conv2d | None:
    conv = module_of(gm, node)
    return conv if isinstance(conv, nn.Conv2d) and single_input(node) is not None else None
