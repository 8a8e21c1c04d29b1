"""Turn sweep run directories into the paper's results tables.

``python -m rld.table [SWEEP_DIR ...] [--out DIR] [--metric top1_best|top1]``

Every directory holding ``.hydra/config.yaml`` under the given roots (default ``sweeps/``)
is one run; its ``metrics.json`` (written by the engine at the end of a run) gives the
numbers.  The outputs, all under ``--out`` (default ``results/``):

- ``runs.csv``: one row per run directory, finished or not;
- ``<dataset>.md|.csv|.tex``: one row per teacher/student pair with the teacher, the
  student trained alone, and the best grid point of each distiller, beside the values
  reported in the literature (``rld/data/paper_results.csv``);
- ``<dataset>/<pair>_<distiller>_grid.md|.png``: the beta x tau grid of every distiller
  swept over more than one point.

Rules (footnotes of each table count what they affect):

- Runs are grouped by data set, pair, distiller and all the distiller's settings; a
  vanilla run (role teacher, or role student with distiller vanilla) is grouped by the
  architecture it trains, so the same teacher trained under two pair names is one group.
  Settings that mean nothing for a distiller are ignored (all of them for vanilla, alpha,
  beta and scd_tau for KD, scd_tau for DKD).
- Within a group, runs of different ``trainer.epochs`` are never averaged together: the
  epochs value with the most runs is used (tie: the larger one).
- The same configuration and seed found twice (two sweep directories) is a duplicate: a
  run with metrics beats one without, then the first by sorted path is kept.
- A run without ``metrics.json`` is *incomplete*; a run whose status is ``diverged`` or
  whose accuracies are not finite is *diverged*; any other status or an unreadable
  ``metrics.json`` is *failed*.  None of them enter a mean; grid cells show them as text.
- Output is byte-identical for identical input (sorted everything, fixed formats, PNGs
  without timestamps or software metadata).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

METRICS = ("top1_best", "top1")
METRIC_TEXT = {
    "top1_best": "top-1 accuracy (%) at the best epoch (`top1_best`, the published convention)",
    "top1": "top-1 accuracy (%) at the last epoch (`top1`)",
}
#: distillers with a column of their own, in this order; others follow sorted
TABLE_DISTILLERS = ("kd", "dkd", "rld")
DISTILLER_LABEL = {"kd": "KD", "dkd": "DKD", "rld": "RLD"}
#: distiller settings that are meaningless for a distiller (never form grid points)
IGNORED_SETTINGS = {
    "kd": {"alpha", "beta", "scd_tau"},
    "dkd": {"scd_tau"},
}
STATUSES = ("completed", "diverged", "failed", "incomplete")
RUN_COLUMNS = [
    "dataset", "pair", "role", "teacher", "student", "arch", "distiller",
    "alpha", "beta", "tau", "scd_tau", "standardize", "warmup", "ce_weight", "kd_weight",
    "seed", "epochs", "epochs_done", "status", "top1", "top1_best", "top5", "wall_s",
    "teacher_top1", "duplicate_of", "path",
]  # fmt: skip
SKIP_DIRS = {"checkpoints", "__pycache__", "wandb", "lightning_logs"}
NA = "—"


# --------------------------------------------------------------------------------------
# collecting runs
# --------------------------------------------------------------------------------------


def find_run_dirs(roots: list[str | Path]) -> list[Path]:
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
    return sorted(found.values(), key=lambda p: str(p))


class _Unresolved(Exception):
    pass


_MISSING = object()
_INTERP = re.compile(r"\$\{([^${}]+)\}")


def _lookup(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


def _resolve(cfg: dict, value: Any, depth: int = 0) -> Any:
    """Resolve plain absolute ``${a.b}`` interpolations (nested ones too) of a saved
    Hydra config without OmegaConf; custom resolvers and relative keys are not handled."""
    if not isinstance(value, str) or "${" not in value:
        return value
    if depth > 16:
        raise _Unresolved(value)
    while True:
        m = _INTERP.search(value)
        if m is None:
            return value
        key = m.group(1).strip()
        if ":" in key or key.startswith("."):
            raise _Unresolved(value)
        target = _lookup(cfg, key)
        if target is _MISSING:
            raise _Unresolved(value)
        target = _resolve(cfg, target, depth + 1)
        if m.start() == 0 and m.end() == len(value):
            return target
        value = value[: m.start()] + str(target) + value[m.end() :]


def _cfg_get(cfg: dict, dotted: str, default: Any = None) -> Any:
    value = _lookup(cfg, dotted)
    if value is _MISSING:
        return default
    try:
        return _resolve(cfg, value)
    except _Unresolved:
        return default


def _float(x: Any) -> float:
    if isinstance(x, bool):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _int(x: Any) -> int | None:
    try:
        if x is None or isinstance(x, bool):
            return None
        v = float(x)
        return int(v) if math.isfinite(v) else None
    except (TypeError, ValueError):
        return None


def _bool(x: Any) -> bool | None:
    if isinstance(x, bool):
        return x
    if isinstance(x, str) and x.lower() in ("true", "false"):
        return x.lower() == "true"
    if isinstance(x, int | float) and not isinstance(x, bool):
        return bool(x)
    return None


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _display_path(p: Path, cwd: str) -> str:
    ap = os.path.abspath(p)
    try:
        if os.path.commonpath([ap, cwd]) == cwd:
            return os.path.relpath(ap, cwd)
    except ValueError:
        pass
    return ap


def _setting_value(x: Any) -> Any:
    """A distiller setting as a hashable, sortable, printable value."""
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int | float):
        return float(x)
    if isinstance(x, list | tuple):
        return str(list(x))
    return str(x)


def load_run(run_dir: Path, cwd: str | None = None) -> dict:
    """One run directory as a flat record (the columns of ``runs.csv`` plus ``_settings``)."""
    cwd = os.path.abspath(cwd or os.getcwd())
    with open(os.path.join(run_dir, ".hydra", "config.yaml"), encoding="utf-8") as f:
        cfg = yaml.load(f, Loader=_Loader) or {}
    metrics: dict | None = None
    status = "incomplete"
    mpath = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(mpath):
        try:
            with open(mpath, encoding="utf-8") as f:
                metrics = json.load(f)
            if not isinstance(metrics, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            metrics, status = None, "failed"
    m = metrics or {}

    def pick(cfg_key: str, m_key: str) -> Any:
        # metrics.json holds resolved values; the saved config may keep interpolations
        # (e.g. oc.select of per-pair defaults) that are only resolved by Hydra
        v = m.get(m_key)
        return _cfg_get(cfg, cfg_key) if v is None else v

    role = str(pick("role", "role") or "student")
    teacher = pick("pair.teacher", "teacher")
    student = pick("pair.student", "student")
    distiller = str(pick("distiller.name", "distiller") or "vanilla")
    if role == "teacher":
        arch = teacher if teacher is not None else m.get("student")
    else:
        arch = student
    rec: dict[str, Any] = {
        "dataset": str(pick("dataset.name", "dataset") or "unknown"),
        "pair": str(pick("pair.name", "pair") or "unknown"),
        "role": role,
        "teacher": None if teacher is None else str(teacher),
        "student": None if student is None else str(student),
        "arch": None if arch is None else str(arch),
        "distiller": distiller,
        "alpha": _float(pick("distiller.alpha", "alpha")),
        "beta": _float(pick("distiller.beta", "beta")),
        "tau": _float(pick("distiller.tau", "tau")),
        "scd_tau": _float(pick("distiller.scd_tau", "scd_tau")),
        "standardize": _bool(pick("distiller.standardize", "standardize")),
        "warmup": _float(pick("distiller.warmup", "warmup")),
        "ce_weight": _float(pick("distiller.ce_weight", "ce_weight")),
        "kd_weight": _float(pick("distiller.kd_weight", "kd_weight")),
        "seed": _int(pick("seed", "seed")),
        "epochs": _int(_cfg_get(cfg, "trainer.epochs")),
        "epochs_done": _int(m.get("epochs")),
        "status": status,
        "top1": _float(m.get("top1")),
        "top1_best": _float(m.get("top1_best")),
        "top5": _float(m.get("top5")),
        "wall_s": _float(m.get("wall_s")),
        "teacher_top1": _float(m.get("teacher_top1")),
        "duplicate_of": "",
        "path": _display_path(run_dir, cwd),
    }
    if rec["epochs"] is None:
        rec["epochs"] = rec["epochs_done"]
    if metrics is not None:
        st = str(m.get("status", "completed"))
        if st == "diverged" or not (math.isfinite(rec["top1"]) and math.isfinite(rec["top1_best"])):
            rec["status"] = "diverged"
        elif st == "completed":
            rec["status"] = "completed"
        else:
            rec["status"] = "failed"
    # every setting of the distiller, resolved (grid points and grouping use these)
    settings: dict[str, Any] = {}
    dist_cfg = cfg.get("distiller") if isinstance(cfg.get("distiller"), dict) else {}
    for key in sorted(dist_cfg):
        if key == "name":
            continue
        value = m.get(key)
        if value is None:
            value = _cfg_get(cfg, f"distiller.{key}")
        settings[key] = _setting_value(value)
    if not dist_cfg:  # config without a distiller node: fall back to metrics.json
        for key in ("alpha", "beta", "tau", "scd_tau", "standardize", "warmup", "ce_weight"):
            if key in m:
                settings[key] = _setting_value(m[key])
    rec["_settings"] = settings
    return rec


def collect_runs(roots: list[str | Path], cwd: str | None = None) -> list[dict]:
    """Load every run under ``roots`` (sorted by path) and mark duplicates."""
    runs = [load_run(d, cwd) for d in find_run_dirs(roots)]
    runs.sort(key=lambda r: r["path"])
    mark_duplicates(runs)
    return runs


# --------------------------------------------------------------------------------------
# grouping
# --------------------------------------------------------------------------------------


def _unit(run: dict) -> tuple:
    """What a run is a measurement of: a vanilla-trained architecture or a distilled pair."""
    if run["role"] == "teacher":
        return ("teacher", run["arch"])
    if run["distiller"] == "vanilla":
        return ("student", run["arch"])
    return (run["distiller"], run["pair"])


def _point(run: dict) -> tuple:
    """The run's distiller settings that matter, as sorted (name, value) pairs."""
    if run["role"] == "teacher" or run["distiller"] == "vanilla":
        return ()
    ignored = IGNORED_SETTINGS.get(run["distiller"], set())
    s = dict(run["_settings"])
    if "scd_tau" in s and "tau" in s and s["scd_tau"] == s["tau"]:
        s["scd_tau"] = "tau"  # the default interpolation: follows tau, not a setting of its own
    return tuple((k, s[k]) for k in sorted(s) if k not in ignored)


