"""ImageNet-style folders (``root/train/<class>/*``, ``root/val/<class>/*``): the loaders.

Train: RandomResizedCrop(S) + RandomHorizontalFlip + ToTensor + Normalize; test: Resize(S/0.875)
+ CenterCrop(S) + ToTensor + Normalize (S = ``cfg.image_size``, 224: Resize 256).

Two input paths give the same samples, in the same order, with the same crop and flip:

* ``pil`` (`ImageNetLoader`): DataLoader workers decode with PIL and run torchvision's
  transforms; each sample's transforms run under a torch RNG state seeded from
  (seed, epoch, index), whichever worker loads it (the caller's RNG state is restored).
* ``device`` (`rld.data.imagenet_device.ImageNetDeviceLoader`): workers only read the files
  and draw the crop parameters (the same draws as the pil path); JPEG decoding (nvjpeg on
  CUDA), crop, resize, flip and normalisation run batched on the device.

``decoder="auto"`` is the device path on CUDA and the pil path on the CPU.  Order, sharding
among data-parallel ranks and the per-sample seeds: `rld.data.folder`, `rld.data.sharding`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from rld.data.folder import FolderLoader, image_folder
from rld.data.sources import register_dataset
from rld.errors import DataError

DECODERS = ("auto", "pil", "device")


def resize_size(image_size: int) -> int:
    """The evaluation resize of crop size `image_size` (224 -> 256): ``round(S / 0.875)``."""
    return int(round(image_size / 0.875))


class SeededTransformDataset(Dataset):
    """Wraps a dataset of (PIL image, label): item ``(i, s)`` applies `transform` under seed
    s and gives ``(x, label, i)``."""

    def __init__(self, base: Any, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, seed = item
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):  # CPU state only; restored on exit
            torch.default_generator.manual_seed(seed)
            x = self.transform(img)
        return x, label, index


class StackCollate:
    """Collates ``(x, label, index)`` samples; an empty batch (a rank's share of a last
    global batch smaller than the number of ranks) gives empty tensors of `shape`."""

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(v) for v in shape)

    def __call__(self, samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not samples:
            return (
                torch.empty((0, *self.shape)),
                torch.empty(0, dtype=torch.long),
                torch.empty(0, dtype=torch.long),
            )
        xs, labels, index = zip(*samples)
        return (
            torch.stack(xs),
            torch.tensor(labels, dtype=torch.long),
            torch.tensor(index, dtype=torch.long),
        )


class ImageNetLoader(FolderLoader):
    """The pil path: a DataLoader whose batches arrive on `device` (non-blocking).

    Yields ``(x, y)`` or, with `with_index`, ``(x, y, index)`` (int64 data set rows).
    `batch_size` is the global batch, shared among `world_size` ranks (`rld.data.sharding`).
    """

    def __init__(self, folder: Any, transform: Any, batch_size: int, *, workers: int,
                 image_size: int = 224, **loader: Any) -> None:
        """`loader`: `FolderLoader`'s settings (train, device, seed, drop_last, rank,
        world_size, with_index)."""
        super().__init__(folder.targets, batch_size, **loader)
        workers = int(workers)
        self.loader = DataLoader(
            SeededTransformDataset(folder, transform),
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=StackCollate((3, image_size, image_size)),
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for x, y, index in self.loader:
            yield self._out(
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
                index.to(self.device, non_blocking=True),
            )


def imagenet_transforms(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """The pil path's (train, test) torchvision transforms."""
    from torchvision import transforms as T

    norm = T.Normalize([float(v) for v in mean], [float(v) for v in std])
    train = T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]
    )
    test = T.Compose(
        [T.Resize(resize_size(image_size)), T.CenterCrop(image_size), T.ToTensor(), norm]
    )
    return train, test


def resolve_decoder(decoder: str, device: torch.device) -> str:
    """The input path of `decoder`: "pil" or "device" ("auto": device on CUDA, else pil)."""
    if decoder not in DECODERS:
        raise DataError(f"dataset.decoder={decoder!r}; expected one of {', '.join(DECODERS)}")
    if decoder == "auto":
        return "device" if device.type == "cuda" else "pil"
    return decoder


def _folders(cfg: Any) -> tuple[Any, Any]:
    root = Path(str(cfg.root)).expanduser()
    train_set = image_folder(root / "train")
    test_set = image_folder(root / "val")
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
    return train_set, test_set


@register_dataset("imagenet", loaders=True)
def build_imagenet_loaders(cfg: Any, batch_size: int, test_batch_size: int, *,
                           decoder: str | None = None, **shard: Any) -> tuple[Any, Any, list[str]]:
    """(train, test, class names) of the folders under ``cfg.root`` (called by
    `rld.data.build_loaders`, which documents the arguments).

    `decoder`: auto | pil | device (None: ``cfg.decoder`` when the config has it, else auto).
    `shard`: the loaders' common settings (device, seed, drop_last, rank, world_size,
    with_index; `FolderLoader`); batch sizes are global.
    """
    device = torch.device(shard["device"])
    if decoder is None:
        decoder = str(getattr(cfg, "decoder", "auto"))
    path = resolve_decoder(decoder, device)
    train_set, test_set = _folders(cfg)
    size = int(cfg.image_size)
    drop_last = shard.pop("drop_last", False)
    common = dict(workers=int(cfg.workers), image_size=size, **shard)
    if path == "device":
        from rld.data.imagenet_device import ImageNetDeviceLoader

        aug = dict(mean=cfg.mean, std=cfg.std, **common)
        train = ImageNetDeviceLoader(train_set.samples, batch_size, train=True,
                                     drop_last=drop_last, **aug)
        test = ImageNetDeviceLoader(test_set.samples, test_batch_size, train=False, **aug)
    else:
        train_tf, test_tf = imagenet_transforms(size, cfg.mean, cfg.std)
        train = ImageNetLoader(train_set, train_tf, batch_size, train=True,
                               drop_last=drop_last, **common)
        test = ImageNetLoader(test_set, test_tf, test_batch_size, train=False, **common)
    return train, test, list(train_set.classes)
