"""ResNets (He et al. 2016, post-activation "v1" blocks) in three published flavours.

* CIFAR resnet8/14/20/32/44/56/110 and resnet8x4/resnet32x4 (CRD/mdistiller ``resnet.py``):
  3x3 stem (stride 1, no max-pool), three stages of ``(depth - 2) // 6`` basic blocks with
  strides 1, 2, 2 (32x32 -> 32, 16, 8), ``AvgPool2d(8)`` on the final 8x8 map, head ``fc``.
  Widths are (stem, stage1..3) = (16, 16, 32, 64), or (32, 64, 128, 256) for the "x4" nets.
* CIFAR ResNet18/50 (CRD/mdistiller ``resnetv2.py``): 3x3 stem with 64 channels (stride 1,
  no max-pool), four stages (64, 128, 256, 512) with strides 1, 2, 2, 2 (32 -> 4x4 map),
  global average pool, head ``linear``; the projection is registered as ``shortcut``.
* ImageNet ResNet18/34/50, torchvision-compatible: 7x7/2 stem + 3x3/2 max-pool, four stages,
  global average pool, head ``fc``.

Shortcuts (all flavours): identity when the block keeps shape, otherwise a projection
``1x1 conv(stride, no bias) + BN`` ("option B", also for the CIFAR resnets of the CRD zoo,
not the zero-padding option A of the original CIFAR ResNet).  The residual is added after
the last BN of the branch, then one ReLU follows the addition.

Features (mdistiller ``cifar/resnet.py``, ``cifar/resnetv2.py``, ``imagenet/resnet.py``):
``feats`` = [stem after its ReLU (before the ImageNet max-pool), each stage's output];
``preact_feats`` = the same before the final ReLU (the last block's ``branch + shortcut``);
the CIFAR stem entry is post-ReLU in both lists, the ImageNet one is ``bn1(conv1(x))`` in
``preact_feats``.  ``pooled``: the pooled, flattened last stage.  ``stage_channels()`` has
one entry per feature, the stem included (mdistiller's resnetv2 / ImageNet ResNets return
the four stage widths of a ResNet50, ``[256, 512, 1024, 2048]``, without the stem, for every
depth).  ``bn_before_relu()``: the last BN of each stage's last block (bn2 basic, bn3
bottleneck); ImageNet: stages 2-4 only, as mdistiller.
"""

from torch import Tensor, nn
from torch.nn import functional as F

from ._init import he_init
from .features import Features, PreactBlock, run_stage


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(PreactBlock):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; conv1 (3x3) carries the stride.
    ``preact(x)`` is the sum before the ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, shortcut_name: str):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_name = shortcut_name
        self.register_module(shortcut_name, _shortcut(cin, planes, stride))

    def preact(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + getattr(self, self.shortcut_name)(x)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(PreactBlock):
    """1x1 reduce - BN - ReLU - 3x3 (stride here, torchvision "v1.5") - BN - ReLU - 1x1 expand x4
    - BN, ``+ shortcut(x)`` (= ``preact(x)``), ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, shortcut_name: str):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut_name = shortcut_name
        self.register_module(shortcut_name, _shortcut(cin, cout, stride))

    def preact(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + getattr(self, self.shortcut_name)(x)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


class ResNet(nn.Module):
    """Stem (conv1-bn1-ReLU[-maxpool]), stages ``layer1..layerN`` (first stage stride 1, the
    others stride 2, stride in each stage's first block), ``avgpool``, flatten, linear head."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: list[int],
        widths: list[int],
        num_classes: int,
        *,
        stem_width: int,
        imagenet_stem: bool = False,
        pool: nn.Module | None = None,
        head: str = "fc",
        shortcut_name: str = "downsample",
    ):
        super().__init__()
        self.imagenet_stem = imagenet_stem
        if imagenet_stem:
            self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = _conv3x3(3, stem_width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        cin = stem_width
        self.num_stages = len(depths)
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(cin, width, stride, shortcut_name))
                cin = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.head_name = head
        self.register_module(head, nn.Linear(cin, num_classes))
        he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return getattr(self, self.head_name)(self.avgpool(x).flatten(1))

    def _stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward_features(self, x: Tensor) -> Features:
        stem = self.bn1(self.conv1(x))
        x = F.relu(stem)
        feats, preacts = [x], [stem if self.imagenet_stem else x]
        x = self.maxpool(x)
        for stage in self._stages():
            x, pre = run_stage(stage, x)
            feats.append(x)
            preacts.append(pre)
        pooled = self.avgpool(x).flatten(1)
        return Features(getattr(self, self.head_name)(pooled), feats, preacts, pooled)

    def stage_channels(self) -> list[int]:
        return [self.bn1.num_features] + [s[-1].last_bn().num_features for s in self._stages()]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        first = 1 if self.imagenet_stem else 0  # mdistiller's ImageNet ResNets skip stage 1
        return [stage[-1].last_bn() for stage in self._stages()[first:]]


def cifar_resnet(depth: int, filters: tuple[int, int, int, int], num_classes: int) -> ResNet:
    """CRD-zoo CIFAR ResNet of ``depth = 6n + 2`` with (stem, stage1, stage2, stage3) widths."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return ResNet(
        BasicBlock, [n] * 3, list(filters[1:]), num_classes,
        stem_width=filters[0], pool=nn.AvgPool2d(8),
    )


_STAGES = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
           50: (Bottleneck, [3, 4, 6, 3])}


def cifar_resnet_v2(depth: int, num_classes: int) -> ResNet:
    """CRD-zoo CIFAR ResNet18/50 (``resnetv2.py``): 3x3 stem, no max-pool, head ``linear``."""
    block, depths = _STAGES[depth]
    return ResNet(
        block, depths, [64, 128, 256, 512], num_classes,
        stem_width=64, head="linear", shortcut_name="shortcut",
    )


def imagenet_resnet(depth: int, num_classes: int) -> ResNet:
    """torchvision ``resnet18/34/50`` (same module names, same forward)."""
    block, depths = _STAGES[depth]
    return ResNet(block, depths, [64, 128, 256, 512], num_classes, stem_width=64,
                  imagenet_stem=True)