def _dedup_key(run: dict) -> tuple:
    return (run["dataset"], _unit(run), _point(run), run["seed"], run["epochs"])


def mark_duplicates(runs: list[dict]) -> None:
    """Fill ``duplicate_of`` for every run whose configuration and seed were seen already.

    A run with metrics (completed or diverged) is kept over one without; then the first
    by sorted path."""
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        by_key[_dedup_key(r)].append(r)
    for group in by_key.values():
        if len(group) < 2:
            continue
        rank = {"completed": 0, "diverged": 0, "failed": 1, "incomplete": 1}
        group.sort(key=lambda r: (rank[r["status"]], r["path"]))
        for r in group[1:]:
            r["duplicate_of"] = group[0]["path"]


def _sort_value(v: Any) -> tuple:
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, bool):
        return (1, float(v), "")
    if isinstance(v, float):
        return (2, v if math.isfinite(v) else math.inf, "")
    return (3, 0.0, str(v))


def _point_sort_key(point: tuple) -> tuple:
    return tuple((k, _sort_value(v)) for k, v in point)


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


SYMBOL = {"beta": "β", "tau": "τ", "alpha": "α"}


def fmt_point(point: tuple, keys: list[str] | None = None) -> str:
    d = dict(point)
    items = list(point) if keys is None else [(k, d[k]) for k in keys if k in d]
    return ", ".join(f"{SYMBOL.get(k, k)}={fmt_value(v)}" for k, v in items)


