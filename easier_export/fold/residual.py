"""Merge a residual / parallel-branch add into the conv: ``conv(x) + x`` and ``convA(x) + convB(x)``.

Two convs reading the same zero-padded input with the same stride sum to one conv (per spatial dim, dilations
written into the kernels)::

    convA(x)[o,p] + convB(x)[o,p] = sum_{i,c} (A'[o,i,c] + B'[o,i,c]) x[i, s p + c - P],   P = max(PA, PB)

where A' is A's kernel placed at offset P - PA inside the merged kernel (likewise B'). Both branches zero-pad
the *same* input, so there is no border effect, only alignment: both must have the same stride and output
size. The skip ``x`` is the 1x1 identity conv (stride 1, in == out channels), which lands as +1 on the centre
tap of the identity channel when the conv has "same" padding. Biases (and bias maps) add.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from ._common import (
    Candidate,
    FoldRecord,
    Merge,
    add_operands,
    as_float64,
    describe,
    dilated_weight,
    expand_groups,
    fold_to_fixpoint,
    module_of,
    plain_conv2d_reason,
    refuse,
    sharing_reason,
    single_input,
    verified_conv,
)


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


def match_residual(gm: GraphModule, node: Node, explain: bool = False) -> Candidate | None:
    """``add(conv(x), x)``, ``add(x, conv(x))`` or ``add(convA(x), convB(x))``, each conv feeding only the add.

    ``explain``: a conv that is shared or also read elsewhere comes back with its ``refusal`` instead of None.
    """
    operands = add_operands(node)
    if operands is None:
        return None

    def conv_of(n: Node) -> nn.Conv2d | None:
        conv = module_of(gm, n)
        return conv if isinstance(conv, nn.Conv2d) and single_input(n) is not None else None

    for body, skip in (operands, operands[::-1]):
        conv = conv_of(body)
        if conv is None:
            continue
        if single_input(body) is skip:
            cand = Candidate("residual", [body, node], skip, [conv, None], f"{describe(conv)} + identity")
        elif (other := conv_of(skip)) is not None and single_input(skip) is single_input(body) and skip is not body:
            cand = Candidate("residual", [body, skip, node], single_input(body), [conv, other],
                             f"{describe(conv)} + {describe(other)}")
        else:
            continue
        cand.refusal = sharing_reason(gm, cand.nodes)
        return cand if explain or not cand.refusal else None
    return None


def build_residual(cand: Candidate) -> Merge:
    return merge_parallel(*cand.modules, cand.in_shape)


def fold_residual(gm: GraphModule, example: Tensor) -> tuple[GraphModule, list[FoldRecord]]:
    """Merge every exact residual / parallel-conv add; shared or fanned-out convs are refused with a reason."""
    return fold_to_fixpoint(gm, example, partial(match_residual, explain=True), build_residual)
