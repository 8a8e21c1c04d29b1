"""From runs to results: groups of runs of one unit, their points (mean ± std over seeds),
grids over the settings that vary, the best point, the literature's values, and the
per-data-set tables with their footnotes.  How values, points and statistics read as text
is here too (cells and footnotes are text)."""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rld.distillers import DISTILLERS

from .runs import PROBLEMS, Run, as_float, status_counts

METRICS = ("top1_best", "top1")
METRIC_TEXT = {
    "top1_best": "top-1 accuracy (%) at the best epoch (`top1_best`, the published convention)",
    "top1": "top-1 accuracy (%) at the last epoch (`top1`)",
}
NA = "—"
SYMBOL = {"beta": "β", "tau": "τ", "alpha": "α"}
#: the labels of the two columns of runs without a distiller; a distiller's label, its order
#: and whether it has a column even without runs are its registration's (`rld.distillers`:
#: `label`, registration order, `table`), any other distiller follows, sorted by name
UNIT_LABEL = {"teacher": "Teacher", "student": "Student"}
#: the literature's values, packaged: <method>_top1 columns per (dataset, teacher, student)
LITERATURE_FILES = ("paper_results.csv", "paper_results_feature.csv")


# -- text ------------------------------------------------------------------------------------
def method_label(m: str) -> str:
    if m in UNIT_LABEL:
        return UNIT_LABEL[m]
    return DISTILLERS.get(m).label if m in DISTILLERS else m


def point_keys(distiller: str) -> tuple[str, ...]:
    """The settings that name a distiller's grid point (none for an unregistered one)."""
    return DISTILLERS.get(distiller).point if distiller in DISTILLERS else ()


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return NA
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def fmt_point(point: Iterable[tuple[str, Any]], keys: Iterable[str] | None = None) -> str:
    """'β=2, τ=4' (only `keys`, in their order, when given)."""
    d = dict(point)
    items = list(d.items()) if keys is None else [(k, d[k]) for k in keys if k in d]
    return ", ".join(f"{SYMBOL.get(k, k)}={fmt_value(v)}" for k, v in items)


def problems_text(statuses: Counter, runs_word: bool = False,
                  pruned_at: tuple[int, ...] = ()) -> str:
    """'2 diverged, 1 incomplete' ('2 diverged runs; 1 incomplete run' with runs_word);
    pruned runs with the epochs they stopped at when `pruned_at` gives them ('pruned at
    epoch 3', '2 pruned at epochs 3, 9')."""
    if runs_word:
        return "; ".join(f"{statuses[s]} {s} run{'s' if statuses[s] > 1 else ''}"
                         for s in PROBLEMS if statuses.get(s))  # fmt: skip
    parts = []
    for s in PROBLEMS:
        n = statuses.get(s)
        if not n:
            continue
        if s == "pruned" and len(pruned_at) == n:
            epochs = ", ".join(map(str, pruned_at))
            parts.append(f"pruned at epoch {epochs}" if n == 1
                         else f"{n} pruned at epochs {epochs}")
        else:
            parts.append(f"{n} {s}")
    return ", ".join(parts)


def fmt_stats(s: PointStats) -> str:
    """'74.12 ± 0.20 (n=3)'; text when no run of the point gave a number."""
    problems = problems_text(s.statuses, pruned_at=s.pruned_at)
    if s.n == 0:
        return problems or "no runs"
    text = f"{s.mean:.2f} ± {s.std:.2f} (n={s.n})" if s.n > 1 else f"{s.mean:.2f} (n=1)"
    if problems:
        text += f" [+{problems}]"
    return text


def sort_key(v: Any) -> tuple:
    """Orders mixed setting values: None, booleans, numbers, text."""
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, bool):
        return (1, float(v), "")
    if isinstance(v, int | float):
        return (2, v if math.isfinite(v) else math.inf, "")
    return (3, 0.0, str(v))


def _point_key(point: tuple) -> tuple:
    return tuple((k, sort_key(v)) for k, v in point)


