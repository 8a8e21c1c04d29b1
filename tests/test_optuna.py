"""Optuna presets (`hparams=grid|tpe`) and the `rld_optuna` sweeper: resumable grids, no
duplicate points between parallel workers, diverged trials that do not stop a study."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # hydra_plugins/ of this checkout, installed or not
    sys.path.insert(0, str(REPO))

TINY = ["dataset=synthetic", "pair=tiny", "trainer.epochs=1", "dataset.train_size=64",
        "dataset.test_size=64", "trainer.batch_size=32", "trainer.progress=none"]
GRID_2X2 = ["hparams=grid", "dataset.grid_beta=[2,4]", "dataset.grid_tau=[2,3]"]


def command(root: Path, *args: str) -> list[str]:
    flags = [a for a in args if a.startswith("-")]  # argparse wants flags first
    rest = [a for a in args if not a.startswith("-")]
    return [sys.executable, "-m", "rld.train", *flags, f"paths.root={root}", *rest]


def environ(**extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def cli(root: Path, *args: str, env: dict | None = None, timeout: float = 600):
    cmd = command(root, *args)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env or environ())
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def study_of(root: Path, tag: str):
    import optuna

    storage = f"sqlite:///{root}/sweeps/{tag}/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def points(study, state=None) -> list[tuple]:
    return sorted((t.params["distiller.beta"], t.params["distiller.tau"]) for t in study.trials
                  if state is None or t.state == state)


# ------------------------------------------------------------------------ presets
def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rld.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=True)


def test_grid_preset_follows_the_dataset_grid():
    from omegaconf import OmegaConf

    cfg = compose("hparams=grid", "dataset=cifar100")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("RldOptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.GridSampler"
    # picked through the sampler group, not _target_ (1.4's GridSampler config has a seed)
    assert sweeper.sampler.get("seed") is None
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert sweeper.n_trials is None  # the whole grid, not the plugin's default of 20
    params = OmegaConf.to_container(sweeper.params, resolve=True)
    assert params == {"distiller.beta": [2.0, 4.0, 8.0, 16.0],
                      "distiller.tau": [2.0, 3.0, 4.0, 5.0]}
    assert sweeper.storage is None  # the sweeper's default: <hydra.sweep.dir>/optuna.db
    assert "cifar100" in sweeper.study_name and "resnet32x4_resnet8x4" in sweeper.study_name

    cfg = compose("hparams=grid", "dataset=imagenet", "pair=resnet34_resnet18")
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    assert params == {"distiller.beta": [0.5, 1.0, 2.0, 3.0], "distiller.tau": [1.0, 2.0]}

    cfg = compose(*GRID_2X2, "hparams.storage=postgresql://u@db/rld")
    assert OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) == {
        "distiller.beta": [2.0, 4.0], "distiller.tau": [2.0, 3.0]}
    assert cfg.hydra.sweeper.storage == "postgresql://u@db/rld"


def test_tpe_preset():
    cfg = compose("hparams=tpe", "hparams.n_trials=5")
    sweeper = cfg.hydra.sweeper
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 0 and sweeper.n_trials == 5
    assert sweeper.params["distiller.beta"] == "tag(log, interval(0.5, 16.0))"
    assert sweeper.params["distiller.tau"] == "interval(1.0, 6.0)"


def test_list_params_become_choices():
    from omegaconf import OmegaConf

    from hydra_plugins.rld_plugins._sweeper import RldOptunaSweeperImpl

    impl = RldOptunaSweeperImpl(
        sampler=None, direction="maximize", storage=None, study_name=None, n_trials=None,
        n_jobs=None, max_failure_rate=1.0, custom_search_space=None,
        params=OmegaConf.create({"a": [2, 4.5], "b": ["x"], "c": "range(3)"}))
    assert impl._parse_sweeper_params_config() == ["a=choice(2,4.5)", "b=choice('x')",
                                                   "c=range(3)"]


def test_run_status_reads_the_run_record(tmp_path, caplog):
    """A NaN objective is a 'diverged' trial only when the run's record says so."""
    import json

    from hydra_plugins.rld_plugins._sweeper import run_status

    record = tmp_path / "metrics.json"
    record.write_text(json.dumps({"status": "diverged", "dataset": "synthetic", "beta": 2.0}))
    assert run_status(str(tmp_path)) == "diverged"
    assert run_status(str(tmp_path / "absent")) is None and run_status(None) is None
    record.write_text('{"status": "compl')  # cut short
    assert run_status(str(tmp_path)) is None
    assert "metrics.json is not valid JSON" in caplog.text


# ------------------------------------------------------------------------ the guard
def test_guard_claims_are_exclusive_and_dead_sweepers_release(tmp_path):
    from hydra_plugins.rld_plugins._guard import Guard

    url = f"sqlite:///{tmp_path}/g.db"
    a = Guard(url, "s", heartbeat_s=60, stale_after_s=600)
    b = Guard(url, "s", heartbeat_s=60, stale_after_s=600)
    b.owner = b.owner + "-b"  # two sweepers of one process: tell them apart
    a.start()
    b.start()
    assert a.claim("p1") and not b.claim("p1") and b.claim("p2")
    a.release(["p1"])
    assert b.claim("p1")
    # b dies without cleaning up (here: its heartbeat stops and grows old)
    b._stop.set()
    with b.engine.begin() as c:
        c.execute(b.workers.update().where(b.workers.c.owner == b.owner).values(heartbeat=0.0))
    assert not a.alive(b.owner)
    assert a.claim("p1")  # taken over from the dead sweeper
    a.reap()
    assert a.claim("p2")
    a.stop()
    a.leave()
    with a.engine.begin() as c:
        assert c.execute(a.sa.select(a.claims)).fetchall() == []


