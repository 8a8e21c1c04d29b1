"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016) as in the CRD/mdistiller CIFAR zoo.

3x3 stem conv (16 channels, no BN/ReLU after it), three groups ``block1..3`` of
``(d - 4) // 6`` pre-activation blocks with widths 16k, 32k, 64k and strides 1, 2, 2
(32x32 -> 32, 16, 8), then BN - ReLU - 8x8 average pool - ``fc``.  The zoo models use no
dropout (``drop_rate=0``).
"""

from torch import Tensor, nn
from torch.nn import functional as F

from ._init import he_init


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
        act = F.relu(self.bn1(x))
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
