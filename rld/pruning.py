"""Pruning: a run's per-epoch reports to its Optuna trial, and the pruners that stop runs
whose curves fall behind.

The `rld_optuna` sweeper gives every job the address of its trial in the job's config,
`hparams.trial` (`{study, number, storage, retry_s}`: no global state, so a job on another
node or in a Slurm allocation finds it the same way), and makes each trial with its pruner as
the user attribute `rld_pruner` (`pruner_spec`: the name and the settings that pruner reads).
The trial, not the job's config, says which pruner decides: a sweeper run again with another
pruner (or none) gives its new trials the new one, while the runs of a shared study agree.

A run with a trial (`TrialReporter`, on rank 0 only; the engine hands the decision to every
rank) reports its objective's metric after every epoch as the trial's intermediate value at
step = epoch (`objective_values`: `top1_best` the best test top-1 so far, `top1` the epoch's
test top-1, `top5` its top-5), then asks the pruner.  Reports come from the run's history
after its checkpoint is written, so:

* a resumed run (or a run promoted into a new trial) first reports the epochs of its history
  that the trial lacks, in order, and never a step at or below one the trial already has:
  nothing twice, nothing out of order;
* an epoch checkpointed but not reported (a process killed in between) is reported by the
  next process, which then asks the pruner.

A database that does not answer is retried for `retry_s` seconds (`rld.storage.Backoff`), then
the run logs it once and trains on without pruning: its results are in its run directory, and
the sweeper reports the missing epochs from `history.csv` when it records the trial.

Optuna is reached through its storage API (`RDBStorage`: `get_trial_id_from_study_id_trial_
number`, `get_trial`, `set_trial_intermediate_value`) and `BasePruner.prune(study,
FrozenTrial)`, the same on optuna 2.10 and 4-5.  One workaround: optuna 2's HyperbandPruner
puts a trial in a bracket by Python's `hash` of its name, which differs between processes
(PYTHONHASHSEED), so the run, its resumed process and the sweeper's sampler would disagree;
`_StableHyperband` uses crc32, as optuna >= 3 does.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from rld.errors import ConfigError

log = logging.getLogger("rld")

PRUNERS = ("none", "median", "percentile", "sha", "hyperband")
PRUNER_ATTR = "rld_pruner"  # a trial's user attribute: its pruner (`pruner_spec`, as JSON)
TRIAL_KEY = "hparams.trial"  # where a job's config holds its trial's address
KEY = "hparams.pruning"  # where the user sets the pruners' settings


@dataclass
class PruningSettings:
    """The pruners' settings (`hparams.pruning.*`), in epochs where they count steps; each
    pruner reads its own (`USED`), as Optuna's pruner of that name takes them."""

    # median, percentile: trials that must complete before any trial is pruned
    n_startup_trials: int = 5
    # median, percentile: epochs during which a run is never pruned
    n_warmup_steps: int = 0
    # median, percentile: ask every this many epochs (after the warm-up)
    interval_steps: int = 1
    # median, percentile: trials that must have reported an epoch before a run is pruned there
    n_min_trials: int = 1
    # percentile: a run below this percentile of the others at an epoch is pruned (median: 50)
    percentile: float = 25.0
    # sha, hyperband: epochs of the first rung ("auto": sha estimates it from the first
    # completed trial); rungs at min_resource * reduction_factor ** (rate + k)
    min_resource: Any = 1
    # hyperband: epochs of the longest bracket ("auto": trainer.epochs)
    max_resource: Any = "auto"
    # sha, hyperband: 1 in reduction_factor trials goes on at each rung
    reduction_factor: int = 3
    # sha: the first rung is at min_resource * reduction_factor ** min_early_stopping_rate
    min_early_stopping_rate: int = 0
    # sha, hyperband: trials that must reach a rung before any is promoted from it
    bootstrap_count: int = 0


