"""ShuffleNetV2 1x (Ma et al. 2018) as in the CRD/mdistiller CIFAR zoo (``ShuffleV2``).

Stem: 1x1 conv 3 -> 24 (no bias), BN, ReLU, no max-pool (32x32 kept).  Three stages of one
stride-2 ``DownBlock`` followed by 3, 7, 3 ``BasicBlock``s with 116, 232, 464 channels (maps
16, 8, 4); then 1x1 conv 464 -> 1024 - BN - ReLU, 4x4 average pool and ``linear``.
Every block ends with a channel shuffle of 2 groups.

Features (mdistiller ``cifar/ShuffleNetv2.py``): ``feats`` = [stem after its ReLU, layer1..3
outputs]; ``preact_feats`` = [the same stem tensor, then for each stage's last block
``cat[x1, branch before its last ReLU]``: *before* the channel shuffle, as mdistiller, so
``feats[i] == channel_shuffle(relu(preact_feats[i]), 2)``]; ``pooled``: the 4x4-pooled
``relu(bn2(conv2(layer3)))`` (1024).  ``stage_channels()`` = [24, 116, 232, 464].
``bn_before_relu()`` raises NotImplementedError as mdistiller's does: a stage's final ReLU
covers only the branch half of the channels, no BN precedes the whole output.
"""

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .features import Features, run_stage
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

    def _branch(self, x2: Tensor) -> Tensor:
        """The branch on the second half, before its last ReLU."""
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out))

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        return channel_shuffle(torch.cat([x1, F.relu(self._branch(x2))], 1), 2)

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, cat[x1, branch before its ReLU])``, the latter unshuffled."""
        x1, x2 = x[:, : self.split], x[:, self.split :]
        pre = self._branch(x2)
        return channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2), torch.cat([x1, pre], 1)


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
        self.widths = [cin, *out_channels[:3]]  # of the features
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

    def forward_features(self, x: Tensor) -> Features:
        x = F.relu(self.bn1(self.conv1(x)))
        feats, preacts = [x], [x]
        for stage in (self.layer1, self.layer2, self.layer3):
            x, pre = run_stage(stage, x)
            feats.append(x)
            preacts.append(pre)
        pooled = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 4).flatten(1)
        return Features(self.linear(pooled), feats, preacts, pooled)

    def stage_channels(self) -> list[int]:
        return list(self.widths)

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        raise NotImplementedError(
            "ShuffleV2 has no BN before its stages' final ReLU (the ReLU covers only half of "
            "the channels), so it cannot be an OFD teacher; mdistiller does not support it either")
