"""ShuffleNetV1 (Zhang et al. 2018) as in the CRD/mdistiller CIFAR zoo (``ShuffleV1``, g=3).

Stem: 1x1 conv 3 -> 24 (no bias), BN, ReLU, no max-pool (32x32 kept).  Three stages of 4, 8, 4
bottlenecks with outputs 240, 480, 960 (maps 16, 8, 4), then 4x4 average pool and ``linear``.
The first block of each stage has stride 2 and outputs ``out - in`` channels, which are
concatenated with a 3x3/2 average-pooled input (``[branch, pooled]`` order) -> ``out``.

Features (mdistiller ``cifar/ShuffleNetv1.py``): ``feats`` = [stem after its ReLU, layer1..3
outputs]; ``preact_feats`` = [the same stem tensor, each stage's last block's sum before its
ReLU]; ``pooled``: the 4x4-pooled layer3 (960).  ``stage_channels()`` = [24, 240, 480, 960]
and ``bn_before_relu()`` = the ``bn3`` of each stage's last block, added here: mdistiller's
ShuffleV1 has no ``get_stage_channels`` and raises in ``get_bn_before_relu``.  That BN
precedes the final ReLU exactly as the last BN of a ResNet block does (stride-1 last block:
``relu(bn3(..) + x)``).
"""

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .features import Features, PreactBlock, run_stage


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """``[N, g*m, H, W] -> view [N, g, m] -> transpose -> [N, m*g]``: output channel
    ``j*g + i`` is input channel ``i*m + j``."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBottleneck(PreactBlock):
    """1x1 group conv (groups g, but 1 when the input is the 24-channel stem) - BN - ReLU -
    channel shuffle (same g) - 3x3 depthwise (stride) - BN - ReLU - 1x1 group conv (groups
    always g) - BN; then ``relu(branch + x)`` (stride 1) or ``relu(cat[branch,
    avgpool3x3/2(x)])`` (stride 2); ``preact(x)`` is that sum or concatenation before the
    ReLU.  Bottleneck width is ``out // 4``.  Note the zoo keeps a ReLU after the depthwise
    conv."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        self.stride = stride
        self.first_groups = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def preact(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        return out + x


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int, out_planes=(240, 480, 960), num_blocks=(4, 8, 4),
                 groups: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(out_planes, num_blocks, strict=True)):
            blocks = [ShuffleBottleneck(cin, cout - cin, 2, groups)]
            blocks += [ShuffleBottleneck(cout, cout, 1, groups) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))

    def _stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def forward_features(self, x: Tensor) -> Features:
        x = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [x], [x]
        for stage in self._stages():
            x, pre = run_stage(stage, x)
            feats.append(x)
            preacts.append(pre)
        pooled = F.avg_pool2d(x, 4).flatten(1)
        return Features(self.linear(pooled), feats, preacts, pooled)

    def stage_channels(self) -> list[int]:
        return [self.bn1.num_features] + [b.num_features for b in self.bn_before_relu()]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [stage[-1].bn3 for stage in self._stages()]