_PERCENTILE = ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials")
USED: dict[str, tuple[str, ...]] = {
    "none": (),
    "median": _PERCENTILE,
    "percentile": ("percentile", *_PERCENTILE),
    "sha": ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"),
    "hyperband": ("min_resource", "max_resource", "reduction_factor", "bootstrap_count"),
}
# (lowest allowed value, what the message says) of the integer settings
_AT_LEAST = {"n_startup_trials": 0, "n_warmup_steps": 0, "interval_steps": 1, "n_min_trials": 1,
             "reduction_factor": 2, "min_early_stopping_rate": 0, "bootstrap_count": 0}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_setting(name: str, value: Any, pruner: str) -> None:
    where = f"{KEY}.{name}={value!r} is not allowed"
    if name in _AT_LEAST:
        if not _is_int(value) or value < _AT_LEAST[name]:
            raise ConfigError(f"{where}: an integer >= {_AT_LEAST[name]}")
    elif name == "percentile":
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not 0 <= value <= 100:
            raise ConfigError(f"{where}: a number in [0, 100]")
    elif name == "min_resource":
        auto = pruner == "sha" and value == "auto"
        if not auto and (not _is_int(value) or value < 1):
            raise ConfigError(f"{where}: an integer >= 1 (epochs)"
                              + (" or auto" if pruner == "sha" else ""))
    elif name == "max_resource" and value != "auto" and (not _is_int(value) or value < 1):
        raise ConfigError(f"{where}: an integer >= 1 (epochs) or auto (trainer.epochs)")


def pruner_spec(name: str, settings: Mapping[str, Any] | None, epochs: int) -> dict[str, Any]:
    """The pruner `name` with the settings it reads, checked: {"name": ..., setting: value}
    (hyperband's max_resource "auto" resolved to `epochs`).  ConfigError (one line naming the
    key and what is allowed) for an unknown pruner, an unknown setting or a bad value."""
    if name not in PRUNERS:
        raise ConfigError(f"hparams.pruner={name!r} is not allowed: use one of "
                          f"{', '.join(PRUNERS)}")
    values = asdict(PruningSettings())
    for key, value in dict(settings or {}).items():
        if key not in values:
            raise ConfigError(f"{KEY}.{key} is not a pruner setting; the settings: "
                              f"{', '.join(f.name for f in fields(PruningSettings))}")
        values[key] = value
    spec: dict[str, Any] = {"name": name}
    for key in USED[name]:
        _check_setting(key, values[key], name)
        spec[key] = values[key]
    if name == "hyperband":
        if spec["max_resource"] == "auto":
            spec["max_resource"] = int(epochs)
        if spec["max_resource"] <= spec["min_resource"]:
            raise ConfigError(f"{KEY}.max_resource={spec['max_resource']} is not allowed: "
                              f"more epochs than min_resource={spec['min_resource']}")
    return spec


def spec_json(spec: Mapping[str, Any]) -> str:
    """A spec as the canonical JSON stored on trials (equal specs, equal strings)."""
    return json.dumps(dict(spec), sort_keys=True)


def spec_text(spec: Mapping[str, Any] | None) -> str:
    """`median(n_startup_trials=5, ...)`, or `none`."""
    if not spec or spec.get("name", "none") == "none":
        return "none"
    args = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}({args})"


def prunes(spec: Mapping[str, Any] | None) -> bool:
    return bool(spec) and spec.get("name", "none") != "none"


def build_pruner(spec: Mapping[str, Any] | None):
    """Optuna's pruner of a spec (`pruner_spec`); NopPruner for none."""
    import optuna

    spec = dict(spec or {"name": "none"})
    name = spec.pop("name", "none")
    p = optuna.pruners
    if name == "none":
        return p.NopPruner()
    if name == "median":
        return p.MedianPruner(**spec)
    if name == "percentile":
        return p.PercentilePruner(**spec)
    if name == "sha":
        return p.SuccessiveHalvingPruner(**spec)
    if name == "hyperband":
        return _stable_hyperband()(**spec)
    raise ConfigError(f"hparams.pruner={name!r} is not allowed: use one of {', '.join(PRUNERS)}")


