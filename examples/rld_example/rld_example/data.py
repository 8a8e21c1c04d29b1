"""`stripes`: 3x32x32 images of sinusoidal stripes, the class being their orientation.

Each image has a random phase, frequency and contrast, a random colour per channel and pixel
noise, all drawn from `dataset.data_seed`; the sizes are the data set's own keys
(`StripesConfig`).  Held in memory as uint8, like CIFAR-100: rld serves the batches on the
device with its augmentation (random crop with padding 4, horizontal flip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import rld
from rld.config import DatasetConfig
from rld.data import DataSet

ANGLES = (0.0, 45.0, 90.0, 135.0)  # degrees; one class each (a flip swaps 45 and 135)


@dataclass
class StripesConfig(DatasetConfig):
    """The common data-set keys (`rld.config.DatasetConfig`) and the stripes' own."""

    train_size: int = 1024  # images in the training split
    test_size: int = 256  # images in the test split
    noise: float = 24.0  # std of the pixel noise, in 0..255 grey levels


def make_split(n: int, seed: int, size: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images [n, 3, size, size] (uint8) and their labels, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(ANGLES), (n,), generator=g)
    theta = torch.tensor(ANGLES)[labels] * math.pi / 180
    freq = torch.empty(n).uniform_(0.25, 0.6, generator=g)
    phase = torch.empty(n).uniform_(0, 2 * math.pi, generator=g)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    along = (xs[None] * torch.cos(theta)[:, None, None] + ys[None] * torch.sin(theta)[:, None, None])
    wave = torch.sin(along * freq[:, None, None] + phase[:, None, None])  # [n, S, S]
    contrast = torch.empty(n, 3, 1, 1).uniform_(40, 90, generator=g)
    base = torch.empty(n, 3, 1, 1).uniform_(90, 165, generator=g)
    images = base + contrast * wave[:, None] + noise * torch.randn(n, 3, size, size, generator=g)
    return images.round().clamp(0, 255).to(torch.uint8), labels


@rld.register_dataset("stripes", settings=StripesConfig)
def load_stripes(cfg) -> DataSet:
    size, seed = int(cfg.image_size), int(cfg.data_seed)
    train = make_split(int(cfg.train_size), seed * 2 + 1, size, float(cfg.noise))
    test = make_split(int(cfg.test_size), seed * 2 + 2, size, float(cfg.noise))
    names = [f"{int(a)}deg" for a in ANGLES]
    return DataSet(*train, *test, num_classes=len(ANGLES), class_names=names)
