"""Pruning (`rld.pruning`, `hparams.pruner`): a run's per-epoch reports to its Optuna trial,
the pruners' settings, a pruned run's record, table cell and rerun, promotion, and a study
database that goes away under a running run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import REPO, run_train, train_command, train_env

from rld.errors import ConfigError
from rld.pruning import (
    PRUNER_ATTR,
    PruningSettings,
    TrialAddress,
    TrialReporter,
    backfill,
    build_pruner,
    missing_reports,
    objective_values,
    pruner_spec,
    spec_json,
)

if str(REPO) not in sys.path:  # hydra_plugins/ of this checkout, installed or not
    sys.path.insert(0, str(REPO))

SMALL = ["dataset=synthetic", "pair=tiny", "dataset.train_size=256", "dataset.test_size=128",
         "trainer.batch_size=64", "trainer.progress=line"]
# one good point and one whose weights decay to nothing (its top-1 stays at chance): the
# grid sampler runs them in this order, one at a time on the basic launcher
GRID = ["hparams=grid", "hparams.beta=[2]", "hparams.tau=[4]",
        "optim.weight_decay=choice(0.0005,5.0)", "trainer.epochs=4"]
MEDIAN = ["hparams.pruner=median", "hparams.pruning.n_startup_trials=1"]


def history(run_dir: Path) -> list[dict]:
    from rld.rundir import RunDir

    return RunDir(run_dir).read_history()


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def study_of(root: Path, tag: str):
    import optuna

    storage = f"sqlite:///{root}/sweeps/{tag}/optuna.db"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def reports_of(run_dir: Path) -> dict:
    """What the run reported, as its history.csv has it (6 significant digits)."""
    return pytest.approx(dict(objective_values(history(run_dir), "top1_best")), abs=1e-3)


def run_dirs(root: Path, tag: str) -> dict[str, Path]:
    """The runs of a sweep by their point folder's name."""
    return {m.parent.parent.name: m.parent
            for m in (root / "sweeps" / tag).rglob("metrics.json")}


# ------------------------------------------------------------------------ settings
def test_pruner_spec_takes_what_each_pruner_reads():
    assert pruner_spec("none", {}, 240) == {"name": "none"}
    assert pruner_spec("median", {"n_startup_trials": 2, "reduction_factor": 9}, 240) == {
        "name": "median", "n_startup_trials": 2, "n_warmup_steps": 0, "interval_steps": 1,
        "n_min_trials": 1}  # reduction_factor is sha's and hyperband's: not median's
    sha = pruner_spec("sha", {"min_resource": "auto"}, 240)
    assert sha == {"name": "sha", "min_resource": "auto", "reduction_factor": 3,
                   "min_early_stopping_rate": 0, "bootstrap_count": 0}
    assert pruner_spec("hyperband", {}, 24)["max_resource"] == 24  # auto: trainer.epochs
    # the same settings, the same text: what tells a trial's pruner from another
    assert spec_json(pruner_spec("median", {}, 1)) == spec_json(pruner_spec("median", {}, 9))


@pytest.mark.parametrize("name, settings, message", [
    ("medain", {}, "hparams.pruner='medain' is not allowed: use one of none, median, "
                   "percentile, sha, hyperband"),
    ("median", {"n_warmup": 3}, "hparams.pruning.n_warmup is not a pruner setting"),
    ("median", {"n_warmup_steps": -1}, "hparams.pruning.n_warmup_steps=-1 is not allowed: "
                                       "an integer >= 0"),
    ("median", {"interval_steps": 1.5}, "hparams.pruning.interval_steps=1.5"),
    ("percentile", {"percentile": 120}, "a number in [0, 100]"),
    ("sha", {"reduction_factor": 1}, "hparams.pruning.reduction_factor=1 is not allowed: "
                                     "an integer >= 2"),
    ("hyperband", {"min_resource": "auto"}, "an integer >= 1 (epochs)"),
    ("hyperband", {"min_resource": 8, "max_resource": 8}, "hparams.pruning.max_resource=8"),
])
def test_bad_pruner_settings_are_one_line(name, settings, message):
    with pytest.raises(ConfigError) as e:
        pruner_spec(name, settings, 8)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_presets_list_every_setting_with_its_default():
    from dataclasses import asdict

    from test_optuna import compose

    for kind in ("grid", "tpe"):
        cfg = compose(f"hparams={kind}")
        assert dict(cfg.hparams.pruning) == asdict(PruningSettings()), kind
        assert cfg.hparams.pruner == "none"
        assert cfg.hydra.sweeper.pruner == "none"
        assert dict(cfg.hydra.sweeper.pruning) == asdict(PruningSettings())