# ------------------------------------------------------------------------ the real CLI
@pytest.mark.slow
def test_grid_parallel_workers_never_duplicate_and_rerun_adds_nothing(teacher_root):
    """Two sweepers (each 2 jobs at a time on the gpus launcher) share one sqlite study of a
    2x2 grid: 4 trials in all, one per point; running the command again adds none."""
    root, tag = teacher_root, "grid2x2"
    args = ["-m", *TINY, *GRID_2X2, f"tag={tag}", "hydra/launcher=gpus",
            "hydra.launcher.n_jobs=2", "hparams.n_jobs=2"]
    t0 = time.time()
    procs = [subprocess.Popen(command(root, *args), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=environ(CUDA_VISIBLE_DEVICES=devs,
                                          RLD_GPU_SLOT_DIR=str(root / f"slots{i}")))
             for i, devs in enumerate(("0,1", "2,3"))]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]
    first = time.time() - t0

    import optuna

    study = study_of(root, tag)
    grid = [(2.0, 2.0), (2.0, 3.0), (4.0, 2.0), (4.0, 3.0)]
    assert points(study) == grid, [(t.number, t.state, t.params) for t in study.trials]
    assert points(study, optuna.trial.TrialState.COMPLETE) == grid
    runs = list((root / "sweeps" / tag / "synthetic").rglob("metrics.json"))
    assert len(runs) == 4
    best = root / "sweeps" / tag / "optuna" / study.study_name / "optimization_results.yaml"
    assert "best_params" in best.read_text()

    t0 = time.time()
    proc = cli(root, *args, env=environ(CUDA_VISIBLE_DEVICES="0,1",
                                        RLD_GPU_SLOT_DIR=str(root / "slots0")))
    assert "4 settled, 0 to run" in proc.stdout + proc.stderr
    assert len(study_of(root, tag).trials) == 4
    print(f"two sweepers on a 2x2 grid: {first:.1f}s; rerun: {time.time() - t0:.1f}s")


@pytest.mark.slow
def test_diverged_trial_fails_and_the_grid_goes_on(teacher_root):
    """beta=1e30 blows the loss up: that trial fails as 'diverged', the other completes, the
    best point is the finite one, and a diverged point is not run again."""
    import optuna

    root, tag = teacher_root, "diverge"
    args = ["-m", *TINY, "trainer.batch_size=16", "distiller.warmup=0", "hparams=grid",
            "hparams.beta=[2,1e30]", "hparams.tau=[4]", f"tag={tag}"]
    cli(root, *args)
    study = study_of(root, tag)
    states = {t.params["distiller.beta"]: (t.state, t.user_attrs.get("rld_state"))
              for t in study.trials}
    assert states == {2: (optuna.trial.TrialState.COMPLETE, "completed"),
                      1e30: (optuna.trial.TrialState.FAIL, "diverged")}
    assert study.best_params == {"distiller.beta": 2, "distiller.tau": 4}
    cli(root, *args)
    assert len(study_of(root, tag).trials) == 2


@pytest.mark.slow
def test_study_follows_a_custom_sweep_dir(teacher_root):
    """hydra.sweep.dir elsewhere: the study is written beside the runs, not in sweeps/."""
    import optuna

    root, tag = teacher_root, "elsewhere"
    sweep_dir = root / "custom" / "grid"
    cli(root, "-m", *TINY, "hparams=grid", "hparams.beta=[2]", "hparams.tau=[4]",
        f"tag={tag}", f"hydra.sweep.dir={sweep_dir}")
    assert not (root / "sweeps" / tag).exists()
    assert len(list(sweep_dir.rglob("metrics.json"))) == 1
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{sweep_dir}/optuna.db")
    assert summary.n_trials == 1 and summary.best_trial.params == {"distiller.beta": 2,
                                                                   "distiller.tau": 4}


@pytest.mark.slow
def test_tpe_short_study_and_top_up(teacher_root):
    import optuna

    root, tag = teacher_root, "tpe"
    cli(root, "-m", *TINY, "hparams=tpe", "hparams.n_trials=2", f"tag={tag}")
    study = study_of(root, tag)
    assert len(study.trials) == 2
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert 0.5 <= t.params["distiller.beta"] <= 16 and 1 <= t.params["distiller.tau"] <= 6
    cli(root, "-m", *TINY, "hparams=tpe", "hparams.n_trials=3", f"tag={tag}")
    assert len(study_of(root, tag).trials) == 3  # the budget is the study's, not the run's


@pytest.mark.slow
def test_tpe_slots_keep_the_budget(teacher_root):
    """Two slots, n_trials=3: a slot that frees up while the other trial still runs counts
    that running trial against the budget (3 trials, not 4)."""
    root, tag = teacher_root, "tpe-slots"
    cli(root, "-m", *TINY, "hparams=tpe", "hparams.n_trials=3", "hydra/launcher=gpus",
        "hydra.launcher.n_jobs=2", f"tag={tag}")
    assert len(study_of(root, tag).trials) == 3
