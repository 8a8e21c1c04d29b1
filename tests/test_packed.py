"""Packed training (`rld.engine.train_points` over several runs, `rld.packing`,
`hydra/launcher=packed`, the `pack` option of the `gpus` and `submitit_local` launchers),
against the same points run separately, on the CPU.

The reference: a 2x2 grid of RLD and of DKD, 2 epochs of the `tiny` pair on the synthetic
set, one separate run per point (the basic launcher).  On the CPU the
default pack mode steps the students one after another with the engine's own step, so a
packed point's history equals its separate run's exactly; the batched (vmap) mode agrees to
the issue's tolerance (losses 1e-3 relative, test top-1 within 0.5 points)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, run_train

BASE = ["dataset=synthetic", "pair=tiny", "dataset.train_size=256", "dataset.test_size=400",
        "trainer.batch_size=64", "trainer.progress=line", "trainer.epochs=2"]
# 4 RLD points and 4 DKD points
GRID = ["distiller=rld,dkd", "distiller.beta=2,8", "distiller.tau=2,4"]
SUFFIX = "dataset.test_size=400+dataset.train_size=256+trainer.batch_size=64+trainer.epochs=2"
LEAVES = [f"{d}/beta={b}+tau={t}+{SUFFIX}" for d in ("rld", "dkd") for b in (2, 8)
          for t in (2, 4)]
PACKED = ["hydra/launcher=packed"]


def run_dir(root: Path, tag: str, leaf: str) -> Path:
    return root / "sweeps" / tag / "synthetic/tiny" / leaf / "seed=0"


def history(path: Path) -> list[dict]:
    with open(path / "history.csv") as f:
        return [{k: float(v) for k, v in row.items() if k != "seconds"}
                for row in csv.DictReader(f)]


def metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def assert_same_run(a: Path, b: Path, exact: bool) -> None:
    """b's history and results equal a's: exactly, or to 1e-3 relative for the losses and
    0.5 points of test top-1 (the tolerance for batched kernels)."""
    ha, hb = history(a), history(b)
    assert [r["epoch"] for r in ha] == [r["epoch"] for r in hb] == [1.0, 2.0]
    assert [list(r) for r in ha] == [list(r) for r in hb]
    if exact:
        assert ha == hb
        for key in ("top1", "top1_best", "top5", "teacher_top1"):
            assert metrics(a)[key] == metrics(b)[key], key
        return
    for ra, rb in zip(ha, hb, strict=True):
        for key in ra:
            if key.startswith("loss"):
                assert math.isclose(ra[key], rb[key], rel_tol=1e-3), (key, ra[key], rb[key])
        assert abs(ra["test_top1"] - rb["test_top1"]) <= 0.5, (ra, rb)


@pytest.fixture(scope="module")
def separate(teacher_root) -> str:
    """The reference: every point as a separate run (tag `sep`)."""
    run_train(teacher_root, "-m", *BASE, *GRID, "tag=sep")
    return "sep"


@pytest.fixture(scope="module")
def packed(teacher_root) -> tuple[str, str]:
    """The same points through `hydra/launcher=packed` (tag `packed`); and its output."""
    proc = run_train(teacher_root, "-m", *BASE, *GRID, *PACKED, "tag=packed")
    return "packed", proc.stdout + proc.stderr


# ------------------------------------------------------------------------ one step
def _states(teacher, specs):
    from rld.bench.common import distiller_config
    from rld.distillers import build_distiller
    from rld.loop import build_train_state
    from rld.models import build_model

    out = []
    for i, (name, settings) in enumerate(specs):
        torch.manual_seed(100 + i)
        distiller = build_distiller(distiller_config(name, **settings))
        out.append(build_train_state(
            build_model("resnet8", 10), teacher if distiller.needs_teacher else None,
            distiller, device=torch.device("cpu"), dtype=torch.float32, channels_last=False,
            compile=False, lr=0.05, momentum=0.9, weight_decay=5e-4))
    return out


@pytest.fixture
def default_dtype():
    """Sets torch's default dtype for one test (models and inputs made in it) and restores it."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_one_step_equals_separate_steps(mode, default_dtype):
    """After two steps (the second with momentum) every point's parameters, batch-norm
    statistics (num_batches_tracked included) and momentum buffers equal its separate
    run's: exactly in loop mode (float32, the same kernels), to 1e-10 relative in vmap mode.
    vmap runs in float64: its batched kernels round differently from the plain ones, and in
    float32 a batch-norm bias whose gradient cancels over the batch differed by 9e-4 to 2e-3
    relative after two steps on one CPU (AMD EPYC, 2026-12-06) and by under 1e-5 on another,
    while in float64 the packed step equals the separate one to 1e-15: the tolerance tests
    the method, not the CPU's float32 kernels."""
    from rld.loop import teacher_output, train_step
    from rld.models import build_model
    from rld.students import build_students

    default_dtype(torch.float64 if mode == "vmap" else torch.float32)
    torch.manual_seed(0)
    teacher = build_model("resnet14", 10).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    specs = [("rld", {"beta": b, "tau": t}) for b in (2.0, 8.0) for t in (2.0, 4.0)]
    specs += [("kd", {"tau": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}), ("vanilla", {})]
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    alone, packed = _states(teacher, specs), _states(teacher, specs)
    students = build_students(packed, mode)
    students.train()
    for s in alone:
        s.train()
    # one thread: the tolerance is that of batched kernels, not of reductions split over
    # threads differently for grouped and plain convolutions
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):
            for s in alone:
                train_step(s, x, y, epoch=3)
            results = students.step(x, y, teacher_output(packed[0], teacher, x), 3)
    finally:
        torch.set_num_threads(threads)
    students.sync()
    assert results.names == [["ce", "rld"]] * 4 + [["ce", "kd"], ["ce"]]
    worst = 0.0
    for a, b in zip(alone, packed, strict=True):
        tensors = list(zip(a.student.state_dict().values(), b.student.state_dict().values()))
        oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
        assert sorted(oa) == sorted(ob)
        tensors += [(oa[i]["momentum_buffer"], ob[i]["momentum_buffer"]) for i in oa]
        for ta, tb in tensors:
            if not ta.is_floating_point():  # num_batches_tracked
                assert torch.equal(ta, tb) and int(ta) == 2
            elif mode == "loop":
                assert torch.equal(ta, tb)
            else:
                worst = max(worst, float((ta - tb).norm() / ta.norm().clamp_min(1e-12)))
    assert worst <= 1e-10
    # the points trained apart from each other: no two ended equal
    assert not torch.equal(packed[0].student.fc.weight, packed[1].student.fc.weight)


