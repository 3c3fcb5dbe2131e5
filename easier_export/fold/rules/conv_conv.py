"""Merge conv -> conv with nothing non-linear between them into one conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..numerics import as_float64, dilated_weight, expand_groups, plain_conv2d_reason, verified_conv
from ..records import Merge, refuse
from ..rule import PairRule

PADDING_REASON = "padding: border values differ (needs padding relocation)"


def compose_convs(first: nn.Conv2d, second: nn.Conv2d, in_shape: torch.Size) -> Merge:
    """One conv equal to ``second(first(x))`` at the static input shape, or the reason there is none."""
    reason = plain_conv2d_reason(first) or plain_conv2d_reason(second)
    if reason:
        return refuse(reason)
    w1, w2 = dilated_weight(first), dilated_weight(second)
    groups = first.groups if first.groups == second.groups else 1
    if groups == 1:
        w1, w2 = expand_groups(w1, first.groups), expand_groups(w2, second.groups)
    weight = compose_weights(w1, w2, groups, first.stride)
    stride = (first.stride[0] * second.stride[0], first.stride[1] * second.stride[1])
    padding = (
        first.stride[0] * second.padding[0] + first.padding[0],
        first.stride[1] * second.padding[1] + first.padding[1],
    )
    a, b = as_float64(first), as_float64(second)
    return verified_conv(lambda x: b(a(x)), weight, stride, padding, groups, in_shape,
                         first.weight.dtype, PADDING_REASON)


def compose_weights(w1: Tensor, w2: Tensor, groups: int, stride: tuple[int, int]) -> Tensor:
    """Merged kernel, group by group: ``conv_transpose2d(W2 as (N=out, C=mid), W1 (mid, in), stride)``."""
    o2, m1 = w2.shape[0] // groups, w1.shape[0] // groups
    blocks = [
        F.conv_transpose2d(w2[g * o2 : (g + 1) * o2], w1[g * m1 : (g + 1) * m1], stride=stride)
        for g in range(groups)
    ]
    return torch.cat(blocks)


class ConvConvRule(PairRule):
    """``second(first(x))`` for two Conv2d. Per spatial dim, dilations first written into the kernels as zero
    taps::

        y1[m, p] = sum_{i,a} W1[m,i,a] x[i, s1 p + a - P1]
        y2[o, q] = sum_{m,b} W2[o,m,b] y1[m, s2 q + b - P2]
                 = sum_{i,c} M[o,i,c] x[i, s1 s2 q + c - (s1 P2 + P1)]
        M[o,i,c] = sum_{m, b, a : s1 b + a = c} W2[o,m,b] W1[m,i,a] = conv_transpose2d(W2, W1, stride=s1)[o,i,c]

    so the merged conv has kernel K1 + s1 (K2 - 1), stride s1 s2 and padding s1 P2 + P1. Groups are expanded to a
    block-diagonal dense kernel (result groups=1) unless both convs have the same groups, which are then kept
    (two depthwise convs stay depthwise).

    The constant part is ``f(0)`` of the original pair: a bias, or a (C, H, W) bias map where the inner zero
    padding makes it position-dependent. The weight part is exact only where the inner zero padding cannot hide
    real pixels (e.g. first conv 1x1/stride 1/no padding, or second conv without padding); each merge is checked
    numerically in float64 and refused with ``PADDING_REASON`` otherwise.
    """

    kind = "conv_conv"
    op = nn.Conv2d

    def compose(self, first: nn.Module, second: nn.Module | None, in_shape: torch.Size) -> Merge:
        return compose_convs(first, second, in_shape)
