"""`python -m rld.bench sweep`: the recipe scaled to the bench's epochs, and how it reads a
sweep (epochs trained, best point among completed runs only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rld.bench import sweep


def test_recipe_scales_lr_drops_and_warmup():
    args = sweep.parse_args(["--epochs", "16"])
    assert "optim.milestones=[10,12,14]" in sweep.common(args)  # 150, 180, 210 of 240
    assert "distiller.warmup=1" in sweep.sweep_overrides(args, "t", "sha", [])
    # the defaults repeat the documented measurement: digits, 12 epochs, sha rungs 1, 3, 9
    args = sweep.parse_args([])
    assert (args.dataset, args.epochs) == ("digits", 12)
    assert "optim.milestones=[8,9,10]" in sweep.common(args)
    assert args.pruning == ["min_resource=1", "reduction_factor=3"]
    with pytest.raises(SystemExit):
        sweep.parse_args(["--pruning", "min_resource"])


def _run(root: Path, name: str, beta: float, status: str, epochs: int, top1: float | None):
    d = root / "sweeps" / "t" / name / "seed=0"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "beta": beta, "tau": 4.0, "status": status, "epochs_done": epochs,
        "top1_best": top1}))


def test_best_point_is_a_completed_one(tmp_path):
    _run(tmp_path, "a", 2.0, "completed", 16, 60.0)
    _run(tmp_path, "b", 4.0, "pruned", 3, 99.0)  # a pruned run's number is no result
    _run(tmp_path, "c", 8.0, "completed", 16, 61.5)
    runs = sweep.read_sweep(tmp_path, "t", "top1_best")
    assert sum(r["epochs"] for r in runs.values()) == 35
    assert sweep.best(runs) == (8.0, 4.0)
    assert math.isnan(sweep.read_sweep(tmp_path, "t", "top5")[(2.0, 4.0)]["value"])
