"""A data loader that keeps a whole CIFAR-sized split on the device.

The split is moved to the device once, as uint8 (CIFAR-100 train: 150 MiB).  Each training
epoch draws its permutation, crop offsets and flip flags from a generator seeded from
(seed, epoch) on the data's device, so the order and augmentation of epoch e are the same
whether or not the run was resumed, and no global RNG is touched.  Batches are assembled,
augmented and normalised by a handful of batched tensor operations, with no host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from rld.data.augment import draw_crop_flip, gather_crop_flip, mix_seed, norm_constants
from rld.data.augment import normalize_uint8 as _normalize

_TRAIN_STREAM = 0x5EED_DA7A  # separates the loader's seeds from other users of `seed`


class DeviceLoader:
    """Iterate ``(x, y)`` batches of a uint8 image tensor held on `device`.

    x: float32 ``[B, C, H, W]`` normalised with `mean`/`std`; y: int64 ``[B]``; both on `device`.
    train=True: a fresh seeded permutation per epoch (see `set_epoch`), random crop with `pad`
    pixels of zero padding and horizontal flip with p=0.5; the last partial batch is kept
    unless `drop_last`.  train=False: fixed order, no augmentation, all samples.

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
    ) -> None:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N,C,H,W], got {images_uint8.dtype} "
                f"{tuple(images_uint8.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != images_uint8.shape[0]:
            raise ValueError(
                f"labels must be [N] with N={images_uint8.shape[0]}, got {tuple(labels.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
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
        self.epoch = 1
        if chunk_images is None:
            chunk_images = 4096 if self.device.type == "cuda" else 2048
        self.chunk_images = int(chunk_images)

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Fix the (1-based) epoch whose order and augmentation the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

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
        return max(1, self.chunk_images // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = self.num_samples, self.batch_size
        nb, per = len(self), self._chunk_batches()
        plan = self.epoch_plan() if self.train else None
        for c0 in range(0, nb, per):
            c1 = min(c0 + per, nb)
            lo, hi = c0 * b, min(c1 * b, n)
            if plan is None:
                x = _normalize(self.images[lo:hi], self.mean, self.std)
                y = self.labels[lo:hi]
            else:
                perm, offsets, flips = plan
                idx = perm[lo:hi]
                x = gather_crop_flip(self.images, idx, offsets[lo:hi], flips[lo:hi], self.pad)
                x = _normalize(x, self.mean, self.std)
                y = self.labels[idx]
            for i in range(0, hi - lo, b):
                yield x[i : i + b], y[i : i + b]
