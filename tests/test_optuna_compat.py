"""The sweeper's adapter to Optuna's internals (`_optuna_compat`): the behaviour the sweeper
relies on, checked against the installed Optuna, so that an Optuna upgrade that breaks it
fails here first."""

from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # hydra_plugins/ of this checkout, installed or not
    sys.path.insert(0, str(REPO))

from hydra_plugins.rld_plugins._optuna_compat import (  # noqa: E402
    GRID_REEVALUATES,
    StudyStore,
    grid_of,
    quiet_grid_sampler,
    tell,
)

SEARCH = {"b": [1, 2, 3], "a": [3.0, 4.0, 5.0]}


def grid_study(url: str) -> optuna.Study:
    return optuna.create_study(study_name="s", storage=url, direction="maximize",
                               sampler=optuna.samplers.GridSampler(SEARCH),
                               load_if_exists=True)


def suggest(trial: optuna.Trial) -> dict:
    return {n: trial.suggest_categorical(n, v) for n, v in SEARCH.items()}


def test_pinned_grid_trials_run_their_points_and_a_full_grid_tells(tmp_path):
    study = grid_study(f"sqlite:///{tmp_path}/o.db")
    grid = grid_of(study.sampler)
    assert sorted(grid.names) == sorted(SEARCH)
    assert {n: sorted(grid.choices[n]) for n in grid.names} == SEARCH
    assert sorted(grid.points) == sorted(itertools.product(*(SEARCH[n] for n in grid.names)))
    store = StudyStore(study)
    # every point, last first: the sampler's own choice would almost never give this order
    for i in reversed(range(len(grid.points))):
        trial = store.new_grid_trial(i)
        params = suggest(trial)
        assert tuple(params[n] for n in grid.names) == grid.points[i], (i, params)
        tell(study, trial, [float(i)], TrialState.COMPLETE)  # the last one fills the grid
    trials = store.trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(grid.points)
    assert sorted(t.value for t in trials) == [float(i) for i in range(len(grid.points))]


def test_store_sees_other_processes_and_fails_their_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    mine, other = grid_study(url), grid_study(url)  # two sweepers: two storages, two caches
    assert other.trials == []  # warm the other's cache
    a, b = StudyStore(mine), StudyStore(other)
    trial = a.new_grid_trial(0)
    params = suggest(trial)
    (seen,) = b.trials()
    assert seen.state == TrialState.RUNNING and seen.params == params
    assert b.fail(seen, {"rld_state": "interrupted"})
    (seen,) = a.trials()
    assert seen.state == TrialState.FAIL and seen.user_attrs["rld_state"] == "interrupted"
    # a finished trial is left as it is
    assert not a.fail(seen, {"rld_state": "error"})
    assert a.trials()[0].user_attrs["rld_state"] == "interrupted"


def test_quiet_grid_sampler_hides_the_reevaluation_warning(caplog):
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"x": [1, 2]}))
    study.optimize(lambda t: float(t.suggest_categorical("x", [1, 2])), n_trials=2)
    optuna.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="optuna"):
            study.ask()  # the grid is full: the sampler warns (Optuna's wording, still)
            assert GRID_REEVALUATES in caplog.text
            caplog.clear()
            with quiet_grid_sampler():
                study.ask()
            assert caplog.text == ""
    finally:
        optuna.logging.disable_propagation()


def test_trial_creation_ends_when_the_database_is_gone(tmp_path):
    """optuna 2's RDBStorage spins forever creating a trial while the database cannot be
    opened; through the store it raises at once (a transient error the sweeper retries with
    its budget)."""
    import shutil
    import threading

    from rld.storage import transient

    folder = tmp_path / "gone"
    folder.mkdir()
    study = optuna.create_study(
        study_name="s", direction="maximize", sampler=optuna.samplers.GridSampler(SEARCH),
        storage=optuna.storages.RDBStorage(f"sqlite:///{folder}/o.db"))
    store = StudyStore(study)
    store.new_grid_trial(0)  # works while the file is there
    store._backend.engine.dispose()  # no pooled connection to the old file
    shutil.rmtree(folder)
    raised: list[BaseException] = []

    def create() -> None:
        try:
            store.new_grid_trial(1)
        except Exception as e:  # noqa: BLE001 - what the sweeper would see
            raised.append(e)

    worker = threading.Thread(target=create, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "trial creation still spinning after 20s"
    assert len(raised) == 1 and transient(raised[0]), raised
