"""`hydra/launcher=slurm` against a real (one-node) Slurm cluster: see scripts/slurm/test.sh."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import REPO, TORCHRUN, run_train, train_command, train_env

TINY = ["dataset=synthetic", "pair=tiny", "trainer.epochs=1", "dataset.train_size=64",
        "dataset.test_size=64", "trainer.batch_size=32", "trainer.progress=none"]
# a CPU-only job that fits the CI machine
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=30"]


def cli(root: Path, *args: str):
    return run_train(root, *args, timeout=900)


def completed_runs(sweep: Path, count: int) -> list[dict]:
    """The records of the sweep's runs: `count` of them, every one completed."""
    paths = sorted((sweep / "synthetic").rglob("metrics.json"))
    assert len(paths) == count, paths
    records = [{**json.loads(m.read_text()), "dir": m.parent} for m in paths]
    assert all(r["status"] == "completed" for r in records), records
    return records


def test_grid_2x2_through_slurm(slurm_cluster, teacher_root):
    """hparams=grid on a 2x2 grid, one Slurm job per point: 4 jobs, 4 completed trials."""
    import optuna

    root, tag = teacher_root, "slurm-grid"
    t0 = time.time()
    cli(root, "-m", *TINY, *SLURM, "hparams=grid", "dataset.grid_beta=[2,4]",
        "dataset.grid_tau=[2,3]", f"tag={tag}")
    sweep = root / "sweeps" / tag
    completed_runs(sweep, 4)
    jobs = [d for d in (sweep / ".submitit").iterdir() if d.is_dir()]
    # one Slurm job per point, each submitted as a slot frees up (no array task "<id>_<i>":
    # a trial waits for its slot, not for a batch)
    assert len([d for d in jobs if re.fullmatch(r"\d+", d.name)]) == 4, jobs
    storage = f"sqlite:///{sweep}/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 4 and len(complete) == 4
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4
    print(f"2x2 grid through Slurm: {time.time() - t0:.1f}s")


def test_grid_with_pruning_through_slurm(slurm_cluster, teacher_root):
    """hparams.pruner=median through Slurm: every job reports its epochs to its trial from
    inside its allocation (the trial's address travels in the job's config), the point
    that falls behind is pruned there (record "pruned" with its epoch, trial PRUNED), the
    other completes, and the same command runs nothing again."""
    import optuna

    root, tag = teacher_root, "slurm-prune"
    # one good point, then one whose weights decay to nothing (chance accuracy): the grid
    # sampler runs them in this order; with one trial at a time the median has a reference
    tiny = [o for o in TINY if not o.startswith(("trainer.epochs=", "dataset.train_size="))]
    args = ["-m", *tiny, *SLURM, "trainer.epochs=3", "dataset.train_size=256",
            "hparams=grid", "hparams.beta=[2]", "hparams.tau=[4]",
            "optim.weight_decay=choice(0.0005,5.0)", "hparams.n_jobs=1",
            "hparams.pruner=median", "hparams.pruning.n_startup_trials=1", f"tag={tag}"]
    cli(root, *args)
    sweep = root / "sweeps" / tag
    records = {json.loads(m.read_text())["status"]: json.loads(m.read_text())
               for m in (sweep / "synthetic").rglob("metrics.json")}
    assert sorted(records) == ["completed", "pruned"], records
    assert 1 <= records["pruned"]["pruned_epoch"] < 3
    storage = f"sqlite:///{sweep}/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "PRUNED"], trials
    for t in trials:  # reported from the Slurm job, one value per epoch trained
        want = 3 if t.state.name == "COMPLETE" else records["pruned"]["pruned_epoch"]
        assert sorted(t.intermediate_values) == list(range(1, want + 1)), t
    again = cli(root, *args)
    assert "0 to run" in again.stdout + again.stderr
    assert len(optuna.load_study(study_name=summary.study_name, storage=storage).trials) == 2


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.pop("seconds", None)  # wall time differs, everything else must not
    return rows


def _squeue(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip()


RUN = [*TINY, "trainer.epochs=6", "dataset.train_size=512", "distiller.beta=2",
       "distiller.tau=4"]


@pytest.fixture(scope="module")
def reference_run(teacher_root) -> Path:
    """The run of the requeue tests, uninterrupted, on this machine."""
    cli(teacher_root, *RUN, "tag=ref")
    (run_dir,) = [m.parent for m in (teacher_root / "sweeps/ref/synthetic").rglob("metrics.json")]
    return run_dir


def _interrupted(root: Path, tag: str, interruption: str, *extra: str) -> tuple[Path, str]:
    """Run RUN through Slurm as tag `tag`, interrupt its job once a checkpoint is saved
    (`scontrol requeue` or SIGUSR2), let the requeued job finish; (run dir, Slurm logs)."""
    proc = subprocess.Popen(train_command(root, "-m", *RUN, *SLURM, *extra, f"tag={tag}"),
                            cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=train_env())
    sweep = root / "sweeps" / tag
    job = None
    try:
        deadline = time.time() + 300
        last = None
        while time.time() < deadline and proc.poll() is None and last is None:
            found = list(sweep.glob("synthetic/**/checkpoints/last.pt"))
            last = found[0] if found else None
            time.sleep(0.2)
        assert last is not None, "no checkpoint appeared"
        run_dir = last.parent.parent
        (job,) = [d.name for d in (sweep / ".submitit").iterdir()
                  if d.is_dir() and re.fullmatch(r"\d+(_\d+)?", d.name)]
        assert not (run_dir / "metrics.json").exists() or json.loads(
            (run_dir / "metrics.json").read_text())["status"] == "running", "finished too soon"
        if interruption == "requeue":
            subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        else:  # to the job step (python), not the batch shell
            subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        # a requeued job may only start again ~2 minutes later (BeginTime): not here
        while proc.poll() is None and time.time() < deadline + 300:
            if _squeue(job) == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                               timeout=30)
            time.sleep(1)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            if job is not None:
                subprocess.run(["scancel", job], timeout=30)
    assert proc.returncode == 0, out[-4000:]
    logs = "".join(p.read_text(errors="replace") for p in (sweep / ".submitit").rglob("*.out"))
    return run_dir, logs


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    got, ref = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert got["status"] == ref["status"] == "completed"
    for key in ("top1", "top1_best", "top5", "world_size"):
        assert got[key] == ref[key], (key, got[key], ref[key])
    assert _history(run_dir) == _history(reference)
    assert len(_history(run_dir)) == 6


