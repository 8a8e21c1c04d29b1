"""`tinycnn`: a small CNN for 3x32x32 inputs (the `cifar` family), registered by name."""

from __future__ import annotations

from torch import Tensor, nn

import rld


class TinyCNN(nn.Module):
    """Two conv-BN-ReLU blocks with max-pooling, global average pooling, a linear head."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


@rld.register_model("tinycnn", family="cifar")
def tinycnn(num_classes: int) -> TinyCNN:
    return TinyCNN(num_classes)
