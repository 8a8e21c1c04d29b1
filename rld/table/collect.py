"""Collecting runs: finding run directories, reading each one's config and
``metrics.json`` into a flat record (a row of ``runs.csv``), and marking duplicates by
what a run measures (its unit and grid point)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from .saved_config import _cfg_get
from .values import _bool, _float, _int

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

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
        finite = math.isfinite(rec["top1"]) and math.isfinite(rec["top1_best"])
        if st not in ("completed", "diverged"):
            rec["status"] = "failed"  # an error stopped the run (or an unknown status)
        elif st == "diverged" or not finite:
            rec["status"] = "diverged"
        else:
            rec["status"] = "completed"
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


def runs_frame(runs: list[dict]):
    """The runs as a pandas DataFrame (the columns of ``runs.csv``)."""
    import pandas as pd

    return pd.DataFrame([{c: r[c] for c in RUN_COLUMNS} for r in runs], columns=RUN_COLUMNS)