@pytest.mark.parametrize("kind", ["grid", "tpe"])
def test_pruning_settings_are_typed_at_composition(kind):
    """hparams.pruning is the PruningSettings schema in both presets: a misspelt setting or
    a value of the wrong type is refused when Hydra composes, before any sweeper starts."""
    from hydra.errors import HydraException
    from test_optuna import compose

    for override, needle in (("hparams.pruning.n_warmup=3", "n_warmup"),
                             ("hparams.pruning.reduction_factor=abc", "reduction_factor")):
        with pytest.raises(HydraException, match=needle):
            compose(f"hparams={kind}", override)


def test_hyperband_brackets_do_not_depend_on_the_process():
    """optuna 2's Hyperband puts a trial in a bracket by Python's salted hash; ours by crc32,
    so the run, its resumed process and the sweeper agree."""
    import binascii
    from types import SimpleNamespace

    pruner = build_pruner(pruner_spec("hyperband", {"min_resource": 1}, 27))
    pruner._try_initialization(None)
    assert len(pruner._pruners) == 4  # brackets of 1, 3, 9, 27 epochs
    for number in range(20):
        trial = SimpleNamespace(number=number)
        n = binascii.crc32(f"s_{number}".encode()) % pruner._total_trial_allocation_budget
        expected = 0
        while n >= pruner._trial_allocation_budgets[expected]:
            n -= pruner._trial_allocation_budgets[expected]
            expected += 1
        assert pruner._get_bracket_id(SimpleNamespace(study_name="s"), trial) == expected


# ------------------------------------------------------------------------ reports
ROWS = [{"epoch": e, "test_top1": v, "test_top5": 90.0 + e}
        for e, v in ((1, 55.0), (2, 52.0), (3, 58.0), (4, 70.0))]


def test_objective_values_follow_the_objective():
    assert objective_values(ROWS, "top1") == [(1, 55.0), (2, 52.0), (3, 58.0), (4, 70.0)]
    assert objective_values(ROWS, "top1_best") == [(1, 55.0), (2, 55.0), (3, 58.0), (4, 70.0)]
    assert objective_values(ROWS, "top5") == [(1, 91.0), (2, 92.0), (3, 93.0), (4, 94.0)]
    values = objective_values(ROWS, "top1")
    assert missing_reports(values, {}) == values
    assert missing_reports(values, {1: 55.0, 2: 52.0}) == values[2:]
    assert missing_reports(values, {3: 58.0}) == [(4, 70.0)]  # never before a reported step
    assert missing_reports(values[:2], {1: 55.0, 2: 52.0, 3: 58.0}) == []


def fresh(url: str):
    """The study's storage as another process sees it (optuna 2's cached storage keeps this
    process's running trials to itself)."""
    import optuna

    return optuna.storages.RDBStorage(url)


@pytest.fixture
def study(tmp_path):
    """A study with one completed trial that reported 50, 60, 70, 80 at epochs 1-4, and a
    running trial (number 1) pruned by the median of the completed ones."""
    import optuna

    url = f"sqlite:///{tmp_path}/s.db"
    s = optuna.create_study(study_name="s", storage=url, direction="maximize")
    done = s.ask()
    for epoch, value in enumerate((50.0, 60.0, 70.0, 80.0), 1):
        done.report(value, epoch)
    s.tell(done, 80.0)
    trial = s.ask()
    trial.set_user_attr(PRUNER_ATTR, spec_json(pruner_spec("median", {"n_startup_trials": 1},
                                                           4)))
    return s, url, trial