@dataclass
class PointStats:
    point: tuple
    runs: list[dict]
    values: list[float]
    mean: float
    std: float
    statuses: Counter

    @property
    def n(self) -> int:
        return len(self.values)

    def problems(self) -> str:
        """e.g. '2 diverged, 1 incomplete' for the runs that did not give a number."""
        return ", ".join(
            f"{self.statuses[s]} {s}" for s in STATUSES[1:] if self.statuses.get(s)
        )


def _stats(point: tuple, runs: list[dict], metric: str) -> PointStats:
    values = [r[metric] for r in runs if r["status"] == "completed" and math.isfinite(r[metric])]
    mean = sum(values) / len(values) if values else math.nan
    if len(values) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    else:
        std = math.nan
    statuses = Counter(r["status"] for r in runs)
    return PointStats(point, runs, values, mean, std, statuses)


@dataclass
class Grid:
    """One distiller's beta x tau grid (for one setting of the other knobs)."""

    dataset: str
    unit: tuple
    variant: tuple  # the other settings, shared by every point of the grid
    betas: list[Any]
    taus: list[Any]
    cells: dict[tuple, PointStats]  # (beta, tau) -> stats; missing points absent
    best: tuple | None  # (beta, tau) of the best cell

    @property
    def n_missing(self) -> int:
        return len(self.betas) * len(self.taus) - len(self.cells)

    @property
    def n_failed_points(self) -> int:
        return sum(1 for c in self.cells.values() if c.n == 0)


