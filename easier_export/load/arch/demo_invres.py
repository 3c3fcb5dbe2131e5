"""The network the `demo` command trains: MobileNetV2-style inverted residual blocks, where depth reduction pays.

Each block is pw 1x1 (C -> 6C) -> BN -> ReLU -> dw 3x3 -> BN -> ReLU -> pw 1x1 (6C -> C) -> BN, plus the input.
Once *both* ReLUs are gone the block is one 3x3 conv C -> C with the residual in its kernel: three ops and an add
become one op, with fewer multiply-adds (9C² instead of 12C² + 54C per pixel). Large enough (~0.2 ms at batch 1
on one CPU core) that the speed-up stands above timer jitter, small enough to train on digits in seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from .demo_cnn import conv_bn


class InvertedResidual(nn.Module):
    def __init__(self, channels: int, expansion: int = 6) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand, self.act1 = conv_bn(channels, hidden, k=1), nn.ReLU()
        self.dw, self.act2 = conv_bn(hidden, hidden, groups=hidden), nn.ReLU()
        self.project = conv_bn(hidden, channels, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act2(self.dw(self.act1(self.expand(x)))))


class DemoInvRes(nn.Module):
    """conv stem, three inverted residual blocks at 16x16, a strided conv, two blocks at 8x8, pooled linear head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem, self.stem_act = conv_bn(in_chans, w), nn.ReLU()
        self.stage1 = nn.Sequential(*(InvertedResidual(w) for _ in range(3)))
        self.down, self.down_act = conv_bn(w, 2 * w, stride=2), nn.ReLU()
        self.stage2 = nn.Sequential(*(InvertedResidual(2 * w) for _ in range(2)))
        self.head = nn.Linear(2 * w, num_classes)
        self.pretrained_cfg = {"mean": (0.5,), "std": (0.5,), "input_size": (in_chans, 16, 16)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.stem_act(self.stem(x)))
        x = self.stage2(self.down_act(self.down(x)))
        return self.head(x.mean((2, 3)))
