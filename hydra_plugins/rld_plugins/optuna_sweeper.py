"""`hydra/sweeper=rld_optuna`: hydra-optuna-sweeper with resumable studies.

Differences from the upstream `optuna` sweeper (whose config it extends, so the sampler is
still chosen with `hydra/sweeper/sampler=grid|tpe|...`):

* params values may be lists: `distiller.beta: ${dataset.grid_beta}` is `choice(2,4,8,16)`.
* grid sampler: runs every grid point that has no completed (or diverged) trial yet, one
  trial per point, whatever `n_trials` says (null: the whole grid; a number caps it).
  Running the command again finishes the missing points only.
* other samplers: `n_trials` is the study's total budget; a second run tops it up.
* several sweepers may share one study (`storage` = any SQLAlchemy URL): a grid point is
  claimed in the database (a row with a unique key) before its trial starts, so parallel
  workers never run the same point twice; trials of a sweeper that died are failed and their
  points given out again (their runs resume from their checkpoints).
* a NaN objective (diverged run) fails the trial and the study goes on; `direction`
  defaults to maximize (accuracy).
* `n_jobs: null`: as many trials at a time as the launcher runs (GPU slots, Slurm array
  parallelism, points of a pack).
* `storage: null` keeps the study beside its runs, in `<hydra.sweep.dir>/optuna.db`
  (sqlite), rather than in memory.  A URL is checked before any work (driver, credentials,
  no password written where Hydra saves it: `rld.storage`) and shown with its password
  redacted; a database that goes away mid-sweep is retried for `storage_retry_s`.
* pruning (`pruner`, `pruning`): each job gets its trial's address in its config
  (`hparams.trial`), reports its objective after every epoch and stops when the trial's
  pruner says so (`rld.pruning`); a pruned point is settled for the same pruner only.
* slots, not batches: with the project's launchers a new trial starts as soon as one
  finishes or is pruned (`_slots`); other launchers run batches of `n_jobs`.
* works with hydra-optuna-sweeper 1.3 (optuna 2) and 1.4 (optuna 4-5): `_optuna_compat`.

The work is done in `_sweeper.py`, imported lazily.
"""


import logging
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.config import Direction, OptunaSweeperConf
from omegaconf import DictConfig


@dataclass
class RldOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.rld_plugins.optuna_sweeper.RldOptunaSweeper"
    direction: Any = Direction.maximize
    # any SQLAlchemy URL; null: sqlite:///<hydra.sweep.dir>/optuna.db (beside the runs)
    storage: Any = None
    # grid: null = every missing point; others: the study's total number of trials
    n_trials: Any = None
    # trials at a time; null: what the launcher runs at a time
    n_jobs: Any = None
    # stop when more than this fraction of the finished trials raised (NaN results never
    # stop a study)
    max_failure_rate: float = 1.0
    # values: Hydra sweep strings (choice(...), interval(...), tag(log, ...)) or lists
    params: Any = None
    # where the best point is written; null: <sweep dir>/optimization_results.yaml
    results_file: Any = None
    # liveness of sweepers sharing a study: heartbeat period and age after which a silent
    # sweeper's running trials are failed and its grid points given out again
    heartbeat_s: float = 30.0
    stale_after_s: float = 600.0
    # a database that does not answer mid-sweep (server restart, network) is retried with a
    # back-off of 1 s doubling to 30 s for this many seconds in all; then the sweeper stops
    storage_retry_s: float = 300.0
    # early stopping (rld.pruning): none | median | percentile | sha | hyperband; every run
    # reports its objective after each epoch to its trial and stops when the pruner says so
    pruner: str = "none"
    # the pruners' settings (rld.pruning.PruningSettings: n_startup_trials, n_warmup_steps,
    # interval_steps, n_min_trials, percentile, min_resource, max_resource, reduction_factor,
    # min_early_stopping_rate, bootstrap_count); checked before any work
    pruning: Any = None
    # seconds a run retries the study's database before it trains on without pruning
    report_retry_s: float = 30.0


# Optuna's RDBStorage imports alembic, whose plugin set-up logs at INFO; Hydra imports optuna
# when it instantiates the sampler, before this sweeper's own module is loaded
logging.getLogger("alembic").setLevel(logging.WARNING)

ConfigStore.instance().store(group="hydra/sweeper", name="rld_optuna",
                             node=RldOptunaSweeperConf, provider="rld")


class RldOptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None,
                 n_trials: int | None, n_jobs: int | None, max_failure_rate: float,
                 custom_search_space: str | None, params: DictConfig | None,
                 search_space: DictConfig | None = None,  # hydra-optuna-sweeper 1.3 only
                 results_file: str | None = None, heartbeat_s: float = 30.0,
                 stale_after_s: float = 600.0, storage_retry_s: float = 300.0,
                 pruner: str = "none", pruning: Any = None,
                 report_retry_s: float = 30.0) -> None:
        from ._sweeper import RldOptunaSweeperImpl

        self.sweeper = RldOptunaSweeperImpl(
            sampler=sampler, direction=direction, storage=storage, study_name=study_name,
            n_trials=n_trials, n_jobs=n_jobs, max_failure_rate=max_failure_rate,
            search_space=search_space, custom_search_space=custom_search_space,
            params=params, results_file=results_file, heartbeat_s=heartbeat_s,
            stale_after_s=stale_after_s, storage_retry_s=storage_retry_s, pruner=pruner,
            pruning=pruning, report_retry_s=report_retry_s)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function,
                           config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
