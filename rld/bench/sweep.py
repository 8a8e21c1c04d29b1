"""``python -m rld.bench sweep``: a grid sweep run both ways, without and with pruning.

A 16-point RLD grid (beta in {2, 4, 8, 16} x tau in {2, 3, 4, 5} by default) on a CPU-sized
task (scikit-learn's digits by default, or the synthetic set) with the CIFAR recipe scaled to
``--epochs`` (its LR drops at 150, 180, 210 of 240 epochs, and RLD's 20-epoch warm-up, at the
same fractions), through the real CLI (``python -m rld.train -m hparams=grid ...``), twice in
one project root:

- ``full``: ``hparams.pruner=none``, every point to the last epoch;
- ``pruned``: ``hparams.pruner=<--pruner>`` with ``--pruning`` settings.

Both sweeps run their points one after another (Hydra's basic launcher: the pruner sees the
same order every time) with the same seed, so a point that completes in both gives the same
numbers in both.  The teacher is trained first when the root has none (not timed).

Prints the epochs each sweep trained, its wall time, the best point of each (among completed
runs, by ``--objective``), and the gap: the full sweep's best value minus the full sweep's
value at the pruned sweep's best point (0.00: the same point, or one as good).  Writes
``--out`` (CSV, one line per sweep).  Exit status 0 when both sweeps ran, whatever the
numbers (the target: the same best point, or a gap of at most 0.5 pt, at <= 40% of the
epochs).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE_EPOCHS, RECIPE_MILESTONES, RECIPE_WARMUP = 240, (150, 180, 210), 20
OBJECTIVES = ("top1_best", "top1", "top5")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m rld.bench sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the defaults are the measurement the README and docs/scaling.md report (digits, 12
    # epochs, sha with rungs 1, 3, 9): the command without options repeats it
    p.add_argument("--dataset", default="digits", choices=("digits", "synthetic"))
    p.add_argument("--train-size", type=int, default=512, help="synthetic: training images")
    p.add_argument("--test-size", type=int, default=256, help="synthetic: test images")
    p.add_argument("--pair", default="tiny", help="a conf/pair/ name")
    p.add_argument("--epochs", type=int, default=12, help="epochs per point")
    p.add_argument("--beta", type=_floats, default=[2.0, 4.0, 8.0, 16.0])
    p.add_argument("--tau", type=_floats, default=[2.0, 3.0, 4.0, 5.0])
    p.add_argument("--pruner", default="sha", help="none | median | percentile | sha | hyperband")
    p.add_argument("--pruning", action="append", default=[], metavar="KEY=VALUE",
                   help="a pruner setting (hparams.pruning.KEY), repeatable; default for sha: "
                        "min_resource=1 reduction_factor=3")
    p.add_argument("--objective", default="top1_best", choices=OBJECTIVES)
    p.add_argument("--root", default="",
                   help="project root of the runs (default: a new temporary folder); a root "
                        "used before recalls its finished runs: time a fresh one")
    p.add_argument("--threads", type=int, default=0, help="OMP threads (0: torch's default)")
    p.add_argument("--out", default="results/bench_sweep.csv")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2")
    if not args.beta or not args.tau:
        p.error("--beta and --tau need at least one value each")
    for item in args.pruning:
        if "=" not in item:
            p.error(f"--pruning {item!r}: use KEY=VALUE")
    if not args.pruning and args.pruner == "sha":
        args.pruning = ["min_resource=1", "reduction_factor=3"]
    return args


def scaled(n: int, epochs: int) -> int:
    """Epoch `n` of the 240-epoch recipe at `epochs` (at least 1)."""
    return max(1, round(n * epochs / RECIPE_EPOCHS))


def common(args) -> list[str]:
    milestones = sorted({scaled(m, args.epochs) for m in RECIPE_MILESTONES})
    size = ([f"dataset.train_size={args.train_size}", f"dataset.test_size={args.test_size}"]
            if args.dataset == "synthetic" else [])
    return [f"dataset={args.dataset}", *size, f"pair={args.pair}", "trainer.device=cpu",
            "trainer.progress=none", f"trainer.epochs={args.epochs}",
            f"optim.milestones=[{','.join(map(str, milestones))}]"]


def cli(root: Path, overrides: list[str], threads: int) -> float:
    """`python -m rld.train paths.root=ROOT <overrides>`: its wall time (raises if it fails)."""
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "rld.train", *[o for o in overrides if o.startswith("-")],
           f"paths.root={root}", *[o for o in overrides if not o.startswith("-")]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rld.bench sweep: {' '.join(cmd)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return wall


def sweep_overrides(args, tag: str, pruner: str, pruning: list[str]) -> list[str]:
    return ["-m", *common(args), "distiller=rld",
            f"distiller.warmup={scaled(RECIPE_WARMUP, args.epochs)}", "hparams=grid",
            f"hparams.beta=[{','.join(map(str, args.beta))}]",
            f"hparams.tau=[{','.join(map(str, args.tau))}]", f"objective={args.objective}",
            f"hparams.pruner={pruner}", *[f"hparams.pruning.{kv}" for kv in pruning],
            f"tag={tag}"]


def read_sweep(root: Path, tag: str, objective: str) -> dict[tuple, dict]:
    """The sweep's runs by (beta, tau): status, epochs trained, objective value."""
    out = {}
    for path in sorted((root / "sweeps" / tag).rglob("metrics.json")):
        rec = json.loads(path.read_text())
        settings = rec.get("settings") or rec  # metrics.json keeps the settings at the top
        point = (float(settings["beta"]), float(settings["tau"]))
        value = rec.get(objective)
        out[point] = {"status": rec["status"], "epochs": int(rec.get("epochs_done") or 0),
                      "value": math.nan if value is None else float(value)}
    return out


