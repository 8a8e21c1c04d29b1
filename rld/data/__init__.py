"""Data sets and loaders.

    DATASETS, register_dataset             the registry of data sets (rld.data.sources)
    load_dataset(cfg) -> DataSet          a data set held in memory (cifar100, synthetic, digits)
    build_loaders(cfg, batch_size, device, seed, drop_last=False) -> Loaders
    build_loaders(..., *, rank=0, world_size=1, with_index=False, decoder=None)
    DeviceLoader(images_uint8, labels, batch_size, *, train, mean, std, device, seed, ...)
    BatchPlan(num_samples, batch_size, *, rank, world_size, drop_last, train)
                                           global batches and a rank's share of each
    crop_flip(batch_uint8, offsets_yx, flips, pad) -> uint8
    DataError                              bad or missing data (a ValueError)

ImageNet: rld.data.imagenet (the PIL path, build_imagenet_loaders) and
rld.data.imagenet_device (JPEG decoding and augmentation on the device).

Names are imported lazily, so ``import rld.data`` (or DataError alone) does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from rld.errors import DataError

if TYPE_CHECKING:  # the names below, for type checkers and IDEs
    from rld.data.augment import crop_flip, mix_seed
    from rld.data.device_loader import DeviceLoader
    from rld.data.loaders import Loaders, build_loaders, resolve_device
    from rld.data.sharding import BatchPlan
    from rld.data.sources import DATASETS, DataSet, DatasetSpec, load_dataset, register_dataset

_LAZY = {
    "DATASETS": "rld.data.sources",
    "DatasetSpec": "rld.data.sources",
    "register_dataset": "rld.data.sources",
    "DataSet": "rld.data.sources",
    "load_dataset": "rld.data.sources",
    "DeviceLoader": "rld.data.device_loader",
    "crop_flip": "rld.data.augment",
    "mix_seed": "rld.data.augment",
    "Loaders": "rld.data.loaders",
    "build_loaders": "rld.data.loaders",
    "resolve_device": "rld.data.loaders",
    "BatchPlan": "rld.data.sharding",
}

__all__ = [
    "DATASETS",
    "BatchPlan",
    "DatasetSpec",
    "register_dataset",
    "DataError",
    "DataSet",
    "DeviceLoader",
    "Loaders",
    "build_loaders",
    "crop_flip",
    "load_dataset",
    "mix_seed",
    "resolve_device",
]
assert set(__all__) == {"DataError", *_LAZY}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rld.data' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
