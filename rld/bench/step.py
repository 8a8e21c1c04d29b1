"""``python -m rld.bench step``: time of one training step per method (the supplement's Figure 2).

For one pair (default resnet32x4 -> resnet8x4, batch 64) on the current device: the median
time of one training step (student forward/backward, teacher forward, loss, the extra
modules, SGD update) of vanilla, KD, FitNet, OFD, ReviewKD, CRD, DKD and RLD, the images/s it
gives, the extra parameters each method adds (counted as the reference releases count them),
and each method's top-1: measured (the best grid point of `results/runs.csv`, from `make
table`) when runs of the pair exist, else the value reported in the literature, labelled so.
The methods are timed round-robin, one step each in turn, on one fixed random batch, so
drifts of the machine's speed hit all of them alike; CUDA steps are synchronised.  With
--compile, compilation (and CUDA-graph capture) happens in the untimed warm-up, whose time is
printed apart, with the number of graphs compiled while timing (should be 0).  Writes
`efficiency.csv` and `efficiency.png` (ms per batch against top-1, circle area by extra
parameters, the device in the title).
"""

from __future__ import annotations

import argparse
import statistics
import time
from copy import deepcopy
from pathlib import Path

from rld.cli import ArgumentParser, natural
from rld.validate import COMPILE_MODES

METHODS = ("vanilla", "kd", "fitnet", "ofd", "reviewkd", "crd", "dkd", "rld")
LOGIT_METHODS = ("vanilla", "kd", "dkd", "rld")
CIFAR_TRAIN_SIZE = 50_000  # CRD's memory holds one row per training sample
IMAGENET_TRAIN_SIZE = 1_281_167


