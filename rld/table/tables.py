"""The per-data-set results tables: one row per pair, one cell per method (teacher,
student alone, each distiller's best grid point) beside the paper's value, and the
footnotes that count what the rules left out."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from .aggregate import Group, _sort_value, _stats, build_groups
from .collect import STATUSES, _unit
from .formatting import NA, fmt_point, fmt_stats, method_label
from .paper import PAPER_COLUMNS, load_paper
from .values import _finite

#: distillers with a column of their own, in this order; others follow sorted
TABLE_DISTILLERS = ("kd", "dkd", "rld")


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
