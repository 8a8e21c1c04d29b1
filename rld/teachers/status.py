"""A teacher file's verification, cached beside it, and what training does with it.

`python -m rld.teachers verify` evaluates a teacher and writes `<file>.verify.json` with the
file's SHA-256 (`rld.reproduce.file_sha256`), its top-1, the expected top-1 and where that
number comes from.  `verification(path)` reads it back: "verified" or "failed" while the
file's SHA-256 is the one verified, else "unverified" (never verified, the file changed since,
or evaluated without an expected accuracy).  Training calls `check_teacher` (logs "verified",
warns with the command that verifies, and gives the reason to stop on "failed" unless
teacher.allow_unverified) and records `verification_record` in metrics.json.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("rld")

CACHE_SUFFIX = ".verify.json"
STATUSES = ("verified", "failed", "unverified")
# overrides of a training command that decide where a teacher is and what it is trained on
TEACHER_KEYS = ("dataset", "dataset.", "pair", "pair.", "paths.", "teacher.checkpoint")


@dataclass
class Verification:
    status: str  # verified | failed | unverified
    sha256: str | None = None  # of the file verified (None: no file)
    top1: float | None = None  # evaluated test top-1 (%)
    expected: float | None = None  # the published (or --expected) top-1
    tolerance: float | None = None  # points
    source: str | None = None  # where `expected` comes from
    reason: str | None = None  # unverified: why
    checked: str | None = None  # when it was evaluated (UTC, ISO 8601)

    def describe(self) -> str:
        """What was found, without the status: `top-1 79.41 (expected 79.42 ± 0.1, <source>)`,
        or why it is unverified."""
        if self.top1 is None:
            return str(self.reason)
        if self.expected is None:
            return f"top-1 {self.top1:.2f}, {self.reason}"
        return (f"top-1 {self.top1:.2f} (expected {self.expected:.2f} ± {self.tolerance:g}, "
                f"{self.source})")


def cache_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CACHE_SUFFIX)


def verification(path: Path) -> Verification:
    """The verification of the teacher file `path` as its cache holds it for its current
    bytes."""
    from rld.reproduce import file_sha256

    path = Path(path)
    if not path.is_file():
        return Verification("unverified", reason=f"no file at {path}")
    sha = file_sha256(path)
    try:
        cached = json.loads(cache_path(path).read_text())
        known = {k: cached[k] for k in Verification.__dataclass_fields__ if k in cached}
        result = Verification(**known)
    except (OSError, ValueError, TypeError, AttributeError):
        return Verification("unverified", sha, reason="never verified")
    if result.sha256 != sha or result.status not in STATUSES:
        return Verification("unverified", sha, reason="the file changed since it was verified")
    return result


def write_verification(path: Path, result: Verification) -> None:
    from rld.io import write_json

    write_json(cache_path(path), asdict(result))


def verification_record(cfg) -> dict | None:
    """What a run's record holds of its teacher's verification (None: no teacher)."""
    from rld.config import distills

    if cfg.role != "student" or not distills(cfg):
        return None
    result = verification(Path(cfg.teacher.checkpoint))
    return {k: v for k, v in asdict(result).items() if v is not None}


def check_teacher(cfg, path: Path) -> str | None:
    """Before distilling from `path`: log that it is verified, or warn (with the command that
    verifies it) when it is not; when its verification failed, the one-line reason to stop
    (None with teacher.allow_unverified=true, which only warns)."""
    result = verification(path)
    if result.status == "verified":
        log.info("teacher %s verified: %s", path, result.describe())
    elif result.status == "unverified":
        log.warning("teacher %s is unverified: %s; verify it with: %s", path,
                    result.describe(), teacher_command(cfg, "verify"))
    elif not cfg.teacher.allow_unverified:
        return (f"teacher {path} failed its verification: {result.describe()}; fetch or "
                "train it again, or pass teacher.allow_unverified=true to distil from it anyway")
    else:
        log.warning("teacher %s failed its verification: %s; distilling from it anyway "
                    "(teacher.allow_unverified=true)", path, result.describe())
    return None


def _task_overrides(cfg) -> list[str] | None:
    """The command-line overrides of the running Hydra job, or of the multirun whose config
    `cfg` is (None outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(o) for o in HydraConfig.get().overrides.task]
    except (ImportError, ValueError):
        from omegaconf import OmegaConf

        task = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
        return None if task is None else [str(o) for o in task]