def test_compiled_vmap_step_equals_the_eager_one(monkeypatch):
    """With trainer.compile the batched forward is compiled once for the pack (a light
    backend here: Inductor's C++ build is slow on a CPU) and steps as the eager one."""
    from rld.loop import teacher_output
    from rld.models import build_model
    from rld.students import VmapStudents

    real, calls = torch.compile, []

    def light(fn, *, mode=None, dynamic=None, **kwargs):
        calls.append((mode, dynamic))
        return real(fn, backend="aot_eager", dynamic=dynamic)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", light)
    try:
        teacher = build_model("resnet8", 10).eval()
        specs = [("rld", {"beta": 2.0, "tau": 4.0}), ("kd", {"tau": 4.0})]
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        packs = []
        for compile in (False, True):
            states = _states(teacher, specs)
            students = VmapStudents(states, compile=compile, compile_mode="max-autotune")
            students.train()
            for _ in range(2):
                students.step(x, y, teacher_output(states[0], teacher, x), 1)
            students.sync()
            packs.append(states)
        assert calls == [("max-autotune", False)]
        for a, b in zip(*packs, strict=True):
            for ta, tb in zip(a.student.state_dict().values(), b.student.state_dict().values()):
                torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------ the CLI
def test_packed_grid_equals_separate_runs(teacher_root, separate, packed):
    """One pack of 8 points; every point's files are a separate run's: same history,
    results, fingerprint; its own log."""
    tag, out = packed
    assert "8 job(s) in 1 pack(s) of 8 job(s)" in out
    assert "pack of 8 points (loop) on cpu" in out
    for leaf in LEAVES:
        a, b = run_dir(teacher_root, separate, leaf), run_dir(teacher_root, tag, leaf)
        assert_same_run(a, b, exact=True)
        ma, mb = metrics(a), metrics(b)
        assert mb["status"] == "completed" and mb["fingerprint"] == ma["fingerprint"]
        assert mb["packed"] == {"points": 8, "mode": "loop"}
        for name in ("student.pt", "checkpoints/last.pt", ".hydra/config.yaml"):
            assert (b / name).exists(), name
        log = (b / "train.log").read_text()
        assert log.count("epoch 1/2") == 1 and "teacher resnet14: test top-1" in log


