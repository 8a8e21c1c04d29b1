"""How the batches of an epoch are cut and shared among data-parallel ranks.

The rule, the same for every loader of `rld.data`:

* ``batch_size`` is the GLOBAL batch, the recipe's.  The epoch's order (a permutation drawn
  from (seed, epoch) for training, ``0 .. N-1`` for evaluation) is cut into global batches of
  ``batch_size`` consecutive positions; with `drop_last` (training only) a last partial global
  batch is dropped.
* Rank ``r`` of ``W`` takes the contiguous slice ``[floor(r*m/W), floor((r+1)*m/W))`` of each
  global batch of ``m`` samples: ``r*B/W .. (r+1)*B/W`` of a full batch, and as even a split as
  possible (sizes differ by at most one; the higher ranks get the extra samples) of the last
  partial one.  When that last batch has fewer samples than there are ranks, some ranks get
  an empty batch for that step.
* Every rank thus runs the same number of steps (``len(plan)``), the ranks' batches of a step
  concatenated in rank order are the 1-rank global batch, and each sample is seen exactly
  once per epoch over all ranks.  Augmentation is drawn per position or per sample, never per
  rank, so a W-rank epoch equals a 1-rank epoch of the same global batch.

Training needs ``batch_size % world_size == 0`` (each rank's batch is the recipe's global batch
over W, so per-rank losses averaged by DistributedDataParallel equal the global mean);
evaluation takes any batch size.
"""

from __future__ import annotations

import math

from rld.errors import DataError


def check_rank(rank: int, world_size: int) -> None:
    """DataError unless ``0 <= rank < world_size``."""
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise DataError(
            f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size"
        )


def check_sharding(batch_size: int, rank: int, world_size: int, *, train: bool = True) -> None:
    """DataError unless the global `batch_size` can be shared by `world_size` ranks."""
    check_rank(rank, world_size)
    if int(batch_size) < 1:
        raise DataError(f"trainer.batch_size must be >= 1, got {batch_size}")
    if train and int(batch_size) % int(world_size):
        raise DataError(
            f"trainer.batch_size={batch_size} (the global batch) does not divide over "
            f"{world_size} ranks; choose a multiple of {world_size}"
        )


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(lo, hi)``: the contiguous share of rank `rank` in ``0 .. size`` (floor split)."""
    return size * rank // world_size, size * (rank + 1) // world_size


class BatchPlan:
    """The global batches of an epoch of `num_samples` and this rank's share of each.

    Positions are indices into the epoch's order (not data set rows).  Pure Python integers:
    nothing here touches a device.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        train: bool = True,
    ) -> None:
        check_sharding(batch_size, rank, world_size, train=train)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = bool(drop_last) and bool(train)
        n, b = self.num_samples, self.batch_size
        self.num_batches = n // b if self.drop_last else math.ceil(n / b)
        self.local_ranges = [self.local_range(i) for i in range(self.num_batches)]
        self.local_sizes = [hi - lo for lo, hi in self.local_ranges]

    def __len__(self) -> int:
        return self.num_batches

    @property
    def local_batch_size(self) -> int:
        """A full batch's share per rank (``batch_size // world_size`` in training)."""
        return self.batch_size // self.world_size

    @property
    def rank_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return sum(self.local_sizes)

    def global_range(self, step: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` of global batch `step` (0-based)."""
        lo = step * self.batch_size
        return lo, min(lo + self.batch_size, self.num_samples)

    def global_size(self, step: int) -> int:
        """Samples in global batch `step` over all ranks (the last one may be partial)."""
        lo, hi = self.global_range(step)
        return hi - lo

    def local_range(self, step: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` of this rank's share of global batch `step`."""
        lo, hi = self.global_range(step)
        a, b = shard_bounds(hi - lo, self.rank, self.world_size)
        return lo + a, lo + b


class PlannedLoader:
    """What every loader tells of its `plan` (a `BatchPlan`; the rest, e.g. this rank's
    samples, from `loader.plan`): the split's size and the number of steps."""

    plan: BatchPlan

    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks together)."""
        return self.plan.num_samples

    def __len__(self) -> int:
        """Steps per epoch, the same on every rank."""
        return len(self.plan)
