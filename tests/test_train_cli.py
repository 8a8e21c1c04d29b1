"""The training CLI end to end, in subprocesses, on the synthetic set and the `tiny` pair."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, SMALL, run_train

RUNS = Path("sweeps/main/synthetic/tiny")


def _run_dir(root: Path, leaf: str) -> Path:
    return root / RUNS / leaf / "seed=0"


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_single_run_writes_everything_and_a_rerun_recalls_it(teacher_root):
    root = teacher_root
    run_train(root, *SMALL, "distiller=rld", "distiller.beta=2", "trainer.epochs=2", "seed=3")
    run_dir = root / RUNS / ("rld/beta=2+tau=4+dataset.test_size=128+dataset.train_size=256+"
                             "trainer.batch_size=64+trainer.epochs=2") / "seed=3"
    for name in (".hydra/config.yaml", "train.log", "history.csv", "metrics.json",
                 "checkpoints/last.pt", "student.pt"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert (metrics["distiller"], metrics["beta"], metrics["tau"], metrics["seed"]) == (
        "rld", 2.0, 4.0, 3)
    assert metrics["teacher"] == "resnet14" and metrics["student"] == "resnet8"
    assert 0 <= metrics["top1"] <= metrics["top1_best"] <= 100
    assert metrics["teacher_top1"] is not None and metrics["versions"]["torch"]
    rows = _history(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"lr", "loss_ce", "loss_rld", "train_top1", "test_top1", "test_top5"} <= set(rows[0])
    ckpt = torch.load(run_dir / "student.pt", weights_only=True)
    assert ckpt["arch"] == "resnet8" and ckpt["num_classes"] == 10

    # the same command again: no training, the same result
    before = (run_dir / "metrics.json").read_text()
    proc = run_train(root, *SMALL, "distiller=rld", "distiller.beta=2", "trainer.epochs=2",
                     "seed=3")
    assert "already finished" in proc.stdout + proc.stderr
    assert (run_dir / "metrics.json").read_text() == before


def test_multirun_grid_one_directory_per_point(teacher_root):
    root = teacher_root
    run_train(root, "-m", *SMALL, "distiller=rld", "distiller.beta=2,4", "distiller.tau=2,3",
              "trainer.epochs=1", "tag=grid")
    base = root / "sweeps/grid/synthetic/tiny/rld"
    suffix = "+dataset.test_size=128+dataset.train_size=256+trainer.batch_size=64+trainer.epochs=1"
    for beta in (2, 4):
        for tau in (2, 3):
            metrics = json.loads((base / f"beta={beta}+tau={tau}{suffix}" / "seed=0"
                                  / "metrics.json").read_text())
            assert (metrics["beta"], metrics["tau"], metrics["status"]) == (beta, tau,
                                                                             "completed")
    assert len(list(base.iterdir())) == 4


def _leaf(epochs: int) -> str:
    return ("kd/tau=4+dataset.test_size=128+dataset.train_size=256+trainer.batch_size=64+"
            f"trainer.epochs={epochs}")


def test_resume_after_sigkill_gives_identical_numbers(teacher_root, tmp_path):
    root = teacher_root
    args = [*SMALL, "distiller=kd", "trainer.epochs=3"]
    run_train(root, *args, "tag=straight")
    straight = root / "sweeps/straight/synthetic/tiny" / _leaf(3) / "seed=0"

    cmd = [sys.executable, "-m", "rld.train", f"paths.root={root}", *args, "tag=killed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = root / "sweeps/killed/synthetic/tiny" / _leaf(3) / "seed=0"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints/last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before a checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((killed / "metrics.json").read_text())["status"] == "running"
    epochs_done = len(_history(killed))
    assert 1 <= epochs_done < 3

    out = run_train(root, *args, "tag=killed")
    assert f"after epoch {epochs_done}" in out.stdout + out.stderr
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    for key in ("top1", "top1_best", "top5", "teacher_top1"):
        assert a[key] == b[key], key
    assert _history(straight) == _history(killed)


def test_divergence_is_recorded_and_named(teacher_root):
    root = teacher_root
    proc = run_train(root, *SMALL, "distiller=rld", "trainer.epochs=2", "optim.lr=1e12",
                     "distiller.warmup=0", "tag=cli_diverge")
    out = proc.stdout + proc.stderr
    assert "non-finite loss at epoch 1, step" in out
    [metrics_path] = (root / "sweeps/cli_diverge").rglob("metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["status"] == "diverged" and metrics["top1"] is None
    assert not (metrics_path.parent / "student.pt").exists()


def test_missing_teacher_gives_both_remedies(tmp_path):
    proc = run_train(tmp_path, *SMALL, "distiller=dkd", check=False)
    assert proc.returncode == 2
    err = proc.stderr
    assert "Traceback" not in err
    assert "teacher checkpoint not found" in err
    assert f"train it:  python -m rld.teachers train dataset=synthetic pair=tiny " \
           f"paths.root={tmp_path}" in err and "cifar_teachers.tar" in err
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize("overrides, needle", [
    (["distiller.tau=0"], "distiller.tau=0.0 is not allowed"),
    (["optim.lr=-1"], "optim.lr=-1.0 is not allowed"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 is not allowed"),
])
def test_bad_input_fails_fast_without_traceback(tmp_path, overrides, needle):
    proc = run_train(tmp_path, *SMALL, *overrides, check=False)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_or_corrupt_teacher_checkpoint(teacher_root, tmp_path):
    root = teacher_root
    wrong = tmp_path / "wrong.pth"  # a resnet8 state dict where resnet14 is expected
    student = next((root / "sweeps").rglob("student.pt"))
    wrong.write_bytes(student.read_bytes())
    proc = run_train(root, *SMALL, "distiller=kd", f"teacher.checkpoint={wrong}",
                     "tag=wrong", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not fit pair.teacher=resnet14" in proc.stderr

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02not a checkpoint")
    proc = run_train(root, *SMALL, "distiller=kd", f"teacher.checkpoint={corrupt}",
                     "tag=corrupt", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(corrupt) in proc.stderr


def test_teacher_classes_must_match_the_dataset(teacher_root):
    """A 10-class synthetic teacher cannot teach a 7-class variant of the data set."""
    proc = run_train(teacher_root, *SMALL, "dataset.num_classes=7", "distiller=kd",
                     "tag=classes", check=False)
    assert proc.returncode == 2 and "7 classes" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_objective_is_returned_and_nan_for_diverged():
    from rld.record import RunRecord

    rec = RunRecord.from_json({"top1_best": 55.0, "top1": float("inf"), "top5": None})
    assert rec.objective("top1_best") == 55.0
    assert math.isnan(rec.objective("top1")) and math.isnan(rec.objective("top5"))


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(teacher_root):
    root = teacher_root
    proc = run_train(root, "-m", *SMALL, "distiller=rld", "distiller.tau=0,2",
                     "trainer.epochs=1", "tag=cli_failing")
    assert "this grid point failed" in proc.stdout + proc.stderr
    base = root / "sweeps/cli_failing/synthetic/tiny/rld"
    statuses = {p.parent.parent.name.split("+")[1]: json.loads(p.read_text())["status"]
                for p in base.rglob("metrics.json")}
    assert statuses == {"tau=0": "failed", "tau=2": "completed"}
    failed = next(base.glob("beta=8+tau=0+*")) / "seed=0" / "metrics.json"
    assert "distiller.tau=0.0 is not allowed" in json.loads(failed.read_text())["message"]
