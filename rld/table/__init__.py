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

Modules: ``collect`` (run directories, their records, duplicates), ``aggregate`` (groups,
grid points, grids, best point), ``tables`` (the per-data-set tables and footnotes),
``paper`` (the published values), ``formatting`` (numbers and labels as text),
``render`` (Markdown, CSV, LaTeX), ``heatmap`` (PNG grids), ``outputs`` (every file
under ``--out``), ``__main__`` (the command line); ``saved_config`` and ``values`` help
``collect`` read raw values.
"""

from .aggregate import Grid, Group, PointStats, build_groups
from .collect import (
    IGNORED_SETTINGS,
    RUN_COLUMNS,
    SKIP_DIRS,
    STATUSES,
    collect_runs,
    find_run_dirs,
    load_run,
    mark_duplicates,
    runs_frame,
)
from .formatting import (
    DISTILLER_LABEL,
    METRIC_TEXT,
    METRICS,
    NA,
    SYMBOL,
    fmt_point,
    fmt_stats,
    fmt_value,
    method_label,
)
from .heatmap import grid_png
from .outputs import write_outputs
from .paper import PAPER_COLUMNS, load_paper
from .render import _cell_text as _cell_text
from .render import _grid_name as _grid_name
from .render import (
    grid_markdown,
    md_table,
    runs_csv,
    table_csv,
    table_latex,
    table_markdown,
    tex_escape,
)
from .tables import TABLE_DISTILLERS, Cell, DatasetTable, Row, build_tables

__all__ = [
    "DISTILLER_LABEL",
    "IGNORED_SETTINGS",
    "METRICS",
    "METRIC_TEXT",
    "NA",
    "PAPER_COLUMNS",
    "RUN_COLUMNS",
    "SKIP_DIRS",
    "STATUSES",
    "SYMBOL",
    "TABLE_DISTILLERS",
    "Cell",
    "DatasetTable",
    "Grid",
    "Group",
    "PointStats",
    "Row",
    "build_groups",
    "build_tables",
    "collect_runs",
    "find_run_dirs",
    "fmt_point",
    "fmt_stats",
    "fmt_value",
    "grid_markdown",
    "grid_png",
    "load_paper",
    "load_run",
    "mark_duplicates",
    "md_table",
    "method_label",
    "runs_csv",
    "runs_frame",
    "table_csv",
    "table_latex",
    "table_markdown",
    "tex_escape",
    "write_outputs",
]
