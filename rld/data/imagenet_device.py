"""The ImageNet input path that decodes and augments on the device.

DataLoader workers only read each file's bytes and draw its crop (the pil path's draws: see
`draw_crop`); a batch crosses from the workers as one byte buffer and one int64 table.  In
the main process, the batch's JPEGs are decoded by one ``torchvision.io.decode_jpeg`` call on
the device (batched nvjpeg on CUDA, the hardware decoder on A100/H100 for baseline JPEGs;
libjpeg-turbo on the CPU, so the whole path also runs, and is tested, on the CPU), then
cropped, resized (bilinear, antialiased: PIL's filter), flipped and normalised there.

Same transforms as the pil path: RandomResizedCrop(S) + horizontal flip for training,
Resize(round(S / 0.875)) + CenterCrop(S) for evaluation.  Files that are not JPEGs in RGB or
greyscale (ImageNet holds a PNG and some CMYK JPEGs named .JPEG) are decoded by PIL in the
worker, exactly as the pil path decodes them.

Agreement with the pil path (tests/test_imagenet_device.py, fixed crops, on the CPU where
both decode with libjpeg-turbo): decoded pixels are equal; resized pixels differ from PIL's
by at most 1 uint8 level, mean |diff| < 0.3 level (PIL rounds between its two resampling
passes), in torch's uint8 kernel and in its float32 one (the CUDA arithmetic).  nvjpeg's
IDCT and chroma upsampling differ from libjpeg-turbo's: the CUDA test's bound is
torchvision's own for nvjpeg, mean |diff| < 2 levels (not run without a GPU).

On CUDA the next batch is decoded and augmented on a side stream while the current one is
handed out, so decoding overlaps the training step's kernels.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from rld.data.augment import norm_constants, normalize_uint8
from rld.data.folder import FolderLoader
from rld.errors import DataError

# columns of a batch's int64 table, one row per sample
KIND, SIZE, HEIGHT, WIDTH, TOP, LEFT, CROP_H, CROP_W, FLIP, LABEL, INDEX = range(11)
COLUMNS = 11
JPEG, RGB_PIXELS = 0, 1  # KIND: encoded JPEG bytes | decoded HWC uint8 pixels (PIL fallback)
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's defaults


def draw_crop(img, seed: int) -> tuple[int, int, int, int, int]:
    """(top, left, height, width, flip) of RandomResizedCrop + RandomHorizontalFlip for a PIL
    image (only its size is read) under torch seed `seed`: the same draws, in the same order,
    as the pil path's transforms under that seed."""
    from torchvision import transforms as T

    with torch.random.fork_rng(devices=[]):  # CPU state only; restored on exit
        torch.default_generator.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(img, list(RRC_SCALE), list(RRC_RATIO))
        flip = int(torch.rand(1) < 0.5)
    return top, left, h, w, flip


