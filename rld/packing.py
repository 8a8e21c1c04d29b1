"""Packs: the grid points of a sweep that differ only in their distiller, grouped to train
together in one process (one data pipeline, one teacher forward per batch, K students
stepped together: `rld.engine.train_points`), and the log lines of each point of a pack.

The points of a pack share everything but the distiller (`pack_key`): data set, pair, seed,
optimiser, epochs, teacher.  Their data order and augmentation depend only on (seed, epoch),
so they see identical batches.  A pack holds packable distillers only (logit distillers
without modules: `DistillerSpec.packable`); any other point is a unit of one.  Used by the
`packed` launcher and by the `pack` option of the `gpus` and `slurm` launchers
(hydra_plugins/rld_plugins/_jobs.py).

    from rld.packing import plan_packs
    from rld.engine import train_points
    for unit in plan_packs(cfgs, pack=16):
        outcomes = train_points([cfgs[i] for i in unit], [run_dirs[i] for i in unit])
"""

from __future__ import annotations

import contextvars
import json
import logging
from contextlib import contextmanager
from pathlib import Path

from rld.config import distiller_spec, distills, key_in, point_value
from rld.reproduce import fingerprint, flatten

# config keys in which the points of one pack may differ (entries as in rld.config.key_in):
# the distiller (the teacher too: distilling points are grouped by teacher file apart), where
# a run is filed and what it returns
PER_POINT = ("distiller.", "teacher.", "tag", "objective", "hparams", "hparams.",
             "trainer.resume", "trainer.tensorboard", "paths.sweeps")


# ------------------------------------------------------------------------------ grouping
def pack_key(cfg) -> str | None:
    """What the points of one pack share (the composed config without `PER_POINT`), as a
    string; None for a config that cannot be packed (a distiller that does not pack, or a
    config that does not resolve: it runs alone and fails there with its message)."""
    try:
        if not distiller_spec(cfg).packable:
            return None
        flat = flatten(cfg)
    except Exception:  # noqa: BLE001 - e.g. a bad interpolation: the point runs alone
        return None
    return json.dumps({k: v for k, v in flat.items() if not key_in(k, PER_POINT)},
                      sort_keys=True, default=str)


def plan_packs(cfgs: list, pack: int | None = None) -> list[list[int]]:
    """Indices of `cfgs` grouped into packs of at most `pack` points (None: no limit),
    split evenly, in the order of each pack's first index.  Points that cannot be packed
    are packs of one; points without a teacher (vanilla) join a pack of distilling points
    of the same key when there is one; configs of one fingerprint (a setting the distiller
    does not read swept: the same run) stay in one pack and count as one point."""
    if pack is not None and int(pack) < 1:
        raise ValueError(f"pack must be >= 1 or null, got {pack}")
    groups: dict[tuple, list[int]] = {}
    alone: list[tuple[str, int]] = []
    for i, cfg in enumerate(cfgs):
        key = pack_key(cfg)
        if key is None:
            groups[("", i)] = [i]
        elif distills(cfg):
            groups.setdefault((key, str(cfg.teacher.checkpoint)), []).append(i)
        else:
            alone.append((key, i))
    for key, i in alone:
        home = next((g for g in groups if g[0] == key), (key, None))
        groups.setdefault(home, []).append(i)
    units: list[list[int]] = []
    for members in groups.values():
        runs: dict[str, list[int]] = {}
        for i in members:
            runs.setdefault(_identity(cfgs[i]), []).append(i)
        points = list(runs.values())
        n = 1 if pack is None else -(-len(points) // int(pack))  # packs
        size, extra = divmod(len(points), n)
        start = 0
        for j in range(n):
            stop = start + size + (j < extra)
            units.append(sorted(i for point in points[start:stop] for i in point))
            start = stop
    return sorted(units, key=lambda u: u[0])


def _identity(cfg) -> str:
    """The run a config names, whatever settings it sets that its distiller does not read."""
    return json.dumps(fingerprint(cfg), sort_keys=True, default=str)


# ------------------------------------------------------------------------------ logging
_POINT: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "rld_packed_point", default=None)


def point_label(cfg) -> str:
    """A point's short name in the pack's log: its distiller and grid values."""
    try:
        keys = distiller_spec(cfg).point
    except ValueError:  # not registered: its name alone
        keys = ()
    values = [f"{k}={point_value(cfg.distiller[k])}" for k in keys]
    return " ".join([str(cfg.distiller.name), *values])


@contextmanager
def point_scope(run_dir: Path, label: str):
    """Log records emitted inside belong to this point (see `PointFilter`)."""
    token = _POINT.set((str(run_dir), label))
    try:
        yield
    finally:
        _POINT.reset(token)


class PointFilter(logging.Filter):
    """For a point's own log file: records of this point, and those of the whole pack."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = str(run_dir)

    def filter(self, record: logging.LogRecord) -> bool:
        point = _POINT.get()
        return point is None or point[0] == self.run_dir


class PointFormatter(logging.Formatter):
    """Prefixes a point's records with its label (for the pack's console)."""

    def __init__(self, base: logging.Formatter | None):
        super().__init__()
        self.base = base or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        point = _POINT.get()
        text = self.base.format(record)
        return text if point is None else f"[{point[1]}] {text}"