# -- statistics, groups, grids ------------------------------------------------------------
@dataclass
class PointStats:
    """The numbers of one grid point: mean ± sample std of `values` (one per seed), and the
    statuses of all its runs (those without a number too)."""

    point: tuple
    values: tuple[float, ...]
    statuses: Counter
    pruned_at: tuple[int, ...] = ()  # the epochs its pruned runs stopped after, sorted
    mean: float = field(init=False, default=math.nan)
    std: float = field(init=False, default=math.nan)

    def __post_init__(self) -> None:
        v = self.values = tuple(self.values)
        if v:
            self.mean = sum(v) / len(v)
        if len(v) > 1:
            self.std = math.sqrt(sum((x - self.mean) ** 2 for x in v) / (len(v) - 1))

    @property
    def n(self) -> int:
        return len(self.values)


def point_stats(point: tuple, runs: list[Run], metric: str) -> PointStats:
    values = [r.metric(metric) for r in runs
              if r.status == "completed" and math.isfinite(r.metric(metric))]  # fmt: skip
    pruned = [r.pruned_epoch for r in runs if r.status == "pruned"]
    at = tuple(sorted(pruned)) if all(e is not None for e in pruned) else ()
    return PointStats(point, tuple(values), status_counts(runs), at)


@dataclass
class Grid:
    """A distiller's points over one or two settings that vary (`axes`: rows then columns,
    or columns alone), for one value of the other settings (`variant`)."""

    dataset: str
    unit: tuple
    axes: tuple[str, ...]
    values: tuple[list, ...]  # each axis's values, sorted
    cells: dict[tuple, PointStats]  # axis values -> stats; points never run are absent
    variant: tuple = ()
    best: tuple | None = None  # axis values of the best cell
    epochs: int | None = None
    n_other_epochs: int = 0
    tag: str = ""  # the variant settings that tell it from the group's other grids

    @property
    def row_key(self) -> str | None:
        return self.axes[0] if len(self.axes) == 2 else None

    @property
    def col_key(self) -> str:
        return self.axes[-1]

    @property
    def rows(self) -> list:
        return self.values[0] if len(self.axes) == 2 else [None]

    @property
    def cols(self) -> list:
        return self.values[-1]

    def key(self, row: Any, col: Any) -> tuple:
        return (row, col) if len(self.axes) == 2 else (col,)

    def cell(self, row: Any, col: Any) -> PointStats | None:
        return self.cells.get(self.key(row, col))

    @property
    def n_cells(self) -> int:
        return math.prod(len(v) for v in self.values)

    @property
    def n_missing(self) -> int:
        return self.n_cells - len(self.cells)

    @property
    def n_failed_points(self) -> int:
        return sum(1 for c in self.cells.values() if c.n == 0)

    @property
    def n_pruned_points(self) -> int:
        """Points whose every run was pruned."""
        return sum(1 for c in self.cells.values() if c.n == 0 and set(c.statuses) == {"pruned"})


@dataclass
class Group:
    """Every (non-duplicate) run of one unit on one data set, at its chosen epochs."""

    dataset: str
    unit: tuple
    runs: list[Run]
    metric: str
    duplicates: int = 0  # runs of this unit left out as duplicates
    epochs: int | None = None
    other_epochs: Counter = field(default_factory=Counter)  # left out: epochs -> runs
    points: dict[tuple, PointStats] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)  # runs at `epochs`, by status
    best: PointStats | None = None
    grids: list[Grid] = field(default_factory=list)

    @property
    def n_other_epochs(self) -> int:
        return sum(self.other_epochs.values())

    def varying(self) -> list[str]:
        """The settings that take more than one value among the points: the distiller's
        point keys first (in their order), then the others by name."""
        seen: dict[str, set] = defaultdict(set)
        for p in self.points:
            for k, v in p:
                seen[k].add(v)
        vary = [k for k in sorted(seen) if len(seen[k]) > 1]
        first = [k for k in point_keys(self.unit[0]) if k in vary]
        return first + [k for k in vary if k not in first]

    def shown_keys(self) -> list[str]:
        """The settings a cell names: the distiller's point keys and any that vary."""
        present = {k for p in self.points for k, _ in p}
        first = [k for k in point_keys(self.unit[0]) if k in present]
        return first + [k for k in self.varying() if k not in first]


