"""MobileNetV1 1.0-224 (Howard et al. 2017) as used by the CRD/mdistiller ImageNet experiments.

``model`` is a Sequential: [0] 3x3 conv stride 2 (3 -> 32) - BN - ReLU, then 13 depthwise-
separable units ``3x3 depthwise (stride) - BN - ReLU - 1x1 - BN - ReLU`` with outputs
64, 128, 128, 256, 256, 512 x6, 1024, 1024 and strides 1, 2, 1, 2, 1, 2, 1x5, 2, 1
(224 -> 112, 112, 56, 56, 28, 28, 14 .., 7, 7), [14] 7x7 average pool; then ``fc``.
"""

from torch import Tensor, nn

UNITS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
    (1024, 2), (1024, 1)]


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