def teacher_command(cfg, action: str) -> str:
    """`python -m rld.teachers <action> dataset=.. pair=..` with the run's own overrides that
    decide where its teacher is and what it is trained on (paths.*, dataset.*, pair.*,
    teacher.checkpoint), so that the command acts on the file the run looks for."""
    from rld.config import key_in

    task = _task_overrides(cfg)
    if task is None:  # outside a Hydra job: the resolved folder of the teachers
        task = [f"paths.teachers={cfg.paths.teachers}"]
    kept = [o for o in task if key_in(o.lstrip("+~").partition("=")[0], TEACHER_KEYS)
            and o.partition("=")[0] not in ("dataset", "pair")]
    words = [f"dataset={cfg.dataset.name}", f"pair={cfg.pair.name}", *kept]
    return " ".join(["python -m rld.teachers", action, *map(shlex.quote, words)])


def require_teacher_file(cfg) -> Path:
    """The run's teacher file (`teacher.checkpoint`); RunError with the remedies
    (`missing_teacher_message`) when it is not there."""
    from rld.errors import RunError

    path = Path(cfg.teacher.checkpoint)
    if not path.exists():
        raise RunError(missing_teacher_message(cfg))
    return path


def missing_teacher_message(cfg) -> str:
    """The error of a run whose teacher file is missing: the commands that fetch or train
    it where the run looks, and the old layout's file when there is one."""
    path = Path(cfg.teacher.checkpoint)
    lines = [f"teacher checkpoint not found: {path}",
             f"  train it:  {teacher_command(cfg, 'train')}"]
    if cfg.dataset.teacher_source:
        lines.append(f"  or fetch the published one:  {teacher_command(cfg, 'fetch')}")
    else:
        lines.append(f"  or fetch your own archive of <arch>_vanilla/{cfg.dataset.teacher_file}:"
                     f"  {teacher_command(cfg, 'fetch')} --from URL|PATH")
    old = Path(cfg.paths.teachers) / f"{cfg.pair.teacher}_vanilla" / cfg.dataset.teacher_file
    if old.is_file():
        teachers = Path(cfg.paths.teachers)
        fix = (f"pass paths.teachers={teachers.parent}" if teachers.name == cfg.dataset.name
               else f"move it to {path}")
        lines.append(f"  a teacher is at {old}, the layout without the data set's folder "
                     f"(paths.teachers now holds one folder per data set): {fix}")
    lines.append("  or pass teacher.checkpoint=PATH (the published cifar_teachers.tar unpacks "
                 "to <arch>_vanilla/ckpt_epoch_240.pth)")
    return "\n".join(lines)


# the launchers whose jobs run on this machine: a teacher file missing here is missing for them
# (a Slurm job may see other file systems than the login node that submits it)
LOCAL_LAUNCHERS = (None, "basic", "gpus", "packed", "submitit_local")
# keys which, swept, give a multirun's points different teachers (or none)
_TEACHER_DECIDING = (*TEACHER_KEYS, "distiller", "role")


def swept_keys(cfg) -> set[str]:
    """The keys that a multirun's points set differently: its sweep overrides (`key=a,b`,
    `range(..)`, `choice(..)`) and the search space of an Optuna preset
    (`hydra.sweeper.params`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    overrides = OverridesParser.create().parse_overrides(_task_overrides(cfg) or [])
    keys = {o.key_or_group for o in overrides if o.is_sweep_override()}
    return keys | set(OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {})


def check_multirun_teacher(cfg) -> None:
    """Before a multirun launches a job: `require_teacher_file` once, when its points all
    distil from one teacher file, instead of every point failing with the same message.
    Nothing is checked when the points' teachers differ (a swept pair, data set, path or
    distiller: each point says so itself) or when the jobs run elsewhere (Slurm)."""
    from rld.config import distills, key_in

    if cfg.hydra.runtime.choices.get("hydra/launcher") not in LOCAL_LAUNCHERS:
        return
    if any(key_in(k, _TEACHER_DECIDING) for k in swept_keys(cfg)):
        return
    if cfg.role == "student" and distills(cfg):
        require_teacher_file(cfg)