def _best(stats: Iterable[tuple[Any, PointStats]]) -> Any:
    """The key of the highest mean; ties: more seeds, then the first in order."""
    scored = [(k, s) for k, s in stats if s.n]
    return max(scored, key=lambda x: (x[1].mean, x[1].n))[0] if scored else None


def build_group(dataset: str, unit: tuple, runs: list[Run], metric: str,
                duplicates: int = 0) -> Group:  # fmt: skip
    g = Group(dataset, unit, runs, metric, duplicates)
    counts = Counter(r.epochs for r in runs)
    g.epochs = max(counts, key=lambda e: (counts[e], -1 if e is None else e))
    g.other_epochs = Counter({e: c for e, c in counts.items() if e != g.epochs})
    by_point: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        if r.epochs == g.epochs:
            by_point[r.point].append(r)
    for p in sorted(by_point, key=_point_key):
        g.points[p] = point_stats(p, by_point[p], metric)
        g.statuses.update(g.points[p].statuses)
    best = _best(g.points.items())
    g.best = None if best is None else g.points[best]
    g.grids = build_grids(g)
    return g


def build_grids(g: Group) -> list[Grid]:
    """One grid per value of the settings beyond the first two that vary (the grid's axes);
    a value with fewer than two points gives none."""
    axes = tuple(g.varying()[:2])
    if not axes:
        return []
    by_variant: dict[tuple, dict[tuple, PointStats]] = defaultdict(dict)
    for p, st in g.points.items():
        d = dict(p)
        variant = tuple((k, v) for k, v in p if k not in axes)
        by_variant[variant][tuple(d.get(a) for a in axes)] = st
    grids = []
    for variant in sorted(by_variant, key=_point_key):
        cells = by_variant[variant]
        if len(cells) < 2:
            continue
        values = tuple(sorted({c[i] for c in cells}, key=sort_key) for i in range(len(axes)))
        grids.append(Grid(g.dataset, g.unit, axes, values, cells, variant, _best(cells.items()),
                          g.epochs, g.n_other_epochs))  # fmt: skip
    if len(grids) > 1:
        keys = {k for gr in grids for k, _ in gr.variant}
        apart = {k for k in keys if len({dict(gr.variant).get(k) for gr in grids}) > 1}
        for gr in grids:
            gr.tag = ",".join(f"{k}={fmt_value(v)}" for k, v in gr.variant if k in apart)
    return grids


def build_groups(runs: list[Run], metric: str) -> dict[tuple, Group]:
    """(dataset, unit) -> Group over the non-duplicate runs."""
    by: dict[tuple, list[Run]] = defaultdict(list)
    dups: Counter = Counter()
    for r in runs:
        if r.duplicate_of:
            dups[(r.dataset, r.unit)] += 1
        else:
            by[(r.dataset, r.unit)].append(r)

    def order(key: tuple) -> tuple:
        return (key[0], tuple("" if x is None else str(x) for x in key[1]))

    return {k: build_group(k[0], k[1], by[k], metric, dups[k]) for k in sorted(by, key=order)}


# -- the literature ------------------------------------------------------------------------
@dataclass
class PaperRow:
    dataset: str
    teacher: str
    student: str
    values: dict[str, float]  # method -> top-1 (teacher, student, kd, ..., crd)


def _packaged(name: str) -> str:
    try:
        return (resources.files("rld") / "data" / name).read_text(encoding="utf-8")
    except (OSError, TypeError, ModuleNotFoundError):  # a source tree without the package
        return (Path(__file__).parents[1] / "data" / name).read_text(encoding="utf-8")


def load_literature(texts: Iterable[str] | None = None) -> list[PaperRow]:
    """The literature's values: every ``<method>_top1`` column of the packaged CSVs (or of
    `texts`), one row per (dataset, teacher, student) in the order first seen."""
    if texts is None:
        texts = [_packaged(name) for name in LITERATURE_FILES]
    rows: dict[tuple, PaperRow] = {}
    for text in texts:
        for line in csv.DictReader(io.StringIO(text)):
            key = (line["dataset"], line["teacher"], line["student"])
            row = rows.setdefault(key, PaperRow(*key, {}))
            for col, value in line.items():
                if col and col.endswith("_top1") and (value or "").strip():
                    row.values[col.removesuffix("_top1")] = as_float(value)
    return list(rows.values())