def parse_args(argv):
    p = ArgumentParser(prog="python -m rld.bench step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="resnet32x4_resnet8x4", help="a conf/pair/ name")
    p.add_argument("--methods", default="",
                   help=f"comma-separated, of {','.join(METHODS)} (default: all on CIFAR "
                        f"pairs; {','.join(LOGIT_METHODS)} on ImageNet pairs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="auto | bf16 | fp16 | fp32")
    p.add_argument("--batch-size", type=natural, default=0,
                   help="default: 64 (CIFAR pairs, the recipe), 256 (ImageNet pairs)")
    p.add_argument("--steps", type=natural, default=0,
                   help="timed steps per method (default: 200 on CUDA, 30 on CPU)")
    p.add_argument("--warmup", type=natural, default=0,
                   help="untimed steps per method first (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile models and loss")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="with --compile (reduce-overhead, max-autotune: CUDA graphs)")
    p.add_argument("--runs", default="results/runs.csv",
                   help="runs.csv of `make table` for measured top-1 ('' for none)")
    p.add_argument("--out", default="results", help="folder for efficiency.csv/.png")
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; use {', '.join(METHODS)}")
    return args


class Pair:
    """A conf/pair/ file's teacher and student, and the input they take."""

    def __init__(self, name: str):
        from omegaconf import OmegaConf

        from rld.models import MODELS

        path = Path(__file__).resolve().parents[2] / "conf" / "pair" / f"{name}.yaml"
        if not path.exists():
            raise SystemExit(f"rld.bench: --pair {name!r}: no conf/pair/{name}.yaml")
        conf = OmegaConf.load(path)
        self.name, self.teacher, self.student = name, str(conf.teacher), str(conf.student)
        # ResNet18/50 exist in both zoos: a pair is CIFAR when both its models are
        cifar_zoo = MODELS["cifar"]
        self.family = "cifar" if {self.teacher, self.student} <= set(cifar_zoo) else "imagenet"
        cifar = self.family == "cifar"
        self.dataset = "cifar100" if cifar else "imagenet"
        self.num_classes, self.image_size = (100, 32) if cifar else (1000, 224)
        self.train_size = CIFAR_TRAIN_SIZE if cifar else IMAGENET_TRAIN_SIZE


def measured_top1(runs_csv: str, pair: str) -> dict[str, float]:
    """Per distiller, the best mean top1_best over its points (its settings as grouped by
    its registered settings, `rld.distillers`) of this pair's finished student runs in
    runs.csv, as
    `make table` counts them (`rld.table.summary.build_group`): no run marked as a duplicate
    of another, and only the runs of the epoch count most of them have (ties: the larger)."""
    if not runs_csv or not Path(runs_csv).exists():
        return {}
    import pandas as pd

    from rld.distillers import DISTILLERS

    df = pd.read_csv(runs_csv)
    df = df[(df["pair"] == pair) & (df["role"] == "student") & (df["status"] == "completed")]
    if "duplicate_of" in df:
        df = df[df["duplicate_of"].isna()]
    out = {}
    for name, runs in df.groupby("distiller"):
        if "epochs" in runs:
            counts = runs["epochs"].value_counts()
            modal = max(counts.index, key=lambda e: (counts[e], e))
            runs = runs[runs["epochs"] == modal]
        settings = DISTILLERS.get(name).setting_names() if name in DISTILLERS else ()
        keys = [k for k in settings if k in runs.columns]
        means = runs.groupby(keys, dropna=False)["top1_best"].mean() if keys else \
            runs["top1_best"]
        out[str(name)] = float(means.max() if keys else means.mean())
    return out


def reported_top1(pair: Pair) -> dict[str, float]:
    """The literature's top-1 of each method for this pair (packaged CSVs)."""
    from rld.table.summary import load_literature

    for row in load_literature():
        if (row.dataset, row.teacher, row.student) == (pair.dataset, pair.teacher, pair.student):
            values = dict(row.values)
            if "student" in values:
                values["vanilla"] = values["student"]
            return values
    return {}


def bench_state(student, teacher, distiller, device, dtype, compile: bool = False,
                compile_mode: str = "default", channels_last: bool = True):
    """A `TrainState` of the CIFAR-100 recipe (SGD lr 0.05, momentum 0.9, wd 5e-4) for the
    module `student` under `teacher` (a module, or None)."""
    from rld.loop import build_train_state

    return build_train_state(student, teacher, distiller, device=device, dtype=dtype,
                             channels_last=channels_last, compile=compile,
                             compile_mode=compile_mode, lr=0.05, momentum=0.9,
                             weight_decay=5e-4)


def build_states(pair: Pair, methods, device, dtype, compile: bool, compile_mode: str) -> dict:
    """A TrainState per method, each with its own student (the same initial weights) and
    extra modules, sharing one teacher (a copy for methods that run it in training mode)."""
    import torch

    from rld.bench.common import distiller_config
    from rld.distillers import build_distiller
    from rld.models import build_model

    torch.manual_seed(0)
    teacher = build_model(pair.teacher, pair.num_classes, pair.family).eval()
    student = build_model(pair.student, pair.num_classes, pair.family)
    labels = torch.arange(pair.train_size) % pair.num_classes
    states = {}
    for name in methods:
        s = deepcopy(student)
        distiller = build_distiller(distiller_config(name), student=s, teacher=teacher,
                                    image_size=pair.image_size, num_train=pair.train_size,
                                    train_labels=labels.to(device))
        t = None
        if distiller.needs_teacher:  # its own copy where training changes the teacher
            t = deepcopy(teacher) if distiller.teacher_train else teacher
        states[name] = bench_state(s, t, distiller, device, dtype, compile, compile_mode)
    return states


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (0 without compile)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_note(compile: bool) -> str:
    """How many compiled graphs run without CUDA graphs (reduce-overhead expects 0)."""
    from torch._dynamo.utils import counters

    return f"; CUDA-graph skips: {counters['inductor']['cudagraph_skips']}" if compile else ""


def measure(states: dict, pair: Pair, device, batch_size: int, steps: int, warmup: int):
    """Per-step seconds of each method, timed round-robin on one fixed random batch, the
    seconds of the untimed warm-up (compilation included) and the graphs compiled while
    timing."""
    import torch

    from rld.bench.common import sync
    from rld.loop import train_step

    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch_size, 3, pair.image_size, pair.image_size, generator=g).to(device)
    y = torch.randint(0, pair.num_classes, (batch_size,), generator=g).to(device)
    index = torch.randperm(pair.train_size, generator=g)[:batch_size].to(device)

    def one(name: str) -> float:
        sync(device)
        t0 = time.perf_counter()
        train_step(states[name], x, y, 1, index)
        sync(device)
        return time.perf_counter() - t0

    for s in states.values():
        s.train()
    t0 = time.perf_counter()
    for _ in range(warmup):
        for name in states:
            one(name)
    warm_s = time.perf_counter() - t0
    graphs = compiled_graphs()
    times: dict[str, list[float]] = {name: [] for name in states}
    for _ in range(steps):
        for name in states:
            times[name].append(one(name))
    return times, warm_s, compiled_graphs() - graphs


