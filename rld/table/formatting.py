"""How values, grid points, statistics, metrics and methods are written as text."""

from __future__ import annotations

from typing import Any

from .aggregate import PointStats

METRICS = ("top1_best", "top1")
METRIC_TEXT = {
    "top1_best": "top-1 accuracy (%) at the best epoch (`top1_best`, the published convention)",
    "top1": "top-1 accuracy (%) at the last epoch (`top1`)",
}
DISTILLER_LABEL = {"kd": "KD", "dkd": "DKD", "rld": "RLD"}
NA = "—"


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


def fmt_stats(s: PointStats) -> str:
    """'74.12 ± 0.20 (n=3)'; text when no run of the point gave a number."""
    if s.n == 0:
        return s.problems() or "no runs"
    text = f"{s.mean:.2f} ± {s.std:.2f} (n={s.n})" if s.n > 1 else f"{s.mean:.2f} (n=1)"
    if s.problems():
        text += f" [+{s.problems()}]"
    return text


def method_label(m: str) -> str:
    if m == "teacher":
        return "Teacher"
    if m == "student":
        return "Student"
    return DISTILLER_LABEL.get(m, m)