def test_reports_are_idempotent_on_resume_and_the_median_prunes(study):
    s, url, trial = study
    address = TrialAddress("s", trial.number, url, retry_s=1.0)

    def values():
        return fresh(url).get_trial(trial._trial_id).intermediate_values

    first = TrialReporter(address, "top1_best", 4)
    assert first.update(ROWS[:1]) is None  # 55 >= the median at epoch 1 (50)
    assert values() == {1: 55.0}
    # a new process (a resume) with the same epoch: nothing twice, no new question
    assert TrialReporter(address, "top1_best", 4).update(ROWS[:1]) is None
    assert values() == {1: 55.0}
    # epoch 2 (best so far 55 < 60): pruned, from a process that reports epoch 2 only
    why = TrialReporter(address, "top1_best", 4).update(ROWS[:2])
    assert why is not None and why.startswith("pruned at epoch 2 by median(")
    assert values() == {1: 55.0, 2: 55.0}
    # a run started over (its history shorter than what the trial has): nothing reported
    assert TrialReporter(address, "top1_best", 4).update(ROWS[:1]) is None
    assert values() == {1: 55.0, 2: 55.0}


def test_no_pruning_after_the_last_epoch(study):
    s, url, trial = study
    reporter = TrialReporter(TrialAddress("s", trial.number, url), "top1_best", 2)
    assert reporter.update(ROWS[:2]) is None  # behind at epoch 2, but nothing left to save
    assert fresh(url).get_trial(trial._trial_id).intermediate_values == {1: 55.0, 2: 55.0}


def test_an_unreachable_database_turns_reports_off_with_one_line(study, tmp_path, caplog):
    s, url, trial = study
    away = f"sqlite:///{tmp_path}/gone/dir/s.db"
    reporter = TrialReporter(TrialAddress("s", trial.number, away, retry_s=0.5), "top1", 4)
    with caplog.at_level(logging.WARNING, logger="rld"):
        t0 = time.monotonic()
        for n in range(1, 5):
            assert reporter.update(ROWS[:n]) is None
    assert time.monotonic() - t0 < 10  # retried for retry_s once, then never again
    lines = [r for r in caplog.records if "training on without pruning" in r.getMessage()]
    assert len(lines) == 1 and "unable to open database file" in lines[0].getMessage()
    # what the sweeper does when it records the trial: the run's epochs from its history
    storage = fresh(url)
    assert backfill(storage, trial._trial_id, ROWS, "top1") == 4
    assert backfill(storage, trial._trial_id, ROWS, "top1") == 0
    assert storage.get_trial(trial._trial_id).intermediate_values == {
        1: 55.0, 2: 52.0, 3: 58.0, 4: 70.0}


def test_a_finished_trial_takes_no_reports(study, caplog):
    """A trial a sweeper failed meanwhile (its sweeper taken for dead): the run goes on."""
    import optuna

    s, url, trial = study
    s.tell(trial, state=optuna.trial.TrialState.FAIL)
    reporter = TrialReporter(TrialAddress("s", trial.number, url, retry_s=5.0), "top1", 4)
    with caplog.at_level(logging.WARNING, logger="rld"):
        assert reporter.update(ROWS[:1]) is None
        assert reporter.update(ROWS[:2]) is None
    assert reporter.off is not None
    assert sum("training on without pruning" in r.getMessage() for r in caplog.records) == 1


def test_trial_address_round_trips_through_an_override():
    from omegaconf import OmegaConf

    from rld.pruning import trial_address

    a = TrialAddress("tag.synthetic.tiny.rld.seed0.grid", 7, "sqlite:////tmp/x y/o'p.db", 3.0)
    (override,) = a.overrides()
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([override])[0]
    cfg = OmegaConf.create({"objective": "top1", "hparams": {"storage": None}})
    OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), merge=True)
    assert trial_address(cfg) == a
    # no storage in the override (a URL with a password): the run's hparams.storage
    b = TrialAddress("s", 1, None)
    parsed = OverridesParser.create().parse_overrides(b.overrides())[0]
    cfg = OmegaConf.create({"hparams": {"storage": "postgresql://u:pw@h/db"}})
    OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), merge=True)
    assert trial_address(cfg).storage == "postgresql://u:pw@h/db"


# ------------------------------------------------------------------------ the real CLI
def test_bad_pruner_stops_the_sweep_before_any_work(tmp_path):
    teacher = tmp_path / "teacher.pth"  # present (the pre-flight looks no further)
    teacher.write_bytes(b"")
    proc = run_train(tmp_path, "-m", *SMALL, *GRID, f"teacher.checkpoint={teacher}",
                     "hparams.pruner=sha", "hparams.pruning.reduction_factor=1", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1] == ("rld.train: error: hparams.pruning.reduction_factor=1 is not allowed: "
                       "an integer >= 2"), proc.stderr[-2000:]
    assert not (tmp_path / "sweeps").exists() or not list((tmp_path / "sweeps").rglob("*.db"))


