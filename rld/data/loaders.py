"""`build_loaders`: the train/test loaders of any configured data set, batches on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rld.data.device_loader import DeviceLoader
from rld.data.sharding import check_sharding
from rld.data.sources import DATASETS, load_dataset


@dataclass
class Loaders:
    """train/test iterate ``(x, y)`` (``(x, y, index)`` with `with_index`) on the device;
    both have set_epoch, len (steps, equal on all ranks), num_samples and rank_samples."""

    train: Any  # DeviceLoader | ImageNetLoader
    test: Any
    num_classes: int
    class_names: list[str]

    @property
    def num_train(self) -> int:
        return int(self.train.num_samples)

    @property
    def num_test(self) -> int:
        return int(self.test.num_samples)


def resolve_device(device: torch.device | str) -> torch.device:
    """torch.device of `device`; "auto" is CUDA when present, else CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_loaders(
    cfg: Any,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    drop_last: bool = False,
    test_batch_size: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    with_index: bool = False,
    decoder: str | None = None,
) -> Loaders:
    """Loaders of the data set `cfg` names (a DatasetConfig or a DictConfig with its keys;
    `rld.data.DATASETS`).

    Data sets held in memory (cifar100, synthetic, digits, ...): `DeviceLoader`s holding each
    split on the device.  Data sets with loaders of their own: theirs, e.g. imagenet
    (ImageFolder(root/train, root/val) through the input path `decoder` selects: auto | pil
    | device; None: ``cfg.decoder`` if set, else auto; cfg.workers workers).  The test loader
    uses `test_batch_size` (default: `batch_size`).

    Batch sizes are global: rank `rank` of `world_size` data-parallel ranks gets its share
    of each batch (`rld.data.sharding`; training needs batch_size % world_size == 0).
    `with_index` makes the loaders yield ``(x, y, index)``, index the int64 rows of the split.
    """
    check_sharding(batch_size, rank, world_size)  # before any data is read
    shard = dict(rank=rank, world_size=world_size, with_index=with_index)
    dev = resolve_device(device)
    spec = DATASETS.get(str(cfg.name))
    if spec.loaders is not None:
        train, test, names = spec.loaders(
            cfg, batch_size, test_batch_size or batch_size, decoder=decoder, device=dev,
            seed=seed, drop_last=drop_last, **shard)
        return Loaders(train, test, len(names), names)
    ds = load_dataset(cfg)
    common = dict(mean=ds.mean, std=ds.std, device=dev, seed=seed, **shard)
    train = DeviceLoader(
        ds.train_images, ds.train_labels, batch_size, train=True, drop_last=drop_last, **common
    )
    test = DeviceLoader(
        ds.test_images, ds.test_labels, test_batch_size or batch_size, train=False, **common
    )
    return Loaders(train, test, ds.num_classes, ds.class_names)