@pytest.mark.parametrize("interruption", ["requeue", "usr2"])
def test_interrupted_job_resumes_from_its_checkpoint(slurm_cluster, teacher_root, reference_run,
                                                     interruption):
    """A job interrupted mid-run runs again, resumes from checkpoints/last.pt and ends with
    exactly the accuracies and history of an uninterrupted run.

    requeue: `scontrol requeue` once an epoch is saved: Slurm kills the job and queues it
    again (preemption in REQUEUE mode).
    usr2: SIGUSR2, which Slurm sends `signal_delay_s` before the time limit (or before a
    preemption): submitit calls the launcher's checkpoint() and requeues the job itself.
    (A real 1-minute time limit takes the same path but its timing depends on how fast the
    machine is, so the test sends the signal.)"""
    t0 = time.time()
    run_dir, logs = _interrupted(teacher_root, f"slurm-{interruption}", interruption)
    if interruption == "usr2":
        assert "Requeued job" in logs, "submitit did not requeue the job"
    assert "resumed from" in logs, "the job did not resume from its checkpoint"
    _assert_same_run(run_dir, reference_run)
    print(f"{interruption}: {time.time() - t0:.1f}s")


def test_two_task_job_is_one_data_parallel_run_that_resumes(slurm_cluster, teacher_root):
    """tasks_per_node=2 (CPU, gloo): each grid point is one run over both tasks, written by
    rank 0 alone; `scontrol requeue` mid-run restarts both tasks, which resume from the
    checkpoint and end with exactly the history of an uninterrupted 2-rank run (torchrun
    on this machine)."""
    root = teacher_root
    t0 = time.time()
    # 4x the samples of RUN: the epochs left after the first checkpoint must outlast Slurm's
    # KillWait (5 s), or the job, which submitit lets finish on SIGTERM, ends before SIGKILL
    bigger = "dataset.train_size=2048"
    run_train(root, *RUN, bigger, "tag=ref-ddp", timeout=600, launch=TORCHRUN)
    (reference,) = [m.parent for m in (root / "sweeps/ref-ddp/synthetic").rglob("metrics.json")]
    run_dir, logs = _interrupted(root, "slurm-ddp", "requeue", "hydra.launcher.tasks_per_node=2",
                                 bigger)
    assert "data-parallel run on 2 processes" in logs
    assert logs.count("resumed from") == 1, "rank 0 alone logs; it resumed once"
    _assert_same_run(run_dir, reference)
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml"]
    assert "data-parallel run" in (run_dir / "train.log").read_text()
    scripts = list((root / "sweeps/slurm-ddp/.submitit").rglob("*submission.sh"))
    assert scripts and all("export SLURM_KILL_BAD_EXIT=1" in p.read_text() for p in scripts)
    print(f"2-task requeue: {time.time() - t0:.1f}s")


def test_packed_grid_through_slurm(slurm_cluster, teacher_root):
    """hydra.launcher.pack=4: the 2x2 grid is one Slurm job that trains the four points
    together; each point has its own completed run directory."""
    root, tag = teacher_root, "slurm-pack"
    t0 = time.time()
    cli(root, "-m", *TINY, *SLURM, "hydra.launcher.pack=4", "distiller.beta=2,4",
        "distiller.tau=2,3", f"tag={tag}")
    sweep = root / "sweeps" / tag
    for record in completed_runs(sweep, 4):
        assert record["packed"]["points"] == 4
        assert (record["dir"] / "student.pt").exists() and (record["dir"] / "train.log").exists()
    jobs = [d for d in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+(_\d+)?", d.name)]
    assert len(jobs) == 1, jobs
    print(f"packed 2x2 grid through Slurm: {time.time() - t0:.1f}s")


def test_requeued_pack_resumes_every_point(slurm_cluster, teacher_root, reference_run):
    """A pack of two points in one Slurm job, requeued mid-run: the job runs again and every
    point resumes from its own checkpoint; the point of the reference's configuration
    (scd_tau=4 is its tau) ends with exactly the reference's numbers."""
    t0 = time.time()
    _, logs = _interrupted(teacher_root, "slurm-pack-requeue", "requeue",
                           "hydra.launcher.pack=2", "distiller.scd_tau=4,2")
    assert "resumed from" in logs, "the pack did not resume from its checkpoints"
    runs = completed_runs(teacher_root / "sweeps/slurm-pack-requeue", 2)
    (same,) = [r["dir"] for r in runs if r["scd_tau"] == 4.0]
    _assert_same_run(same, reference_run)
    print(f"packed requeue: {time.time() - t0:.1f}s")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
