"""Run directories and what each one recorded: finding them, reading each one's record
(`rld.record`, `metrics.json`) into a `Run` (a row of ``runs.csv``), and marking duplicates.

A directory without a record (killed before the engine wrote one, or made by a version that
wrote it only at the end) is read from its saved ``.hydra/config.yaml`` with OmegaConf, or,
failing that, from its path (``<dataset>/<pair>/<distiller>/<point>/seed=N``); a directory
with a record never needs its config.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from rld.distillers import DISTILLERS, followed_settings, setting_keys
from rld.errors import ConfigError, RecordError
from rld.record import RECORD, RunRecord, read_record
from rld.registry import load_plugins

log = logging.getLogger("rld")

#: what a run directory is to the tables; every status but the first gives no number (a
#: pruned run, stopped early by an Optuna pruner, shows the epoch it stopped at)
STATUSES = ("completed", "diverged", "failed", "incomplete", "pruned")
PROBLEMS = STATUSES[1:]
#: folders never searched for runs (besides hidden ones)
SKIP_DIRS = frozenset({"checkpoints", "__pycache__", "wandb", "lightning_logs", "tb"})
CONFIG = os.path.join(".hydra", "config.yaml")


def run_columns() -> tuple[str, ...]:
    """The columns of runs.csv: who the run is, every setting of every registered
    distiller (`rld.distillers.setting_keys`), what it gave, where."""
    return ("dataset", "pair", "role", "teacher", "student", "arch", "distiller",
            *setting_keys(), "seed", "epochs", "epochs_done", "pruned_epoch", "status", "top1",
            "top1_best",
            "top5", "wall_s", "teacher_top1", "message", "duplicate_of", "path")


def as_float(x: Any) -> float:
    """A number as a float; NaN for anything else (None, text, a damaged value)."""
    if isinstance(x, bool):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def as_int(x: Any) -> int | None:
    v = as_float(x)
    return int(v) if math.isfinite(v) and not isinstance(x, bool) else None


def setting_value(x: Any) -> Any:
    """A distiller setting as a hashable, sortable, printable value."""
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, str) and x.lower() in ("true", "false"):
        return x.lower() == "true"
    if isinstance(x, list | tuple):
        return str(list(x))
    return str(x)


def status_counts(runs: Iterable[Run]) -> Counter:
    return Counter(r.status for r in runs)


@dataclass
class Run:
    """One run directory as the tables see it (one row of runs.csv)."""

    dataset: str
    pair: str
    role: str
    teacher: str | None  # the teacher's architecture, where the run knows it
    student: str | None  # the student's architecture, where the run knows it
    arch: str | None  # the architecture this run trained
    distiller: str
    settings: dict[str, Any]
    seed: int | None
    epochs: int | None  # configured
    epochs_done: int | None
    status: str  # one of STATUSES
    pruned_epoch: int | None = None  # the epoch a pruned run stopped after
    top1: float = math.nan
    top1_best: float = math.nan
    top5: float = math.nan
    wall_s: float = math.nan
    teacher_top1: float = math.nan
    message: str = ""  # the record's message, or why it could not be read
    path: str = ""  # as shown in the outputs (relative to the working directory if inside it)
    unreadable: bool = False  # metrics.json exists but cannot be read (status failed)
    duplicate_of: str = ""

    @cached_property
    def unit(self) -> tuple:
        """What the run measures: a vanilla-trained architecture or a distilled pair."""
        if self.role == "teacher":
            return ("teacher", self.arch)
        if self.distiller == "vanilla":
            return ("student", self.arch)
        return (self.distiller, self.pair)

    @cached_property
    def point(self) -> tuple:
        """The distiller's settings (those it registered; every recorded one for a distiller
        that is not registered here), as sorted (name, value) pairs."""
        if self.unit[0] in ("teacher", "student"):
            return ()
        s = self.settings
        keys = DISTILLERS.get(self.distiller).setting_names() \
            if self.distiller in DISTILLERS else None
        follows = followed_settings()
        out = []
        for k in sorted(s if keys is None else keys):
            v = s.get(k)
            src = follows.get(k)
            if src is not None and src in s and v == s[src]:
                v = src  # the default: follows `src`, not a setting of its own
            out.append((k, v))
        return tuple(out)

    def metric(self, key: str) -> float:
        return getattr(self, key)

    def column(self, name: str) -> Any:
        """The value of a `run_columns()` column: a field of the run, else a setting."""
        return getattr(self, name) if name in _FIELDS else self.settings.get(name)


_FIELDS = frozenset(f.name for f in dataclasses.fields(Run))


def find_run_dirs(roots: Iterable[str | Path]) -> list[Path]:
    """Every directory under ``roots`` that holds ``.hydra/config.yaml``, sorted.

    Hidden folders, ``checkpoints`` and the like are not descended into; sweep-level
    files (``multirun.yaml``, Optuna databases) are simply never looked at.
    """
    found: dict[str, Path] = {}
    for root in roots:
        stack = [str(root)]
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    entries = list(it)
            except OSError:
                continue
            for e in entries:
                if not e.is_dir(follow_symlinks=False):
                    continue
                if e.name == ".hydra":
                    if os.path.isfile(os.path.join(e.path, "config.yaml")):
                        found.setdefault(os.path.realpath(d), Path(d))
                elif not e.name.startswith(".") and e.name not in SKIP_DIRS:
                    stack.append(e.path)
    return sorted(found.values(), key=str)


def display_path(p: str | Path, cwd: str) -> str:
    ap = os.path.abspath(p)
    try:
        if os.path.commonpath([ap, cwd]) == cwd:
            return os.path.relpath(ap, cwd)
    except ValueError:
        pass
    return ap


def read_run(run_dir: Path, cwd: str | None = None) -> Run:
    """One run directory as a Run; never raises for a damaged directory."""
    path = display_path(run_dir, os.path.abspath(cwd or os.getcwd()))
    try:
        record = read_record(run_dir)
    except RecordError as e:
        run = _run_from_record(_record_from_config(run_dir), run_dir, path)
        shown = os.path.join(path, RECORD)
        run.status, run.unreadable = "failed", True
        run.message = str(e).replace(str(Path(run_dir) / RECORD), shown, 1)
        return run
    if record is not None and record.plugins:
        _load_plugins(tuple(record.plugins))
    return _run_from_record(record or _record_from_config(run_dir), run_dir, path)


@functools.cache
def _load_plugins(modules: tuple[str, ...]) -> None:
    """The plugins a run was made with (its distiller's label and settings are theirs),
    where they import here; without them its distiller shows by name."""
    try:
        load_plugins(modules)
    except (ConfigError, ImportError) as e:
        log.warning("plugins %s of some runs do not import here (%s): their distillers "
                    "show by name", ", ".join(modules), e)


def _status(record: RunRecord) -> str:
    if record.status in ("running", "interrupted"):
        return "incomplete"
    if record.status == "pruned":
        return "pruned"
    if record.status not in ("completed", "diverged"):
        return "failed"  # an error stopped the run (or a status this version does not know)
    finite = math.isfinite(as_float(record.top1)) and math.isfinite(as_float(record.top1_best))
    return "completed" if record.status == "completed" and finite else "diverged"


def _run_from_record(record: RunRecord, run_dir: Path, path: str) -> Run:
    guess = _guess_from_path(run_dir)
    distiller = str(record.distiller or guess.get("distiller") or "vanilla")
    role = str(record.role or ("teacher" if distiller == "teacher" else "student"))
    distiller = "vanilla" if distiller == "teacher" else distiller
    arch = None if record.student is None else str(record.student)
    status = _status(record)
    epochs = as_int(record.epochs)
    done = as_int(record.epochs_done)
    return Run(
        dataset=str(record.dataset or guess.get("dataset") or "unknown"),
        pair=str(record.pair or guess.get("pair") or "unknown"), role=role,
        teacher=arch if role == "teacher" else _str_or_none(record.teacher),
        student=None if role == "teacher" else arch, arch=arch, distiller=distiller,
        settings={k: setting_value(v) for k, v in (record.settings or {}).items()},
        seed=as_int(record.seed if record.seed is not None else guess.get("seed")),
        epochs=epochs, epochs_done=epochs if status == "completed" and not done else done,
        status=status, pruned_epoch=as_int(record.pruned_epoch) if status == "pruned" else None,
        top1=as_float(record.top1), top1_best=as_float(record.top1_best),
        top5=as_float(record.top5), wall_s=as_float(record.wall_s),
        teacher_top1=as_float(record.teacher_top1),
        message=" ".join(str(record.message or "").split()), path=path,
    )  # fmt: skip


def _str_or_none(x: Any) -> str | None:
    return None if x is None else str(x)


def _guess_from_path(run_dir: Path) -> dict[str, Any]:
    """<dataset>/<pair>/<distiller or teacher>/<point>/seed=N, as the run directories are
    named; nothing when the path does not end that way."""
    parts = Path(run_dir).parts
    m = re.fullmatch(r"seed=(-?\d+)", parts[-1]) if parts else None
    if m is None or len(parts) < 5:
        return {}
    return {"dataset": parts[-5], "pair": parts[-4], "distiller": parts[-3],
            "seed": int(m.group(1))}  # fmt: skip


def _record_from_config(run_dir: Path) -> RunRecord:
    """What the saved config says of a run without a readable record (status "running")."""
    cfg = read_saved_config(run_dir)

    def get(dotted: str) -> Any:
        node: Any = cfg
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    role = get("role")
    distiller = get("distiller.name")
    dist = get("distiller")
    return RunRecord(
        dataset=get("dataset.name"), pair=get("pair.name"), role=role, distiller=distiller,
        student=get("pair.teacher" if role == "teacher" else "pair.student"),
        teacher=get("pair.teacher") if distiller not in (None, "vanilla") else None,
        settings={k: v for k, v in dist.items() if k != "name"} if isinstance(dist, dict) else {},
        seed=get("seed"), epochs=get("trainer.epochs"),
    )  # fmt: skip


def read_saved_config(run_dir: Path) -> dict:
    """``.hydra/config.yaml`` as plain values, each interpolation resolved where it can be
    (a value that cannot be, e.g. one naming a resolver of another process, stays as
    written); {} when the file cannot be read."""
    import yaml
    from omegaconf import OmegaConf

    try:  # PyYAML's C parser, then OmegaConf: twice as fast as OmegaConf.load
        with open(os.path.join(run_dir, CONFIG), encoding="utf-8") as f:
            data = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        cfg = OmegaConf.create(data) if isinstance(data, dict) else None
    except Exception:  # a damaged file only costs this run its details
        cfg = None
    if cfg is None:
        return {}
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return _resolve_each(cfg)


def _resolve_each(node) -> dict:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    raw = OmegaConf.to_container(node, resolve=False)
    out = {}
    for key, written in raw.items():
        try:
            value = node[key]
            if isinstance(value, DictConfig):
                value = _resolve_each(value)
            elif isinstance(value, ListConfig):
                value = OmegaConf.to_container(value, resolve=True)
        except Exception:
            value = written
        out[key] = value
    return out


def collect_runs(roots: Iterable[str | Path], cwd: str | None = None) -> list[Run]:
    """Read every run under ``roots`` (sorted by path) and mark duplicates."""
    runs = [read_run(d, cwd) for d in find_run_dirs(roots)]
    runs.sort(key=lambda r: r.path)
    mark_duplicates(runs)
    return runs


def mark_duplicates(runs: list[Run]) -> None:
    """Fill ``duplicate_of`` for every run whose configuration and seed were seen already.

    A run with numbers (completed or diverged) is kept over one without; then the first
    by sorted path."""
    by_key: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        by_key[(r.dataset, r.unit, r.point, r.seed, r.epochs)].append(r)
    for group in by_key.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda r: (r.status not in ("completed", "diverged"), r.path))
        for r in group[1:]:
            r.duplicate_of = group[0].path


def runs_frame(runs: list[Run]):
    """The runs as a pandas DataFrame (the columns of ``runs.csv``)."""
    import pandas as pd

    columns = run_columns()
    rows = [{c: r.column(c) for c in columns} for r in runs]
    return pd.DataFrame(rows, columns=list(columns))
