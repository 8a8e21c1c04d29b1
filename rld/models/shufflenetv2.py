"""ShuffleNetV2 1x (Ma et al. 2018) as in the CRD/mdistiller CIFAR zoo (``ShuffleV2``).

Stem: 1x1 conv 3 -> 24 (no bias), BN, ReLU, no max-pool (32x32 kept).  Three stages of one
stride-2 ``DownBlock`` followed by 3, 7, 3 ``BasicBlock``s with 116, 232, 464 channels (maps
16, 8, 4); then 1x1 conv 464 -> 1024 - BN - ReLU, 4x4 average pool and ``linear``.
Every block ends with a channel shuffle of 2 groups.
"""

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .shufflenetv1 import channel_shuffle


def _conv(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """Split with ratio 0.5: the first half ``x1`` passes through; the second half goes
    1x1 - BN - ReLU - 3x3 depthwise - BN (no ReLU) - 1x1 - BN - ReLU; output
    ``shuffle(cat[x1, branch], 2)``."""

    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split = int(channels * split_ratio)
        c = channels - self.split
        self.conv1, self.bn1 = _conv(c, c), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = _conv(c, c, 3, groups=c), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = _conv(c, c), nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class DownBlock(nn.Module):
    """Two stride-2 branches on the full input, ``out // 2`` channels each:
    left = 3x3 depthwise/2 - BN - 1x1 - BN - ReLU; right = 1x1 - BN - ReLU - 3x3 depthwise/2 -
    BN - 1x1 - BN - ReLU; output ``shuffle(cat[left, right], 2)``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = _conv(cin, cin, 3, 2, groups=cin), nn.BatchNorm2d(cin)
        self.conv2, self.bn2 = _conv(cin, mid), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = _conv(cin, mid), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = _conv(mid, mid, 3, 2, groups=mid), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = _conv(mid, mid), nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, out_channels=(116, 232, 464, 1024),
                 num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1, self.bn1 = _conv(3, 24), nn.BatchNorm2d(24)
        cin = 24
        for i, (cout, n) in enumerate(zip(out_channels[:3], num_blocks, strict=True)):
            blocks = [DownBlock(cin, cout)] + [BasicBlock(cout) for _ in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.conv2, self.bn2 = _conv(cin, out_channels[3]), nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))