@pytest.mark.slow
def test_vmap_pack_agrees_with_separate_runs(teacher_root, separate):
    run_train(teacher_root, "-m", *BASE, *GRID, *PACKED, "hydra.launcher.pack_mode=vmap",
              "tag=vmap")
    for leaf in LEAVES:
        assert metrics(run_dir(teacher_root, "vmap", leaf))["packed"]["mode"] == "vmap"
        assert_same_run(run_dir(teacher_root, separate, leaf),
                        run_dir(teacher_root, "vmap", leaf), exact=False)


def test_recall_across_packed_and_unpacked_commands(teacher_root, separate, packed):
    """Finished points are recalled, whichever command trained them: an unpacked command
    over packed runs, and a packed command over separate runs, train nothing."""
    # the basic launcher looks each of the 8 jobs up, a pack each of its 8 runs
    for tag, launcher, recalls in ((packed[0], [], 8), (separate, PACKED, 8)):
        before = {leaf: (run_dir(teacher_root, tag, leaf) / "metrics.json").read_text()
                  for leaf in LEAVES}
        proc = run_train(teacher_root, "-m", *BASE, *GRID, *launcher, f"tag={tag}")
        out = proc.stdout + proc.stderr
        assert out.count("run already finished (completed)") == recalls, out[-3000:]
        assert "epoch 1/2" not in out
        for leaf in LEAVES:
            assert (run_dir(teacher_root, tag, leaf) / "metrics.json").read_text() == before[leaf]