def test_grid_prunes_a_point_records_it_and_promotes_it(teacher_root):
    """A 2-point grid, median pruner: the second point (weights decayed to nothing) is pruned
    at epoch 1 (its trial PRUNED, its record "pruned" with the epoch, its checkpoint kept, its
    table cell "pruned at epoch 1"); every run reported each epoch exactly once; the same
    command again runs nothing; with hparams.pruner=none the point resumes from its
    checkpoint to the result of an unpruned run."""
    import optuna

    root, tag = teacher_root, "prune"
    proc = run_train(root, "-m", *SMALL, *GRID, *MEDIAN, f"tag={tag}")
    study = study_of(root, tag)
    by_wd = {t.params["optim.weight_decay"]: t for t in study.trials}
    assert {wd: t.state for wd, t in by_wd.items()} == {
        0.0005: optuna.trial.TrialState.COMPLETE, 5.0: optuna.trial.TrialState.PRUNED}
    runs = {wd: Path(t.user_attrs["rld_run_dir"]) for wd, t in by_wd.items()}
    for wd, t in by_wd.items():  # the reports are the history's best-so-far, epoch by epoch
        assert t.intermediate_values == reports_of(runs[wd]), wd
    pruned = record(runs[5.0])
    assert (pruned["status"], pruned["pruned_epoch"], pruned["epochs_done"]) == ("pruned", 1, 1)
    assert pruned["top1"] is None and pruned["top1_best"] is None
    assert pruned["message"].startswith("pruned at epoch 1 by median(")
    assert (runs[5.0] / "checkpoints/last.pt").exists() and not (runs[5.0] / "student.pt").exists()
    assert by_wd[5.0].value == by_wd[5.0].intermediate_values[1]  # its last report
    assert "1 completed, 1 pruned" in proc.stdout + proc.stderr

    from rld.table import collect_runs
    from rld.table.summary import fmt_stats, point_stats

    (run,) = collect_runs([runs[5.0]])
    assert (run.status, run.pruned_epoch) == ("pruned", 1)
    assert fmt_stats(point_stats((), [run], "top1_best")) == "pruned at epoch 1"

    again = run_train(root, "-m", *SMALL, *GRID, *MEDIAN, f"tag={tag}")
    assert "2 settled, 0 to run" in again.stdout + again.stderr
    assert len(study_of(root, tag).trials) == 2

    promoted = run_train(root, "-m", *SMALL, *GRID, "hparams.pruner=none", f"tag={tag}")
    out = promoted.stdout + promoted.stderr
    assert "1 settled, 1 to run" in out and "resumed from checkpoints/last.pt after epoch 1" in out
    study = study_of(root, tag)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 3 and len(done) == 2
    new = max(done, key=lambda t: t.number)
    assert new.intermediate_values == reports_of(runs[5.0])
    assert record(runs[5.0])["status"] == "completed"
    # the unpruned run of the same point, alone: the same history and numbers
    run_train(root, *SMALL, "distiller.beta=2", "distiller.tau=4", "optim.weight_decay=5.0",
              "trainer.epochs=4", "tag=unpruned")
    (alone,) = run_dirs(root, "unpruned").values()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in history(alone)]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in history(runs[5.0])] == strip
    for key in ("top1", "top1_best", "top5"):
        assert record(runs[5.0])[key] == record(alone)[key], key


