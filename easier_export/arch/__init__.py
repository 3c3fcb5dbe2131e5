"""Architectures that ship with the tool (no download needed)."""

from .cifar_resnet import cifar_resnet20, cifar_resnet32
from .cifar_small import cifar_mobilenet_v2, cifar_vit
from .demo_cnn import DemoNet

BUILTINS = {
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet32": cifar_resnet32,
    "cifar_mobilenet_v2": cifar_mobilenet_v2,
    "cifar_vit": cifar_vit,
    "demo_cnn": DemoNet,
}

__all__ = ["BUILTINS", "DemoNet", "cifar_mobilenet_v2", "cifar_resnet20", "cifar_resnet32", "cifar_vit"]
