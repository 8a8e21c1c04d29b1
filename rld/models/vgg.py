"""VGG with batch norm as in the CRD/mdistiller CIFAR zoo (``vgg*_bn``).

Five blocks ``block0..block4``; a block is ``[conv3x3(bias=True) - BN - ReLU] * m`` with its
last ReLU dropped from the Sequential and applied in ``forward`` (so indices are conv 0, 3, 6..
and BN 1, 4, 7..).  2x2 max-pool after blocks 0, 1 and 2; after block 3 only for 64x64 inputs,
so on 32x32 CIFAR images blocks 3 and 4 both run at 4x4.  Then global average pool and a
single linear layer 512 -> classes (no VGG-style FC stack).

Features (mdistiller ``cifar/vgg.py``): ``feats`` = ``relu(block_i)`` for the five blocks
(before their max-pool); ``preact_feats`` = [``relu(block0)`` (post-ReLU, as mdistiller),
``block1..block4`` outputs before their ReLU]; ``pooled`` = the globally pooled ``relu(block4)``
(after the pooling, 512); ``stage_channels()`` = each block's width; ``bn_before_relu()`` =
the last BN of blocks 1-4.
"""

from torch import Tensor, nn
from torch.nn import functional as F

from ._init import he_init
from .features import Features

CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(cin: int, widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int):
        super().__init__()
        cins = [3] + [widths[-1] for widths in cfg[:-1]]
        for i, (cin, widths) in enumerate(zip(cins, cfg, strict=True)):
            self.add_module(f"block{i}", _block(cin, widths))
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        he_init(self, linear_std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        h = x.shape[2]
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if h == 64:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.block4(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def _blocks(self) -> list[nn.Sequential]:
        return [getattr(self, f"block{i}") for i in range(5)]

    def forward_features(self, x: Tensor) -> Features:
        h = x.shape[2]
        feats, preacts = [], []
        for i, block in enumerate(self._blocks()):
            pre = block(x)
            x = F.relu(pre)
            feats.append(x)
            preacts.append(x if i == 0 else pre)
            if i < 3 or (i == 3 and h == 64):
                x = F.max_pool2d(x, 2)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return Features(self.classifier(pooled), feats, preacts, pooled)

    def stage_channels(self) -> list[int]:
        return [block[-1].num_features for block in self._blocks()]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [block[-1] for block in self._blocks()[1:]]


def vgg(name: str, num_classes: int) -> VGG:
    return VGG(CONFIGS[name], num_classes)
