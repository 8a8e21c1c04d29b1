"""MobileNetV2 of the CRD/mdistiller CIFAR zoo (``mobile_half``: expansion T=6, width 0.5).

Differences from the ImageNet MobileNetV2 (Sandler et al. 2018): plain ReLU (not ReLU6); the
1x1 expansion conv is kept even for t=1; the last 1x1 conv keeps 1280 channels (not scaled
for width <= 1); no dropout before the classifier.  For 32x32 inputs:

* ``conv1``: 3x3 conv stride 2 (32 -> 16x16), 16 channels, BN, ReLU;
* ``blocks``: (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1)
  (6,160,3,2) (6,320,1,1) with c halved -> 8, 12, 16, 32, 48, 80, 160 channels and maps
  16, 16, 8, 4, 4, 2, 2; the stride is in each group's first block;
* ``conv2``: 1x1 conv 160 -> 1280, BN, ReLU; 2x2 average pool (``AvgPool2d(2, ceil_mode)``);
* ``classifier``: ``Sequential(Linear(1280, classes))``.

Features (mdistiller ``cifar/mobilenetv2.py``): ``feats`` = [``conv1`` output (after its
ReLU), outputs of block groups 1, 2, 4, 6] (``FEATURE_GROUPS``; 16, 12, 16, 48, 160 channels
at 16, 16, 8, 4, 2 for 32x32 inputs).  mdistiller gives no ``preact_feats`` for this model;
ours are the same tensors as ``feats`` (the groups end in a linear bottleneck, no ReLU; the
stem entry is post-ReLU as in the other models).  ``pooled``: the pooled ``conv2`` output
(1280).  ``bn_before_relu()`` = the last BN of the last block of groups 1, 2, 4, 6.
"""

from torch import Tensor, nn

from ._init import he_init
from .features import Features

SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1)]
FEATURE_GROUPS = (1, 2, 4, 6)  # block groups whose outputs are features (mdistiller)


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class InvertedResidual(nn.Module):
    """``conv`` = 1x1 expand (t*cin) - BN - ReLU - 3x3 depthwise (stride) - BN - ReLU - 1x1
    project - BN (linear bottleneck).  Identity residual iff stride 1 and cin == cout."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, width: float = 0.5, input_size: int = 32):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(3, cin, 3, stride=2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTING:
            cout = int(c * width)
            group = []
            for i in range(n):
                group.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            self.blocks.append(nn.Sequential(*group))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1)
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        he_init(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(self.avgpool(self.conv2(x)).flatten(1))

    def forward_features(self, x: Tensor) -> Features:
        x = self.conv1(x)
        feats = [x]
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in FEATURE_GROUPS:
                feats.append(x)
        pooled = self.avgpool(self.conv2(x)).flatten(1)
        return Features(self.classifier(pooled), feats, list(feats), pooled)

    def stage_channels(self) -> list[int]:
        return [self.conv1[1].num_features] + [b.num_features for b in self.bn_before_relu()]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.blocks[i][-1].conv[-1] for i in FEATURE_GROUPS]