@dataclass
class Group:
    """Every (non-duplicate) run of one unit on one data set."""

    dataset: str
    unit: tuple
    runs: list[dict]
    metric: str
    epochs: int | None = None
    other_epochs: Counter = field(default_factory=Counter)
    points: dict[tuple, PointStats] = field(default_factory=dict)
    best: PointStats | None = None
    grids: list[Grid] = field(default_factory=list)

    def build(self) -> Group:
        counts = Counter(r["epochs"] for r in self.runs)
        self.epochs = max(counts, key=lambda e: (counts[e], -1 if e is None else e))
        self.other_epochs = Counter({e: c for e, c in counts.items() if e != self.epochs})
        by_point: dict[tuple, list[dict]] = defaultdict(list)
        for r in self.runs:
            if r["epochs"] == self.epochs:
                by_point[_point(r)].append(r)
        for p in sorted(by_point, key=_point_sort_key):
            self.points[p] = _stats(p, by_point[p], self.metric)
        scored = [s for s in self.points.values() if s.n]
        if scored:
            # highest mean; ties: more seeds, then the first point in sorted order
            self.best = max(scored, key=lambda s: (s.mean, s.n))
        self._build_grids()
        return self

    def _build_grids(self) -> None:
        variants: dict[tuple, dict[tuple, PointStats]] = defaultdict(dict)
        for p, st in self.points.items():
            d = dict(p)
            variant = tuple((k, v) for k, v in p if k not in ("beta", "tau"))
            variants[variant][(d.get("beta"), d.get("tau"))] = st
        for variant in sorted(variants, key=_point_sort_key):
            cells = variants[variant]
            if len(cells) < 2:
                continue
            betas = sorted({b for b, _ in cells}, key=_sort_value)
            taus = sorted({t for _, t in cells}, key=_sort_value)
            scored = [(bt, s) for bt, s in cells.items() if s.n]
            best = max(scored, key=lambda x: (x[1].mean, x[1].n))[0] if scored else None
            self.grids.append(Grid(self.dataset, self.unit, variant, betas, taus, cells, best))

    @property
    def n_other_epochs(self) -> int:
        return sum(self.other_epochs.values())

    def varying_keys(self) -> list[str]:
        """Settings that take more than one value among the points (always beta/tau)."""
        keys = ["beta", "tau"]
        seen: dict[str, set] = defaultdict(set)
        for p in self.points:
            for k, v in p:
                seen[k].add(v)
        keys += [k for k in sorted(seen) if len(seen[k]) > 1 and k not in keys]
        present = {k for p in self.points for k, _ in p}
        return [k for k in keys if k in present]


def build_groups(runs: list[dict], metric: str) -> dict[tuple, Group]:
    """(dataset, unit) -> Group over the non-duplicate runs."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if not r["duplicate_of"]:
            by[(r["dataset"], _unit(r))].append(r)
    return {
        k: Group(k[0], k[1], v, metric).build()
        for k, v in sorted(by.items(), key=lambda kv: (kv[0][0], _unit_sort(kv[0][1])))
    }


def _unit_sort(unit: tuple) -> tuple:
    return tuple("" if x is None else str(x) for x in unit)


# --------------------------------------------------------------------------------------
# the paper's numbers
# --------------------------------------------------------------------------------------

PAPER_COLUMNS = {
    "teacher": "teacher_top1",
    "student": "student_top1",
    "kd": "kd_top1",
    "dkd": "dkd_top1",
    "rld": "rld_top1",
}


def load_paper() -> list[dict]:
    """Rows of the packaged ``paper_results.csv`` (floats; NaN where not reported)."""
    try:
        res = resources.files("rld") / "data" / "paper_results.csv"
        text = res.read_text(encoding="utf-8")
    except (OSError, TypeError, ModuleNotFoundError):
        # e.g. rld imported as a namespace package from a source tree
        text = (Path(__file__).parent / "data" / "paper_results.csv").read_text(encoding="utf-8")
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        for col in PAPER_COLUMNS.values():
            row[col] = _float(row.get(col) or math.nan)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------


def fmt_num(v: float, signed: bool = False) -> str:
    if not _finite(v):
        return NA
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def fmt_stats(s: PointStats) -> str:
    """'74.12 ± 0.20 (n=3)'; text when no run of the point gave a number."""
    if s.n == 0:
        return s.problems() or "no runs"
    text = f"{s.mean:.2f} ± {s.std:.2f} (n={s.n})" if s.n > 1 else f"{s.mean:.2f} (n=1)"
    if s.problems():
        text += f" [+{s.problems()}]"
    return text


@dataclass
class Cell:
    """One method's cell in the main table."""

    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    text: str = NA
    point: str = ""
    paper: float = math.nan
    epochs: int | None = None
    mark: str = ""  # teacher only: † teacher_top1 of the distillation runs, ‡ paper only

    @property
    def diff(self) -> float:
        return self.mean - self.paper if _finite(self.mean) and _finite(self.paper) else math.nan

    def ours(self) -> str:
        t = self.text + self.mark
        return f"{t} @ {self.point}" if self.point and self.n else t

    def paper_text(self) -> str:
        if not _finite(self.paper):
            return NA
        if _finite(self.diff):
            return f"{self.paper:.2f} (Δ {self.diff:+.2f})"
        return f"{self.paper:.2f}"


def _cell_from_group(g: Group | None) -> Cell:
    c = Cell()
    if g is None:
        return c
    c.epochs = g.epochs
    if g.best is not None:
        s = g.best
        c.mean, c.std, c.n = s.mean, s.std, s.n
        c.text = fmt_stats(s)
        c.point = fmt_point(s.point, g.varying_keys()) if s.point else ""
    else:
        total = Counter()
        for s in g.points.values():
            total.update(s.statuses)
        c.text = ", ".join(f"{total[s]} {s}" for s in STATUSES[1:] if total.get(s)) or NA
    return c


@dataclass
class Row:
    pair: str
    teacher: str | None
    student: str | None
    cells: dict[str, Cell]
    teacher_source: str