def test_faults_stay_local(teacher_root, separate):
    """In one pack: a point whose loss turns non-finite stops alone (diverged), points with
    an invalid setting fail alone (failed, with the message), the healthy point trains as
    its separate run."""
    proc = run_train(teacher_root, "-m", *BASE, *PACKED, "distiller=rld", "distiller.beta=2",
                     "distiller.kd_weight=1,1e30", "distiller.tau=4,0", "tag=faults")
    out = proc.stdout + proc.stderr
    base = teacher_root / "sweeps/faults/synthetic/tiny/rld"
    found = [json.loads(p.read_text()) for p in base.rglob("metrics.json")]
    by = {(m["kd_weight"], m["tau"]): m for m in found}
    assert len(found) == len(by) == 4, sorted(by)
    assert by[(1.0, 4.0)]["status"] == "completed"
    assert by[(1e30, 4.0)]["status"] == "diverged" and by[(1e30, 4.0)]["top1"] is None
    assert by[(1e30, 4.0)]["message"].startswith("non-finite loss at epoch 1, step")
    for kd_weight in (1.0, 1e30):
        failed = by[(kd_weight, 0.0)]
        assert failed["status"] == "failed"
        assert "distiller.tau=0.0 is not allowed" in failed["message"]
    assert "this grid point failed" in out and "pack of 2 points" in out
    healthy = next(base.glob("beta=2+tau=4+*+kd_weight=1+*")) / "seed=0"
    assert_same_run(run_dir(teacher_root, separate, LEAVES[1]), healthy, exact=True)


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_every_point(teacher_root, separate, tmp_path):
    """A packed process killed with SIGKILL after epoch 1: the same command again resumes
    every point from its own last.pt (one whose checkpoints were lost restarts and catches
    up alone) and ends with the uninterrupted numbers."""
    root, tag = teacher_root, "killed"
    cmd = [sys.executable, "-m", "rld.train", "-m", f"paths.root={root}", *BASE, *GRID,
           *PACKED, f"tag={tag}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lasts = [run_dir(root, tag, leaf) / "checkpoints/last.pt" for leaf in LEAVES]
    deadline = time.time() + 300
    while not all(p.exists() for p in lasts):
        assert proc.poll() is None and time.time() < deadline, "ended before checkpoints"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert all(metrics(p.parent.parent)["status"] == "running" for p in lasts)
    lost = lasts[0].parent
    for name in ("last.pt", "prev.pt"):
        (lost / name).unlink(missing_ok=True)

    out = run_train(root, "-m", *BASE, *GRID, *PACKED, f"tag={tag}")
    text = out.stdout + out.stderr
    assert text.count("resumed from checkpoints/last.pt after epoch 1") == 7, text[-3000:]
    for leaf in LEAVES:
        assert_same_run(run_dir(root, separate, leaf), run_dir(root, tag, leaf), exact=True)


@pytest.mark.slow
def test_gpus_launcher_packs_on_the_cpu(teacher_root, separate):
    """`hydra/launcher=gpus hydra.launcher.pack=3` without a GPU: packs of 3, 3 and 2 runs
    in two worker processes, each point as its separate run."""
    proc = run_train(teacher_root, "-m", *BASE, *GRID, "hydra/launcher=gpus",
                     "hydra.launcher.pack=3", "hydra.launcher.n_jobs=2", "tag=gpus_pack",
                     env={"CUDA_VISIBLE_DEVICES": ""})
    out = proc.stdout + proc.stderr
    assert "8 job(s) in 3 pack(s) of 3/2 job(s)" in out, out[-3000:]
    for leaf in LEAVES:
        b = run_dir(teacher_root, "gpus_pack", leaf)
        assert metrics(b)["packed"]["points"] in (2, 3)
        assert_same_run(run_dir(teacher_root, separate, leaf), b, exact=True)


@pytest.mark.slow
def test_submitit_local_packs(teacher_root, separate):
    """One submitit job per pack (the Slurm launcher's path, here with the local
    executor): the packs are pickled, run in their own processes and return each point's
    JobReturn."""
    run_train(teacher_root, "-m", *BASE, *GRID, "hydra/launcher=submitit_local",
              "+hydra.launcher.pack=4", "tag=local_pack")
    results = list((teacher_root / "sweeps/local_pack/.submitit").rglob("*_result.pkl"))
    assert len(results) == 2, results  # 8 runs in packs of 4
    for leaf in LEAVES:
        assert_same_run(run_dir(teacher_root, separate, leaf),
                        run_dir(teacher_root, "local_pack", leaf), exact=True)


@pytest.mark.slow
def test_optuna_grid_through_the_packed_launcher(teacher_root):
    """hparams=grid with hydra/launcher=packed: the study's batch is one pack; 4 trials."""
    import optuna

    run_train(teacher_root, *BASE, "trainer.epochs=1", "hparams=grid",
              "dataset.grid_beta=[2,4]", "dataset.grid_tau=[2,3]", *PACKED, "tag=optuna_pack")
    storage = f"sqlite:///{teacher_root}/sweeps/optuna_pack/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert sorted((t.params["distiller.beta"], t.params["distiller.tau"]) for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE) == [(2, 2), (2, 3), (4, 2),
                                                                      (4, 3)]
    runs = list((teacher_root / "sweeps/optuna_pack/synthetic").rglob("metrics.json"))
    assert [json.loads(m.read_text())["packed"]["points"] for m in runs] == [4] * 4


