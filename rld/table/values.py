"""Coercion of raw values read from saved configs, ``metrics.json`` and CSV cells."""

from __future__ import annotations

import math
from typing import Any


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
