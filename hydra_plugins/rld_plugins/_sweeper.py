"""The `rld_optuna` sweeper: hydra-optuna-sweeper's loop, made resumable and safe to share.

Bookkeeping, all in the study's own database so that any SQLAlchemy URL works:

* every trial carries the user attributes `rld_owner` (the sweeper process that runs it),
  `rld_state` (completed | diverged | error | interrupted) and `rld_run_dir`;
* grid points are claimed, and sweepers send heartbeats, through `_guard.Guard`: a point is
  only claimed when no trial of it has settled, and two sweepers never hold the same point.

A sweeper whose heartbeat is older than `stale_after_s` (or whose process is gone, on this
host) is dead: its claims are dropped and its running trials failed as `interrupted`, so
their points are run again (resuming from the run's checkpoint).  Optuna's and
hydra-optuna-sweeper's internals are reached through `_optuna_compat` only.

The storage URL is checked before any work (`rld.storage`: parseable, driver installed, no
password written where Hydra saves it, server reachable with these credentials); a failure is
one line.  Every later database call of the sweeper is retried with a bounded back-off
(`storage_retry_s` in all, `rld.storage.Backoff`) so a server restart costs a pause, not the
sweep; a server that stays away ends the sweeper with one line, and the runs it launched keep
their results on disk for the next run of the same command.  The TPE budget is counted and
spent under a claim (`Guard.hold`), so several sweepers never exceed `n_trials` together.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import logging
import math
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from omegaconf import OmegaConf
from optuna.trial import TrialState

from rld.errors import ConfigError
from rld.pruning import (
    PRUNER_ATTR,
    TrialAddress,
    backfill,
    build_pruner,
    pruner_spec,
    prunes,
    spec_json,
    spec_text,
)
from rld.storage import (
    KEY,
    Backoff,
    StorageError,
    StorageUnavailable,
    check_connection,
    check_url,
    engine_kwargs,
    has_password,
    one_line,
    redact,
)

from ._guard import Guard
from ._optuna_compat import (
    Grid,
    StudyStore,
    configure_trials,
    grid_of,
    impl_args,
    quiet_grid_sampler,
    sampler_of,
    split_overrides,
    tell,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

OWNER_ATTR = "rld_owner"
STATE_ATTR = "rld_state"
RUN_DIR_ATTR = "rld_run_dir"
# the study's file when hydra.sweeper.storage is null: beside the sweep's runs
DEFAULT_DB = "optuna.db"
# the claim under which a sweeper counts and starts trials of a budgeted (non-grid) study
BUDGET_CLAIM = "@budget"
# PostgreSQL advisory lock that serialises sweepers creating the tables of one database
STARTUP_LOCK = 0x726C64  # "rld"


BAD_STORAGE, DATABASE_GONE = 2, 1  # exit codes of `_stop`
BAD_INPUT = BAD_STORAGE  # a bad setting: exit 2, as `rld.train` exits on bad input


def _stop(message: str, code: int) -> NoReturn:
    """End the sweeper with `message` as its only line on stderr (an exception would reach
    Hydra, which adds a traceback or its HYDRA_FULL_ERROR hint): bad storage before any work
    (BAD_STORAGE, as `rld.train` exits on bad input) or a database that stayed away
    (DATABASE_GONE).  The `finally` blocks on the way out still run."""
    sys.stderr.write(f"rld.train: error: {message}\n")  # the sweeper of rld.train only
    sys.stderr.flush()
    raise SystemExit(code)


def default_storage(sweep_dir: str) -> str:
    """`sqlite:///<sweep dir>/optuna.db` (absolute): the study lives beside its runs."""
    return f"sqlite:///{Path(sweep_dir).absolute() / DEFAULT_DB}"


def _sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine.url import make_url

    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _startup_lock(url: str | None, backoff: Backoff) -> Iterator[None]:
    """Serialise the start-up (table creation, registration) of sweepers on one database: a
    file lock for sqlite, an advisory lock on PostgreSQL (dropped by the server if the
    connection is lost); elsewhere the start-up retries cover it."""
    path = _sqlite_path(url) if url else None
    if path is not None:
        with _file_lock(path):
            yield
        return
    if not url or not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy as sa

    engine = sa.create_engine(url, **engine_kwargs(url))

    def lock() -> Any:
        c = engine.connect()
        try:
            c.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": STARTUP_LOCK})
        except BaseException:
            c.close()
            raise
        return c

    c = backoff.call(lock, "waiting for other sweepers to start")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a lost connection has dropped it already
            c.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": STARTUP_LOCK})
        with contextlib.suppress(Exception):
            c.close()
        engine.dispose()


def _strings(node: Any) -> Iterator[str]:
    """Every string in a container (the config as Hydra saves it)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list | tuple):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


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
    def __init__(self, *, results_file: str | None = None, heartbeat_s: float = 30.0,
                 stale_after_s: float = 600.0, storage_retry_s: float = 300.0,
                 pruner: str = "none", pruning: Any = None, report_retry_s: float = 30.0,
                 **upstream: Any) -> None:
        upstream["sampler"] = sampler_of(upstream.get("sampler"))
        super().__init__(*impl_args(**upstream))
        self.results_file = results_file
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        if not storage_retry_s or float(storage_retry_s) < 0:
            raise ValueError(f"hydra.sweeper.storage_retry_s={storage_retry_s!r}: seconds "
                             "of retrying a database that does not answer, > 0")
        self.backoff = Backoff(budget_s=float(storage_retry_s))
        self.guard: Guard | None = None
        self.store: StudyStore | None = None
        self.url: str | None = None
        self._numbers: dict[int, int] = {}  # id(trial) -> its number, known without a query
        self._company = (0, 0)  # trials in the study and other live sweepers, at start
        self._resume: list[dict[str, Any]] = []  # points of interrupted trials to run again
        self._space: tuple[dict, dict, list[str]] = ({}, {}, [])  # search, fixed, deletes
        # the pruner as configured, checked at the start of the sweep (`rld.pruning`)
        self._pruning = (str(pruner), OmegaConf.to_container(pruning, resolve=True)
                         if OmegaConf.is_config(pruning) else dict(pruning or {}))
        self.report_retry_s = float(report_retry_s)
        self.pruner: dict[str, Any] = {"name": "none"}  # its spec (`rld.pruning.pruner_spec`)
        self._jobs_storage: str | None | bool = False  # what jobs get; False: no reports

    # -- the database --------------------------------------------------------------------
    def _db(self, fn: Callable[[], T], what: str) -> T:
        """`fn()`, retried while the database is unreachable (within storage_retry_s)."""
        return self.backoff.call(fn, what)

    @staticmethod
    def _once(fn: Callable[[], Any], what: str) -> None:
        """`fn()` once, on the way out after an error: a failure is only logged."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - do not hide the error that brought us here
            log.warning("%s failed: %s", what, one_line(e))

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

    def _check_storage(self, url: str) -> None:
        """Before any work: a URL that parses, an installed driver, no password where
        Hydra saves it, a server that answers to these credentials; else one line."""
        path = _sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        saved = _strings(OmegaConf.to_container(self.config, resolve=False))
        try:
            check_url(url, saved)
            check_connection(url)
        except StorageError as e:
            _stop(str(e), BAD_STORAGE)

    def _rdb_storage(self, url: str) -> optuna.storages.RDBStorage:
        """Optuna's storage on `url`; a schema this Optuna cannot use (a study written by
        optuna 2, opened by optuna 4+: `optuna storage upgrade`) is one line."""
        try:
            return self.backoff.start(lambda: optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs(url)), "opening the Optuna storage")
        except RuntimeError as e:
            if "schema" not in str(e):
                raise
            _stop(f"{KEY}={redact(url)}: {e}".replace("$STORAGE_URL", redact(url)),
                  BAD_STORAGE)

    def _open_study(self, directions: list[str]) -> optuna.Study:
        storage = self.storage
        if storage is None:
            storage = default_storage(str(self.config.hydra.sweep.dir))
        url = storage if isinstance(storage, str) else None
        if url:
            self._check_storage(url)
        self.url = url
        start = self.backoff.start
        with _startup_lock(url, self.backoff):
            if url:
                storage = self._rdb_storage(url)
            study = start(lambda: optuna.create_study(
                study_name=self.study_name, storage=storage, sampler=self.sampler,
                pruner=build_pruner(self.pruner), directions=directions,
                load_if_exists=True), "creating the study")
            self.store = StudyStore(study)  # before any trial: no cache between us and the DB
            if url:
                self.guard = Guard(url, study.study_name, self.heartbeat_s, self.stale_after_s,
                                   self.backoff)
                # registered under the start-up lock: a sweeper starting next sees this one
                start(self.guard.start, "registering this sweeper")
            elif storage is not None:
                log.warning("storage %r is not a URL: no guard against other sweepers",
                            storage)
            self._company = self._db(lambda: (
                len(self._all_trials()), self.guard.others() if self.guard else 0),
                "reading the study")
        # jobs reach the study at its URL; one with a password never travels in an
        # override (Hydra saves them): its jobs read hparams.storage themselves
        self._jobs_storage = False if not url else None if has_password(url) else url
        if self._jobs_storage is False and prunes(self.pruner):
            log.warning("storage %r is not a URL the jobs can reach: runs report nothing and "
                        "no trial is pruned", storage)
        log.info("Study %s in %s (%s, pruner %s)", study.study_name,
                 redact(url) if url else type(storage).__name__, type(self.sampler).__name__,
                 spec_text(self.pruner))
        return study

    # -- trials --------------------------------------------------------------------------
    def _all_trials(self) -> list[optuna.trial.FrozenTrial]:
        """Fresh from the database (no cache sees other processes' updates)."""
        assert self.store is not None
        return self.store.trials()

    @property
    def _owner(self) -> str:
        return self.guard.owner if self.guard else "local"

    def _orphaned(self, t: optuna.trial.FrozenTrial, alive: dict[str, bool]) -> bool:
        """A running trial no live sweeper runs: its sweeper is dead, or it has had no owner
        for stale_after_s (a sweeper died, or lost the database, between making the trial and
        naming its owner)."""
        assert self.guard is not None
        owner = t.user_attrs.get(OWNER_ATTR)
        if owner is None:
            started = t.datetime_start
            return started is not None and (
                datetime.datetime.now() - started).total_seconds() > self.stale_after_s
        if owner not in alive:
            alive[owner] = self.guard.alive(owner)
        return not alive[owner]

    def _fail_orphans(self) -> list[dict[str, Any]]:
        """Fail running trials of dead sweepers; return their params."""
        if self.guard is None:
            return []
        assert self.store is not None
        self.guard.reap()
        alive: dict[str, bool] = {}
        orphans = []
        for t in self._all_trials():
            if t.state != TrialState.RUNNING or not self._orphaned(t, alive):
                continue
            # False: finished in the meantime, or failed by another sweeper
            if self.store.fail(t, {STATE_ATTR: "interrupted"}):
                log.warning("trial %d (%s) of a stopped sweeper marked interrupted", t.number,
                            t.params)
                if t.params:
                    orphans.append(dict(t.params))
        return orphans

    def _new_trial(self, grid_id: int | None = None,
                   params: dict[str, Any] | None = None) -> optuna.Trial:
        """A running trial of this sweeper, made with its owner and its grid point (or the
        `params` of an interrupted trial run again) in one transaction, then opened by the
        sampler.  Retried as a whole while the database is away, reusing a trial already
        made: a retry never leaves a second one behind."""
        assert self.store is not None
        system = (self.store.grid_attrs(grid_id) if grid_id is not None
                  else self.store.rerun_attrs(params) if params else {})
        made: list[int] = []

        def make() -> optuna.Trial:
            if not made:
                made.append(self.store.create({OWNER_ATTR: self._owner,
                                               PRUNER_ATTR: spec_json(self.pruner)}, system))
            trial = self.store.open(made[0], grid_id)
            self._numbers[id(trial)] = trial.number
            return trial

        return self._db(make, "starting a trial")

    def _configure(self, study: optuna.Study,
                   trials: list[optuna.Trial]) -> Sequence[Sequence[str]]:
        search, fixed, deletes = self._space
        try:
            overrides = self._db(lambda: configure_trials(self, trials, search, fixed,
                                                          deletes), "picking the trials' points")
            return [[*o, *self._trial_overrides(study, t)] for o, t in zip(overrides, trials)]
        except ValueError as e:
            if "distribution" not in str(e).lower():
                raise
            raise ValueError(
                f"{e}\nStudy '{study.study_name}' was started with another search space "
                "(another grid or sampler): give this one its own name with "
                "hparams.study_name=... (or another tag=).") from e

    def _trial_overrides(self, study: optuna.Study, trial: optuna.Trial) -> list[str]:
        """The job's own trial, in its config (`hparams.trial`, `rld.pruning`): where it
        reports its epochs and asks the trial's pruner."""
        if self._jobs_storage is False:
            return []
        return TrialAddress(study.study_name, self._numbers[id(trial)], self._jobs_storage,
                            self.report_retry_s).overrides()

    def _outcome(self, number: int, ret: Any, n_directions: int,
                 run_dir: str | None) -> tuple[TrialState, str, list[float] | None]:
        """(state, rld_state, values) of a finished job; asks no database."""
        value = ret.return_value  # raises the job's exception: the caller counts it
        try:
            values = [float(value)] if n_directions == 1 else [float(v) for v in value]
        except (TypeError, ValueError):
            values = [math.nan]
        if all(math.isfinite(v) for v in values):
            return TrialState.COMPLETE, "completed", values
        status = run_status(run_dir)
        if status == "pruned":
            log.info("trial %d pruned (%s)", number, run_dir)
            return TrialState.PRUNED, "pruned", None
        tag = "diverged" if status == "diverged" else "error"
        log.warning("trial %d %s (%s)", number,
                    "diverged" if tag == "diverged" else "gave no number", run_dir)
        return TrialState.FAIL, tag, None

    def _tell(self, study: optuna.Study, trials: list[optuna.Trial], returns: Sequence[Any],
              directions: list[str]) -> list[BaseException]:
        raised: list[BaseException] = []
        for trial, ret in zip(trials, returns):
            number = self._numbers.pop(id(trial), -1)
            run_dir = _run_dir(ret)
            try:
                state, tag, values = self._outcome(number, ret, len(directions), run_dir)
            except Exception as e:  # noqa: BLE001 - the job raised: a failed trial
                raised.append(e)
                state, tag, values = TrialState.FAIL, "error", None
                log.warning("trial %d failed: %s", number, e)
            self._db(functools.partial(self._record, study, trial, tag, run_dir, values,
                                       state), f"recording trial {number}")
        return raised

    def _record(self, study: optuna.Study, trial: optuna.Trial, tag: str,
                run_dir: str | None, values: list[float] | None, state: TrialState) -> None:
        """Write a trial's outcome; a repeat after a write that went through is a no-op."""
        assert self.store is not None
        if study._storage.get_trial(trial._trial_id).state.is_finished():
            return
        if run_dir:  # the epochs a run could not report (its database was away)
            from rld.rundir import RunDir

            history = RunDir(Path(run_dir)).read_history()
            backfill(study._storage, trial._trial_id, history, self._objective)
        trial.set_user_attr(STATE_ATTR, tag)
        if run_dir:
            trial.set_user_attr(RUN_DIR_ATTR, run_dir)
        tell(study, trial, values, state)

    def _finish_mine(self) -> None:
        """On the way out: my running trials (Ctrl-C, errors) become `interrupted`."""
        assert self.store is not None
        for t in self._all_trials():
            if t.state == TrialState.RUNNING and t.user_attrs.get(OWNER_ATTR) == self._owner:
                self.store.fail(t, {STATE_ATTR: "interrupted"})

    def _wind_down(self, ok: bool) -> None:
        """Leave the study: after a sweep that went well, with retries; after an error, one
        try each (a dead sweeper's trials and claims are reaped by the next one anyway)."""
        if self.store is None:
            return
        call = self._db if ok else self._once
        steps = [(self._finish_mine, "marking this sweeper's running trials interrupted")]
        if self.guard is not None:
            self.guard.stop()
            steps.append((self.guard.leave, "dropping this sweeper's claims"))
        for fn, what in steps:
            call(fn, what)
        if self.guard is not None:
            self.guard.close()

    # -- the sweep -----------------------------------------------------------------------
    @property
    def _objective(self) -> str:
        return str(OmegaConf.select(self.config, "objective", default="top1_best"))

    def _check_pruner(self) -> None:
        """The pruner and its settings, before any work; a bad one is one line, exit 2."""
        name, settings = self._pruning
        epochs = OmegaConf.select(self.config, "trainer.epochs", default=None)
        try:
            self.pruner = pruner_spec(name, settings, int(epochs or 1))
        except ConfigError as e:
            _stop(str(e), BAD_INPUT)

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._check_pruner()
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        is_grid = (isinstance(self.sampler, functools.partial)
                   and self.sampler.func is optuna.samplers.GridSampler)
        distributions, fixed, deletes = split_overrides(params_conf)
        search = dict(getattr(self, "search_space_distributions", None) or {})  # 1.3 only
        search.update(distributions)
        for name in fixed:
            search.pop(name, None)
        self._space = (search, fixed, deletes)
        if is_grid:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in search.items()}
            self.sampler = self.sampler(grid)
        directions = self._get_directions()
        ok = False
        try:
            study = self._open_study(directions)
            with quiet_grid_sampler():
                if is_grid:
                    self._sweep_grid(study, directions)
                else:
                    self._sweep_budget(study, directions)
            self._db(lambda: self._write_results(study, directions), "writing the results")
            ok = True
        except StorageUnavailable as e:
            _stop(f"{KEY}={redact(self.url or '')}: {e}. The runs launched so far keep their "
                  "results: run the same command again when the database is back.",
                  DATABASE_GONE)
        finally:
            self._wind_down(ok)

    def _run_slots(self, study: optuna.Study, directions: list[str],
                   start: Callable[[int], list[tuple[optuna.Trial, str | None]]]) -> None:
        """Keep the launcher's slots busy (`_slots`): `start(n)` starts up to n trials (each
        with the grid point it holds, or None) while a slot is free, and each trial is
        recorded, and its point released, as soon as its job ends; until `start` gives
        nothing and no job runs.  Stops (raising the job's error) when more than
        max_failure_rate of the finished jobs raised."""
        from ._slots import open_slots

        slots = open_slots(self.launcher, self._batch_size())
        running: dict[int, tuple[optuna.Trial, str | None]] = {}
        held: set[str] = set()
        finished = failed = 0
        ok = False
        try:
            while True:
                free = slots.capacity - len(running)
                new = start(free) if free > 0 else []
                held.update(k for _, k in new if k)
                if new:
                    overrides = self._configure(study, [t for t, _ in new])
                    jobs = []
                    for (trial, key), o in zip(new, overrides):
                        running[self.job_idx] = (trial, key)
                        jobs.append((self.job_idx, list(o)))
                        self.job_idx += 1
                    slots.submit(jobs)
                if not running:
                    break
                for idx, ret in slots.wait():
                    trial, key = running.pop(idx)
                    raised = self._tell(study, [trial], [ret], directions)
                    if key:
                        self._release([key], ok=True)
                        held.discard(key)
                    finished += 1
                    failed += len(raised)
                    if raised and failed / finished > self.max_failure_rate:
                        log.error("%d of %d finished trials raised (max_failure_rate=%s)",
                                  failed, finished, self.max_failure_rate)
                        ret.return_value  # noqa: B018 - re-raises the job's exception
            ok = True
        finally:
            if not ok:
                self._release(sorted(held), ok=False)
            slots.close(ok)

    def _settled(self, names: Sequence[str]) -> set[tuple]:
        """Grid points (values in the order of `names`) that are not to run again: those with
        a completed trial, one failed as a settled run (diverged), or one pruned by this
        sweeper's pruner (with another pruner, or none, a pruned point runs again: its run
        resumes from its checkpoint, "promotion")."""
        out = set()
        for t in self._all_trials():
            if all(n in t.params for n in names) and self._closed(t):
                out.add(tuple(t.params[n] for n in names))
        return out

    def _closed(self, t: optuna.trial.FrozenTrial) -> bool:
        """Whether a finished trial settles its point."""
        from rld.record import SETTLED

        return (t.state == TrialState.COMPLETE
                or (t.state == TrialState.FAIL and t.user_attrs.get(STATE_ATTR) in SETTLED)
                or (t.state == TrialState.PRUNED and prunes(self.pruner)
                    and t.user_attrs.get(PRUNER_ATTR) == spec_json(self.pruner)))

    def _claim_batch(self, candidates: Sequence[int], grid: Grid, keys: Sequence[str],
                     size: int) -> list[int]:
        """Up to `size` of the grid points `candidates` not settled yet, claimed (with a
        guard) so that no other sweeper runs them meanwhile.  Safe to repeat: a point this
        sweeper holds already is claimed again."""
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

    def _release(self, keys: list[str], ok: bool) -> None:
        if self.guard is not None and keys:
            (self._db if ok else self._once)(lambda: self.guard.release(keys),
                                             "releasing grid points")

    def _sweep_grid(self, study: optuna.Study, directions: list[str]) -> None:
        grid = grid_of(self.sampler)
        names, grids = grid.names, grid.points
        keys = [",".join(f"{n}={v!r}" for n, v in zip(names, g)) for g in grids]
        limit = len(grids) if self.n_trials is None else min(int(self.n_trials), len(grids))
        done_before = self._db(lambda: self._settled(names), "reading the study")
        todo = [i for i, g in enumerate(grids) if g not in done_before][: max(0, limit
                                                                             - len(done_before))]
        log.info("grid of %d point(s) (%s): %d settled, %d to run, %d at a time", len(grids),
                 " x ".join(f"{n} {list(grid.choices[n])}" for n in names),
                 len(done_before), len(todo), self._batch_size())
        tried: set[int] = set()

        def start(n: int) -> list[tuple[optuna.Trial, str | None]]:
            self._db(self._fail_orphans, "looking for stopped sweepers")
            candidates = [i for i in todo if i not in tried]
            if not candidates:
                return []
            batch = self._db(functools.partial(self._claim_batch, candidates, grid, keys, n),
                             "claiming grid points")
            tried.update(batch)
            out = []
            try:
                for i in batch:
                    out.append((self._new_trial(grid_id=i), keys[i]))
            except BaseException:
                self._release([keys[i] for i in batch], ok=False)
                raise
            return out

        self._run_slots(study, directions, start)
        settled = self._db(lambda: self._settled(names), "reading the study")
        left = [keys[i] for i in todo if grids[i] not in settled]
        if left:
            log.info("%d grid point(s) not settled by this sweeper (running elsewhere, "
                     "failed, or pruned by another pruner): %s", len(left), "; ".join(left))

    def _budget_used(self, trials: list[optuna.trial.FrozenTrial]) -> int:
        """Trials that count against n_trials: finished ones (except interrupted), this
        sweeper's running ones (its slots start trials while others still run) and those
        running in other live sweepers."""
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
                if owner is None or owner == me:
                    n += 1
                elif self.guard is not None:
                    if owner not in alive:
                        alive[owner] = self.guard.alive(owner)
                    n += alive[owner]
        return n

    def _promotable(self, trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
        """Points of trials pruned by another pruner (or none now) that no trial settles or
        runs: run again first, they resume from their checkpoints ("promotion")."""
        def point(t: optuna.trial.FrozenTrial) -> tuple:
            return tuple(sorted(t.params.items()))

        taken = {point(t) for t in trials
                 if t.state == TrialState.RUNNING or (t.state.is_finished() and self._closed(t))}
        out: dict[tuple, dict[str, Any]] = {}
        for t in trials:
            if t.state == TrialState.PRUNED and t.params and point(t) not in taken:
                out.setdefault(point(t), dict(t.params))
        return list(out.values())

    def _start_budgeted(self, n: int) -> list[optuna.Trial]:
        """Up to `n` trials of a budgeted study, counted and started under the budget claim
        so that sweepers sharing the study never start more than n_trials together:
        interrupted points first, then promoted ones, then the sampler's."""
        hold = (self.guard.hold(BUDGET_CLAIM, call=self._db) if self.guard is not None
                else contextlib.nullcontext())
        with hold:
            trials = self._db(self._all_trials, "reading the study")
            n = min(n, max(0, int(self.n_trials) - self._budget_used(trials)))
            again = self._resume + [p for p in self._promotable(trials) if p not in self._resume]
            reruns, self._resume = again[:n], [p for p in self._resume if p not in again[:n]]
            return ([self._new_trial(params=p) for p in reruns]
                    + [self._new_trial() for _ in range(n - len(reruns))])

    def _own_draws(self, study: optuna.Study) -> None:
        """A seeded sampler draws the same points in every process that starts it: a sweeper
        joining a study that has trials, or other live sweepers, gets a seed of its own,
        derived from the seed, the trials and the sweepers it found (a lone sweeper on a new
        study keeps the configured seed: its study is reproducible)."""
        conf = self.config.hydra.sweeper.get("sampler")
        if conf is None or conf.get("seed") is None or self._company == (0, 0):
            return
        trials, others = self._company
        seed = zlib.crc32(f"{conf.seed}:{trials}:{others}".encode()) & 0x7FFFFFFF
        own = OmegaConf.create(OmegaConf.to_container(conf, resolve=True))
        own.seed = seed
        self.sampler = study.sampler = sampler_of(own)
        log.info("sampler seed %s -> %d: the study has %d trial(s) and %d other live "
                 "sweeper(s); this sweeper draws its own points", conf.seed, seed, trials,
                 others)

    def _sweep_budget(self, study: optuna.Study, directions: list[str]) -> None:
        if self.n_trials is None:
            raise ValueError("hydra.sweeper.n_trials (hparams.n_trials) must be set for "
                             f"sampler {type(self.sampler).__name__}")
        self._own_draws(study)

        def start(n: int) -> list[tuple[optuna.Trial, str | None]]:
            self._resume += self._db(self._fail_orphans, "looking for stopped sweepers")
            return [(t, None) for t in self._start_budgeted(n)]

        self._run_slots(study, directions, start)

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
        from rld.io import write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, OmegaConf.to_yaml(OmegaConf.create(results)))  # atomic
        log.info("results: %s (%s)", path, ", ".join(f"{v} {k}" for k, v in states.items()))
