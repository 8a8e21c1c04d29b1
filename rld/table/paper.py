"""The values reported in the literature: the packaged ``rld/data/paper_results.csv``."""

from __future__ import annotations

import csv
import io
import math
from importlib import resources
from pathlib import Path

from .values import _float

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
        text = (Path(__file__).parents[1] / "data" / "paper_results.csv").read_text(encoding="utf-8")
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        for col in PAPER_COLUMNS.values():
            row[col] = _float(row.get(col) or math.nan)
        rows.append(row)
    return rows
