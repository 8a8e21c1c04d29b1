"""ImageNet-style folders (``root/train/<class>/*``, ``root/val/<class>/*``) through a DataLoader.

Train: RandomResizedCrop(S) + RandomHorizontalFlip + ToTensor + Normalize; test: Resize(S/0.875)
+ CenterCrop(S) + ToTensor + Normalize (S = ``cfg.image_size``, 224: Resize 256).

Order and augmentation are reproducible per (seed, epoch): the sampler draws the epoch's
permutation from a generator seeded from (seed, epoch), and each sample's transforms run under
a torch RNG state seeded from (seed, epoch, index), whichever worker loads it (the caller's
global RNG state is restored afterwards).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rld.data.augment import mix_seed
from rld.data.errors import DataError

_ORDER_STREAM = 0x0DE7
_AUGMENT_STREAM = 0xA06


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed)``: a (seed, epoch)-seeded permutation, or 0..n-1."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, _ORDER_STREAM, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = range(self.n)
        base = mix_seed(self.seed, _AUGMENT_STREAM, self.epoch)
        for i in order:
            yield i, mix_seed(base, i)


class SeededTransformDataset(Dataset):
    """Wraps a dataset of (PIL image, label): item ``(i, s)`` applies `transform` under seed s."""

    def __init__(self, base: Any, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):  # CPU state only; restored on exit
            torch.default_generator.manual_seed(seed)
            x = self.transform(img)
        return x, label


class ImageNetLoader:
    """A DataLoader over an image folder whose batches arrive on `device` (non-blocking)."""

    def __init__(
        self,
        folder: Any,
        transform: Any,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str,
        seed: int,
        workers: int,
        drop_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.train = bool(train)
        self.sampler = EpochSampler(len(folder), seed, shuffle=self.train)
        self.drop_last = bool(drop_last) and self.train
        self.batch_size = int(batch_size)
        workers = int(workers)
        self.loader = DataLoader(
            SeededTransformDataset(folder, transform),
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            drop_last=self.drop_last,
        )

    @property
    def num_samples(self) -> int:
        return self.sampler.n

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, dtype=torch.long, non_blocking=True),
            )


def imagenet_transforms(image_size: int, mean: Sequence[float], std: Sequence[float]):
    from torchvision import transforms as T

    norm = T.Normalize([float(v) for v in mean], [float(v) for v in std])
    train = T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]
    )
    test = T.Compose(
        [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size), T.ToTensor(), norm]
    )
    return train, test


def _image_folder(path: Path) -> Any:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DataError(
            f"ImageNet folder {path} not found (expected <dataset.root>/train/<class>/*.JPEG "
            f"and <dataset.root>/val/<class>/*.JPEG); set dataset.root=DIR"
        )
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise DataError(f"ImageNet folder {path}: {e}; set dataset.root=DIR") from e


def build_imagenet_loaders(
    cfg: Any,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    drop_last: bool = False,
    test_batch_size: int | None = None,
) -> tuple[ImageNetLoader, ImageNetLoader, list[str]]:
    root = Path(str(cfg.root)).expanduser()
    train_set = _image_folder(root / "train")
    test_set = _image_folder(root / "val")
    if train_set.classes != test_set.classes:
        raise DataError(
            f"the class folders of {root / 'train'} and {root / 'val'} differ "
            f"({len(train_set.classes)} vs {len(test_set.classes)} classes)"
        )
    if len(train_set.classes) != int(cfg.num_classes):
        raise DataError(
            f"dataset.num_classes={cfg.num_classes} but {root / 'train'} has "
            f"{len(train_set.classes)} class folders"
        )
    train_tf, test_tf = imagenet_transforms(int(cfg.image_size), cfg.mean, cfg.std)
    workers = int(cfg.workers)
    train = ImageNetLoader(
        train_set,
        train_tf,
        batch_size,
        train=True,
        device=device,
        seed=seed,
        workers=workers,
        drop_last=drop_last,
    )
    test = ImageNetLoader(
        test_set,
        test_tf,
        test_batch_size or batch_size,
        train=False,
        device=device,
        seed=seed,
        workers=workers,
    )
    return train, test, list(train_set.classes)