@dataclass
class DatasetTable:
    dataset: str
    metric: str
    methods: list[str]
    rows: list[Row]
    notes: list[str]
    has_paper: bool
    groups: list[Group]


def method_label(m: str) -> str:
    if m == "teacher":
        return "Teacher"
    if m == "student":
        return "Student"
    return DISTILLER_LABEL.get(m, m)


def build_tables(runs: list[dict], metric: str, paper: list[dict] | None = None) -> list[DatasetTable]:
    if paper is None:
        paper = load_paper()
    groups = build_groups(runs, metric)
    tables = []
    for dataset in sorted({r["dataset"] for r in runs}):
        tables.append(_build_table(dataset, runs, groups, metric, paper))
    return tables


def _build_table(
    dataset: str, runs: list[dict], groups: dict[tuple, Group], metric: str, paper: list[dict]
) -> DatasetTable:
    druns = [r for r in runs if r["dataset"] == dataset]
    used = [r for r in druns if not r["duplicate_of"]]
    paper_rows = [p for p in paper if p["dataset"] == dataset]
    paper_index = {(p["teacher"], p["student"]): i for i, p in enumerate(paper_rows)}

    # pairs seen in any run (first teacher/student by sorted path when names disagree)
    pairs: dict[str, tuple] = {}
    for r in used:
        pairs.setdefault(r["pair"], (r["teacher"], r["student"]))
    extra = sorted(
        {r["distiller"] for r in used if r["role"] != "teacher"} - {"vanilla", *TABLE_DISTILLERS}
    )
    methods = ["teacher", "student", *TABLE_DISTILLERS, *extra]

    def order(item):
        name, (t, s) = item
        i = paper_index.get((t, s))
        return (0, i, name) if i is not None else (1, 0, name)

    rows: list[Row] = []
    for pair, (t, s) in sorted(pairs.items(), key=order):
        prow = paper_rows[paper_index[(t, s)]] if (t, s) in paper_index else None
        cells: dict[str, Cell] = {}
        # teacher: role=teacher runs of that architecture, else the loaded teacher's accuracy
        tg = groups.get((dataset, ("teacher", t)))
        if tg is not None:
            cells["teacher"] = _cell_from_group(tg)
            source = "runs"
        else:
            vals = sorted(
                {
                    r["teacher_top1"]
                    for r in used
                    if r["pair"] == pair
                    and r["role"] != "teacher"
                    and r["distiller"] != "vanilla"
                    and math.isfinite(r["teacher_top1"])
                }
            )
            c = Cell()
            if vals:
                st = _stats((), [{"status": "completed", "v": v} for v in vals], "v")
                c.mean, c.std, c.n = st.mean, st.std, st.n
                c.text = fmt_stats(st)
                c.mark = "†"
                source = "checkpoint"
            else:
                source = "paper"
                c.mark = "‡" if prow is not None and _finite(prow["teacher_top1"]) else ""
                if not c.mark:
                    source = "none"
            cells["teacher"] = c
        cells["student"] = _cell_from_group(groups.get((dataset, ("student", s))))
        for m in methods[2:]:
            cells[m] = _cell_from_group(groups.get((dataset, (m, pair))))
        if prow is not None:
            for m, col in PAPER_COLUMNS.items():
                if m in cells:
                    cells[m].paper = prow[col]
        rows.append(Row(pair, t, s, cells, source))

    dgroups = [g for (d, _), g in groups.items() if d == dataset]
    notes = _notes(dataset, druns, rows, dgroups, metric)
    has_paper = any(_finite(c.paper) for row in rows for c in row.cells.values())
    return DatasetTable(dataset, metric, methods, rows, notes, has_paper, dgroups)


def _unit_text(unit: tuple) -> str:
    kind, name = unit
    if kind == "teacher":
        return f"teacher {name}"
    if kind == "student":
        return f"student {name} alone"
    return f"{name} {method_label(kind)}"