def test_storage_unreachable_mid_run_the_run_finishes(teacher_root, tmp_path):
    """A run reporting to its trial loses the study's database after epoch 1: it logs that
    once, trains on without pruning and completes; the sweeper's backfill adds the epochs."""
    import optuna

    db_dir = tmp_path / "db"
    db_dir.mkdir()
    url = f"sqlite:///{db_dir}/s.db"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    trial = study.ask()
    trial.set_user_attr(PRUNER_ATTR, spec_json(pruner_spec("median", {"n_startup_trials": 0},
                                                           6)))
    address = TrialAddress("s", trial.number, url, retry_s=2.0).overrides()[0]
    cmd = train_command(teacher_root, *SMALL, "trainer.epochs=6", "tag=outage", address)
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    storage = fresh(url)
    try:
        deadline = time.monotonic() + 240
        while not storage.get_trial(trial._trial_id).intermediate_values:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        os.rename(db_dir, tmp_path / "away")  # the shared file system goes away
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert out.count("training on without pruning") == 1, out[-3000:]
    (run,) = run_dirs(teacher_root, "outage").values()
    assert record(run)["status"] == "completed" and len(history(run)) == 6
    os.rename(tmp_path / "away", db_dir)
    storage = fresh(url)
    reported = storage.get_trial(trial._trial_id).intermediate_values
    assert 1 in reported and len(reported) < 6
    assert backfill(storage, trial._trial_id, history(run), "top1_best") == 6 - len(reported)
    assert storage.get_trial(trial._trial_id).intermediate_values == reports_of(run)
    shutil.rmtree(db_dir)


@pytest.mark.slow
def test_tpe_prunes_and_a_larger_budget_promotes_pruned_points_first(teacher_root):
    """TPE with the median pruner: the seeded sampler's second point decays its weights to
    nothing and is pruned at epoch 1; the budget counts it; n_trials+1 with
    hparams.pruner=none resumes that point (from its checkpoint) before drawing a new one."""
    import optuna

    root, tag = teacher_root, "tpe-prune"
    args = ["-m", *SMALL, "trainer.epochs=3", "hparams=tpe", *MEDIAN, f"tag={tag}",
            "optim.weight_decay=choice(0.0005,5.0)"]
    run_train(root, *args, "hparams.n_trials=4")
    trials = study_of(root, tag).trials
    assert len(trials) == 4
    first_pruned = trials[1]
    assert first_pruned.params["optim.weight_decay"] == 5.0  # the seeded sampler's draw
    assert first_pruned.state == optuna.trial.TrialState.PRUNED
    for t in trials:
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        run = Path(t.user_attrs["rld_run_dir"])
        assert t.intermediate_values == reports_of(run), t.number
        expect = "completed" if t.state == optuna.trial.TrialState.COMPLETE else "pruned"
        assert record(run)["status"] == expect
    run_train(root, *args, "hparams.n_trials=4")  # the budget is spent: nothing runs
    assert len(study_of(root, tag).trials) == 4
    proc = run_train(root, *args, "hparams.n_trials=5", "hparams.pruner=none")
    assert "resumed from checkpoints/last.pt after epoch 1" in proc.stdout + proc.stderr
    trials = study_of(root, tag).trials
    assert len(trials) == 5 and trials[4].params == first_pruned.params
    assert trials[4].state == optuna.trial.TrialState.COMPLETE
    assert record(Path(trials[4].user_attrs["rld_run_dir"]))["status"] == "completed"