def efficiency_rows(args, pair: Pair, states: dict, times: dict, dtype, device_label: str,
                    warm_s: float) -> list[dict]:
    """One row per method: timing, extra parameters, top-1 (measured or reported)."""
    from rld.table.summary import method_label

    measured, reported = measured_top1(args.runs, pair.name), reported_top1(pair)
    kd_ms = statistics.median(times["kd"]) * 1e3 if "kd" in times else None
    rows = []
    for name, samples in times.items():
        ms = statistics.median(samples) * 1e3
        top1, source = measured.get(name), "measured"
        if top1 is None:
            top1, source = reported.get(name), "reported" if name in reported else ""
        rows.append({
            "method": "vanilla" if name == "vanilla" else method_label(name),
            "ms_per_batch": round(ms, 4), "images_per_s": round(args.batch_size / ms * 1e3, 1),
            "vs_kd": round(ms / kd_ms, 4) if kd_ms else None,
            "extra_params": states[name].distiller.extra_parameters(),
            "top1": top1, "top1_source": source, "device": device_label,
            "precision": str(dtype).removeprefix("torch."), "batch_size": args.batch_size,
            "steps": len(samples), "pair": pair.name,
            "compile": f"compile {args.compile_mode}" if args.compile else "eager",
            "warmup_s": round(warm_s, 2)})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from rld.bench.common import device_name
    from rld.engine import resolve_device, resolve_precision
    from rld.io import write_csv

    pair = Pair(args.pair)
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (64 if pair.family == "cifar" else 256)
    methods = args.methods or list(METHODS if pair.family == "cifar" else LOGIT_METHODS)
    steps, warmup = args.steps or (200 if cuda else 30), args.warmup or (20 if cuda else 3)
    states = build_states(pair, methods, device, dtype, args.compile, args.compile_mode)
    times, warm_s, late = measure(states, pair, device, args.batch_size, steps, warmup)
    name = device_name(device)
    rows = efficiency_rows(args, pair, states, times, dtype, name, warm_s)
    out = Path(args.out)
    write_csv(out / "efficiency.csv", rows)
    plot(rows, out / "efficiency.png")
    print(f"training step, {pair.name}, batch {args.batch_size}, {steps} steps/method, "
          f"{rows[0]['precision']}, {rows[0]['compile']}, on {name} (torch {torch.__version__})")
    print(f"untimed warm-up ({warmup} steps/method{', compilation included' * args.compile}): "
          f"{warm_s:.1f} s; graphs compiled while timed: {late}{compile_note(args.compile)}")
    print(f"{'method':<9} {'ms/batch':>9} {'images/s':>9} {'vs KD':>6} {'extra params':>13} "
          f"{'top-1':>13}")
    for r in rows:
        top1 = "" if r["top1"] is None else f"{r['top1']:.2f} ({r['top1_source']})"
        vs = "" if r["vs_kd"] is None else f"{r['vs_kd']:.3f}"
        print(f"{r['method']:<9} {r['ms_per_batch']:>9.2f} {r['images_per_s']:>9.0f} {vs:>6} "
              f"{r['extra_params']:>13,} {top1:>13}")
    if "rld" in times and "kd" in times:
        print(f"RLD/KD batch-time ratio: {rows[methods.index('rld')]['vs_kd']:.3f}")
    print(f"wrote {out / 'efficiency.csv'} and {out / 'efficiency.png'}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    """The supplement's Figure 2: x = ms per batch, y = top-1, circle area proportional to
    the extra parameters (with a floor, so methods that add none still show), each method
    labelled; hollow circles where the top-1 is the literature's, not measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    have_top1 = all(r["top1"] is not None for r in rows)
    biggest = max([r["extra_params"] for r in rows] + [1])
    for i, r in enumerate(rows):
        y = r["top1"] if have_top1 else i
        area = 60 + 2400 * r["extra_params"] / biggest
        measured = r["top1_source"] == "measured"
        ax.scatter(r["ms_per_batch"], y, s=area, alpha=0.45 if measured else 0.9,
                   facecolors=None if measured else "none", edgecolors=f"C{i}",
                   color=f"C{i}" if measured else None, linewidths=1.5)
        extra = f" (+{r['extra_params'] / 1e6:.2f}M)" if r["extra_params"] else ""
        ax.annotate(r["method"] + extra, (r["ms_per_batch"], y), textcoords="offset points",
                    xytext=(7, 5), fontsize=8)
    ax.set_xlabel("training time per batch (ms)")
    if have_top1:
        sources = {r["top1_source"] for r in rows}
        ax.set_ylabel("top-1 (%)" + (": filled = measured, hollow = reported"
                                     if len(sources) > 1 else f" ({sources.pop()})"))
    else:
        ax.set_yticks(range(len(rows)), [r["method"] for r in rows])
        ax.set_ylabel("method (no top-1 known)")
    r0 = rows[0]
    ax.set_title(f"{r0['pair']}, batch {r0['batch_size']}, {r0['precision']}, {r0['compile']}\n"
                 f"on {r0['device']} (circle area: extra parameters)", fontsize=9)
    ax.margins(x=0.25, y=0.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