def read_sample(
    path: str, label: int, index: int, seed: int, train: bool
) -> tuple[torch.Tensor, list[int]]:
    """(payload, table row) of one file: its bytes when nvjpeg/libjpeg can decode it to RGB
    as PIL would, else PIL's RGB pixels; the row holds its size, crop and flip."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            buf = bytearray(f.read())
        with Image.open(io.BytesIO(buf)) as img:
            w, h = img.size
            crop = draw_crop(img, seed) if train else (0, 0, h, w, 0)
            if img.format == "JPEG" and img.mode in ("RGB", "L"):
                kind, payload = JPEG, torch.frombuffer(buf, dtype=torch.uint8)
            else:  # PNG, CMYK, ...: PIL's conversion, as ImageFolder's loader does
                pixels = np.array(img.convert("RGB"))  # a writable copy
                kind, payload = RGB_PIXELS, torch.from_numpy(pixels).reshape(-1)
    except OSError as e:  # unreadable file, not an image
        raise DataError(f"cannot read image {path}: {e}") from e
    return payload, [kind, payload.numel(), h, w, *crop, int(label), int(index)]


class EncodedFiles(Dataset):
    """Item ``(index, sample_seed)`` of ``samples`` (ImageFolder's (path, label) list):
    `read_sample` of that file."""

    def __init__(self, samples: Sequence[tuple[str, int]], train: bool) -> None:
        self.samples, self.train = samples, bool(train)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, list[int]]:
        index, seed = item
        path, label = self.samples[index]
        return read_sample(path, label, index, seed, self.train)


def collate_encoded(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """One uint8 buffer of all payloads and the int64 ``[B, COLUMNS]`` table: two tensors
    per batch to cross from a worker, whatever the batch size."""
    if not samples:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, COLUMNS, dtype=torch.long)
    payloads, rows = zip(*samples)
    return torch.cat(payloads), torch.tensor(rows, dtype=torch.long)


def _decode_jpegs(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        # nvjpeg writes its outputs on its own stream, into memory the caching allocator may
        # just have freed from the current stream's pending kernels (the last batch's
        # resizes): let those finish first.  decode_jpeg waits for its own stream anyway.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)


def _decode_with_pil(payload: torch.Tensor, index: int, device: torch.device) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload.numpy().tobytes())) as img:
            pixels = np.array(img.convert("RGB"))
    except OSError as e:
        raise DataError(f"image {index} of the split cannot be decoded: {e}") from e
    return torch.from_numpy(pixels).permute(2, 0, 1).to(device)


def decode_images(
    payloads: Sequence[torch.Tensor], rows: list[list[int]], device: torch.device
) -> list[torch.Tensor]:
    """uint8 ``[3, H, W]`` images on `device`, the JPEGs decoded in one batched call.

    Should that call fail (a file libjpeg/nvjpeg rejects but PIL reads), the batch is decoded
    image by image, with PIL for the files that fail again.
    """
    jpegs = [i for i, r in enumerate(rows) if r[KIND] == JPEG]
    out: list[torch.Tensor | None] = [None] * len(rows)
    try:
        decoded = _decode_jpegs([payloads[i] for i in jpegs], device) if jpegs else []
    except RuntimeError:
        decoded = []
        for i in jpegs:
            try:
                decoded += _decode_jpegs([payloads[i]], device)
            except RuntimeError:
                decoded.append(_decode_with_pil(payloads[i], rows[i][INDEX], device))
    for i, img in zip(jpegs, decoded):
        out[i] = img
    for i, r in enumerate(rows):
        if r[KIND] == RGB_PIXELS:
            out[i] = payloads[i].view(r[HEIGHT], r[WIDTH], 3).permute(2, 0, 1).to(device)
        if tuple(out[i].shape) != (3, r[HEIGHT], r[WIDTH]):
            raise DataError(
                f"image {r[INDEX]} decoded to {tuple(out[i].shape)}, its header says "
                f"{r[HEIGHT]}x{r[WIDTH]}"
            )
    return out


def _resize(img: torch.Tensor, size: tuple[int, int], via_float: bool) -> torch.Tensor:
    """Bilinear antialiased resize of ``[1, 3, h, w]`` uint8: natively in uint8 (the CPU
    kernel written to match PIL), or in float32 (CUDA has no uint8 kernel), then rounded."""
    x = img.float() if via_float else img
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.round_().to(torch.uint8)


def crop_resize(
    images: Sequence[torch.Tensor],
    boxes: Sequence[Sequence[int]],
    size: int,
    *,
    via_float: bool,
) -> torch.Tensor:
    """uint8 ``[B, 3, size, size]``: image i cropped to ``boxes[i] = (top, left, h, w)`` and
    resized, as torchvision's ``resized_crop(img, top, left, h, w, [size, size])``."""
    # One resize per image: the images and their crop windows all differ in size.
    out = [
        _resize(img[None, :, t : t + h, x : x + w], (size, size), via_float)
        for img, (t, x, h, w) in zip(images, boxes)
    ]
    return _as_uint8(torch.cat(out))


def shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after torchvision's ``Resize(size)``: the shorter side becomes `size`, the longer
    ``int(size * long / short)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's ``CenterCrop(crop)`` (Python's round, as torchvision)."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def resize_center_crop(
    images: Sequence[torch.Tensor], resize: int, crop: int, *, via_float: bool
) -> torch.Tensor:
    """uint8 ``[B, 3, crop, crop]``: ``CenterCrop(crop)(Resize(resize)(img))`` of each image."""
    out = []
    for img in images:  # one resize per image: sizes differ
        h, w = shorter_side_size(img.shape[-2], img.shape[-1], resize)
        t, x = center_offsets(h, w, crop)
        out.append(_resize(img[None], (h, w), via_float)[:, :, t : t + crop, x : x + crop])
    return _as_uint8(torch.cat(out))


