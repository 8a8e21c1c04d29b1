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

from rld.errors import CheckpointError, ConfigError
from rld.registry import load_entry_points, unknown_name

from .checkpoint import load_checkpoint
from .features import Features, feature_shapes
from .mobilenetv1 import MobileNetV1
from .mobilenetv2 import MobileNetV2
from .resnet import cifar_resnet, cifar_resnet_v2, imagenet_resnet
from .shufflenetv1 import ShuffleNetV1
from .shufflenetv2 import ShuffleNetV2
from .vgg import vgg
from .wrn import WideResNet

__all__ = [
    "MODELS", "CheckpointError", "ConfigError", "Features", "build_model", "feature_shapes",
    "load_checkpoint", "model_names", "register_model",
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


def register_model(name: str, family: str = "cifar"):
    """Declare model `name` of `family` (exported as `rld.register_model`) on a factory
    `fn(num_classes) -> nn.Module` whose `forward(x)` gives the logits.  Feature distillers
    also need `forward_features(x) -> Features` (and OFD `bn_before_relu()`); a model without
    them trains alone or with logit distillers.  A family is a kind of input: `cifar`
    (3x32x32), `imagenet` (3x224x224), or a new one (a data set says its `family`)."""
    def decorate(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        models = MODELS.setdefault(family, {})
        old = models.get(name)
        if old is not None and getattr(old, "__qualname__", None) != fn.__qualname__:
            raise ValueError(f"a {family} model named {name!r} is registered already")
        models[name] = fn
        return fn
    return decorate


def model_names(family: str) -> list[str]:
    """The registered models of `family` (plugins' entry points included); ConfigError for
    an unknown family."""
    load_entry_points()
    if family not in MODELS:
        raise unknown_name("dataset.family", family, MODELS, "a registered model family")
    return sorted(MODELS[family])


def build_model(name: str, num_classes: int, family: str = "cifar") -> nn.Module:
    """Build ``name`` of ``family`` ("cifar": 3x32x32 inputs, "imagenet": 3x224x224)."""
    if name not in model_names(family):
        raise unknown_name("model", name, MODELS[family], f"a registered {family} model")
    return MODELS[family][name](num_classes)
