"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016) as in the CRD/mdistiller CIFAR zoo.

3x3 stem conv (16 channels, no BN/ReLU after it), three groups ``block1..3`` of
``(d - 4) // 6`` pre-activation blocks with widths 16k, 32k, 64k and strides 1, 2, 2
(32x32 -> 32, 16, 8), then BN - ReLU - 8x8 average pool - ``fc``.  The zoo models use no
dropout (``drop_rate=0``).

Features (mdistiller ``cifar/wrn.py``): ``feats`` = [stem conv output, block1, block2,
block3 outputs] (pre-activation network: these sums have no BN/ReLU after them);
``preact_feats`` = [stem conv output, then for each group's output the BN that starts the next
unit: ``block2.layer[0].bn1``, ``block3.layer[0].bn1`` and the final ``bn1``] (so
``relu(preact_feats[i])``, not ``feats[i]``, is what the next layer reads); these three BNs
are ``bn_before_relu()``.  mdistiller applies each of them a second time to get the
pre-activation (in training, a second running-statistics update); here the output the network
computes anyway is kept, so values are the same and the statistics are updated once.
``pooled``: the 8x8-pooled ``relu(bn1(block3))``.  ``stage_channels()`` = [16, 16k, 32k, 64k].
"""

from torch import Tensor, nn
from torch.nn import functional as F

from ._init import he_init
from .features import Features


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``bn1-ReLU-conv1(3x3, stride)-bn2-ReLU-[dropout]-conv2(3x3)``.

    Same width in and out: the shortcut is the raw input ``x``.  Width change: the shortcut is
    ``convShortcut`` (1x1, stride, no BN) applied to the *pre-activated* ``relu(bn1(x))``,
    the same tensor that feeds conv1.  No ReLU after the addition.
    """

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from(x, self.bn1(x))

    def forward_from(self, x: Tensor, pre: Tensor) -> Tensor:
        """The block on ``x`` given ``pre = bn1(x)``, its pre-activation."""
        act = F.relu(pre)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideGroup(nn.Module):
    """``n`` blocks in ``.layer``; the first one changes width and carries the stride."""

    def __init__(self, n: int, cin: int, cout: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*(
            WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
            for i in range(n)
        ))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def forward_from(self, x: Tensor, pre: Tensor) -> Tensor:
        """The group on ``x`` given ``pre`` = the first unit's ``bn1(x)``."""
        for i, block in enumerate(self.layer):
            x = block.forward_from(x, pre) if i == 0 else block(x)
        return x


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideGroup(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideGroup(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.flatten(1))

    def forward_features(self, x: Tensor) -> Features:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        pre1 = self.block2.layer[0].bn1(f1)
        f2 = self.block2.forward_from(f1, pre1)
        pre2 = self.block3.layer[0].bn1(f2)
        f3 = self.block3.forward_from(f2, pre2)
        pre3 = self.bn1(f3)
        pooled = F.avg_pool2d(F.relu(pre3), 8).flatten(1)
        return Features(self.fc(pooled), [f0, f1, f2, f3], [f0, pre1, pre2, pre3], pooled)

    def stage_channels(self) -> list[int]:
        return [self.conv1.out_channels] + [b.num_features for b in self.bn_before_relu()]

    def bn_before_relu(self) -> list[nn.BatchNorm2d]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]
