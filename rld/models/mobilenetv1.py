"""MobileNetV1 1.0-224 (Howard et al. 2017) as used by the CRD/mdistiller ImageNet experiments.

``model`` is a Sequential: [0] 3x3 conv stride 2 (3 -> 32) - BN - ReLU, then 13 depthwise-
separable units ``3x3 depthwise (stride) - BN - ReLU - 1x1 - BN - ReLU`` with outputs
64, 128, 128, 256, 256, 512 x6, 1024, 1024 and strides 1, 2, 1, 2, 1, 2, 1x5, 2, 1
(224 -> 112, 112, 56, 56, 28, 28, 14 .., 7, 7), [14] 7x7 average pool; then ``fc``.

Features (mdistiller ``imagenet/mobilenetv1.py``; no stem entry): ``feats`` = outputs of
units ``model[3, 5, 11, 13]`` (``FEATURE_UNITS``: 128@56, 256@28, 512@14, 1024@7 for 224
inputs); ``preact_feats`` = the same before the unit's last ReLU (its last BN's output; these
four BNs are ``bn_before_relu()``); ``pooled``: the 7x7-pooled ``model[13]`` output (1024);
``stage_channels()`` = [128, 256, 512, 1024].
"""

from torch import Tensor, nn
from torch.nn import functional as F

from .features import Features

UNITS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
    (1024, 2), (1024, 1)]
FEATURE_UNITS = (3, 5, 11, 13)  # indices in ``model`` of the units giving features (mdistiller)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        layers = [_conv_bn(3, 32, 2)]
        cin = 32
        for cout, stride in UNITS:
            layers.append(_conv_dw(cin, cout, stride))
            cin = cout
        self.model = nn.Sequential(*layers, nn.AvgPool2d(7))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.model(x).flatten(1))

    def forward_features(self, x: Tensor) -> Features:
        feats, preacts = [], []
        for i in range(len(UNITS) + 1):
            unit = self.model[i]
            if i in FEATURE_UNITS:
                for k in range(len(unit) - 1):  # all but the last ReLU
                    x = unit[k](x)
                preacts.append(x)
                x = F.relu(x)
                feats.append(x)
            else:
                x = unit(x)
        pooled = self.model[-1](x).flatten(1)
        return Features(self.fc(pooled), feats, preacts, pooled)

    def stage_channels(self) -> list[int]:
        return [bn.num_features for bn in self.bn_before_relu()]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.model[i][-2] for i in FEATURE_UNITS]
