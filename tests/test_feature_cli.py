"""The feature distillers through the real CLI on the `tiny` pair and synthetic data: each of
the four trains, keeps its modules out of student.pt, sweeps its settings, and resumes after
SIGKILL exactly where an uninterrupted run ends."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, SMALL, run_train

from rld.models import build_model
from rld.record import read_record

# CRD's memory holds the 256 training samples; a few negatives keep it small
FEATURE = [*SMALL, "distiller.nce_k=32"]


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def _only_run(root: Path, tag: str) -> Path:
    [path] = (root / "sweeps" / tag).rglob("metrics.json")
    return path.parent


@pytest.mark.parametrize("name", ["fitnet", "ofd", "reviewkd", "crd"])
def test_feature_distiller_trains_through_the_cli(teacher_root, name):
    root, tag = teacher_root, f"feat_{name}"
    small = FEATURE if name == "crd" else SMALL  # nce_k is a setting of CRD alone
    run_train(root, *small, f"distiller={name}", "trainer.epochs=1", f"tag={tag}")
    run_dir = _only_run(root, tag)
    record = read_record(run_dir)
    assert record.status == "completed" and record.distiller == name
    assert record.settings["kd_weight"] == {"fitnet": 100.0, "ofd": 1e-3, "reviewkd": 1.0,
                                            "crd": 0.8}[name]
    history = _history(run_dir)
    assert float(history[0][f"loss_{name}"]) > 0  # the feature term was trained
    state = torch.load(run_dir / "checkpoints/last.pt", weights_only=False)
    assert state["distiller"]  # the extra modules are in the checkpoint...
    student = torch.load(run_dir / "student.pt", weights_only=True)
    model = build_model("resnet8", 10)
    model.load_state_dict(student["model"])  # ...not in student.pt: it loads as a model
    assert set(student["model"]) == set(model.state_dict())


def test_feature_settings_sweep_like_beta_and_tau(teacher_root):
    root = teacher_root
    run_train(root, "-m", *FEATURE, "distiller=crd", "distiller.nce_t=0.05,0.1",
              "trainer.epochs=1", "tag=feat_grid")
    runs = sorted((root / "sweeps/feat_grid").rglob("metrics.json"))
    assert [read_record(p.parent).settings["nce_t"] for p in runs] == [0.05, 0.1]
    assert all("nce_t=" in str(p) for p in runs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["crd", "ofd"])  # random negatives; a teacher in train mode
def test_killed_feature_run_resumes_exactly(teacher_root, name):
    root = teacher_root
    args = [*(FEATURE if name == "crd" else SMALL), f"distiller={name}", "trainer.epochs=3"]
    run_train(root, *args, f"tag=straight_{name}")
    straight = _only_run(root, f"straight_{name}")

    cmd = [sys.executable, "-m", "rld.train", f"paths.root={root}", *args, f"tag=killed_{name}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list((root / "sweeps" / f"killed_{name}").rglob("checkpoints/last.pt")):
        assert proc.poll() is None and time.time() < deadline, "run ended before a checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _only_run(root, f"killed_{name}")
    assert read_record(killed).status == "running" and len(_history(killed)) < 3

    run_train(root, *args, f"tag=killed_{name}")
    a, b = read_record(straight), read_record(killed)
    assert (a.top1, a.top1_best, a.top5) == (b.top1, b.top1_best, b.top5)
    assert _history(straight) == _history(killed)