class ImageNetDeviceLoader(FolderLoader):
    """The device path over ImageFolder's ``samples`` (a list of (path, label)).

    Yields ``(x, y)`` or, with `with_index`, ``(x, y, index)``: x float32 ``[b, 3, S, S]``
    normalised, y and index int64 ``[b]``, all on `device`.  Batches, order, per-sample crops
    and flips, and sharding among ranks are those of the pil path (`ImageNetLoader`) for the
    same seed.  `via_float` (default: on all but the CPU) resizes in float32 then rounds.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], batch_size: int, *, workers: int,
                 mean: Sequence[float], std: Sequence[float], image_size: int = 224,
                 via_float: bool | None = None, **loader: Any) -> None:
        """`loader`: `FolderLoader`'s settings (train, device, seed, drop_last, rank,
        world_size, with_index)."""
        from rld.data.imagenet import resize_size

        super().__init__([label for _, label in samples], batch_size, **loader)
        self.samples = list(samples)
        self.image_size = int(image_size)
        self.resize = resize_size(self.image_size)
        self.mean, self.std = norm_constants(mean, std, self.device)
        self.via_float = self.device.type != "cpu" if via_float is None else bool(via_float)
        workers = int(workers)
        self.loader = DataLoader(
            EncodedFiles(self.samples, self.train),
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_encoded,
            persistent_workers=workers > 0,
        )

    def transform_batch(self, data: torch.Tensor, table: torch.Tensor) -> tuple:
        """A collated batch (`collate_encoded`) -> the yielded tuple, on the device."""
        dev, s = self.device, self.image_size
        rows = table.tolist()  # a CPU tensor: no device sync
        y = table[:, LABEL].to(dev, non_blocking=True)
        index = table[:, INDEX].to(dev, non_blocking=True)
        if not rows:
            return self._out(torch.empty(0, 3, s, s, device=dev), y, index)
        payloads = torch.split(data, [r[SIZE] for r in rows])
        images = decode_images(payloads, rows, dev)
        if self.train:
            boxes = [r[TOP : CROP_W + 1] for r in rows]
            x = crop_resize(images, boxes, s, via_float=self.via_float)
            flips = table[:, FLIP].to(dev, non_blocking=True).bool().view(-1, 1, 1, 1)
            x = torch.where(flips, x.flip(3), x)
        else:
            x = resize_center_crop(images, self.resize, s, via_float=self.via_float)
        return self._out(normalize_uint8(x, self.mean, self.std), y, index)

    def _prepare(self, raw, stream: torch.cuda.Stream) -> tuple | None:
        """The batch `raw`, queued on `stream`, and the event that marks it ready."""
        if raw is None:
            return None
        with torch.cuda.stream(stream):
            out = self.transform_batch(*raw)
            done = torch.cuda.Event()
            done.record(stream)
        return out, done

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.device.type != "cuda":
            for raw in self.loader:
                yield self.transform_batch(*raw)
            return
        # the next batch is queued on a side stream before the current one is handed out
        stream = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        stream.wait_stream(main)
        batches = iter(self.loader)
        ready = self._prepare(next(batches, None), stream)
        while ready is not None:
            upcoming = self._prepare(next(batches, None), stream)
            out, done = ready
            main.wait_event(done)
            for t in out:
                t.record_stream(main)
            yield out
            ready = upcoming
