"""The `rld_optuna` sweeper: hydra-optuna-sweeper's loop, made resumable and safe to share.

Bookkeeping, all in the study's own database so that any SQLAlchemy URL works:

* every trial carries the user attributes `rld_owner` (the sweeper process that runs it),
  `rld_state` (completed | diverged | error | interrupted) and `rld_run_dir`;
* grid points are claimed, and sweepers send heartbeats, through `_guard.Guard`: a point is
  only claimed when no trial of it has settled, and two sweepers never hold the same point.

A sweeper whose heartbeat is older than `stale_after_s` (or whose process is gone, on this
host) is dead: its claims are dropped and its running trials failed as `interrupted`, so
their points are run again (resuming from the run's checkpoint).  Optuna's internals are
reached through `_optuna_compat` only.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logging.getLogger("alembic").setLevel(logging.WARNING)  # RDBStorage's schema chatter

import optuna  # noqa: E402
from hydra_plugins.hydra_optuna_sweeper._impl import (  # noqa: E402
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import OmegaConf  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from ._guard import Guard, engine_kwargs, retry  # noqa: E402
from ._optuna_compat import Grid, StudyStore, grid_of, quiet_grid_sampler, tell  # noqa: E402

log = logging.getLogger(__name__)

OWNER_ATTR = "rld_owner"
STATE_ATTR = "rld_state"
RUN_DIR_ATTR = "rld_run_dir"
# the study's file when hydra.sweeper.storage is null: beside the sweep's runs
DEFAULT_DB = "optuna.db"


def default_storage(sweep_dir: str) -> str:
    """`sqlite:///<sweep dir>/optuna.db` (absolute): the study lives beside its runs."""
    return f"sqlite:///{Path(sweep_dir).absolute() / DEFAULT_DB}"


def _sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine.url import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def _redact(url: str) -> str:
    from sqlalchemy.engine.url import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for logging
        return "<storage>"


@contextlib.contextmanager
def _file_lock(path: Path | None):
    """Serialise start-up (table creation) of several sweepers on one sqlite file."""
    if path is None:
        yield
        return
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _value_str(v: Any) -> str:
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if v is None:
        return "null"
    return str(v)


def _run_dir(ret: Any) -> str | None:
    try:
        return str(ret.hydra_cfg.hydra.runtime.output_dir)
    except Exception:  # noqa: BLE001 - a job that failed before Hydra set it up
        return None


def run_status(run_dir: str | None) -> str | None:
    """The status in the run's record (rld.record); None without a readable record."""
    if not run_dir:
        return None
    from rld.record import RecordError, read_record

    try:
        record = read_record(Path(run_dir))
    except RecordError as e:
        log.warning("%s", e)
        return None
    return None if record is None else record.status


class RldOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, *args: Any, results_file: str | None = None, heartbeat_s: float = 30.0,
                 stale_after_s: float = 600.0) -> None:
        super().__init__(*args)
        self.results_file = results_file
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.guard: Guard | None = None
        self.store: StudyStore | None = None

    # -- configuration -------------------------------------------------------------------
    def _parse_sweeper_params_config(self) -> list[str]:
        if not self.params:
            return []
        out = []
        for k, v in self.params.items():
            if OmegaConf.is_list(v) or isinstance(v, list | tuple):
                values = list(OmegaConf.to_container(v, resolve=True)
                              if OmegaConf.is_config(v) else v)
                if not values:
                    raise ValueError(f"hydra.sweeper.params.{k}: empty list")
                out.append(f"{k}=choice({','.join(_value_str(x) for x in values)})")
            else:
                out.append(f"{k}={v}")
        return out

    def _batch_size(self) -> int:
        if self.n_jobs:
            return max(1, int(self.n_jobs))
        launcher = self.launcher
        par = getattr(launcher, "parallelism", None)
        if par:
            return max(1, int(par))
        params = getattr(launcher, "params", None)  # upstream submitit launchers
        if isinstance(params, dict) and params.get("array_parallelism"):
            return max(1, int(params["array_parallelism"]))
        joblib = getattr(launcher, "joblib", None)  # upstream joblib launcher
        if isinstance(joblib, dict) and joblib.get("n_jobs"):
            n = int(joblib["n_jobs"])
            return os.cpu_count() or 1 if n < 0 else max(1, n)
        return 1

    def _open_study(self, directions: list[str]) -> optuna.Study:
        storage = self.storage
        if storage is None:
            storage = default_storage(str(self.config.hydra.sweep.dir))
        url = storage if isinstance(storage, str) else None
        path = _sqlite_path(url) if url else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            if url:
                storage = retry(lambda: optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs(url)), "opening the Optuna storage")
            study = retry(lambda: optuna.create_study(
                study_name=self.study_name, storage=storage, sampler=self.sampler,
                directions=directions, load_if_exists=True), "creating the study")
            if url:
                self.guard = Guard(url, study.study_name, self.heartbeat_s, self.stale_after_s)
            elif storage is not None:
                log.warning("storage %r is not a URL: no guard against other sweepers",
                            storage)
        log.info("Study %s in %s (%s)", study.study_name,
                 _redact(url) if url else type(storage).__name__, type(self.sampler).__name__)
        self.store = StudyStore(study)
        return study

    # -- trials --------------------------------------------------------------------------
    def _all_trials(self) -> list[optuna.trial.FrozenTrial]:
        """Fresh from the database (Optuna's cache does not see other processes' updates)."""
        assert self.store is not None
        return self.store.trials()

    @property
    def _owner(self) -> str:
        return self.guard.owner if self.guard else "local"

    def _fail_orphans(self) -> list[dict[str, Any]]:
        """Fail running trials of dead sweepers; return their params."""
        if self.guard is None:
            return []
        assert self.store is not None
        self.guard.reap()
        alive: dict[str, bool] = {}
        orphans = []
        for t in self._all_trials():
            owner = t.user_attrs.get(OWNER_ATTR)
            if t.state != TrialState.RUNNING or owner is None:
                continue
            if owner not in alive:
                alive[owner] = self.guard.alive(owner)
            if alive[owner]:
                continue
            # False: finished in the meantime, or failed by another sweeper
            if self.store.fail(t, {STATE_ATTR: "interrupted"}):
                log.warning("trial %d (%s) of a stopped sweeper marked interrupted", t.number,
                            t.params)
                orphans.append(dict(t.params))
        return orphans

    def _new_trial(self, study: optuna.Study, grid_id: int | None = None) -> optuna.Trial:
        assert self.store is not None
        trial = study.ask() if grid_id is None else self.store.new_grid_trial(grid_id)
        trial.set_user_attr(OWNER_ATTR, self._owner)
        return trial

    def _configure(self, study: optuna.Study, trials: list[optuna.Trial], search: dict,
                   fixed: dict) -> Sequence[Sequence[str]]:
        try:
            return self._configure_trials(trials, search, fixed)
        except ValueError as e:
            if "distribution" not in str(e).lower():
                raise
            raise ValueError(
                f"{e}\nStudy '{study.study_name}' was started with another search space "
                "(another grid or sampler): give this one its own name with "
                "hparams.study_name=... (or another tag=).") from e

    def _tell(self, study: optuna.Study, trials: list[optuna.Trial], returns: Sequence[Any],
              directions: list[str]) -> list[BaseException]:
        raised: list[BaseException] = []
        for trial, ret in zip(trials, returns):
            run_dir = _run_dir(ret)
            values: list[float] | None = None
            try:
                value = ret.return_value
            except Exception as e:  # noqa: BLE001 - the job raised: a failed trial
                raised.append(e)
                state, tag = TrialState.FAIL, "error"
                log.warning("trial %d failed: %s", trial.number, e)
            else:
                try:
                    values = ([float(value)] if len(directions) == 1
                              else [float(v) for v in value])
                except (TypeError, ValueError):
                    values = [math.nan]
                if all(math.isfinite(v) for v in values):
                    state, tag = TrialState.COMPLETE, "completed"
                else:
                    values = None
                    state = TrialState.FAIL
                    tag = "diverged" if run_status(run_dir) == "diverged" else "error"
                    log.warning("trial %d %s: %s (%s)", trial.number,
                                "diverged" if tag == "diverged" else "gave no number",
                                trial.params, run_dir)
            trial.set_user_attr(STATE_ATTR, tag)
            if run_dir:
                trial.set_user_attr(RUN_DIR_ATTR, run_dir)
            tell(study, trial, values, state)
        return raised

    def _check_failures(self, raised: list[BaseException], returns: Sequence[Any]) -> None:
        if raised and len(raised) / len(returns) > self.max_failure_rate:
            log.error("%d of %d trials of this batch raised (max_failure_rate=%s)",
                      len(raised), len(returns), self.max_failure_rate)
            for ret in returns:
                ret.return_value  # noqa: B018 - re-raises the job's exception

    def _finish_mine(self) -> None:
        """On the way out (Ctrl-C, errors): my running trials become `interrupted`."""
        if self.store is None:
            return
        try:
            trials = self._all_trials()
        except Exception as e:  # noqa: BLE001 - do not hide the error that brought us here
            log.warning("could not mark this sweeper's running trials interrupted: %s", e)
            return
        for t in trials:
            if t.state == TrialState.RUNNING and t.user_attrs.get(OWNER_ATTR) == self._owner:
                with contextlib.suppress(Exception):
                    self.store.fail(t, {STATE_ATTR: "interrupted"})

    # -- the sweep -----------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        is_grid = (isinstance(self.sampler, functools.partial)
                   and self.sampler.func is optuna.samplers.GridSampler)
        distributions, fixed = create_params_from_overrides(params_conf)
        search = dict(self.search_space_distributions or {})
        search.update(distributions)
        for name in fixed:
            search.pop(name, None)
        if is_grid:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in search.items()}
            self.sampler = self.sampler(grid)
        directions = self._get_directions()
        study = self._open_study(directions)
        if self.guard is not None:
            self.guard.start()
        try:
            with quiet_grid_sampler():
                if is_grid:
                    self._sweep_grid(study, search, fixed, directions)
                else:
                    self._sweep_budget(study, search, fixed, directions)
        finally:
            self._finish_mine()
            if self.guard is not None:
                self.guard.stop()
        self._write_results(study, directions)

    def _settled(self, names: Sequence[str]) -> set[tuple]:
        """Grid points (values in the order of `names`) that are not to run again: those with
        a completed trial, or one failed as a settled run (diverged)."""
        from rld.record import SETTLED

        out = set()
        for t in self._all_trials():
            if not all(n in t.params for n in names):
                continue
            if t.state == TrialState.COMPLETE or (
                    t.state == TrialState.FAIL and t.user_attrs.get(STATE_ATTR) in SETTLED):
                out.add(tuple(t.params[n] for n in names))
        return out

    def _claim_batch(self, candidates: Sequence[int], grid: Grid, keys: Sequence[str],
                     size: int) -> list[int]:
        """Up to `size` of the grid points `candidates` not settled yet, claimed (with a
        guard) so that no other sweeper runs them meanwhile."""
        done = self._settled(grid.names)
        batch: list[int] = []
        for i in candidates:
            if grid.points[i] in done:
                continue
            if self.guard is not None:
                if not self.guard.claim(keys[i]):
                    continue
                if grid.points[i] in self._settled(grid.names):  # finished while claiming
                    self.guard.release([keys[i]])
                    continue
            batch.append(i)
            if len(batch) == size:
                break
        return batch

    def _sweep_grid(self, study: optuna.Study, search: dict, fixed: dict,
                    directions: list[str]) -> None:
        grid = grid_of(self.sampler)
        names, grids = grid.names, grid.points
        keys = [",".join(f"{n}={v!r}" for n, v in zip(names, g)) for g in grids]
        limit = len(grids) if self.n_trials is None else min(int(self.n_trials), len(grids))
        batch_size = self._batch_size()
        done_before = self._settled(names)
        todo = [i for i, g in enumerate(grids) if g not in done_before][: max(0, limit
                                                                             - len(done_before))]
        log.info("grid of %d point(s) (%s): %d settled, %d to run, %d at a time", len(grids),
                 " x ".join(f"{n} {list(grid.choices[n])}" for n in names),
                 len(done_before), len(todo), batch_size)
        tried: set[int] = set()
        while True:
            self._fail_orphans()
            batch = self._claim_batch([i for i in todo if i not in tried], grid, keys,
                                      batch_size)
            if not batch:
                break
            try:
                trials = [self._new_trial(study, grid_id=i) for i in batch]
                overrides = self._configure(study, trials, search, fixed)
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
                self.job_idx += len(returns)
                raised = self._tell(study, trials, returns, directions)
            finally:
                tried.update(batch)
                if self.guard is not None:
                    self.guard.release(keys[i] for i in batch)
            self._check_failures(raised, returns)
        settled = self._settled(names)
        left = [keys[i] for i in todo if grids[i] not in settled]
        if left:
            log.info("%d grid point(s) not settled by this sweeper (running elsewhere or "
                     "failed): %s", len(left), "; ".join(left))

    def _budget_used(self, trials: list[optuna.trial.FrozenTrial]) -> int:
        """Trials that count against n_trials: finished ones (except interrupted) and
        those running in other live sweepers."""
        me = self._owner
        alive: dict[str, bool] = {}
        n = 0
        for t in trials:
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                n += 1
            elif t.state == TrialState.FAIL:
                n += t.user_attrs.get(STATE_ATTR) != "interrupted"
            elif t.state == TrialState.RUNNING:
                owner = t.user_attrs.get(OWNER_ATTR)
                if owner is None:
                    n += 1
                elif owner != me and self.guard is not None:
                    if owner not in alive:
                        alive[owner] = self.guard.alive(owner)
                    n += alive[owner]
        return n

    def _sweep_budget(self, study: optuna.Study, search: dict, fixed: dict,
                      directions: list[str]) -> None:
        if self.n_trials is None:
            raise ValueError("hydra.sweeper.n_trials (hparams.n_trials) must be set for "
                             f"sampler {type(self.sampler).__name__}")
        batch_size = self._batch_size()
        while True:
            for params in self._fail_orphans():
                study.enqueue_trial(params)  # resumes the interrupted run
            counted = self._budget_used(self._all_trials())
            to_go = int(self.n_trials) - counted
            if to_go <= 0:
                break
            trials = [self._new_trial(study) for _ in range(min(batch_size, to_go))]
            overrides = self._configure(study, trials, search, fixed)
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            raised = self._tell(study, trials, returns, directions)
            self._check_failures(raised, returns)

    def _write_results(self, study: optuna.Study, directions: list[str]) -> None:
        trials = self._all_trials()
        states: dict[str, int] = {}
        for t in trials:
            k = t.user_attrs.get(STATE_ATTR) or t.state.name.lower()
            states[k] = states.get(k, 0) + 1
        results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name,
                                   "trials": states}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if len(directions) < 2:
            if complete:
                best = study.best_trial
                results.update(best_params=best.params, best_value=best.value,
                               best_trial=best.number,
                               best_run_dir=best.user_attrs.get(RUN_DIR_ATTR))
                log.info("Best parameters: %s", best.params)
                log.info("Best value: %s", best.value)
            else:
                results.update(best_params=None, best_value=None)
                log.warning("no completed trial in study %s yet", study.study_name)
        else:
            results["solutions"] = [{"params": t.params, "values": t.values}
                                    for t in study.best_trials]
        path = Path(self.results_file or f"{self.config.hydra.sweep.dir}/"
                                          "optimization_results.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(results), path)
        log.info("results: %s (%s)", path, ", ".join(f"{v} {k}" for k, v in states.items()))
