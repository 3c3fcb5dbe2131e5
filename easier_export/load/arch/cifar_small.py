"""Small CIFAR-10 networks for the latency-aware benchmark: a ReLU6 net and a GELU transformer at 32x32.

Both are stock library models (torchvision MobileNetV2, timm ViT) so that what EASIER and the folder see is what
users run; only the size and the preprocessing config (read by ``models._finish``) are fixed here.
"""

from __future__ import annotations

from torch import nn

# The CIFAR ResNets' normalisation, so one data pipeline serves every built-in CIFAR model.
CIFAR_CFG = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def cifar_mobilenet_v2(num_classes: int = 10) -> nn.Module:
    """torchvision MobileNetV2 at width 0.5 with its ImageNet strides (35 ReLU6 call sites), run at 32x32."""
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None, width_mult=0.5, num_classes=num_classes)
    model.pretrained_cfg = dict(CIFAR_CFG)
    return model


def cifar_vit(num_classes: int = 10) -> nn.Module:
    """timm ViT with 4x4 patches (64 tokens), width 128, depth 6, 4 heads: ~1.2 M parameters, 6 GELUs."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4,
                              num_classes=num_classes)
    model.pretrained_cfg = dict(CIFAR_CFG)
    return model