@pytest.mark.slow
def test_a_pack_prunes_each_point_on_its_own(teacher_root):
    """Successive halving (rungs at epochs 1 and 2) on a packed 4-point grid: each point
    reports its own curve; pruned points stop at their epoch (the pack trains on without
    them) and show as pruned in the table; the others complete every epoch."""
    import optuna

    from rld.table import build_tables, cell_text, collect_runs

    root, tag = teacher_root, "pack-prune"
    proc = run_train(root, "-m", *SMALL, "trainer.epochs=4", "hparams=grid",
                     "hparams.beta=[1,2,8,32]", "hparams.tau=[4]", "hparams.pruner=sha",
                     "hparams.pruning.reduction_factor=2", "hydra/launcher=packed",
                     f"tag={tag}")
    assert "4 job(s) in 1 pack(s) of 4 job(s)" in proc.stdout + proc.stderr
    trials = study_of(root, tag).trials
    states = {t.params["distiller.beta"]: t.state for t in trials}
    pruned = [b for b, s in states.items() if s == optuna.trial.TrialState.PRUNED]
    done = [b for b, s in states.items() if s == optuna.trial.TrialState.COMPLETE]
    assert pruned and done and len(pruned) + len(done) == 4, states
    for t in trials:
        run = Path(t.user_attrs["rld_run_dir"])
        rec, hist = record(run), history(run)
        assert t.intermediate_values == reports_of(run)
        if t.state == optuna.trial.TrialState.PRUNED:
            assert rec["status"] == "pruned" and len(hist) == rec["pruned_epoch"] < 4
        else:
            assert rec["status"] == "completed" and len(hist) == 4
    # the pack's epoch (every point's `seconds`: the pack's) gets cheaper as points leave:
    # the last epochs, trained by fewer students, take less than the first, trained by four
    survivor = Path(next(t for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
                    .user_attrs["rld_run_dir"])
    seconds = [row["seconds"] for row in history(survivor)]
    left = [len([t for t in trials if len(t.intermediate_values) >= e]) for e in range(1, 5)]
    print(f"pack epochs: points {left}, seconds {[round(s, 2) for s in seconds]}")
    assert left[0] == 4 and left[-1] < 4
    after = [s for s, n in zip(seconds, left) if n == left[-1]]
    assert sum(after) / len(after) < seconds[0], (left, seconds)
    (t,) = build_tables(collect_runs([root / "sweeps" / tag]), "top1_best")
    (group,) = [g for g in t.groups if g.unit[0] == "rld"]
    (grid,) = group.grids
    for beta in pruned:
        assert cell_text(grid, None, beta).startswith("pruned at epoch"), grid
    assert grid.best[-1] in done


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["gpus", "submitit_local"])
def test_slots_refill_before_a_batch_would_end(teacher_root, launcher):
    """Two slots, one long trial (16 epochs) and three short ones (2-4 epochs): the short
    trials run one after another beside the long one, so the sweep takes about the long
    trial's time; in batches of two the third and fourth would start only when the long
    one ended.  (The epochs are strings so that the grid sampler, which sorts a choice's
    values, starts the long trial first; submitit_local starts a process per job.)"""
    root, tag = teacher_root, f"slots-{launcher}"
    extra = (["hydra.launcher.n_jobs=2"] if launcher == "gpus"
             else ["hydra.launcher.cpus_per_task=1", "hparams.n_jobs=2"])
    t0 = time.time()
    run_train(root, "-m", *SMALL, "dataset.test_size=64", "trainer.progress=none",
              "hparams=grid", "hparams.beta=[2]", "hparams.tau=[4]",
              "trainer.epochs=choice('16','2','3','4')", f"hydra/launcher={launcher}",
              *extra, f"tag={tag}", timeout=600)
    wall = time.time() - t0
    trials = {int(t.params["trainer.epochs"]): t for t in study_of(root, tag).trials}
    assert sorted(trials) == [2, 3, 4, 16]
    long = trials[16]
    assert long.number == 0
    # the third trial: in batches of two it would wait for the long one; with slots it
    # starts when the first short one ends (on warm gpus workers the fourth too)
    for short in (3, 4) if launcher == "gpus" else (3,):
        assert trials[short].datetime_start < long.datetime_complete, (short, trials)
    span = (long.datetime_complete - long.datetime_start).total_seconds()
    print(f"{launcher}: sweep {wall:.1f}s, long trial {span:.1f}s")


@pytest.mark.slow
def test_two_sweepers_with_pruning_never_run_a_point_twice(teacher_root):
    """Two sweepers (2 workers each) share one study of a 4-point grid with successive
    halving: one trial per point, each completed or pruned; the same command adds none."""
    import optuna

    root, tag = teacher_root, "two-prune"
    args = ["-m", *SMALL, "trainer.epochs=3", "hparams=grid", "hparams.beta=[1,2,8,32]",
            "hparams.tau=[4]", "hparams.pruner=sha", "hparams.pruning.reduction_factor=2",
            "hydra/launcher=gpus", "hydra.launcher.n_jobs=2", f"tag={tag}"]
    procs = [subprocess.Popen(train_command(root, *args), cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=train_env({"RLD_GPU_SLOT_DIR": str(root / f"slots{i}")}))
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-4000:]
    trials = study_of(root, tag).trials
    points = sorted(t.params["distiller.beta"] for t in trials)
    assert points == [1, 2, 8, 32], [(t.number, t.state, t.params) for t in trials]
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert all(t.state in finished for t in trials)
    again = run_train(root, *args)
    assert "4 settled, 0 to run" in again.stdout + again.stderr
    assert len(study_of(root, tag).trials) == 4