def _stable_hyperband():
    """HyperbandPruner with a bracket per trial that every process agrees on (see the
    module's docstring): optuna >= 3's crc32 of `<study>_<number>`."""
    import binascii

    import optuna

    class _StableHyperband(optuna.pruners.HyperbandPruner):
        def _get_bracket_id(self, study, trial) -> int:
            if len(self._pruners) == 0:
                return 0
            n = (binascii.crc32(f"{study.study_name}_{trial.number}".encode())
                 % self._total_trial_allocation_budget)
            for bracket_id in range(self._n_brackets):
                n -= self._trial_allocation_budgets[bracket_id]
                if n < 0:
                    return bracket_id
            raise AssertionError("unreachable: the budgets cover every n")

    return _StableHyperband


# ------------------------------------------------------------------ what a run reports
METRIC_OF = {"top1_best": "test_top1", "top1": "test_top1", "top5": "test_top5"}


def objective_values(history: list[Mapping[str, Any]], objective: str) -> list[tuple[int, float]]:
    """(epoch, value) of the objective `objective` after each epoch of a run's history: what
    the run reports (`top1_best`: the best test top-1 up to that epoch)."""
    key = METRIC_OF[objective]
    out, best = [], -math.inf
    for row in history:
        value = float(row[key])
        if objective == "top1_best":
            best = max(best, value)
            value = best
        out.append((int(row["epoch"]), value))
    return out


def missing_reports(values: list[tuple[int, float]], reported: Mapping[int, float]
                    ) -> list[tuple[int, float]]:
    """The (epoch, value) pairs to report to a trial that has `reported`: those after its
    last step, in order (never a step twice, never one before a reported one)."""
    last = max(reported, default=0)
    return [(e, v) for e, v in values if e > last]


@dataclass(frozen=True)
class TrialAddress:
    """Where a job's trial is: its study, its number, the study's storage (None: the run's
    `hparams.storage`, for a URL with a password that no override may carry) and the seconds
    a report retries a silent database."""

    study: str
    number: int
    storage: str | None
    retry_s: float = 30.0

    def overrides(self) -> list[str]:
        """The job overrides that give a job this address (`hparams.trial`)."""
        def q(s: str) -> str:
            return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"

        storage = "null" if self.storage is None else q(self.storage)
        return [f"++{TRIAL_KEY}={{study:{q(self.study)},number:{self.number},"
                f"storage:{storage},retry_s:{self.retry_s}}}"]


def trial_address(cfg) -> TrialAddress | None:
    """The address in a run's config (None: the run is no Optuna trial)."""
    hp = cfg.get("hparams") or {}
    trial = hp.get("trial") if hasattr(hp, "get") else None
    if not trial:
        return None
    storage = trial.get("storage") or hp.get("storage")
    return TrialAddress(str(trial["study"]), int(trial["number"]),
                        None if storage is None else str(storage),
                        float(trial.get("retry_s", 30.0)))


_STORAGES: dict[str, Any] = {}  # url -> RDBStorage: the reporters of a pack share one


def _storage(url: str):
    import optuna

    from rld.storage import engine_kwargs

    if url not in _STORAGES:
        kwargs = engine_kwargs(url)
        if url.startswith("sqlite"):
            # a run writes once an epoch: a new connection each time sees the file as it is
            # now (a shared file system that went away and came back), not a stale handle
            from sqlalchemy.pool import NullPool

            kwargs["poolclass"] = NullPool
        logging.getLogger("alembic").setLevel(logging.WARNING)  # its set-up logs at INFO
        _STORAGES[url] = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    return _STORAGES[url]


