"""``python -m rld.bench step``: milliseconds per training batch of each distiller.

The supplement's Figure 2: for one pair (default resnet32x4 -> resnet8x4) on the current
device, the median time of one training step (student forward/backward, teacher forward,
loss, SGD update; batch 64) for vanilla, KD, DKD and RLD, with the extra trainable
parameters each method adds (0 for logit methods), and optionally each method's top-1
from `results/runs.csv`.  The methods are timed round-robin, one step each in turn, so
drifts of the machine's speed hit all of them alike; CUDA steps are synchronised.
With --compile, compilation (and CUDA-graph capture) happens in the untimed warm-up, whose
time is printed apart, with the number of graphs compiled while timing (should be 0).
Writes `efficiency.csv` and `efficiency.png` (batch time against top-1, circle size by
extra parameters).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rld.validate import COMPILE_MODES

METHODS = ("vanilla", "kd", "dkd", "rld")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m rld.bench step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pair", default="resnet32x4_resnet8x4", help="a conf/pair/ name")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="timed steps per method (default: 200 on CUDA, 30 on CPU)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed steps per method first (default: 20 on CUDA, 3 on CPU)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile models and loss")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="with --compile (reduce-overhead, max-autotune: CUDA graphs)")
    p.add_argument(
        "--runs",
        default="results/runs.csv",
        help="runs.csv of `make table` for the top-1 column ('' for none)",
    )
    p.add_argument("--out", default="results", help="folder for efficiency.csv/.png")
    return p.parse_args(argv)


def _pair(name: str) -> tuple[str, str]:
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[2] / "conf" / "pair" / f"{name}.yaml"
    if not path.exists():
        raise SystemExit(f"rld.bench step: --pair {name!r}: no conf/pair/{name}.yaml")
    pair = OmegaConf.load(path)
    return pair.teacher, pair.student


def _top1(runs_csv: str, pair: str) -> dict[str, float]:
    """Best mean top1_best per distiller of this pair (role=student) from runs.csv."""
    if not runs_csv or not Path(runs_csv).exists():
        return {}
    import pandas as pd

    df = pd.read_csv(runs_csv)
    df = df[(df["pair"] == pair) & (df["role"] == "student") & (df["status"] == "completed")]
    if df.empty:
        return {}
    means = df.groupby(["distiller", "beta", "tau"], dropna=False)["top1_best"].mean()
    return {d: float(v.max()) for d, v in means.groupby(level=0)}


def bench_step(student_arch: str, teacher, distiller, device, dtype, channels_last: bool,
               compile: bool, compile_mode: str):
    """A `TrainState` of the CIFAR-100 recipe (SGD lr 0.05, momentum 0.9, wd 5e-4) for a
    fresh `student_arch` (100 classes) under `teacher` (a module, or None)."""
    from rld.loop import build_train_state
    from rld.models import build_model

    return build_train_state(build_model(student_arch, 100), teacher, distiller, device=device,
                      dtype=dtype, channels_last=channels_last, compile=compile,
                      compile_mode=compile_mode, lr=0.05, momentum=0.9, weight_decay=5e-4)


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (0 without compile)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_note(compile: bool) -> str:
    """How many compiled graphs run without CUDA graphs (reduce-overhead expects 0)."""
    from torch._dynamo.utils import counters

    return f"; CUDA-graph skips: {counters['inductor']['cudagraph_skips']}" if compile else ""


def measure(
    pair: str,
    device,
    dtype,
    batch_size: int,
    steps: int,
    warmup: int,
    compile: bool = False,
    compile_mode: str = "default",
) -> tuple[dict[str, list[float]], float, int]:
    """Per-step seconds of each method, timed round-robin on one fixed random batch, the
    seconds of the untimed warm-up (compilation included) and the graphs compiled while
    timing."""
    import torch

    from rld.bench.common import distiller_config
    from rld.distillers import build_distiller
    from rld.loop import train_step
    from rld.models import build_model

    teacher_arch, student_arch = _pair(pair)
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (batch_size,), device=device)
    teacher = build_model(teacher_arch, 100)
    steps_by = {}
    for name in METHODS:
        distiller = build_distiller(distiller_config(name))
        steps_by[name] = bench_step(student_arch, teacher if distiller.needs_teacher else None,
                                    distiller, device, dtype, True, compile, compile_mode)

    def one(name: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(steps_by[name], x, y, epoch=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for s in steps_by.values():
        s.train()
    t0 = time.perf_counter()
    for _ in range(warmup):
        for name in METHODS:
            one(name)
    warm_s = time.perf_counter() - t0
    graphs = compiled_graphs()
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(steps):
        for name in METHODS:
            times[name].append(one(name))
    return times, warm_s, compiled_graphs() - graphs


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from rld.bench.common import device_name
    from rld.engine import resolve_device, resolve_precision
    from rld.io import write_text

    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    cuda = device.type == "cuda"
    steps = args.steps or (200 if cuda else 30)
    warmup = args.warmup or (20 if cuda else 3)
    compiled = f"compile {args.compile_mode}" if args.compile else "eager"
    times, warm_s, late = measure(
        args.pair, device, dtype, args.batch_size, steps, warmup, args.compile, args.compile_mode
    )
    top1 = _top1(args.runs, args.pair)
    name = device_name(device)
    kd_ms = statistics.median(times["kd"]) * 1e3
    rows = []
    for method in METHODS:
        ms = statistics.median(times[method]) * 1e3
        rows.append(
            {
                "method": method.upper() if method != "vanilla" else "vanilla",
                "ms_per_batch": ms,
                "vs_kd": ms / kd_ms,
                "extra_params": 0,
                "top1": top1.get(method),
                "device": name,
                "precision": str(dtype).removeprefix("torch."),
                "batch_size": args.batch_size,
                "steps": steps,
                "pair": args.pair,
                "compile": compiled,
                "warmup_s": warm_s,
            }
        )
    out = Path(args.out)
    header = list(rows[0])
    lines = [",".join(header)] + [
        ",".join(
            "" if r[k] is None else (f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]))
            for k in header
        )
        for r in rows
    ]
    write_text(out / "efficiency.csv", "\n".join(lines) + "\n")
    _plot(rows, out / "efficiency.png", name)
    print(
        f"training step, {args.pair}, batch {args.batch_size}, {steps} steps/method, "
        f"{rows[0]['precision']}, {compiled}, on {name} (torch {torch.__version__})"
    )
    print(
        f"untimed warm-up ({warmup} steps/method{', compilation included' * args.compile}): "
        f"{warm_s:.1f} s; graphs compiled while timed: {late}{compile_note(args.compile)}"
    )
    print(f"{'method':<8} {'ms/batch':>9} {'vs KD':>7} {'extra params':>13} {'top-1':>7}")
    for r in rows:
        t = "" if r["top1"] is None else f"{r['top1']:.2f}"
        print(
            f"{r['method']:<8} {r['ms_per_batch']:>9.2f} {r['vs_kd']:>7.3f} "
            f"{r['extra_params']:>13} {t:>7}"
        )
    print(f"RLD/KD batch-time ratio: {rows[3]['vs_kd']:.3f}")
    print(f"wrote {out / 'efficiency.csv'} and {out / 'efficiency.png'}")
    return 0


def _plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    have_top1 = all(r["top1"] is not None for r in rows)
    for i, r in enumerate(rows):
        yv = r["top1"] if have_top1 else i
        ax.scatter(r["ms_per_batch"], yv, s=200 + r["extra_params"] / 1e3, alpha=0.6)
        ax.annotate(r["method"], (r["ms_per_batch"], yv), textcoords="offset points", xytext=(8, 4))
    ax.set_xlabel("training time per batch (ms)")
    if have_top1:
        ax.set_ylabel("top-1 (%)")
    else:
        ax.set_yticks(range(len(rows)), [r["method"] for r in rows])
        ax.set_ylabel("method (no top-1 in runs.csv)")
    ax.set_title(f"{rows[0]['pair']} on {device}\n(circle size: extra parameters)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
