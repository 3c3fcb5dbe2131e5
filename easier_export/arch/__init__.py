"""Architectures that ship with the tool (no download needed)."""

from .cifar_resnet import cifar_resnet20, cifar_resnet32
from .demo_cnn import DemoNet

BUILTINS = {
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet32": cifar_resnet32,
    "demo_cnn": DemoNet,
}

__all__ = ["BUILTINS", "DemoNet", "cifar_resnet20", "cifar_resnet32"]
