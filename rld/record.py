"""The record of a run, `metrics.json`: one schema, written by the engine and read by the
engine (to recall a finished run), the tables and the Optuna sweeper.

The engine writes the record when a run starts (status "running", with everything the
config decides) and rewrites it when the run ends.  A key is added to what runs record by
adding a field here; a distiller's settings are those it registered (`rld.distillers`).  On
disk the distiller's settings sit at the top level beside the other fields (`"beta": 8.0`),
as they always have; keys this version does not know are kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rld.config import distiller_spec, trained_arch
from rld.errors import ConfigError, RecordError

RECORD = "metrics.json"
STATUSES = ("running", "completed", "diverged", "failed", "pruned", "interrupted")
# a run in one of these states is finished: recalled, never trained again (a pruned run is
# not: run again without its pruner, it resumes from its checkpoint to the end)
SETTLED = ("completed", "diverged")


def _finite_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


@dataclass
class RunRecord:
    # what the config decides
    dataset: str
    pair: str
    role: str
    student: str  # the architecture trained (the teacher's own with role=teacher)
    distiller: str
    settings: dict[str, Any]  # the distiller's settings, resolved
    seed: int
    epochs: int  # configured (trainer.epochs)
    teacher: str | None = None  # the teacher's architecture, for distillation runs
    fingerprint: dict[str, Any] = field(default_factory=dict)
    # what the run gives
    status: str = "running"
    message: str | None = None
    top1: float | None = None  # test top-1 (%) after the last epoch
    top1_best: float | None = None  # best test top-1 over the epochs
    top5: float | None = None
    epochs_done: int | None = 0  # None: a record from before it was recorded
    pruned_epoch: int | None = None  # the epoch after which an Optuna pruner stopped it
    wall_s: float | None = None
    teacher_top1: float | None = None
    teacher_sha256: str | None = None
    # the teacher file's verification when the run started (rld.teachers: status verified |
    # failed | unverified, top1, expected, tolerance, source, reason, checked)
    teacher_verification: dict[str, Any] | None = None
    device: str | None = None
    precision: str | None = None
    cuda_visible_devices: str | None = None
    world_size: int = 1
    versions: dict[str, Any] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)  # the config's plugins (rld.registry)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys read from disk

    @classmethod
    def from_config(cls, cfg, fingerprint: dict | None = None, **outcome: Any) -> RunRecord:
        """The record of a composed TrainConfig before it runs (status "running")."""
        d = cfg.distiller
        try:
            spec = distiller_spec(cfg)
        except ConfigError:  # the record of a run that failed for that reason
            spec = None
        names = spec.setting_names() if spec else [k for k in d if k != "name"]
        return cls(
            dataset=str(cfg.dataset.name), pair=str(cfg.pair.name), role=str(cfg.role),
            student=trained_arch(cfg),
            teacher=str(cfg.pair.teacher) if spec is None or spec.needs_teacher else None,
            distiller=str(d.name), settings={k: d.get(k) for k in names}, seed=int(cfg.seed),
            plugins=[str(m) for m in cfg.get("plugins") or ()],
            epochs=int(cfg.trainer.epochs), fingerprint=dict(fingerprint or {}), **outcome)

    @property
    def settled(self) -> bool:
        return self.status in SETTLED

    def objective(self, key: str) -> float:
        """The metric `key` (top1_best | top1 | top5) as a float; NaN when there is none."""
        value = _finite_or_none(getattr(self, key))
        return math.nan if value is None else value

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("settings", "extra")}
        return {**self.extra, **out, **self.settings}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        from rld.distillers import setting_keys

        data = dict(data)
        settings = {k: data.pop(k) for k in setting_keys() if k in data}
        known = {f.name for f in fields(cls)} - {"settings", "extra"}
        values = {k: data.pop(k) for k in list(data) if k in known}
        for k in ("dataset", "pair", "role", "student", "distiller"):
            values.setdefault(k, None)
        values.setdefault("seed", None)
        values.setdefault("epochs_done", None)
        values.setdefault("epochs", None)
        return cls(settings=settings, extra=data, **values)

    def write(self, run_dir: Path) -> None:
        from rld.io import write_json

        write_json(Path(run_dir) / RECORD, self.to_json())


def read_record(run_dir: Path) -> RunRecord | None:
    """The record in `run_dir`; None when there is none; RecordError (naming the file) when
    it cannot be read."""
    path = Path(run_dir) / RECORD
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RecordError(f"{path} cannot be read: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise RecordError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): "
                          "truncated or damaged") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path} holds a JSON {type(data).__name__}, not a record")
    return RunRecord.from_json(data)