# -- the per-data-set tables -----------------------------------------------------------------
@dataclass
class Cell:
    """One method's cell in a data set's table."""

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
        return self.mean - self.paper if math.isfinite(self.mean + self.paper) else math.nan

    def ours(self) -> str:
        t = self.text + self.mark
        return f"{t} @ {self.point}" if self.point and self.n else t

    def paper_text(self) -> str:
        if not math.isfinite(self.paper):
            return NA
        if math.isfinite(self.diff):
            return f"{self.paper:.2f} (Δ {self.diff:+.2f})"
        return f"{self.paper:.2f}"


def cell_of(stats: PointStats, point: str = "") -> Cell:
    return Cell(stats.mean, stats.std, stats.n, fmt_stats(stats), point)


def group_cell(g: Group | None) -> Cell:
    if g is None:
        return Cell()
    if g.best is None:
        c = Cell(text=problems_text(g.statuses) or NA)
    else:
        c = cell_of(g.best, fmt_point(g.best.point, g.shown_keys()) if g.best.point else "")
    c.epochs = g.epochs
    return c


@dataclass
class Row:
    pair: str
    teacher: str | None
    student: str | None
    cells: dict[str, Cell]
    teacher_source: str  # runs | checkpoint | paper | none


@dataclass
class DatasetTable:
    dataset: str
    metric: str
    methods: list[str]
    rows: list[Row]
    notes: list[str]
    has_paper: bool
    groups: list[Group]


def build_tables(runs: list[Run], metric: str,
                 literature: list[PaperRow] | None = None) -> list[DatasetTable]:  # fmt: skip
    if literature is None:
        literature = load_literature()
    groups = build_groups(runs, metric)
    return [_build_table(d, runs, groups, metric, literature)
            for d in sorted({r.dataset for r in runs})]


def table_methods(used: list[Run]) -> list[str]:
    present = {r.distiller for r in used if r.role != "teacher"} - {"vanilla"}
    known = [m for m, spec in DISTILLERS.items()
             if m != "vanilla" and (spec.table or m in present)]
    return ["teacher", "student", *known, *sorted(present - set(known))]


def _pairs(used: list[Run]) -> dict[str, tuple]:
    """pair -> (teacher, student) architectures, from the runs that know them (distillation
    runs first, then by sorted path)."""
    names: dict[str, list] = {}
    for r in sorted(used, key=lambda r: (r.unit[0] in ("teacher", "student"), r.path)):
        known = names.setdefault(r.pair, [None, None])
        known[0] = known[0] or r.teacher
        known[1] = known[1] or r.student
    return {p: tuple(ts) for p, ts in names.items()}


def _build_table(dataset: str, runs: list[Run], groups: dict[tuple, Group], metric: str,
                 literature: list[PaperRow]) -> DatasetTable:  # fmt: skip
    druns = [r for r in runs if r.dataset == dataset]
    used = [r for r in druns if not r.duplicate_of]
    paper = [p for p in literature if p.dataset == dataset]
    index = {(p.teacher, p.student): i for i, p in enumerate(paper)}
    methods = table_methods(used)

    def order(item: tuple) -> tuple:
        name, ts = item
        return (0, index[ts], name) if ts in index else (1, 0, name)

    rows = []
    for pair, (t, s) in sorted(_pairs(used).items(), key=order):
        cells, source = {}, "runs"
        tg = groups.get((dataset, ("teacher", t)))
        cells["teacher"] = group_cell(tg) if tg is not None else _checkpoint_cell(used, pair)
        if tg is None:
            source = "checkpoint" if cells["teacher"].n else "none"
        cells["student"] = group_cell(groups.get((dataset, ("student", s))))
        for m in methods[2:]:
            cells[m] = group_cell(groups.get((dataset, (m, pair))))
        prow = paper[index[(t, s)]] if (t, s) in index else None
        for m, c in cells.items():
            c.paper = prow.values.get(m, math.nan) if prow is not None else math.nan
        if source == "none" and math.isfinite(cells["teacher"].paper):
            source, cells["teacher"].mark = "paper", "‡"
        rows.append(Row(pair, t, s, cells, source))
    dgroups = [g for (d, _), g in groups.items() if d == dataset]
    has_paper = any(math.isfinite(c.paper) for row in rows for c in row.cells.values())
    notes = table_notes(druns, rows, dgroups, methods, has_paper)
    return DatasetTable(dataset, metric, methods, rows, notes, has_paper, dgroups)


