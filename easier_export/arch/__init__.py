"""Architectures that ship with the tool (no download needed)."""

from .cifar_resnet import cifar_resnet20, cifar_resnet32
from .demo_cnn import DemoNet
from .demo_invres import DemoInvRes

BUILTINS = {
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet32": cifar_resnet32,
    "demo_cnn": DemoNet,
    "demo_invres": DemoInvRes,
}

__all__ = ["BUILTINS", "DemoInvRes", "DemoNet", "cifar_resnet20", "cifar_resnet32"]
