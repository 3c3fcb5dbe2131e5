"""The small residual CNN the `demo` command trains on scikit-learn's digits."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class DemoNet(nn.Module):
    """conv-BN-ReLU stem, a basic residual block, a strided downsample, an inverted-residual
    (1x1 - depthwise 3x3 - 1x1) block, pooled linear head: every fold type has something to do."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = conv_bn(in_chans, w)
        self.act0 = nn.ReLU()
        self.b1_conv1, self.b1_act1, self.b1_conv2 = conv_bn(w, w), nn.ReLU(), conv_bn(w, w)
        self.b1_act2 = nn.ReLU()
        self.down, self.down_act = conv_bn(w, 2 * w, stride=2), nn.ReLU()
        self.b2_expand, self.b2_act1 = conv_bn(2 * w, 4 * w, k=1), nn.ReLU()
        self.b2_dw, self.b2_act2 = conv_bn(4 * w, 4 * w, groups=4 * w), nn.ReLU()
        self.b2_project = conv_bn(4 * w, 2 * w, k=1)
        self.head = nn.Linear(2 * w, num_classes)
        self.pretrained_cfg = {"mean": (0.5,), "std": (0.5,), "input_size": (in_chans, 16, 16)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.stem(x))
        x = self.b1_act2(x + self.b1_conv2(self.b1_act1(self.b1_conv1(x))))
        x = self.down_act(self.down(x))
        x = x + self.b2_project(self.b2_act2(self.b2_dw(self.b2_act1(self.b2_expand(x)))))
        return self.head(x.mean((2, 3)))
