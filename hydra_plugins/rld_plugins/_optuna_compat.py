"""Every use of Optuna's internals by the `rld_optuna` sweeper, behind one small adapter.

The sweeper needs a few things Optuna's public API does not give:

* the trials as they are in the database now, past the storage's per-process cache (which
  does not see other sweepers' writes): `Study._storage`, `Study._study_id` and the cache's
  `_CachedStorage._backend`;
* a trial pinned to a grid point of its choosing: the grid sampler picks the point of a trial
  from the trial's system attribute `grid_id`, an index into `GridSampler._all_grids`, whose
  columns are `GridSampler._param_names` (its values per name: `GridSampler._search_space`);
  the trial is made with `Trial(study, trial_id)` (a constructor Optuna calls "not for direct
  use") on a trial created with `BaseStorage.create_new_trial`;
* failing a running trial of another (dead) process, known only as a `FrozenTrial`:
  `FrozenTrial._trial_id`, and `BaseStorage.set_trial_state` (optuna 2) /
  `BaseStorage.set_trial_state_values` (optuna >= 3);
* the grid sampler's logger, `optuna.samplers._grid`, and the text of its warning that it
  "is re-evaluating a configuration" (the sweeper re-runs errored points on purpose);
* `Study.tell` raising "Study.stop ..." when the grid sampler stops a full grid outside
  `optimize` (harmless here: the sweeper keeps its own count).

Written against optuna 2.10 (pinned by hydra-optuna-sweeper 1.3.0) and checked on 4.9; a new
Optuna version should need changes here only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

GRID_LOGGER = "optuna.samplers._grid"
GRID_ID_ATTR = "grid_id"
GRID_REEVALUATES = "is re-evaluating a configuration"


@dataclass(frozen=True)
class Grid:
    """The points of a GridSampler, in the sampler's own order: a trial whose `grid_id` is
    `i` runs `points[i]` (values in the order of `names`)."""

    names: tuple[str, ...]
    points: tuple[tuple[Any, ...], ...]
    choices: dict[str, tuple[Any, ...]]


def grid_of(sampler: optuna.samplers.GridSampler) -> Grid:
    names = tuple(sampler._param_names)
    return Grid(names=names, points=tuple(tuple(p) for p in sampler._all_grids),
                choices={n: tuple(sampler._search_space[n]) for n in names})


class StudyStore:
    """A study's storage, read and written directly (not through Optuna's cache)."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self._storage = study._storage
        self._backend = getattr(self._storage, "_backend", self._storage)
        self._study_id = study._study_id

    def trials(self) -> list[FrozenTrial]:
        """Every trial of the study, fresh from the database (not to be modified)."""
        return self._backend.get_all_trials(self._study_id, deepcopy=False)

    def new_grid_trial(self, grid_id: int) -> Trial:
        """A running trial that the study's GridSampler will give `grid_of(sampler).points[
        grid_id]`, whatever point the sampler would have picked."""
        trial_id = self._storage.create_new_trial(self._study_id)
        trial = optuna.trial.Trial(self.study, trial_id)  # the sampler picks some grid id...
        self._storage.set_trial_system_attr(trial_id, GRID_ID_ATTR, grid_id)  # ...we pin ours
        return trial

    def fail(self, trial: FrozenTrial, user_attrs: dict[str, Any]) -> bool:
        """Set `user_attrs` on a running trial of any process, then fail it.  False when the
        trial finished in the meantime (or another sweeper failed it first)."""
        trial_id = trial._trial_id
        try:
            for key, value in user_attrs.items():
                self._backend.set_trial_user_attr(trial_id, key, value)
            if hasattr(self._backend, "set_trial_state_values"):  # optuna >= 3
                self._backend.set_trial_state_values(trial_id, TrialState.FAIL)
            else:  # optuna 2
                self._backend.set_trial_state(trial_id, TrialState.FAIL)
        except RuntimeError:  # optuna 3+: UpdateFinishedTrialError, a RuntimeError
            return False
        return True


def tell(study: optuna.Study, trial: Trial, values: list[float] | None,
         state: TrialState) -> None:
    """`study.tell`, where the grid sampler's `study.stop()` on a full grid is no error."""
    try:
        study.tell(trial, values=values, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


class _QuietGrid(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return GRID_REEVALUATES not in record.getMessage()


@contextlib.contextmanager
def quiet_grid_sampler() -> Iterator[None]:
    """Silence the GridSampler's warning that it re-evaluates a point: the sweeper picks the
    points itself, and re-runs a point whose earlier trial errored on purpose."""
    quiet = _QuietGrid()
    logger = logging.getLogger(GRID_LOGGER)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
