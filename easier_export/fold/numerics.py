"""Exact float64 numerics of the merges: folded weights, and the check that a merged conv equals its original.

Every merge is built in float64 and checked against the original subgraph (also run in float64) at the static
input shape before it is accepted: a merge that is not exact to ``EXACT_RTOL`` is refused with a reason, never
shipped.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .records import Merge, refuse

EXACT_RTOL = 1e-9
"""Largest float64 relative error (to the output scale) at which a merged op counts as exact."""


class BiasMapConv2d(nn.Conv2d):
    """Conv2d plus a per-position bias map of shape (C, H, W), broadcast over the batch.

    It is the exact constant part of a merged conv chain whose inner zero padding made the bias depend on the
    position (the border sees fewer bias taps). Valid only at the static spatial size it was built for.
    """

    def __init__(self, *args, bias_map: Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.bias_map


def as_float64(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double()


def rel_err(got: Tensor, want: Tensor) -> float:
    scale = want.abs().max().clamp_min(1e-300)
    return float((got - want).abs().max() / scale)


def conv_geometry(conv: nn.Conv2d) -> str:
    kh, kw = conv.kernel_size
    kernel = f"{kh}x{kw}"
    if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1:
        text = f"conv {kernel} dw {conv.out_channels}"
    else:
        groups = f" g{conv.groups}" if conv.groups > 1 else ""
        text = f"conv {kernel} {conv.in_channels}->{conv.out_channels}{groups}"
    if conv.stride != (1, 1):
        text += f" s{conv.stride[0]}"
    if conv.dilation != (1, 1):
        text += f" d{conv.dilation[0]}"
    if isinstance(conv, BiasMapConv2d):
        text += " +map"
    return text


def describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return conv_geometry(module)
    if isinstance(module, nn.Linear):
        return f"linear {module.in_features}->{module.out_features}"
    return type(module).__name__


def plain_conv2d_reason(conv: nn.Module) -> str:
    """Why a module cannot take part in a conv merge, or "" when it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} is not zero padding"
    if isinstance(conv.padding, str):
        return f"padding {conv.padding!r} is not numeric"
    return ""


def bias64(module: nn.Module) -> Tensor:
    """float64 bias of a conv/linear, zeros when it has none."""
    if module.bias is not None:
        return module.bias.detach().double()
    return torch.zeros(module.weight.shape[0], dtype=torch.float64)


def dilated_weight(conv: nn.Conv2d) -> Tensor:
    """float64 weight with the dilation written into the kernel as zero taps (result dilation 1)."""
    w = conv.weight.detach().double()
    dh, dw = conv.dilation
    if (dh, dw) == (1, 1):
        return w
    o, i, kh, kw = w.shape
    out = w.new_zeros(o, i, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out[:, :, ::dh, ::dw] = w
    return out


def expand_groups(w: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return w
    o, ig, kh, kw = w.shape
    og = o // groups
    out = w.new_zeros(o, ig * groups, kh, kw)
    for g in range(groups):
        out[g * og : (g + 1) * og, g * ig : (g + 1) * ig] = w[g * og : (g + 1) * og]
    return out


def verified_conv(
    reference: Callable[[Tensor], Tensor],
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
    in_shape: torch.Size,
    dtype: torch.dtype,
    inexact_reason: str,
) -> Merge:
    """Build the conv with the given float64 linear part whose constant part is ``reference(0)``; accept it
    only if it reproduces ``reference`` (a float64 affine map) on random inputs at the static shape.

    The composite is affine, so ``f(x) = L(x) + f(0)``: ``f(0)`` becomes the conv bias when it is constant per
    channel, else a (C, H, W) bias map. The check catches what the weight algebra cannot see (zero padding
    between merged convs meeting real pixels, a crop by stride).
    """
    probe_shape = (2, *in_shape[1:])
    with torch.no_grad():
        constant = reference(torch.zeros(probe_shape[1:], dtype=torch.float64)[None])[0]
        merged = conv_with_constant(weight, stride, padding, groups, constant)
        x = torch.randn(probe_shape, dtype=torch.float64)
        want, got = reference(x), merged(x)
    if got.shape != want.shape:
        return refuse(f"output size differs: {tuple(want.shape[1:])} -> {tuple(got.shape[1:])}")
    err = rel_err(got, want)
    if err > EXACT_RTOL:
        return Merge(None, inexact_reason, err)
    return Merge(merged.to(dtype), "", err)


def conv_with_constant(
    weight: Tensor, stride: tuple[int, int], padding: tuple[int, int], groups: int, constant: Tensor
) -> nn.Conv2d:
    """float64 Conv2d with ``weight``; ``constant`` (C, H, W) becomes its bias or, if varying, a bias map."""
    out_ch, in_per_group, kh, kw = weight.shape
    spread = (constant - constant[:, :1, :1]).abs().max()
    uniform = bool(spread <= 1e-12 * constant.abs().max().clamp_min(1.0))
    kwargs = dict(stride=stride, padding=padding, groups=groups, dtype=torch.float64)
    if uniform:
        conv = nn.Conv2d(in_per_group * groups, out_ch, (kh, kw), bias=True, **kwargs)
        conv.bias.data.copy_(constant[:, 0, 0])
    else:
        conv = BiasMapConv2d(in_per_group * groups, out_ch, (kh, kw), bias=False, bias_map=constant, **kwargs)
    conv.weight.data.copy_(weight)
    return conv.eval()
