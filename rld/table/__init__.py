"""Turn sweep run directories into the paper's results tables.

``python -m rld.table [SWEEP_DIR ...] [--out DIR] [--metric top1_best|top1]``

Every directory holding ``.hydra/config.yaml`` under the given roots (default ``sweeps/``)
is one run; its record (``metrics.json``, `rld.record`: written by the engine when the run
starts and rewritten when it ends) says what it is and what it gave.  The outputs, all
under ``--out`` (default ``results/``):

- ``runs.csv``: one row per run directory, finished or not;
- ``<dataset>.md|.csv|.tex``: one row per teacher/student pair with the teacher, the
  student trained alone, and the best point of each distiller (KD, DKD, RLD always; any
  other registered distiller with runs, e.g. FitNet, OFD, ReviewKD, CRD, or a plugin's),
  beside the values reported in the literature (``rld/data/paper_results*.csv``);
- ``<dataset>/<pair>_<distiller>[_<variant>]_grid.md|.png``: for every distiller run at
  more than one point, its grid over the settings that vary (two: rows x columns, e.g.
  beta x tau; one: a single row; more: one grid per value of the others).

Rules (footnotes of each table count what they affect):

- Runs are grouped by data set, pair, distiller and the distiller's settings (those it
  registered, ``rld.distillers``; the others are ignored); a vanilla run (role
  teacher, or role student with distiller vanilla) is grouped by the architecture it
  trains, so the same teacher trained under two pair names is one group.
- Within a group, runs of different ``trainer.epochs`` are never averaged together: the
  epochs value with the most runs is used (tie: the larger one).
- The same configuration and seed found twice (two sweep directories) is a duplicate: a
  run with numbers (completed or diverged) beats one without, then the first by sorted
  path is kept.
- A run whose record says "running" or "interrupted", or that has no record (killed before the engine
  wrote one, or made by an older version; read from its saved config instead), is
  *incomplete*; a record "diverged", or "completed" with accuracies that are not finite, is
  *diverged*; a record "pruned" (stopped early by an Optuna pruner) is *pruned*, shown as
  "pruned at epoch e"; any other status is *failed*, and so is an unreadable
  ``metrics.json``, which a footnote names with the reason.  None of them enter a mean (the
  best point is chosen among completed runs); grid cells show them as text.
- Output is byte-identical for identical input (sorted everything, fixed formats, PNGs
  without timestamps or software metadata).

Modules: ``runs`` (run directories read into rows, duplicates), ``summary`` (groups, point
statistics, grids, best points, the literature's values, the per-data-set tables and their
footnotes, and how values read as text), ``render`` (Markdown, CSV, LaTeX, PNG heatmaps,
writing the files), ``__main__`` (the command line).
"""

from .render import (
    cell_text,
    grid_markdown,
    grid_name,
    grid_png,
    md_table,
    runs_csv,
    table_csv,
    table_latex,
    table_markdown,
    tex_escape,
    write_outputs,
)
from .runs import (
    PROBLEMS,
    SKIP_DIRS,
    STATUSES,
    Run,
    collect_runs,
    find_run_dirs,
    mark_duplicates,
    read_run,
    read_saved_config,
    run_columns,
    runs_frame,
)
from .summary import (
    METRIC_TEXT,
    METRICS,
    NA,
    SYMBOL,
    UNIT_LABEL,
    Cell,
    DatasetTable,
    Grid,
    Group,
    PaperRow,
    PointStats,
    Row,
    build_groups,
    build_tables,
    fmt_point,
    fmt_stats,
    fmt_value,
    load_literature,
    method_label,
    point_keys,
)

__all__ = [
    "METRICS", "METRIC_TEXT", "NA", "PROBLEMS",
    "SKIP_DIRS", "STATUSES", "SYMBOL", "UNIT_LABEL", "Cell", "DatasetTable", "Grid",
    "Group", "PaperRow", "PointStats", "Row", "Run", "build_groups", "build_tables",
    "cell_text", "collect_runs", "find_run_dirs", "fmt_point", "fmt_stats", "fmt_value",
    "grid_markdown", "grid_name", "grid_png", "load_literature", "mark_duplicates",
    "md_table", "method_label", "point_keys", "read_run", "read_saved_config", "run_columns",
    "runs_csv", "runs_frame",
    "table_csv", "table_latex", "table_markdown", "tex_escape", "write_outputs",
]  # fmt: skip
