"""A data loader that keeps a whole CIFAR-sized split on the device.

The split is moved to the device once, as uint8 (CIFAR-100 train: 150 MiB).  Each training
epoch draws its permutation, crop offsets and flip flags from a generator seeded from
(seed, epoch) on the data's device, so the order and augmentation of epoch e are the same
whether or not the run was resumed, and no global RNG is touched.  Batches are assembled,
augmented and normalised by a handful of batched tensor operations, with no host syncs.

Data-parallel ranks (``rank``/``world_size``) share each global batch as `rld.data.sharding`
describes: every rank draws the same permutation and augmentation (indexed by position in
the epoch's order) and keeps its slice, so W ranks together see the 1-rank run's batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from rld.data.augment import draw_crop_flip, gather_crop_flip, mix_seed, norm_constants
from rld.data.augment import normalize_uint8 as _normalize
from rld.data.sharding import BatchPlan, PlannedLoader

_TRAIN_STREAM = 0x5EED_DA7A  # separates the loader's seeds from other users of `seed`


def _check_inputs(images: torch.Tensor, labels: torch.Tensor, batch_size: int, pad: int) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"images must be uint8 [N,C,H,W], got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be [N] with N={images.shape[0]}, got {tuple(labels.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")


class DeviceLoader(PlannedLoader):
    """Iterate ``(x, y)`` (or ``(x, y, index)``) batches of a uint8 image tensor on `device`.

    x: float32 ``[b, C, H, W]`` normalised with `mean`/`std`; y: int64 ``[b]``; with
    `with_index`, index: int64 ``[b]``, the rows of `images_uint8` in the batch; all on
    `device`.  train=True: a fresh seeded permutation per epoch (see `set_epoch`), random crop
    with `pad` pixels of zero padding and horizontal flip with p=0.5; the last partial batch
    is kept unless `drop_last`.  train=False: fixed order, no augmentation, all samples.

    `batch_size` is the global batch; rank `rank` of `world_size` gets its share of each
    (``b = batch_size // world_size`` for full training batches; see `rld.data.sharding`).
    ``len(loader)`` is the number of steps, the same on every rank.

    Batches are prepared `chunk_images` at a time (default 4096 on CUDA, 2048 on CPU) and
    yielded as views, which cuts kernel launches per batch; the samples, their order and
    their augmentation do not depend on it.
    """

    def __init__(
        self,
        images_uint8: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str,
        seed: int,
        drop_last: bool = False,
        pad: int = 4,
        chunk_images: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        with_index: bool = False,
    ) -> None:
        _check_inputs(images_uint8, labels, batch_size, pad)
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device).contiguous()
        self.labels = labels.to(self.device, dtype=torch.long)
        self.mean, self.std = norm_constants(mean, std, self.device)
        if self.mean.shape[1] != self.images.shape[1]:
            raise ValueError(
                f"mean/std have {self.mean.shape[1]} channels, images {self.images.shape[1]}"
            )
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.drop_last = bool(drop_last) and self.train
        self.pad = int(pad)
        self.with_index = bool(with_index)
        self.plan = BatchPlan(
            int(self.images.shape[0]),
            self.batch_size,
            rank=rank,
            world_size=world_size,
            drop_last=self.drop_last,
            train=self.train,
        )
        # this rank's positions in the epoch's order, step after step (all of them: 0..n-1)
        self.positions = torch.cat(
            [torch.arange(lo, hi) for lo, hi in self.plan.local_ranges]
            or [torch.zeros(0, dtype=torch.long)]
        ).to(self.device)
        self.epoch = 1
        if chunk_images is None:
            chunk_images = 4096 if self.device.type == "cuda" else 2048
        self.chunk_images = int(chunk_images)

    def set_epoch(self, epoch: int) -> None:
        """Fix the (1-based) epoch whose order and augmentation the next iteration yields."""
        self.epoch = int(epoch)

    def generator(self, epoch: int | None = None) -> torch.Generator:
        """The generator of `epoch` (default: the current one), on the data's device."""
        e = self.epoch if epoch is None else int(epoch)
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed(self.seed, _TRAIN_STREAM, e))
        return g

    def epoch_plan(
        self, epoch: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(permutation [N], crop offsets [N, 2], flip flags [N]) of a training epoch."""
        g = self.generator(epoch)
        perm = torch.randperm(self.num_samples, generator=g, device=self.device)
        offsets, flips = draw_crop_flip(self.num_samples, self.pad, g, self.device)
        return perm, offsets, flips

    def _chunk_batches(self) -> int:
        """Batches assembled per round of tensor operations (fewer launches, same result)."""
        return max(1, self.chunk_images // max(1, self.plan.local_batch_size))

    def _rank_order(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(rows, crop offsets, flips) of this rank's samples in step order (no augmentation
        when evaluating).  The epoch's plan is drawn for all N positions, as on one rank."""
        if not self.train:
            return self.positions, None, None
        perm, offsets, flips = self.epoch_plan()
        pos = self.positions
        return perm[pos], offsets[pos], flips[pos]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        sizes, per = self.plan.local_sizes, self._chunk_batches()
        rows, offsets, flips = self._rank_order()
        lo = 0
        for c0 in range(0, len(sizes), per):
            chunk = sizes[c0 : c0 + per]
            hi = lo + sum(chunk)
            idx = rows[lo:hi]
            if offsets is None:
                x = _normalize(self.images.index_select(0, idx), self.mean, self.std)
            else:
                x = gather_crop_flip(self.images, idx, offsets[lo:hi], flips[lo:hi], self.pad)
                x = _normalize(x, self.mean, self.std)
            y = self.labels[idx]
            i = 0
            for size in chunk:
                if self.with_index:
                    yield x[i : i + size], y[i : i + size], idx[i : i + size]
                else:
                    yield x[i : i + size], y[i : i + size]
                i += size
            lo = hi