def _notes(
    dataset: str, druns: list[dict], rows: list[Row], groups: list[Group], metric: str
) -> list[str]:
    notes = []
    status = Counter(r["status"] for r in druns if not r["duplicate_of"])
    n_dup = sum(1 for r in druns if r["duplicate_of"])
    n_other = sum(g.n_other_epochs for g in groups)
    notes.append(
        f"Runs: {len(druns)} run directories; {status['completed']} completed, "
        f"{status['diverged']} diverged, {status['failed']} failed, "
        f"{status['incomplete']} incomplete (no metrics.json), {n_dup} duplicates ignored, "
        f"{n_other} left out for other epochs."
    )
    notes.append(
        "Cells: mean ± sample std over seeds (n = seeds that finished); KD/DKD/RLD show the "
        "grid point with the highest mean and its settings; paper (Δ) is the value reported "
        "in the literature and ours minus it."
    )
    by_src = defaultdict(list)
    for row in rows:
        by_src[row.teacher_source].append(row.pair)
    src_text = {
        "runs": "role=teacher runs of the teacher architecture",
        "checkpoint": "† the evaluated accuracy of the loaded teacher checkpoint "
        "(teacher_top1 of the distillation runs; n = distinct values)",
        "paper": "‡ no run: paper value only",
        "none": "no run and no paper value",
    }
    parts = [
        f"{src_text[k]} ({', '.join(by_src[k])})"
        for k in ("runs", "checkpoint", "paper", "none")
        if by_src[k]
    ]
    if parts:
        notes.append("Teacher column: " + "; ".join(parts) + ".")
    for g in groups:
        bits = []
        if len(g.points) > 1:
            bits.append(f"{len(g.points)} grid points run")
            missing = sum(gr.n_missing for gr in g.grids)
            if missing:
                bits.append(f"{missing} missing")
        failed_pts = sum(1 for s in g.points.values() if s.n == 0)
        if failed_pts:
            bits.append(f"{failed_pts} point{'s' if failed_pts > 1 else ''} without a finished run")
        total: Counter = Counter()
        for s in g.points.values():
            total.update(s.statuses)
        for st in STATUSES[1:]:
            if total.get(st):
                bits.append(f"{total[st]} {st} run{'s' if total[st] > 1 else ''}")
        if g.other_epochs:
            oth = ", ".join(
                f"{c} at epochs={e}"
                for e, c in sorted(g.other_epochs.items(), key=lambda x: _sort_value(x[0]))
            )
            bits.append(f"epochs={g.epochs} used, left out {oth}")
        gdup = sum(1 for r in druns if r["duplicate_of"] and _unit(r) == g.unit)
        if gdup:
            bits.append(f"{gdup} duplicate{'s' if gdup > 1 else ''} ignored")
        if bits:
            notes.append(f"{_unit_text(g.unit)}: " + "; ".join(bits) + ".")
    return notes


# --------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A GitHub pipe table with padded columns (no dependency on tabulate's version)."""
    cols = len(header)
    align = align or ["l"] * cols
    cells = [[_md_escape(c) for c in header]] + [[_md_escape(c) for c in r] for r in rows]
    width = [max(3, *(len(r[i]) for r in cells)) for i in range(cols)]

    def line(r):
        out = []
        for i, c in enumerate(r):
            out.append(c.rjust(width[i]) if align[i] == "r" else c.ljust(width[i]))
        return "| " + " | ".join(out) + " |"

    sep = []
    for i in range(cols):
        sep.append("-" * (width[i] - 1) + ":" if align[i] == "r" else "-" * width[i])
    return "\n".join([line(cells[0]), "| " + " | ".join(sep) + " |", *map(line, cells[1:])])


def table_markdown(t: DatasetTable) -> str:
    header = ["Pair"]
    for m in t.methods:
        header.append(method_label(m))
        if t.has_paper:
            header.append("paper (Δ)")
    body = []
    for row in t.rows:
        line = [row.pair]
        for m in t.methods:
            c = row.cells[m]
            line.append(c.ours())
            if t.has_paper:
                line.append(c.paper_text())
        body.append(line)
    out = [
        f"## {t.dataset}",
        "",
        f"Metric: {METRIC_TEXT[t.metric]}.",
        "",
        md_table(header, body),
        "",
    ]
    out += [f"- {n}" for n in t.notes]
    return "\n".join(out) + "\n"


def table_csv(t: DatasetTable) -> str:
    header = ["dataset", "metric", "pair", "teacher", "student", "teacher_source"]
    for m in t.methods:
        header += [f"{m}_{x}" for x in ("mean", "std", "n", "epochs", "best", "text", "paper", "diff")]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in t.rows:
        line = [t.dataset, t.metric, row.pair, row.teacher or "", row.student or "", row.teacher_source]
        for m in t.methods:
            c = row.cells[m]
            line += [
                _csv_num(c.mean), _csv_num(c.std), c.n, "" if c.epochs is None else c.epochs,
                c.point if c.n else "", c.text + c.mark, _csv_num(c.paper), _csv_num(c.diff),
            ]  # fmt: skip
        w.writerow(line)
    return buf.getvalue()


def _csv_num(v: float) -> str:
    return f"{v:.4f}" if _finite(v) else ""


_TEX_CHARS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "β": r"$\beta$",
    "τ": r"$\tau$",
    "α": r"$\alpha$",
    "Δ": r"$\Delta$",
    "×": r"$\times$",
    "—": "---",
    "†": r"\textsuperscript{\dag}",
    "‡": r"\textsuperscript{\ddag}",
    "≥": r"$\geq$",
    "`": "",
}


def tex_escape(s: str) -> str:
    return "".join(_TEX_CHARS.get(ch, ch) for ch in s)


