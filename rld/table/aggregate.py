"""Aggregation over seeds: the groups of runs of one unit, their grid points (mean ±
std over seeds), the beta x tau grids and the best point."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from .collect import STATUSES, _point, _unit


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
