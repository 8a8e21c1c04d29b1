"""``python -m rld.bench epoch``: one RLD training epoch, fast path against the published loop.

Both paths train the pair's student (default resnet32x4 -> resnet8x4) with RLD on the same
synthetic CIFAR-sized images (default 50,000 on CUDA, 5,000 on CPU), in the same process:
- fast: the whole set on the device as uint8, crop/flip/normalise batched there
  (`DeviceLoader`), bf16 autocast on capable GPUs, channels-last, loss and accuracy
  accumulated on the device and read once (the engine's `train_epoch`);
- reference: the published loop, a torchvision DataLoader with 2 workers running PIL
  transforms (RandomCrop(32, 4) + flip + ToTensor + Normalize), fp32, and a host read of
  the loss and the accuracy after every step.
Each path first runs a few untimed steps (CUDA context, cuDNN autotuning); the fast path's
also cover the partial last batch, so that with --compile every graph is compiled (and
captured, with CUDA graphs) before the clock starts.  Their time is printed apart, with the
number of graphs compiled while timing (should be 0).
"""

from __future__ import annotations

import argparse
import time

from rld.cli import ArgumentParser, natural, positive
from rld.validate import COMPILE_MODES


def parse_args(argv):
    p = ArgumentParser(
        prog="python -m rld.bench epoch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pair", default="resnet32x4_resnet8x4")
    p.add_argument("--images", type=natural, default=0, help="default 50000 on CUDA, 5000 on CPU")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="of the fast path")
    p.add_argument("--compile", action="store_true", help="torch.compile (fast path)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="with --compile (reduce-overhead, max-autotune: CUDA graphs)")
    p.add_argument("--workers", type=natural, default=2, help="reference DataLoader workers")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", default="results/bench_epoch.csv")
    return p.parse_args(argv)


def _reference_epoch(step, ds, batch_size: int, workers: int, device, warm: int) -> float:
    import torch

    from rld.bench.common import PilImages, cifar_pil_transform, sync
    from rld.loop import train_step

    data = PilImages(ds.train_images, ds.train_labels, cifar_pil_transform(ds.mean, ds.std))
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, num_workers=workers
    )

    def run(limit):
        meter = correct = 0.0
        for i, (x, y) in enumerate(loader):
            if i == limit:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _, loss, logits = train_step(step, x, y, epoch=1)
            meter += loss.item()  # the published loop's per-step host reads
            correct += (logits.argmax(1) == y).float().mean().item()

    run(warm)
    t0 = time.perf_counter()
    run(-1)
    sync(device)
    return time.perf_counter() - t0


def _fast_epoch(step, ds, batch_size: int, device, warm: int) -> tuple[float, float, int]:
    """Seconds of one timed epoch, seconds of the untimed warm-up before it, and the graphs
    compiled while timing."""

    from rld.bench.common import sync
    from rld.bench.step import compiled_graphs
    from rld.data import DeviceLoader
    from rld.loop import Progress, train_epoch, train_step
    from rld.students import LoopStudents

    loader = DeviceLoader(
        ds.train_images,
        ds.train_labels,
        batch_size,
        train=True,
        mean=ds.mean,
        std=ds.std,
        device=device,
        seed=0,
    )
    loader.set_epoch(1)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == warm:
            break
        train_step(step, x, y, epoch=1)
    rest = loader.num_samples % batch_size
    for _ in range(3 if rest else 0):  # the last batch's shape: compile, then graph capture
        train_step(step, x[:rest], y[:rest], epoch=1)
    loader.set_epoch(2)
    sync(device)
    warm_s = time.perf_counter() - t0
    graphs = compiled_graphs()
    t0 = time.perf_counter()
    train_epoch(LoopStudents([step]), loader, 2, 2, Progress("none", 1.0))  # one host read
    return time.perf_counter() - t0, warm_s, compiled_graphs() - graphs


def _measure(args) -> dict:
    """Time the fast path and (unless skipped) the reference on the same images."""
    import torch

    from rld.bench.common import device_name, distiller_config, synthetic_cifar
    from rld.bench.step import Pair, bench_state
    from rld.distillers import build_distiller
    from rld.engine import resolve_device, resolve_precision
    from rld.models import build_model

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    images = args.images or (50000 if cuda else 5000)
    ds = synthetic_cifar(images)
    pair = Pair(args.pair)
    if pair.family != "cifar":
        raise SystemExit(f"rld.bench epoch: --pair {args.pair}: a CIFAR pair is needed (the "
                         "epoch is of CIFAR-sized images)")
    warm = 20 if cuda else 2

    def step(dtype, channels_last, compile, compile_mode="default"):
        torch.manual_seed(0)
        student, teacher = (build_model(a, pair.num_classes, pair.family)
                            for a in (pair.student, pair.teacher))
        return bench_state(student, teacher, build_distiller(distiller_config("rld")), device,
                           dtype, compile, compile_mode, channels_last)

    fast_dtype = resolve_precision(args.precision, device)
    fast_step = step(fast_dtype, True, args.compile, args.compile_mode)
    fast, warm_s, late = _fast_epoch(fast_step, ds, args.batch_size, device, warm)
    ref = None
    if not args.skip_reference:
        ref = _reference_epoch(step(torch.float32, False, False), ds, args.batch_size,
                               args.workers, device, warm)
    prec = str(fast_dtype).removeprefix("torch.")
    rows = [{"path": "fast", "seconds": fast,
             "description": f"device-resident data, {prec}, no per-step sync"
             + (f", compile {args.compile_mode}" if args.compile else "")}]
    if ref is not None:
        rows.append({"path": "reference", "seconds": ref, "description":
                     f"DataLoader({args.workers} workers)+PIL, fp32, per-step .item()"})
    return {"rows": rows, "device": device_name(device), "images": images, "warm": warm,
            "warm_s": warm_s, "late": late, "fast": fast, "ref": ref,
            "torch": torch.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    from rld.bench.common import save_rows
    from rld.bench.step import compile_note

    m = _measure(args)
    images, fast, ref = m["images"], m["fast"], m["ref"]
    print(f"one RLD epoch, {args.pair}, {images} synthetic 32x32 images, batch "
          f"{args.batch_size}, on {m['device']} (torch {m['torch']})")
    print(f"{'path':<70} {'seconds':>8} {'images/s':>9}")
    for row in m["rows"]:
        label = f"{row['path']}: {row['description']}"
        print(f"{label:<70} {row['seconds']:>8.2f} {images / row['seconds']:>9.0f}")
    print(f"fast path untimed warm-up ({m['warm']} steps + the last batch's shape"
          f"{', compilation included' * args.compile}): {m['warm_s']:.1f} s; "
          f"graphs compiled while timed: {m['late']}{compile_note(args.compile)}")
    if ref is not None:
        print(f"speed-up of the fast path: {ref / fast:.2f}x")
    if args.out:
        fast_row = {"speedup": f"{ref / fast:.3f}" if ref is not None else "",
                    "warmup_s": f"{m['warm_s']:.3f}"}
        table = [{**row, "device": m["device"], "images": images,
                  "batch_size": args.batch_size, "seconds": f"{row['seconds']:.3f}",
                  "images_per_s": f"{images / row['seconds']:.1f}",
                  **(fast_row if row["path"] == "fast" else {"speedup": "", "warmup_s": ""})}
                 for row in m["rows"]]
        save_rows(args.out, table, ["path", "description", "device", "images", "batch_size",
                                    "seconds", "images_per_s", "speedup", "warmup_s"])
    return 0
