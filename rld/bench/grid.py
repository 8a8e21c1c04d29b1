"""``python -m rld.bench grid``: K grid points trained packed against one after another.

The points are the first K of the CIFAR-100 RLD grid (beta in {2, 4, 8, 16} x tau in
{2, 3, 4, 5}, default all 16) on one pair (default resnet32x4 -> resnet8x4), batch 64, on
synthetic CIFAR-sized images held on the device, in one process on one device:

- sequential: today's fast path, each point's run by itself: its own pass over the batches
  and its own teacher forward per batch (`rld.loop.train_step`), point after point;
- packed: one pass over the batches, one teacher forward per batch, the K students stepped
  together (`rld.students`: `loop` one after another, `vmap` as one batched model).

Each path runs untimed warm-up steps first (compilation, with --compile); then the paths are
timed in turn, `--repeats` times, and the median of each is reported.  Prints seconds per N
steps, the device-hours the K points' 240-epoch training (782 steps per epoch) would take at
that speed, peak memory (CUDA: torch.cuda.max_memory_allocated per path; CPU: the process's
peak resident set, both paths together), and, last, the speed-up of the packed path (the
mode `auto` picks on this device) as a number followed by x.  Writes `bench_grid.csv`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

from rld.cli import ArgumentParser, natural, positive
from rld.validate import COMPILE_MODES

GRID_BETA = (2.0, 4.0, 8.0, 16.0)
GRID_TAU = (2.0, 3.0, 4.0, 5.0)
EPOCHS = 240


def parse_args(argv):
    p = ArgumentParser(prog="python -m rld.bench grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="resnet32x4_resnet8x4", help="a conf/pair/ name")
    p.add_argument("--points", type=positive, default=16, help="grid points K (1-16)")
    p.add_argument("--steps", type=natural, default=0,
                   help="timed steps N per repeat (default: 50 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=-1,
                   help="untimed steps per path first (default: 10 on CUDA, 1 on CPU)")
    p.add_argument("--repeats", type=positive, default=3, help="timings per path (median)")
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--mode", default="auto", choices=("auto", "loop", "vmap", "all"),
                   help="packed path(s) to time (auto: vmap on CUDA, loop on the CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile both paths")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--out", default="results/bench_grid.csv")
    args = p.parse_args(argv)
    if not 1 <= args.points <= len(GRID_BETA) * len(GRID_TAU):
        p.error(f"--points {args.points}: the grid has 1 to {len(GRID_BETA) * len(GRID_TAU)}")
    if args.steps < 0:
        p.error("--steps must be >= 1 (0: the default)")
    for key in ("repeats", "batch_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def grid_points(k: int) -> list[dict]:
    return [{"beta": b, "tau": t} for b in GRID_BETA for t in GRID_TAU][:k]


def build_states(pair, teacher, points: list[dict], device, dtype, compile: bool,
                 compile_mode: str) -> list:
    """One `TrainState` per point (`rld.bench.step.bench_state`: the CIFAR-100 recipe; RLD
    without warm-up), each student seeded by its index."""
    import torch

    from rld.bench.common import distiller_config
    from rld.bench.step import bench_state
    from rld.distillers import build_distiller
    from rld.models import build_model

    states = []
    for i, point in enumerate(points):
        torch.manual_seed(i)
        student = build_model(pair.student, pair.num_classes, pair.family)
        states.append(bench_state(student, teacher, build_distiller(distiller_config(
            "rld", **point)), device, dtype, compile, compile_mode))
    return states


def epoch_steps(args) -> int:
    """Steps of one CIFAR-100 epoch (50,000 images) at the benchmark's batch size."""
    from rld.bench.step import CIFAR_TRAIN_SIZE

    return math.ceil(CIFAR_TRAIN_SIZE / args.batch_size)


