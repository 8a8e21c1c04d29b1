"""``python -m rld.bench data --dataset imagenet``: images/s of the two ImageNet input paths.

Both paths read the same generated tree of JPEG files of ImageNet-like sizes (about 500x375,
both orientations, some larger, a few greyscale) and deliver normalised 224x224 batches on the
device: ``pil`` (DataLoader workers decode with PIL and run torchvision's transforms) and
``device`` (workers read the bytes; decoding, crop, resize, flip and normalisation run batched
on the device: nvjpeg on CUDA, libjpeg-turbo on the CPU).  Training transforms
(RandomResizedCrop + flip) and evaluation transforms (Resize 256 + CenterCrop 224) are timed
separately.  Each timing is one full pass after a warm-up of two batches (workers started,
decoders initialised), the device synchronised at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rld.bench.common import LOADER_FIELDS, device_name, save_rows, sync
from rld.cli import ArgumentParser, natural, positive

FIELDS = ["path", "split", *LOADER_FIELDS, "speedup_vs_pil"]
SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (640, 480), (800, 600)]
WEIGHTS = [0.35, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05]
CLASSES = 10
MARKER = "rld_bench_tree.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m rld.bench data --dataset imagenet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", default="imagenet", choices=["imagenet"])
    p.add_argument("--images", type=positive, default=None, help="training images (CUDA 4096, CPU 256)")
    p.add_argument("--batch-size", type=positive, default=None, help="global batch (CUDA 256, CPU 32)")
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda[:N]")
    p.add_argument("--workers", type=natural, default=None, help="DataLoader workers (CUDA 8, CPU 2)")
    p.add_argument("--root", default="", help="JPEG tree to reuse or create (default: a temp dir)")
    p.add_argument("--split", default="both", choices=["train", "val", "both"])
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--out", default="results/bench_imagenet_data.csv", help="CSV ('' for none)")
    args = p.parse_args(argv)
    for key in ("images", "batch_size", "workers"):
        value = getattr(args, key)
        least = {"images": CLASSES, "batch_size": 1, "workers": 0}[key]
        if value is not None and value < least:
            p.error(f"--{key.replace('_', '-')} must be >= {least}")
    return args


def photo(w: int, h: int, rng: Any) -> Any:
    """A smooth random RGB picture with grain (a PIL image), so that JPEG sizes and decode
    times are photo-like; `rng` a numpy Generator."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    return Image.fromarray((smooth + grain).clip(0, 255).astype(np.uint8))


def _write_image(path: Path, size: tuple[int, int], grey: bool, rng: Any) -> None:
    img = photo(*size, rng)
    (img.convert("L") if grey else img).save(path, format="JPEG", quality=90)


def make_jpeg_tree(root: Path, train_images: int, seed: int = 0) -> dict:
    """root/{train,val}/<class>/*.JPEG (val: a quarter of train, at least one per class), or
    the tree already there when its marker says it was made with the same settings."""
    import numpy as np

    spec = {"train": train_images, "val": max(CLASSES, train_images // 4), "seed": seed}
    marker = root / MARKER
    if marker.exists():
        if json.loads(marker.read_text()) == spec:
            return spec
        for split in ("train", "val"):  # a tree of ours with other settings: remade
            shutil.rmtree(root / split, ignore_errors=True)
        marker.unlink()
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"--root {root} holds files that this benchmark did not write")
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i in range(spec[split]):
            folder = root / split / f"n{i % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            size = SIZES[rng.choice(len(SIZES), p=WEIGHTS)]
            _write_image(folder / f"{split}_{i:06d}.JPEG", size, rng.random() < 0.02, rng)
    marker.write_text(json.dumps(spec))
    return spec


def time_pass(root: Path, path: str, split: str, args: Any, device: Any) -> tuple[float, int]:
    """Seconds of one full pass over `split` by input path `path`, and the images seen."""
    from omegaconf import OmegaConf

    from rld.data import build_loaders

    conf = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/dataset/imagenet.yaml")
    cfg = SimpleNamespace(name="imagenet", root=str(root), num_classes=CLASSES,
                          image_size=int(conf.image_size), mean=list(conf.mean),
                          std=list(conf.std), workers=args.workers)
    data = build_loaders(cfg, args.batch_size, device, args.seed, decoder=path)
    loader = data.train if split == "train" else data.test
    loader.set_epoch(1)
    for i, _ in enumerate(loader):  # warm-up: workers started, decoder initialised
        if i == 1:
            break
    loader.set_epoch(2)
    sync(device)
    t0 = time.perf_counter()
    seen = 0
    for x, _y in loader:
        seen += x.shape[0]
    sync(device)
    return time.perf_counter() - t0, seen


def _defaults(args: argparse.Namespace, cuda: bool) -> None:
    if args.images is None:
        args.images = 4096 if cuda else 256
    if args.batch_size is None:
        args.batch_size = 256 if cuda else 32
    if args.workers is None:
        args.workers = 8 if cuda else 2


def _rows(args, device, root: Path) -> list[dict]:
    import torch

    common = dict(
        device=str(device),
        device_name=device_name(device),
        batch_size=args.batch_size,
        workers=args.workers,
        torch_threads=torch.get_num_threads(),
    )
    rows = []
    for split in ("train", "val") if args.split == "both" else (args.split,):
        pil_ips = None
        for path in ("pil", "device"):
            seconds, seen = time_pass(root, path, split, args, device)
            ips = seen / seconds
            pil_ips = pil_ips or ips
            rows.append(
                dict(
                    path=path,
                    split=split,
                    images=seen,
                    seconds=round(seconds, 4),
                    images_per_s=round(ips, 1),
                    speedup_vs_pil=round(ips / pil_ips, 2),
                    **common,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from rld.data.loaders import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("rld.bench imagenet_data: --device cuda but CUDA is not available")
        return 2
    _defaults(args, cuda)
    if cuda:
        torch.zeros(1, device=device)  # context start-up is not the loader's
    tmp = None if args.root else Path(tempfile.mkdtemp(prefix="rld_bench_imagenet_"))
    root = Path(args.root).expanduser() if args.root else tmp
    try:
        t0 = time.perf_counter()
        try:
            spec = make_jpeg_tree(root, args.images, args.seed)
        except ValueError as e:
            print(f"rld.bench imagenet_data: {e}")
            return 2
        print(
            f"JPEG tree {root}: {spec['train']} train, {spec['val']} val images "
            f"({time.perf_counter() - t0:.1f} s to make or check)"
        )
        rows = _rows(args, device, root)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"device: {rows[0]['device_name']} [{device}], torch threads: "
        f"{rows[0]['torch_threads']}, batch {args.batch_size}, {args.workers} workers"
    )
    print(f"{'path':<8}{'split':<7}{'images':>8}{'seconds':>10}{'images/s':>11}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['path']:<8}{r['split']:<7}{r['images']:>8}{r['seconds']:>10.3f}"
            f"{r['images_per_s']:>11.0f}{r['speedup_vs_pil']:>7.2f}x"
        )
    save_rows(args.out, rows, FIELDS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
