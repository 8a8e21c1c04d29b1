"""Every use of Optuna's and hydra-optuna-sweeper's internals by the `rld_optuna` sweeper,
behind one small adapter.

The sweeper needs a few things Optuna's public API does not give:

* the trials as they are in the database now, and writes that reach the database at once:
  `Study._storage` is replaced by the `RDBStorage` behind Optuna's `_CachedStorage`
  (`_CachedStorage._backend`), with `Study._study_id`.  Optuna 2's cache keeps this process's
  running trials in memory and drops a pending write before the database call that fails
  (`_flush_trial`), so a write retried after a database outage was refused ("already
  finished") or lost, and the cache never sees other sweepers' writes;
* a trial pinned to a grid point of its choosing: the grid sampler picks the point of a trial
  from the trial's system attribute `grid_id`, an index into `GridSampler._all_grids`, whose
  columns are `GridSampler._param_names` (its values per name: `GridSampler._search_space`);
  the trial is made with `Trial(study, trial_id)` (a constructor Optuna calls "not for direct
  use") on a trial created with `BaseStorage.create_new_trial` from a template trial that
  carries its owner and point (and `fixed_params` for a trial run again), so that it never
  exists without them; the GridSampler's own attribute for its grid is `search_space`;
* failing a running trial of another (dead) process, known only as a `FrozenTrial`:
  `FrozenTrial._trial_id`, and `BaseStorage.set_trial_state` (optuna 2) /
  `BaseStorage.set_trial_state_values` (optuna >= 3);
* the grid sampler's logger, `optuna.samplers._grid`, and the text of its warning that it
  "is re-evaluating a configuration" (the sweeper re-runs errored points on purpose);
* `Study.tell` raising "Study.stop ..." when the grid sampler stops a full grid outside
  `optimize` (harmless here: the sweeper keeps its own count);
* optuna 2's `RDBStorage._create_new_trial` retries an `OperationalError` forever (its retry
  counter is never increased): while the database is unreachable it spins without a pause or
  an end.  Its engine (`RDBStorage.engine`) turns a refused or lost connection into a
  `DisconnectionError`, which that loop does not catch and the sweeper retries with its
  budget: `_end_spinning`.

And of hydra-optuna-sweeper, which changed between 1.3 and 1.4:

* 1.3 gets its sampler instantiated with the sweeper (Hydra 1.3 instantiates plugins
  recursively); 1.4 gets the sampler's config and instantiates it itself, with Hydra 1.4's
  `_execution_whitelist_` of allowed targets: `sampler_of`;
* `OptunaSweeperImpl.__init__` lost `search_space` in 1.4 (`params` only): `impl_args`;
* `create_params_from_overrides` also returns the delete overrides (`~key`) in 1.4, which
  `_configure_trials` then takes as a fourth argument: `split_overrides`, `configure_trials`.

Written against optuna 2.10 with hydra-optuna-sweeper 1.3.0 (the released stack, the
default) and checked on optuna 5.x with hydra-optuna-sweeper 1.4.0rc3 (`make test-next`); a
new Optuna or sweeper version should need changes here only.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper import _impl as upstream
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, Trial, TrialState

OPTUNA_MAJOR = int(optuna.__version__.split(".")[0])
GRID_LOGGER = "optuna.samplers._grid"
GRID_ID_ATTR = "grid_id"
GRID_SPACE_ATTR = "search_space"
FIXED_PARAMS_ATTR = "fixed_params"  # what enqueue_trial sets: the points a trial must take
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
    """A study's storage, read and written directly: the study itself is switched to the
    database behind Optuna's cache (see the module's docstring), so make the store before
    any trial of this process."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self._backend = getattr(study._storage, "_backend", study._storage)
        study._storage = self._backend
        self._study_id = study._study_id
        if isinstance(self._backend, optuna.storages.RDBStorage) and OPTUNA_MAJOR < 3:
            _end_spinning(self._backend.engine)

    def trials(self) -> list[FrozenTrial]:
        """Every trial of the study, fresh from the database (not to be modified)."""
        return self._backend.get_all_trials(self._study_id, deepcopy=False)

    def create(self, user_attrs: dict[str, Any], system_attrs: dict[str, Any]) -> int:
        """A running trial with these attributes, made in one transaction (so no other
        process ever sees it without them): its id.  Through `create_new_trial`'s template
        trial; `system_attrs` may hold `fixed_params` (the points of a trial run again) or a
        grid point (`grid_attrs`)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            template = optuna.trial.create_trial(state=TrialState.RUNNING,
                                                 user_attrs=user_attrs,
                                                 system_attrs=system_attrs)
        return self._backend.create_new_trial(self._study_id, template_trial=template)

    def grid_attrs(self, grid_id: int) -> dict[str, Any]:
        """The system attributes that pin a trial to grid point `grid_id` of the study's
        GridSampler (`grid_of(sampler).points[grid_id]`)."""
        return {GRID_ID_ATTR: grid_id, GRID_SPACE_ATTR: self.study.sampler._search_space}

    @staticmethod
    def rerun_attrs(params: dict[str, Any]) -> dict[str, Any]:
        """The system attributes that make a trial take `params` (as `enqueue_trial` does)."""
        return {FIXED_PARAMS_ATTR: dict(params)}

    def open(self, trial_id: int, grid_id: int | None = None) -> Trial:
        """The `Trial` of a created trial, prepared by the study's sampler; safe to repeat.
        Optuna 2's GridSampler draws a grid point for every new `Trial` whatever the trial
        says: `grid_id` is pinned again after it."""
        trial = optuna.trial.Trial(self.study, trial_id)
        if grid_id is not None:
            self._backend.set_trial_system_attr(trial_id, GRID_ID_ATTR, grid_id)
        return trial

    def new_grid_trial(self, grid_id: int, user_attrs: dict[str, Any] | None = None) -> Trial:
        """A running trial that the study's GridSampler gives `grid_of(sampler).points[
        grid_id]`, whatever point the sampler would have picked."""
        return self.open(self.create(user_attrs or {}, self.grid_attrs(grid_id)), grid_id)

    def fail(self, trial: FrozenTrial | Trial | int, user_attrs: dict[str, Any]) -> bool:
        """Set `user_attrs` on a running trial of any process (a trial or its id), then fail
        it.  False when the trial finished in the meantime (or another sweeper failed it
        first)."""
        trial_id = trial if isinstance(trial, int) else trial._trial_id
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


def _end_spinning(engine: Any) -> None:
    """Raise a connection that fails to open, or is lost, as DisconnectionError (see the
    module's docstring); errors on a live connection (a deadlock) stay OperationalError."""
    import sqlalchemy as sa

    @sa.event.listens_for(engine, "handle_error")
    def _disconnected(context: Any) -> None:
        error = context.original_exception
        lost = context.is_disconnect or context.connection is None
        if lost and isinstance(context.sqlalchemy_exception, sa.exc.OperationalError):
            raise sa.exc.DisconnectionError(str(error).strip()) from error


def tell(study: optuna.Study, trial: Trial, values: list[float] | None,
         state: TrialState) -> None:
    """`study.tell`, safe to repeat: a trial already finished (a retry after a tell whose
    answer a database outage swallowed) is left as it is, and the grid sampler's
    `study.stop()` on a full grid is no error."""
    if study._storage.get_trial(trial._trial_id).state.is_finished():
        return
    try:
        study.tell(trial, values=values, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


# targets a sampler config may name (what hydra-optuna-sweeper 1.4 allows)
SAMPLER_TARGETS = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")


def sampler_of(sampler: Any) -> Any:
    """The sampler (a partial for the grid sampler) from what the sweeper was given."""
    if not OmegaConf.is_config(sampler):
        return sampler  # Hydra 1.3: instantiated already
    import hydra
    from hydra.utils import instantiate
    from packaging.version import Version

    if Version(hydra.__version__) >= Version("1.4.0.dev0"):
        return instantiate(sampler, _execution_whitelist_=SAMPLER_TARGETS)
    return instantiate(sampler)


def impl_args(**kwargs: Any) -> list[Any]:
    """The positional arguments of the installed `OptunaSweeperImpl.__init__`, picked by name
    from `kwargs` (1.3 takes `search_space`, 1.4 does not)."""
    names = list(inspect.signature(upstream.OptunaSweeperImpl.__init__).parameters)[1:]
    if "search_space" not in names and kwargs.get("search_space"):
        raise ValueError("hydra.sweeper.search_space is gone in hydra-optuna-sweeper 1.4: "
                         "give the search space as hydra.sweeper.params")
    return [kwargs.get(n) for n in names]


def split_overrides(arguments: Sequence[str]) -> tuple[dict, dict, list[str]]:
    """(distributions, fixed values, delete overrides `~key`) of sweep overrides; the last
    is always empty on hydra-optuna-sweeper 1.3."""
    out = upstream.create_params_from_overrides(list(arguments))
    return out[0], out[1], list(out[2]) if len(out) > 2 else []


def configure_trials(impl: Any, trials: Sequence[Trial], search: dict, fixed: dict,
                     deletes: Sequence[str]) -> Sequence[Sequence[str]]:
    """`OptunaSweeperImpl._configure_trials`: the overrides of each trial's job."""
    if len(inspect.signature(impl._configure_trials).parameters) > 3:  # 1.4: + deletes
        return impl._configure_trials(list(trials), search, fixed, list(deletes))
    return impl._configure_trials(list(trials), search, fixed)


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