# ------------------------------------------------------------------------ in process
def test_grid_bench_prints_the_speedup_last(tmp_path, capsys):
    """`python -m rld.bench grid`, shortened: both pack modes against the sequential path,
    one row each in the CSV, the speed-up printed last as a number followed by x."""
    import re

    from rld.bench.grid import main

    out = tmp_path / "bench_grid.csv"
    assert main(["--pair", "tiny", "--points", "2", "--steps", "1", "--repeats", "1",
                 "--warmup", "0", "--mode", "all", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.search(r"\(loop, 2 points\): \d+\.\d\dx$", last), last
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == ["sequential", "packed-loop", "packed-vmap"]
    for r in rows:
        seconds = float(r["seconds"])
        assert seconds > 0 and float(r["speedup"]) == pytest.approx(
            float(rows[0]["seconds"]) / seconds, rel=1e-2)
        assert float(r["grid_hours_240_epochs"]) == pytest.approx(
            seconds * 782 * 240 / 3600, rel=1e-2)
        assert r["peak_kind"] == "process max RSS (all paths)" and float(r["peak_mib"]) > 0


def _compose(root: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from rld.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.root={root}", *overrides])


def test_plan_packs_groups_by_everything_but_the_distiller(tmp_path):
    from rld.packing import plan_packs

    cfgs = [_compose(tmp_path, *BASE, f"distiller={d}", f"seed={s}")
            for d, s in [("rld", 0), ("rld", 1), ("kd", 0), ("vanilla", 0), ("vanilla", 2),
                         ("crd", 0), ("dkd", 0)]]
    # seed 0: rld, kd, vanilla, dkd in one pack; seed 1 and seed 2 alone; crd never packed
    assert plan_packs(cfgs) == [[0, 2, 3, 6], [1], [4], [5]]
    assert plan_packs(cfgs, pack=3) == [[0, 2], [1], [3, 6], [4], [5]]
    other_teacher = _compose(tmp_path, *BASE, "distiller=kd", "teacher.checkpoint=/x.pth")
    assert plan_packs([cfgs[0], other_teacher, cfgs[3]]) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="pack must be >= 1"):
        plan_packs(cfgs, pack=0)
    # two configs of one run (the same fingerprint) count as one point of one pack
    twin = _compose(tmp_path, *BASE, "distiller=rld", "distiller.tau=4.0")
    assert plan_packs([cfgs[0], cfgs[2], twin], pack=2) == [[0, 1, 2]]
    assert plan_packs([cfgs[0], cfgs[2], twin], pack=1) == [[0, 2], [1]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_compiled_pack_trains_as_the_eager_one(teacher_root, tmp_path, monkeypatch, mode):
    """trainer.compile=true in a pack (a light backend: Inductor's C++ build is slow on a
    CPU): the teacher is compiled once, the students as the mode compiles them; one epoch
    ends where the eager pack ends."""
    from rld.engine import train_points

    real, calls = torch.compile, []

    def light(fn, *, mode=None, dynamic=None, **kwargs):
        calls.append(mode)
        return real(fn, backend="aot_eager", dynamic=dynamic)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", light)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for compile in ("false", "true"):
            cfgs = [_compose(teacher_root, *BASE, "trainer.epochs=1", f"distiller={d}",
                             f"trainer.compile={compile}") for d in ("rld", "kd")]
            dirs = [tmp_path / compile / d for d in ("rld", "kd")]
            outcomes = train_points(cfgs, dirs, mode)
            assert [o.status for o in outcomes] == ["completed"] * 2, outcomes
            runs[compile] = dirs
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert calls and set(calls) == {"default"}
    for eager, compiled in zip(runs["false"], runs["true"], strict=True):
        (a,), (b,) = history(eager), history(compiled)
        for key in a:
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a, b)


def test_a_pack_too_large_for_memory_is_cut(teacher_root, separate, tmp_path, monkeypatch,
                                            caplog):
    """An out-of-memory error on a pack's first step trains the halves one after the
    other, from scratch, with the separate runs' results."""
    from rld.engine import train_points
    from rld.students import LoopStudents

    real_step = LoopStudents.step

    def step(self, *args):
        if len(self.states) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(self, *args)

    monkeypatch.setattr(LoopStudents, "step", step)
    leaves = LEAVES[:2] + LEAVES[4:5]
    cfgs = [_compose(teacher_root, *BASE, "distiller=rld", "distiller.beta=2",
                     f"distiller.tau={t}") for t in (2, 4)]
    cfgs.append(_compose(teacher_root, *BASE, "distiller=dkd", "distiller.beta=2",
                         "distiller.tau=2"))
    dirs = [tmp_path / leaf for leaf in leaves]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the separate runs (OMP_NUM_THREADS=1): same kernels
    try:
        with caplog.at_level(logging.WARNING, logger="rld"):
            outcomes = train_points(cfgs, dirs)
    finally:
        torch.set_num_threads(threads)
    assert [o.status for o in outcomes] == ["completed"] * 3
    assert "a pack of 3 points does not fit in device memory: training packs of 2 and 1" \
        in caplog.text
    for leaf, d in zip(leaves, dirs, strict=True):
        assert_same_run(run_dir(teacher_root, separate, leaf), d / "", exact=True)
