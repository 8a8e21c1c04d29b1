"""``python -m rld.bench data``: images/s of the on-device CIFAR loader vs a torchvision DataLoader.

Both run one full pass over the same synthetic CIFAR-sized images with the same recipe
(random crop 32 with 4 px zero padding, horizontal flip, normalisation), batches delivered on
the device.  Start-up is included, as a user sees it: the DataLoader's worker start-up, and
the copy of the whole split to the device for the on-device loader.  CUDA's context is
initialised before either is timed.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rld.bench.common import (
    LOADER_FIELDS,
    PilImages,
    cifar_pil_transform,
    device_name,
    save_rows,
    sync,
    synthetic_cifar,
)
from rld.cli import ArgumentParser, natural, positive
from rld.config import CIFAR_MEAN, CIFAR_STD

FIELDS = ["loader", *LOADER_FIELDS, "speedup_vs_dataloader"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m rld.bench data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", default="cifar", choices=["cifar", "imagenet"],
                   help="imagenet: the ImageNet input paths (see --dataset imagenet --help)")
    p.add_argument("--images", type=positive, default=20000, help="images in the pass (20000)")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda[:N]")
    p.add_argument("--workers", type=natural, default=2, help="DataLoader workers (2)")
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--out", default="results/bench_data.csv", help="CSV file ('' for none)")
    args = p.parse_args(argv)
    if args.images < 1 or args.batch_size < 1 or args.workers < 0:
        p.error("--images and --batch-size must be >= 1, --workers >= 0")
    return args


def time_device_loader(images, labels, batch_size: int, device: Any, seed: int) -> float:
    from rld.data.device_loader import DeviceLoader

    sync(device)
    t0 = time.perf_counter()
    loader = DeviceLoader(
        images,
        labels,
        batch_size,
        train=True,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        device=device,
        seed=seed,
    )
    loader.set_epoch(1)
    for _x, _y in loader:
        pass
    sync(device)
    return time.perf_counter() - t0


def time_dataloader(images, labels, batch_size: int, device: Any, seed: int, workers: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    ds = PilImages(images, labels, cifar_pil_transform())
    cuda = device.type == "cuda"
    sync(device)
    t0 = time.perf_counter()
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(seed),
    )
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
    sync(device)
    return time.perf_counter() - t0


def _measure_cifar(args, device) -> list[dict]:
    """Both CIFAR input paths over the same synthetic images: one full pass each."""
    import torch

    ds = synthetic_cifar(args.images, args.seed)
    images, labels = ds.train_images, ds.train_labels
    n, b = args.images, args.batch_size
    t_dl = time_dataloader(images, labels, b, device, args.seed, args.workers)
    t_dev = time_device_loader(images, labels, b, device, args.seed)
    dl_ips, dev_ips = n / t_dl, n / t_dev
    common = dict(device=str(device), device_name=device_name(device), images=n,
                  batch_size=b, torch_threads=torch.get_num_threads())
    return [
        dict(loader="torchvision_dataloader", workers=args.workers, seconds=round(t_dl, 4),
             images_per_s=round(dl_ips, 1), speedup_vs_dataloader=1.0, **common),
        dict(loader="device_loader", workers=0, seconds=round(t_dev, 4),
             images_per_s=round(dev_ips, 1), speedup_vs_dataloader=round(dev_ips / dl_ips, 2),
             **common),
    ]


def _print_rows(args, device, rows: list[dict]) -> None:
    import torch

    print(f"device: {device_name(device)} [{device}], torch threads: {torch.get_num_threads()}")
    print(f"{args.images} synthetic 32x32 images, batch {args.batch_size}, one full pass each, "
          f"start-up included (DataLoader: {args.workers} workers started; on-device: split "
          f"copied to {device})")
    print(f"{'loader':<34}{'seconds':>10}{'images/s':>12}{'ratio':>9}")
    labels_txt = {
        "torchvision_dataloader": f"torchvision DataLoader + PIL ({args.workers} w)",
        "device_loader": "rld DeviceLoader (on device)",
    }
    for r in rows:
        print(f"{labels_txt[r['loader']]:<34}{r['seconds']:>10.3f}{r['images_per_s']:>12.0f}"
              f"{r['speedup_vs_dataloader']:>8.1f}x")


def main(argv: list[str] | None = None) -> int:
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default="cifar", choices=["cifar", "imagenet"])
    known, _ = pre.parse_known_args(argv)
    if known.dataset == "imagenet":  # the ImageNet input paths: their own options
        from rld.bench.imagenet_data import main as imagenet_main

        return imagenet_main(argv)
    args = parse_args(argv)
    import torch

    from rld.data.loaders import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("rld.bench data: --device cuda but CUDA is not available")
            return 2
        torch.zeros(1, device=device)  # context start-up is not the loader's
    rows = _measure_cifar(args, device)
    _print_rows(args, device, rows)
    save_rows(args.out, rows, FIELDS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