def table_latex(t: DatasetTable) -> str:
    per = 2 if t.has_paper else 1
    ncols = 1 + per * len(t.methods)
    spec = "l" + ("cc" if t.has_paper else "c") * len(t.methods)
    lines = [
        "% generated by rld.table; needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        "\\footnotesize",
        f"\\caption{{{tex_escape(t.dataset)}: {tex_escape(METRIC_TEXT[t.metric])}.}}",
        f"\\label{{tab:rld-{tex_escape(t.dataset)}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
    ]
    if t.has_paper:
        head = ["Pair"] + [
            f"\\multicolumn{{2}}{{c}}{{{tex_escape(method_label(m))}}}" for m in t.methods
        ]
        lines.append(" & ".join(head) + " \\\\")
        lines.append(
            " ".join(f"\\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(t.methods)))
        )
        lines.append(" & ".join([""] + ["ours", "paper ($\\Delta$)"] * len(t.methods)) + " \\\\")
    else:
        lines.append(" & ".join(["Pair"] + [tex_escape(method_label(m)) for m in t.methods]) + " \\\\")
    lines.append("\\midrule")
    for row in t.rows:
        cells = [tex_escape(row.pair)]
        for m in t.methods:
            c = row.cells[m]
            cells.append(tex_escape(c.ours()))
            if t.has_paper:
                cells.append(tex_escape(c.paper_text()))
        lines.append(" & ".join(cells) + " \\\\")
    lines.append("\\bottomrule")
    lines.append("\\end{tabular}")
    lines.append("")
    lines.append(f"\\par\\smallskip\\begin{{minipage}}{{\\linewidth}}\\scriptsize % {ncols} columns")
    for n in t.notes:
        lines.append(tex_escape(n) + "\\par")
    lines.append("\\end{minipage}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def _variant_tag(g: Grid, group: Group) -> str:
    """The settings that tell this grid from the group's other grids ('' if it is alone)."""
    if len(group.grids) < 2:
        return ""
    keys = {k for gr in group.grids for k, _ in gr.variant}
    varying = {k for k in keys if len({dict(gr.variant).get(k) for gr in group.grids}) > 1}
    return ",".join(f"{k}={fmt_value(v)}" for k, v in g.variant if k in varying)


def _grid_name(g: Grid, group: Group) -> str:
    kind, pair = g.unit
    name = f"{pair}_{kind}"
    tag = _variant_tag(g, group)
    if tag:
        name += "_" + re.sub(r"[^A-Za-z0-9=,.+-]", "", tag)
    return f"{name}_grid"


def _cell_text(g: Grid, bt: tuple) -> str:
    s = g.cells.get(bt)
    if s is None:
        return "missing"
    return fmt_stats(s)


def grid_markdown(g: Grid, group: Group, metric: str) -> str:
    kind, pair = g.unit
    beta_label = "β \\ τ" if any(b is not None for b in g.betas) else "τ"
    header = [beta_label] + [fmt_value(t) for t in g.taus]
    body = []
    for b in g.betas:
        line = ["" if b is None else fmt_value(b)]
        for t in g.taus:
            text = _cell_text(g, (b, t))
            if (b, t) == g.best:
                text = f"**{text}** (best)"
            line.append(text)
        body.append(line)
    title = f"# {g.dataset} / {pair} / {method_label(kind)}: β × τ grid"
    lines = [title, "", f"Metric: {METRIC_TEXT[metric]}; epochs={group.epochs}."]
    if g.variant:
        lines.append(f"Other settings: {fmt_point(g.variant)}.")
    lines += ["", md_table(header, body), ""]
    if g.best is not None:
        s = g.cells[g.best]
        point = fmt_point(tuple(x for x in zip(("beta", "tau"), g.best, strict=True) if x[1] is not None))
        lines.append(f"- Best: {point}: {fmt_stats(s)}.")
    else:
        lines.append("- Best: none (no grid point has a finished run).")
    lines.append(
        f"- {len(g.betas) * len(g.taus)} cells: {len(g.cells)} run, {g.n_missing} missing, "
        f"{g.n_failed_points} without a finished run."
    )
    if group.other_epochs:
        lines.append(
            f"- {group.n_other_epochs} runs with epochs other than {group.epochs} left out."
        )
    return "\n".join(lines) + "\n"


_LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.9, "pad": 2.0}


def grid_png(g: Grid, group: Group, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    kind, pair = g.unit
    nb, nt = len(g.betas), len(g.taus)
    data = np.full((nb, nt), np.nan)
    for i, b in enumerate(g.betas):
        for j, t in enumerate(g.taus):
            s = g.cells.get((b, t))
            if s is not None and s.n:
                data[i, j] = s.mean
    w = min(3.0 + 1.5 * nt, 20.0)
    h = min(2.2 + 0.95 * nb, 16.0)
    with plt.rc_context({"font.size": 10, "svg.hashsalt": "rld", "path.simplify": True}):
        fig, ax = plt.subplots(figsize=(w, h), dpi=100)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#ffffff")
        finite = data[np.isfinite(data)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if vmax - vmin < 1e-9:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for i, b in enumerate(g.betas):
            for j, t in enumerate(g.taus):
                s = g.cells.get((b, t))
                if s is None:  # never run: grey, hatched
                    ax.add_patch(
                        Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#e0e0e0",
                                  edgecolor="#9a9a9a", hatch="//", linewidth=0.5)
                    )  # fmt: skip
                    ax.text(j, i, "missing", ha="center", va="center", fontsize=9,
                            color="#404040", fontstyle="italic", bbox=_LABEL_BOX)  # fmt: skip
                    continue
                if not s.n:  # run, but no finished run: pink, cross-hatched
                    ax.add_patch(
                        Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#f4c7c3",
                                  edgecolor="#c0392b", hatch="xx", linewidth=0.5)
                    )  # fmt: skip
                    ax.text(j, i, s.problems().replace(", ", "\n"), ha="center", va="center",
                            fontsize=9, color="#8b0000", fontweight="bold",
                            bbox=_LABEL_BOX)  # fmt: skip
                    continue
                txt = f"{s.mean:.2f}" + (f"\n± {s.std:.2f}" if s.n > 1 else "") + f"\nn={s.n}"
                if s.problems():
                    txt += f"\n+{s.problems()}"
                frac = (s.mean - vmin) / (vmax - vmin)
                ax.text(j, i, txt, ha="center", va="center", fontsize=9,
                        color="black" if frac > 0.6 else "white")  # fmt: skip
        if g.best is not None:
            i, j = g.betas.index(g.best[0]), g.taus.index(g.best[1])
            ax.add_patch(
                Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e41a1c", linewidth=3.5)
            )
            ax.text(j + 0.46, i - 0.44, "best", ha="right", va="top", fontsize=8,
                    color="#e41a1c", fontweight="bold")  # fmt: skip
        ax.set_xticks(range(nt), [fmt_value(t) for t in g.taus])
        ax.set_yticks(range(nb), ["" if b is None else fmt_value(b) for b in g.betas])
        ax.set_xlabel("τ (temperature)")
        ax.set_ylabel("β" if any(b is not None for b in g.betas) else "")
        title = f"{g.dataset} · {pair} · {method_label(kind)} · {metric} (epochs={group.epochs})"
        tag = _variant_tag(g, group)
        if tag:
            title += "\n" + tag
        ax.set_title(title, fontsize=10)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(f"{metric} (%) mean over seeds")
        fig.tight_layout()
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)


