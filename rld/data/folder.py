"""What the two ImageNet input paths share: the image folders, the epoch's sharded batches of
``(index, sample_seed)`` and the loader plumbing (epochs, length, sample counts).

Order and augmentation are reproducible per (seed, epoch): the epoch's order is a permutation
drawn from a generator seeded from (seed, epoch) (training) or ``0 .. N-1`` (evaluation), cut
into global batches and shared among ranks by `rld.data.sharding.BatchPlan`; each sample's
random transforms are seeded from (seed, epoch, index), so a sample gets the same crop and
flip whichever rank, worker or input path loads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from rld.data.augment import mix_seed
from rld.data.sharding import BatchPlan, PlannedLoader
from rld.errors import DataError

_ORDER_STREAM = 0x0DE7
_AUGMENT_STREAM = 0xA06


def image_folder(path: Path) -> Any:
    """torchvision's ImageFolder over `path`, or a DataError naming dataset.root."""
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


class EpochBatchSampler(Sampler):
    """Yields this rank's batches, lists of ``(index, sample_seed)``, one per step.

    `plan` cuts the epoch's order (a (seed, epoch)-seeded permutation when `shuffle`, else
    ``0 .. n-1``) into global batches and gives this rank's share; `sample_seed` is a
    function of (seed, epoch, index) only.
    """

    def __init__(self, plan: BatchPlan, seed: int, shuffle: bool) -> None:
        self.plan, self.seed, self.shuffle = plan, int(seed), bool(shuffle)
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        """The epoch's order of data set rows (all ranks)."""
        n = self.plan.num_samples
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(mix_seed(self.seed, _ORDER_STREAM, self.epoch))
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order()
        base = mix_seed(self.seed, _AUGMENT_STREAM, self.epoch)
        for lo, hi in self.plan.local_ranges:
            yield [(i, mix_seed(base, i)) for i in order[lo:hi]]


class FolderLoader(PlannedLoader):
    """The sampler-side half of an image-folder loader: epochs, steps and sample counts.

    ``labels``: int64 ``[N]`` on `device`, the label of every row of the split (all ranks).
    Subclasses set ``self.loader`` (a DataLoader over ``self.sampler``) and ``__iter__``.
    """

    def __init__(
        self,
        targets: Sequence[int],
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        with_index: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.train = bool(train)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last) and self.train
        self.with_index = bool(with_index)
        self.labels = torch.as_tensor(targets, dtype=torch.long).to(self.device)
        self.plan = BatchPlan(
            len(targets),
            self.batch_size,
            rank=rank,
            world_size=world_size,
            drop_last=self.drop_last,
            train=self.train,
        )
        self.sampler = EpochBatchSampler(self.plan, seed, shuffle=self.train)

    def set_epoch(self, epoch: int) -> None:
        """Fix the (1-based) epoch whose order and augmentation the next iteration yields."""
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def _out(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> tuple:
        return (x, y, index) if self.with_index else (x, y)