class TrialReporter:
    """A run's reports to its trial and the pruner's answers (call it on rank 0 only).

    `update(history)` after each epoch (and once when the run starts, for a resumed run):
    reports the epochs the trial lacks, asks the trial's pruner (not after the last of the
    run's `epochs`: nothing is left to save), and returns why the run is to stop (None: go
    on).  A database that stays away for `retry_s` seconds, or a trial
    that cannot take reports (finished by a sweeper in the meantime, gone), turns the
    reporter off with one log line: the run trains on without pruning."""

    def __init__(self, address: TrialAddress, objective: str, epochs: int) -> None:
        self.address, self.objective, self.epochs = address, objective, int(epochs)
        self.off: str | None = None  # why reports stopped
        self.spec: dict[str, Any] | None = None
        self._conn: tuple[Any, Any, int, Any] | None = None  # storage, study, trial id, pruner
        self._ask = False  # a report went through that the pruner has not judged yet

    @property
    def label(self) -> str:
        return f"trial {self.address.number} of study {self.address.study}"

    def update(self, history: list[Mapping[str, Any]]) -> str | None:
        if self.off is not None or not history:
            return None
        from rld.storage import Backoff

        try:
            return Backoff(budget_s=self.address.retry_s).call(
                lambda: self._update(history), f"reporting to {self.label}")
        except Exception as e:  # noqa: BLE001 - nothing here may stop the training
            from rld.storage import one_line

            self.off = one_line(e)
            log.warning("%s: %s; training on without pruning (the sweeper reports this "
                        "run's epochs from its history.csv when it records the trial)",
                        self.label, self.off)
            return None

    def _connect(self) -> tuple[Any, Any, int, Any]:
        if self._conn is None:
            import optuna

            if not self.address.storage:
                raise ValueError("no storage URL (hparams.storage is null)")
            storage = _storage(self.address.storage)
            study_id = storage.get_study_id_from_name(self.address.study)
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id,
                                                                       self.address.number)
            attr = storage.get_trial(trial_id).user_attrs.get(PRUNER_ATTR)
            self.spec = json.loads(attr) if attr else {"name": "none"}
            pruner = build_pruner(self.spec)
            study = optuna.load_study(study_name=self.address.study, storage=storage,
                                      pruner=pruner)
            self._conn = (storage, study, trial_id, pruner)
            log.info("reporting %s to %s (pruner: %s)", self.objective, self.label,
                     spec_text(self.spec))
        return self._conn

    def _update(self, history: list[Mapping[str, Any]]) -> str | None:
        """One try: report what the trial lacks (read fresh, so a retry repeats nothing),
        then ask the pruner once about the last step."""
        storage, study, trial_id, pruner = self._connect()
        trial = storage.get_trial(trial_id)
        values = objective_values(history, self.objective)
        for epoch, value in missing_reports(values, trial.intermediate_values):
            storage.set_trial_intermediate_value(trial_id, epoch, value)
            self._ask = True
        if not self._ask or not prunes(self.spec):
            return None
        trial = storage.get_trial(trial_id)
        # after the last epoch there is nothing left to save: the run completes
        stop = trial.last_step < self.epochs and pruner.prune(study, trial)
        self._ask = False
        if not stop:
            return None
        return (f"pruned at epoch {trial.last_step} by {spec_text(self.spec)} ({self.label}; "
                f"{self.objective} {trial.intermediate_values[trial.last_step]:.2f})")


def reporter_for(cfg) -> TrialReporter | None:
    """The reporter of a run started by the Optuna sweeper (None for any other run)."""
    address = trial_address(cfg)
    return None if address is None else TrialReporter(address, str(cfg.objective),
                                                      int(cfg.trainer.epochs))


def backfill(storage: Any, trial_id: int, history: list[Mapping[str, Any]],
             objective: str) -> int:
    """Report the epochs of a finished run's `history` that its trial lacks (a run whose
    reports stopped): the number reported.  The sweeper calls it before it records the
    trial, through its retries."""
    trial = storage.get_trial(trial_id)
    todo = missing_reports(objective_values(history, objective), trial.intermediate_values)
    for epoch, value in todo:
        storage.set_trial_intermediate_value(trial_id, epoch, value)
    return len(todo)