def best(runs: dict[tuple, dict]) -> tuple | None:
    done = {p: r["value"] for p, r in runs.items()
            if r["status"] == "completed" and math.isfinite(r["value"])}
    return max(sorted(done), key=lambda p: done[p]) if done else None


def fmt_point(p: tuple | None) -> str:
    return "none" if p is None else f"beta={p[0]:g} tau={p[1]:g}"


def report(args, results: dict[str, dict]) -> list[dict]:
    """Print the comparison; the CSV rows."""
    full, pruned = results["full"]["runs"], results["pruned"]["runs"]
    b_full, b_pruned = best(full), best(pruned)
    gap = (full[b_full]["value"] - full[b_pruned]["value"]
           if b_full is not None and b_pruned in full else math.nan)
    total = len(full) * args.epochs
    rows = []
    print(f"{len(full)}-point grid, {args.dataset}/{args.pair}, {args.epochs} epochs, "
          f"milestones {common(args)[-1].split('=')[1]}, objective {args.objective}")
    for name, res in results.items():
        runs = res["runs"]
        epochs = sum(r["epochs"] for r in runs.values())
        n_pruned = sum(r["status"] == "pruned" for r in runs.values())
        b = best(runs)
        value = f" ({runs[b]['value']:.2f})" if b else ""
        print(f"{name:>7}: {epochs:4d} epochs ({100 * epochs / total:5.1f}%), wall "
              f"{res['wall_s']:7.1f} s, {n_pruned:2d} pruned, best {fmt_point(b)}{value}")
        rows.append({"sweep": name, "pruner": res["pruner"], "points": len(runs),
                     "epochs_per_point": args.epochs, "epochs": epochs,
                     "epochs_pct": round(100 * epochs / total, 1),
                     "wall_s": round(res["wall_s"], 1), "pruned": n_pruned,
                     "best": fmt_point(b), "best_value": round(runs[b]["value"], 2) if b else "",
                     "gap_pt": round(gap, 2) if math.isfinite(gap) else ""})
    same = b_full == b_pruned
    print(f"same best point: {'yes' if same else 'no'}; gap in {args.objective}: "
          f"{gap:.2f} pt (full sweep's best minus its value at the pruned sweep's best)")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="rld-bench-sweep-")).resolve()
    teacher = ["distiller=vanilla", "role=teacher",
               *[o for o in common(args) if not o.startswith(("trainer.epochs", "optim."))]]
    print(f"root {root}; training the teacher when missing (not timed)", flush=True)
    cli(root, teacher, args.threads)
    results = {}
    for name, pruner, pruning in (("full", "none", []),
                                  ("pruned", args.pruner, args.pruning)):
        print(f"sweep {name} (pruner {pruner} {' '.join(pruning)})...", flush=True)
        wall = cli(root, sweep_overrides(args, f"bench-{name}", pruner, pruning), args.threads)
        results[name] = {"pruner": " ".join([pruner, *pruning]), "wall_s": wall,
                         "runs": read_sweep(root, f"bench-{name}", args.objective)}
    rows = report(args, results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0
