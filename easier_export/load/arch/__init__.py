"""Architectures that ship with the tool (no download needed)."""

from .cifar_resnet import cifar_resnet20, cifar_resnet32
from .cifar_small import cifar_mobilenet_v2, cifar_vit
from .demo_cnn import DemoNet
from .demo_invres import DemoInvRes

BUILTINS = {
    "cifar_resnet20": cifar_resnet20,
    "cifar_resnet32": cifar_resnet32,
    "cifar_mobilenet_v2": cifar_mobilenet_v2,
    "cifar_vit": cifar_vit,
    "demo_cnn": DemoNet,
    "demo_invres": DemoInvRes,
}

__all__ = ["BUILTINS", "DemoInvRes", "DemoNet", "cifar_mobilenet_v2", "cifar_resnet20", "cifar_resnet32", "cifar_vit"]