def runs_csv(runs: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RUN_COLUMNS)
    for r in runs:
        line = []
        for c in RUN_COLUMNS:
            v = r[c]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                line.append("")
            elif isinstance(v, bool):
                line.append("true" if v else "false")
            elif isinstance(v, float):
                line.append(repr(v))
            else:
                line.append(v)
        w.writerow(line)
    return buf.getvalue()


def runs_frame(runs: list[dict]):
    """The runs as a pandas DataFrame (the columns of ``runs.csv``)."""
    import pandas as pd

    return pd.DataFrame([{c: r[c] for c in RUN_COLUMNS} for r in runs], columns=RUN_COLUMNS)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_outputs(
    runs: list[dict], out: Path, metric: str, paper: list[dict] | None = None
) -> tuple[list[Path], list[DatasetTable]]:
    """Write every output file; returns the paths written and the tables."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "runs.csv"
    _write(p, runs_csv(runs))
    written.append(p)
    tables = build_tables(runs, metric, paper)
    for t in tables:
        for ext, fn in (("md", table_markdown), ("csv", table_csv), ("tex", table_latex)):
            p = out / f"{_safe(t.dataset)}.{ext}"
            _write(p, fn(t))
            written.append(p)
        for g in t.groups:
            for grid in g.grids:
                base = out / _safe(t.dataset) / _safe(_grid_name(grid, g))
                _write(base.with_suffix(".md"), grid_markdown(grid, g, metric))
                base.parent.mkdir(parents=True, exist_ok=True)
                grid_png(grid, g, metric, base.with_suffix(".png"))
                written += [base.with_suffix(".md"), base.with_suffix(".png")]
    return written, tables


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_=,.+-]", "_", name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m rld.table",
        description="Collect sweep runs into results/runs.csv and the paper's tables.",
    )
    ap.add_argument("sweeps", nargs="*", default=["sweeps"], metavar="SWEEP_DIR",
                    help="directories to search for runs (default: sweeps)")  # fmt: skip
    ap.add_argument("--out", default="results", help="output directory (default: results)")
    ap.add_argument("--metric", choices=METRICS, default="top1_best",
                    help="best-epoch (default, published convention) or last-epoch top-1")  # fmt: skip
    args = ap.parse_args(argv)
    missing = [d for d in args.sweeps if not os.path.isdir(d)]
    if missing:
        print(f"error: no such directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = collect_runs(args.sweeps)
    if not runs:
        print(f"warning: no run directories (.hydra/config.yaml) under {', '.join(args.sweeps)}",
              file=sys.stderr)  # fmt: skip
    written, tables = write_outputs(runs, Path(args.out), args.metric)
    for t in tables:
        print(table_markdown(t))
    print("Wrote:")
    for p in written:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
