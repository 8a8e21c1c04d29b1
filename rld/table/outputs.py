"""Writing every output file under ``--out``: ``runs.csv``, each data set's tables and
each grid's Markdown and PNG."""

from __future__ import annotations

import re
from pathlib import Path

from .heatmap import grid_png
from .render import _grid_name, grid_markdown, runs_csv, table_csv, table_latex, table_markdown
from .tables import DatasetTable, build_tables


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