def _checkpoint_cell(used: list[Run], pair: str) -> Cell:
    """The teacher's accuracy as evaluated by the pair's distillation runs (teacher_top1;
    n = distinct values), marked †."""
    values = sorted({r.teacher_top1 for r in used
                     if r.pair == pair and r.unit[0] not in ("teacher", "student")
                     and math.isfinite(r.teacher_top1)})  # fmt: skip
    if not values:
        return Cell()
    c = cell_of(PointStats((), tuple(values), Counter(completed=len(values))))
    c.mark = "†"
    return c


# -- footnotes -------------------------------------------------------------------------------
_TEACHER_SOURCE = {
    "runs": "role=teacher runs of the teacher architecture",
    "checkpoint": "† the evaluated accuracy of the loaded teacher checkpoint "
    "(teacher_top1 of the distillation runs; n = distinct values)",
    "paper": "‡ no run: paper value only",
    "none": "no run and no paper value",
}


def unit_text(unit: tuple) -> str:
    kind, name = unit
    if kind == "teacher":
        return f"teacher {name}"
    if kind == "student":
        return f"student {name} alone"
    return f"{name} {method_label(kind)}"


def table_notes(druns: list[Run], rows: list[Row], groups: list[Group], methods: list[str],
                has_paper: bool = True) -> list[str]:  # fmt: skip
    """The footnotes of one data set's table: what the rules left out, counted."""
    used = [r for r in druns if not r.duplicate_of]
    status = status_counts(used)
    labels = "/".join(method_label(m) for m in methods[2:])
    notes = [
        f"Runs: {len(druns)} run directories; {status['completed']} completed, "
        f"{status['diverged']} diverged, {status['failed']} failed, {status['incomplete']} "
        f"incomplete (running, or no metrics.json), "
        + (f"{status['pruned']} pruned (stopped early by an Optuna pruner: shown with the "
           "epoch, never as a number), " if status["pruned"] else "")
        + f"{len(druns) - len(used)} duplicates "
        f"ignored, {sum(g.n_other_epochs for g in groups)} left out for other epochs.",
        "Cells: mean ± sample std over seeds (n = seeds that finished); "
        f"{labels} show the grid point with the highest mean and its settings"
        + ("; paper (Δ) is the value reported in the literature and ours minus it."
           if has_paper else "."),
    ]  # fmt: skip
    by_src = defaultdict(list)
    for row in rows:
        by_src[row.teacher_source].append(row.pair)
    parts = [f"{text} ({', '.join(by_src[k])})" for k, text in _TEACHER_SOURCE.items()
             if by_src[k]]  # fmt: skip
    if parts:
        notes.append("Teacher column: " + "; ".join(parts) + ".")
    notes += [n for n in map(group_note, groups) if n]
    notes += [f"Unreadable, counted as failed: {r.message}." for r in druns if r.unreadable]
    return notes


def group_note(g: Group) -> str:
    """What one group's cell leaves out ('' when nothing)."""
    bits = []
    if len(g.points) > 1:
        bits.append(f"{len(g.points)} grid points run")
        missing = sum(gr.n_missing for gr in g.grids)
        if missing:
            bits.append(f"{missing} missing")
    failed = sum(1 for s in g.points.values() if s.n == 0)
    if failed:
        bits.append(f"{failed} point{'s' if failed > 1 else ''} without a finished run")
    if problems_text(g.statuses):
        bits.append(problems_text(g.statuses, runs_word=True))
    if g.other_epochs:
        other = ", ".join(f"{c} at epochs={e}" for e, c in
                          sorted(g.other_epochs.items(), key=lambda x: sort_key(x[0])))  # fmt: skip
        bits.append(f"epochs={g.epochs} used, left out {other}")
    if g.duplicates:
        bits.append(f"{g.duplicates} duplicate{'s' if g.duplicates > 1 else ''} ignored")
    return f"{unit_text(g.unit)}: " + "; ".join(bits) + "." if bits else ""
