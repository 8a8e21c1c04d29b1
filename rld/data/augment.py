"""Batched CIFAR augmentation on uint8 tensors, on whatever device they live on.

The training recipe is torchvision's ``RandomCrop(32, padding=4)`` (zero padding) followed by
``RandomHorizontalFlip()``, ``ToTensor()`` and ``Normalize(mean, std)``.  Here the crop and the
flip of a whole batch are a few batched tensor operations ending in one gather (see
`gather_crop_flip`).  ``oy, ox`` are the offsets of the crop window inside the padded image, in
``0 .. 2 * pad``, exactly torchvision's ``crop(pad(img, pad), top=oy, left=ox, ...)``.  Normalisation repeats torchvision's arithmetic
(``x.float() / 255``, then ``- mean``, then ``/ std``), so results are bitwise equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 chained over `parts`).

    Pure Python and platform independent: (seed, epoch) always gives the same generator seed.
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


def draw_crop_flip(
    n: int, pad: int, generator: torch.Generator, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``[n, 2]`` (int64, uniform in ``0 .. 2 * pad``) and flip flags ``[n]`` (bool, p=0.5)
    drawn from `generator`, on its device."""
    device = generator.device if device is None else device
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    return offsets, flips


def gather_crop_flip(
    images: torch.Tensor,
    index: torch.Tensor | None,
    offsets_yx: torch.Tensor,
    flips: torch.Tensor,
    pad: int,
) -> torch.Tensor:
    """``crop_flip(images[index], ...)``, batched.

    images: uint8 ``[N, C, H, W]``; index: int64 ``[B]`` rows of `images` (None: all of them);
    offsets_yx: int ``[B, 2]`` in ``0 .. 2 * pad``; flips: bool ``[B]``.  Returns uint8
    ``[B, C, H, W]`` (contiguous).

    The batch is zero-padded and stacked with its mirror image; every crop window of that
    stack is a strided view (``unfold``), and one advanced-indexing gather picks, per image,
    the window of its offsets in the plain or the mirrored copy.  A flip after the crop is
    the crop at column ``2 * pad - ox`` of the mirrored padded image.
    """
    _, _, h, w = images.shape
    dev = images.device
    batch = images if index is None else images.index_select(0, index.to(dev))
    b = batch.shape[0]
    offsets_yx = offsets_yx.to(device=dev, dtype=torch.long)
    flips = flips.to(device=dev, dtype=torch.bool)
    if pad > 0:
        batch = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    both = torch.cat([batch, batch.flip(3)])  # [2B, C, H + 2p, W + 2p]
    windows = both.unfold(2, h, 1).unfold(3, w, 1)  # [2B, C, 2p + 1, 2p + 1, H, W], a view
    ar = torch.arange(b, device=dev)
    which = ar + flips.long() * b
    ox = torch.where(flips, 2 * pad - offsets_yx[:, 1], offsets_yx[:, 1])
    return windows[which, :, offsets_yx[:, 0], ox]


def crop_flip(
    batch_uint8: torch.Tensor, offsets_yx: torch.Tensor, flips: torch.Tensor, pad: int = 4
) -> torch.Tensor:
    """Random-crop-with-zero-padding then horizontal flip, with the parameters given.

    Equals, image by image, torchvision's ``hflip(crop(pad(img, pad), oy, ox, H, W))`` where the
    flip applies when ``flips[b]`` is true.  batch_uint8: ``[B, C, H, W]`` uint8.
    """
    if batch_uint8.dtype != torch.uint8 or batch_uint8.dim() != 4:
        raise ValueError(
            f"crop_flip wants a uint8 [B,C,H,W] batch, got {batch_uint8.dtype} "
            f"{tuple(batch_uint8.shape)}"
        )
    return gather_crop_flip(batch_uint8.contiguous(), None, offsets_yx, flips, pad)


def norm_constants(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as float32 ``[1, C, 1, 1]`` tensors on `device` (std must be positive)."""
    m = torch.as_tensor([float(v) for v in mean], dtype=torch.float32)
    s = torch.as_tensor([float(v) for v in std], dtype=torch.float32)
    if m.shape != s.shape or m.dim() != 1:
        raise ValueError(f"mean and std must be sequences of the same length, got {mean}, {std}")
    if bool((s <= 0).any()):
        raise ValueError(f"std must be positive, got {list(std)}")
    return m.view(1, -1, 1, 1).to(device), s.view(1, -1, 1, 1).to(device)


def normalize_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32, as ``Normalize(mean, std)(ToTensor()(img))``."""
    return x.to(torch.float32).div_(255).sub_(mean).div_(std)
