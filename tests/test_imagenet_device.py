"""The ImageNet device input path (rld.data.imagenet_device) against the PIL path, on the CPU.

Tolerances (measured on the CPU, where both paths decode with libjpeg-turbo):
* decoded pixels: equal (max |diff| 0 uint8 levels); nvjpeg on a GPU is not covered here;
* resized pixels, fixed crops: max |diff| 1 uint8 level, mean |diff| < 0.3 level (measured
  up to 0.24 on strong up-scaling of small crops; PIL rounds between its two resampling
  passes), for torch's uint8 kernel (CPU) and its float32 kernel (the CUDA arithmetic);
* normalised tensors: the same 1 level, i.e. ``1 / (255 * std)``.
On CUDA (tests skipped without a GPU), nvjpeg's IDCT and chroma upsampling differ from
libjpeg-turbo's; the bound is torchvision's own for nvjpeg against its CPU decoder: mean
|diff| < 2 levels.
"""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from rld.bench.imagenet_data import photo
from rld.data import DataError, build_loaders
from rld.data.augment import norm_constants, normalize_uint8
from rld.data.imagenet import resolve_decoder
from rld.data.imagenet_device import (
    JPEG,
    KIND,
    RGB_PIXELS,
    crop_resize,
    decode_images,
    read_sample,
    resize_center_crop,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CPU = torch.device("cpu")
MAX_LEVELS, MEAN_LEVELS = 1, 0.3
# (width, height, PIL mode, format) of the files: ImageNet's usual sizes, a greyscale JPEG,
# a CMYK JPEG and a PNG named .JPEG (ImageNet holds both kinds)
FILES = [
    (500, 375, "RGB", "JPEG"),
    (375, 500, "RGB", "JPEG"),
    (333, 500, "RGB", "JPEG"),
    (500, 333, "L", "JPEG"),
    (400, 300, "CMYK", "JPEG"),
    (300, 400, "RGB", "PNG"),
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet_device")
    rng = np.random.default_rng(0)
    for split, classes in (("train", ("n0001", "n0002")), ("val", ("n0001", "n0002"))):
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i, (w, h, mode, fmt) in enumerate(FILES):
                if split == "val" and i % 2 != c:
                    continue
                img = photo(w, h, rng).convert(mode)
                img.save(folder / f"{cls}_{i}.JPEG", format=fmt, quality=90)
    return root


def _files(root: Path) -> list[Path]:
    return sorted((root / "train").rglob("*.JPEG"))


def _decode(path: Path) -> tuple[torch.Tensor, list[int]]:
    payload, row = read_sample(str(path), 0, 0, 0, train=False)
    return decode_images([payload], [row], CPU)[0], row


def _levels(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    d = (a.int() - b.int()).abs().float()
    return int(d.max()), float(d.mean())


def _pil_u8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


# --------------------------------------------------------------------------- decoding


def test_files_are_routed_and_decoded_as_pil_does(tree: Path) -> None:
    kinds = {}
    for path in _files(tree):
        img, row = _decode(path)
        ref = _pil_u8(Image.open(path).convert("RGB"))  # ImageFolder's loader
        assert img.dtype == torch.uint8 and img.shape == ref.shape, path.name
        assert torch.equal(img, ref), (path.name, _levels(img, ref))
        kinds[Image.open(path).mode, Image.open(path).format] = row[KIND]
    assert kinds == {
        ("RGB", "JPEG"): JPEG,
        ("L", "JPEG"): JPEG,  # decoded to RGB by libjpeg / nvjpeg
        ("CMYK", "JPEG"): RGB_PIXELS,  # PIL's CMYK conversion, in the worker
        ("RGB", "PNG"): RGB_PIXELS,
    }


def test_unreadable_file_names_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "broken.JPEG"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image .*broken.JPEG"):
        read_sample(str(bad), 0, 0, 0, train=True)


def test_a_batch_the_decoder_rejects_falls_back_per_image(tree: Path, monkeypatch) -> None:
    import rld.data.imagenet_device as dev

    samples = [read_sample(str(p), 0, i, 0, train=False) for i, p in enumerate(_files(tree))]
    payloads, rows = zip(*samples)
    expected = decode_images(payloads, list(rows), CPU)
    real = dev._decode_jpegs
    bad = payloads[0].data_ptr()

    rejected = []

    def picky(batch, device):  # rejects any batch that holds the first file
        if any(p.data_ptr() == bad for p in batch):
            rejected.append(len(batch))
            raise RuntimeError("unsupported JPEG")
        return real(batch, device)

    monkeypatch.setattr(dev, "_decode_jpegs", picky)
    got = decode_images(payloads, list(rows), CPU)
    assert rejected and rejected[0] > 1  # the whole batch was tried, then image by image
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# --------------------------------------------------------------------------- fixed crops


def _crops(h: int, w: int) -> list[tuple[int, int, int, int, bool]]:
    """(top, left, height, width, flip): whole image, a small corner crop (up-scaled), a
    central one, extreme aspect ratios."""
    return [
        (0, 0, h, w, False),
        (h - 30, w - 40, 30, 40, True),
        (h // 4, w // 5, h // 2, w // 2, False),
        (0, 0, h, w // 3, True),
        (5, 7, h // 3, w - 7, False),
    ]


@pytest.mark.parametrize("via_float", [False, True])
def test_fixed_crops_match_the_pil_path(tree: Path, via_float: bool) -> None:
    mean, std = norm_constants(MEAN, STD, CPU)
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    for path in _files(tree):
        img, _ = _decode(path)
        pil = Image.open(path).convert("RGB")
        h, w = img.shape[1:]
        for t, x, ch, cw, flip in _crops(h, w):
            ref = TF.resized_crop(pil, t, x, ch, cw, [224, 224], InterpolationMode.BILINEAR)
            ref = TF.hflip(ref) if flip else ref
            got = crop_resize([img], [(t, x, ch, cw)], 224, via_float=via_float)
            got = got.flip(3) if flip else got
            worst, avg = _levels(got[0], _pil_u8(ref))
            assert worst <= MAX_LEVELS and avg < MEAN_LEVELS, (path.name, t, x, ch, cw, avg)
            diff = (normalize_uint8(got, mean, std)[0] - to_tensor(ref)) * std[0] * 255
            assert diff.abs().max() <= MAX_LEVELS + 1e-3


@pytest.mark.parametrize("via_float", [False, True])
def test_eval_resize_center_crop_matches_the_pil_path(tree: Path, via_float: bool) -> None:
    for path in _files(tree):
        img, _ = _decode(path)
        ref = TF.center_crop(TF.resize(Image.open(path).convert("RGB"), 256), 224)
        got = resize_center_crop([img], 256, 224, via_float=via_float)
        assert got.shape == (1, 3, 224, 224)
        worst, avg = _levels(got[0], _pil_u8(ref))
        assert worst <= MAX_LEVELS and avg < MEAN_LEVELS, (path.name, avg)


# --------------------------------------------------------------------------- loaders


def _cfg(root: Path, workers: int = 0, **kw) -> SimpleNamespace:
    return SimpleNamespace(
        name="imagenet", root=str(root), num_classes=2, image_size=224, mean=MEAN, std=STD,
        workers=workers, **kw,
    )  # fmt: skip


def _epoch(loader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return list(loader)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(u, v) for u, v in zip(p, q)) for p, q in zip(a, b)
    )


def test_device_path_batches_are_the_pil_path_batches(tree: Path) -> None:
    """Same samples, order, crops and flips (drawn in the workers as the PIL transforms draw
    them); pixels within the decoders' and resamplers' tolerance."""
    std = torch.tensor(STD).view(1, 3, 1, 1)
    runs = {}
    for decoder in ("pil", "device"):
        loaders = build_loaders(_cfg(tree), 5, "cpu", seed=11, with_index=True, decoder=decoder)
        runs[decoder] = (_epoch(loaders.train, 4), _epoch(loaders.test, 4))
    for split in (0, 1):
        pil, dev = runs["pil"][split], runs["device"][split]
        assert len(pil) == len(dev) == 3 - split  # 12 train, 6 val images
        for (xp, yp, ip), (xd, yd, id_) in zip(pil, dev):
            assert torch.equal(yp, yd) and torch.equal(ip, id_)
            assert xd.dtype == torch.float32 and xd.shape == xp.shape
            levels = ((xd - xp) * std * 255).abs()
            assert levels.max() <= MAX_LEVELS + 1e-3 and levels.mean() < MEAN_LEVELS


def test_device_path_order_and_augmentation_per_seed_and_epoch(tree: Path) -> None:
    train = build_loaders(_cfg(tree), 5, "cpu", seed=2, with_index=True, decoder="device").train
    first, again = _epoch(train, 1), _epoch(train, 1)
    assert _same(first, again)
    for _x, _y, index in first:
        assert index.dtype == torch.int64
    rows = torch.cat([i for _, _, i in first])
    assert torch.equal(rows.sort().values, torch.arange(12))  # each sample once
    second = _epoch(train, 2)
    assert not torch.equal(torch.cat([i for _, _, i in second]), rows)  # order differs
    assert not torch.equal(first[0][0], second[0][0])
    cfg = _cfg(tree, workers=1)
    workers = build_loaders(cfg, 5, "cpu", seed=2, with_index=True, decoder="device").train
    assert _same(_epoch(workers, 1), first)  # workers change nothing
    test = build_loaders(_cfg(tree), 4, "cpu", seed=2, with_index=True, decoder="device").test
    a, b = _epoch(test, 1), _epoch(test, 7)
    assert _same(a, b) and torch.equal(torch.cat([i for _, _, i in a]), torch.arange(6))
    assert all(
        len(batch) == 2 for batch in build_loaders(_cfg(tree), 4, "cpu", 0, decoder="device").test
    )  # (x, y) stays the default


def test_decoder_selector(tree: Path) -> None:
    assert resolve_decoder("auto", torch.device("cpu")) == "pil"
    assert resolve_decoder("auto", torch.device("cuda")) == "device"
    assert resolve_decoder("device", torch.device("cpu")) == "device"
    with pytest.raises(DataError, match=r"dataset\.decoder='nvjpeg'.*auto, pil, device"):
        build_loaders(_cfg(tree), 4, "cpu", 0, decoder="nvjpeg")
    from rld.data.imagenet import ImageNetLoader
    from rld.data.imagenet_device import ImageNetDeviceLoader

    assert isinstance(build_loaders(_cfg(tree), 4, "cpu", 0).train, ImageNetLoader)
    chosen = build_loaders(_cfg(tree, decoder="device"), 4, "cpu", 0)  # cfg.decoder, if set
    assert isinstance(chosen.train, ImageNetDeviceLoader)


# --------------------------------------------------------------------------- CUDA (nvjpeg)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
NVJPEG_MEAN_LEVELS = 2.0


@needs_cuda
def test_cuda_decoding_close_to_the_cpu_decoder(tree: Path) -> None:
    for path in _files(tree):
        payload, row = read_sample(str(path), 0, 0, 0, train=False)
        cpu = decode_images([payload], [row], CPU)[0]
        gpu = decode_images([payload], [row], torch.device("cuda"))[0]
        assert gpu.is_cuda and gpu.shape == cpu.shape
        assert _levels(gpu.cpu(), cpu)[1] < NVJPEG_MEAN_LEVELS, path.name


@needs_cuda
def test_cuda_device_path_is_the_pil_path(tree: Path) -> None:
    from rld.data.imagenet_device import ImageNetDeviceLoader

    assert isinstance(build_loaders(_cfg(tree), 5, "cuda", 0).train, ImageNetDeviceLoader)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    pil = build_loaders(_cfg(tree), 5, "cpu", seed=11, with_index=True, decoder="pil")
    gpu = build_loaders(_cfg(tree), 5, "cuda", seed=11, with_index=True, decoder="auto")
    for a, b in ((pil.train, gpu.train), (pil.test, gpu.test)):
        ref, got = _epoch(a, 4), _epoch(b, 4)
        slow = []  # one batch at a time, synchronised: the side stream must change nothing
        b.set_epoch(4)
        for batch in b:
            torch.cuda.synchronize()
            slow.append([t.clone() for t in batch])
        assert _same(got, slow)
        assert len(ref) == len(got)
        for (xp, yp, ip), (xd, yd, id_) in zip(ref, got):
            assert xd.is_cuda and torch.equal(yd.cpu(), yp) and torch.equal(id_.cpu(), ip)
            assert ((xd.cpu() - xp) * std * 255).abs().mean() < NVJPEG_MEAN_LEVELS


# --------------------------------------------------------------------------- benchmark


def test_bench_imagenet_data_writes_csv(tmp_path: Path, capsys) -> None:
    from rld.bench.imagenet_data import main

    out = tmp_path / "b.csv"
    root = tmp_path / "tree"
    argv = ["--images", "10", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    assert main([*argv, "--root", str(root), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "images/s" in text and "device:" in text
    rows = list(csv.DictReader(out.open()))
    assert [(r["path"], r["split"]) for r in rows] == [
        ("pil", "train"), ("device", "train"), ("pil", "val"), ("device", "val"),
    ]  # fmt: skip
    assert all(float(r["images_per_s"]) > 0 and r["images"] == "10" for r in rows)
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.JPEG")}
    assert main([*argv, "--root", str(root), "--out", ""]) == 0  # the tree is reused
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.JPEG")} == stamp
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("x")
    assert main([*argv, "--root", str(tmp_path / "other"), "--out", ""]) == 2
