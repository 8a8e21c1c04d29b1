"""Model zoo: CIFAR models of the CRD/mdistiller zoo and ImageNet models (torchvision-compatible
ResNets, the CRD/mdistiller MobileNetV1).

Every model's ``forward(x)`` returns only the logits ``[B, num_classes]``; module names (hence
``state_dict`` keys) equal the published ones, so ``cifar_teachers.tar`` checkpoints and
torchvision ImageNet weights load with ``strict=True`` and no key mapping.  For feature
distillers every model also has ``forward_features(x) -> Features`` (logits and mdistiller's
intermediate features), ``stage_channels()`` and ``bn_before_relu()``; ``feature_shapes``
gives the feature shapes for an input size (see ``features.py``).
"""

from collections.abc import Callable
from functools import partial

from torch import nn

from .checkpoint import CheckpointError, load_checkpoint
from .features import Features, feature_shapes
from .mobilenetv1 import MobileNetV1
from .mobilenetv2 import MobileNetV2
from .resnet import cifar_resnet, cifar_resnet_v2, imagenet_resnet
from .shufflenetv1 import ShuffleNetV1
from .shufflenetv2 import ShuffleNetV2
from .vgg import vgg
from .wrn import WideResNet

__all__ = [
    "MODELS", "CheckpointError", "Features", "build_model", "feature_shapes", "load_checkpoint",
]

_NARROW, _WIDE = (16, 16, 32, 64), (32, 64, 128, 256)

MODELS: dict[str, dict[str, Callable[[int], nn.Module]]] = {
    "cifar": {
        **{f"resnet{d}": partial(cifar_resnet, d, _NARROW) for d in (8, 14, 20, 32, 44, 56, 110)},
        "resnet8x4": partial(cifar_resnet, 8, _WIDE),
        "resnet32x4": partial(cifar_resnet, 32, _WIDE),
        "ResNet18": partial(cifar_resnet_v2, 18),
        "ResNet50": partial(cifar_resnet_v2, 50),
        **{f"wrn_{d}_{k}": partial(WideResNet, d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
        **{name: partial(vgg, name) for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
        "MobileNetV2": MobileNetV2,
        "ShuffleV1": ShuffleNetV1,
        "ShuffleV2": ShuffleNetV2,
    },
    "imagenet": {
        "ResNet18": partial(imagenet_resnet, 18),
        "ResNet34": partial(imagenet_resnet, 34),
        "ResNet50": partial(imagenet_resnet, 50),
        "MobileNetV1": MobileNetV1,
    },
}


def build_model(name: str, num_classes: int, family: str = "cifar") -> nn.Module:
    """Build ``name`` of ``family`` ("cifar": 3x32x32 inputs, "imagenet": 3x224x224)."""
    if family not in MODELS:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(MODELS)}")
    if name not in MODELS[family]:
        raise ValueError(
            f"unknown {family} model {name!r}; allowed: {', '.join(sorted(MODELS[family]))}")
    return MODELS[family][name](num_classes)