class Paths:
    """The timed paths over one loader of N batches."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def sequential(self, states) -> None:
        from rld.loop import train_step

        for s in states:  # each point's run: its own pass and teacher forward
            for x, y in self.loader:
                train_step(s, x, y, epoch=1)

    def packed(self, students, teacher_fn, s0, cudagraphs: bool) -> None:

        from rld.loop import teacher_output

        for x, y in self.loader:
            x = s0.inputs(x)
            students.step(x, y, teacher_output(s0, teacher_fn, x, cudagraphs), 1)

    def timed(self, fn, *args) -> tuple[float, float | None]:
        """Seconds of `fn(*args)` and, on CUDA, its peak allocated memory (MiB)."""
        import torch

        from rld.bench.common import sync

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        fn(*args)
        sync(self.device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if cuda else None
        return seconds, peak


def measure(args, device, dtype) -> tuple[dict, dict, float, int]:
    """Per path: the median seconds per N steps and the peak memory; the warm-up's seconds
    (compilation included); N."""
    import torch

    from rld.bench.common import synthetic_cifar
    from rld.bench.step import Pair
    from rld.data import DeviceLoader
    from rld.loop import CUDAGRAPH_MODES
    from rld.models import build_model
    from rld.students import build_students, resolve_mode

    cuda = device.type == "cuda"
    steps = args.steps or (50 if cuda else 2)
    warm = args.warmup if args.warmup >= 0 else (10 if cuda else 1)
    pair = Pair(args.pair)
    if pair.family != "cifar":
        raise SystemExit(f"rld.bench grid: --pair {args.pair}: a CIFAR pair is needed (the "
                         "benchmark trains on CIFAR-sized images)")
    ds = synthetic_cifar(args.batch_size * max(steps, warm, 1))
    loader = DeviceLoader(ds.train_images, ds.train_labels, args.batch_size, train=True,
                          mean=ds.mean, std=ds.std, device=device, seed=0, drop_last=True)
    torch.manual_seed(0)
    teacher = build_model(pair.teacher, pair.num_classes, pair.family).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    points = grid_points(args.points)
    modes = ("loop", "vmap") if args.mode == "all" else (resolve_mode(args.mode, device, dtype),)
    paths = Paths(_Limited(loader, warm), device)
    seq = build_states(pair, teacher, points, device, dtype, args.compile,
                       args.compile_mode)
    for s in seq:
        s.train()
    teacher_fn = seq[0].teacher_forward  # compiled with --compile, else the module
    cudagraphs = args.compile and args.compile_mode in CUDAGRAPH_MODES and cuda
    runs = {"sequential": lambda: paths.sequential(seq)}
    for mode in modes:  # compiled as the engine compiles a pack (rld.engine)
        states = build_states(pair, teacher, points, device, dtype,
                              args.compile and mode == "loop", args.compile_mode)
        students = build_students(states, mode, args.compile, args.compile_mode)
        students.train()
        runs[f"packed-{mode}"] = (lambda st=students, s0=states[0]:
                                  paths.packed(st, teacher_fn, s0, cudagraphs))
    t0 = time.perf_counter()
    for run in runs.values():
        run()
    warm_s = time.perf_counter() - t0
    paths.loader = _Limited(loader, steps)
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float | None] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds, peak = paths.timed(run)
            times[name].append(seconds)
            peaks[name] = None if peak is None else max(peaks.get(name) or 0.0, peak)
    return {k: statistics.median(v) for k, v in times.items()}, peaks, warm_s, steps


class _Limited:
    """The first `n` batches of a loader."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                return
            yield batch[0], batch[1]


def max_rss_mib() -> float:
    """Peak resident set of this process (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from rld.bench.common import device_name, save_rows
    from rld.engine import resolve_device, resolve_precision
    from rld.students import resolve_mode

    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    cuda = device.type == "cuda"
    medians, peaks, warm_s, steps = measure(args, device, dtype)
    name = device_name(device)
    prec = str(dtype).removeprefix("torch.")
    compiled = f"compile {args.compile_mode}" if args.compile else "eager"
    rss = None if cuda else max_rss_mib()
    seq = medians["sequential"]
    rows = []
    for path, seconds in medians.items():
        per_step = seconds / steps
        rows.append({
            "path": path, "points": args.points, "steps": steps, "seconds": round(seconds, 4),
            "s_per_step": round(per_step, 5), "epoch_s": round(per_step * epoch_steps(args), 2),
            "grid_hours_240_epochs": round(per_step * epoch_steps(args) * EPOCHS / 3600, 3),
            "speedup": round(seq / seconds, 3),
            "peak_mib": None if peaks.get(path) is None else round(peaks[path], 1),
            "peak_kind": "cuda max_memory_allocated" if cuda else "process max RSS (all paths)",
            "device": name, "precision": prec, "compile": compiled, "pair": args.pair,
            "batch_size": args.batch_size, "repeats": args.repeats, "warmup_s": round(warm_s, 2)})
        if rss is not None:
            rows[-1]["peak_mib"] = round(rss, 1)
    print(f"{args.points} RLD grid points, {args.pair}, batch {args.batch_size}, {steps} steps, "
          f"{prec}, {compiled}, on {name} (torch {torch.__version__}); median of "
          f"{args.repeats}; untimed warm-up {warm_s:.1f} s")
    print(f"{'path':<14} {'s/' + str(steps) + ' steps':>12} {'s/step':>8} {'epoch s':>9} "
          f"{'240-ep h':>9} {'speed-up':>9} {'peak MiB':>9}")
    for r in rows:
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"{r['path']:<14} {r['seconds']:>12.2f} {r['s_per_step']:>8.3f} "
              f"{r['epoch_s']:>9.1f} {r['grid_hours_240_epochs']:>9.2f} "
              f"{r['speedup']:>8.2f}x {peak:>9}")
    print(f"(epoch s: {epoch_steps(args)} steps of all {args.points} points; 240-ep h: device-hours "
          f"of their 240-epoch training, steps only; peak: "
          f"{rows[0]['peak_kind']})")
    save_rows(args.out, rows)
    auto = f"packed-{resolve_mode('auto', device, dtype)}"
    headline = auto if auto in medians else next(k for k in medians if k != "sequential")
    print(f"speed-up of the packed path ({headline.removeprefix('packed-')}, "
          f"{args.points} points): {seq / medians[headline]:.2f}x")
    return 0
