"""The run directory: its files, the record's book-keeping, TensorBoard events and the lock.

A run directory holds `metrics.json` (the run's record, `rld.record`: written when the run
starts and when it ends), `history.csv`, `student.pt`, TensorBoard event files (`tb/`) and
`checkpoints/last.pt`, written atomically after every epoch with every state needed to
continue bit-for-bit (model, distiller, optimiser, scheduler, best accuracy, history, RNG
states; the data order is a function of (seed, epoch)); the previous epoch's checkpoint is
kept as `checkpoints/prev.pt`.  A finished run's record is recalled only when its
fingerprint (its result-deciding config and its teacher's identity) equals the config's.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rld import io
from rld.errors import RecordError, RunError
from rld.record import RECORD, RunRecord, read_record
from rld.reproduce import TEACHER_KEY, fingerprint, rng_state, set_rng_state, versions
from rld.teachers import verification_record

log = logging.getLogger("rld")
LOCK = ".lock"  # the lock file of a run directory (`run_lock`)


def config_difference(new: dict, old: dict) -> list[str]:
    """Keys whose values differ between two fingerprints.  Only keys on both sides are
    compared: a key one side lacks was added to (or dropped from) the schema between the two
    versions that wrote them, or is a teacher identity that could not be taken (no file);
    a changed value of a new key also changes the run directory's name, so it never reaches
    the same directory by the command line."""
    return sorted(k for k in set(new) & set(old) if new[k] != old[k])


class RunDir:
    """The files of one run directory."""

    HISTORY = "history.csv"
    LAST = Path("checkpoints") / "last.pt"
    PREV = Path("checkpoints") / "prev.pt"
    STUDENT = "student.pt"
    TENSORBOARD = "tb"

    def __init__(self, path: Path):
        self.path = Path(path)

    def recall(self, fp: dict) -> RunRecord | None:
        """The record of a finished run of this configuration; None when there is none (or
        it cannot be read: the run resumes from its checkpoint and writes a new one)."""
        try:
            record = read_record(self.path)
        except RecordError as e:
            log.warning("%s; resuming from the checkpoints to write it again", e)
            return None
        if record is None or not record.settled:
            return None
        diff = config_difference(fp, record.fingerprint)
        if diff:
            raise RunError(f"{self.path} holds a finished run of another configuration "
                           f"(differs in {', '.join(diff[:5])}); choose another tag= or "
                           "remove that directory")
        if TEACHER_KEY in fp and TEACHER_KEY not in record.fingerprint:
            log.warning("the record in %s does not identify its teacher: recalled unchecked",
                        self.path)
        return record

    def adopt_legacy(self) -> None:
        """Move into this directory the run of a version that named point directories with
        `,` and brackets (`beta=2,tau=4/seed=0` is now `beta=2+tau=4/seed=0`:
        `rld.config.renamed_point`), so that it is recalled or resumed here; an entry both
        have (Hydra's `.hydra/` and `train.log` of this command) keeps the old one as
        `<name>.legacy`.  Nothing happens once this directory has a record or checkpoints."""
        from rld.config import renamed_point

        if (self.path / RECORD).exists() or (self.path / self.LAST).exists():
            return
        point = self.path.parent
        try:
            old = next((d / self.path.name for d in point.parent.iterdir()
                        if renamed_point(d.name) == point.name
                        and (d / self.path.name).is_dir()), None)
        except OSError:
            return
        if old is None:
            return
        for entry in old.iterdir():
            target = self.path / entry.name
            os.replace(entry, target.with_name(f"{entry.name}.legacy") if target.exists()
                       else target)
        for folder in (old, old.parent):
            with suppress(OSError):
                folder.rmdir()  # when empty
        log.info("run directory renamed (names no longer hold ',' or brackets): %s -> %s",
                 old, self.path)

    def load_checkpoint(self, fp: dict, device: torch.device) -> tuple[dict, Path] | None:
        """The newest checkpoint that reads (last.pt, else prev.pt) and its path; None when
        there is none.  RunError when checkpoints exist but none reads, or when one belongs
        to another configuration."""
        tried = []
        for rel in (self.LAST, self.PREV):
            path = self.path / rel
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location=device, weights_only=False)
            except Exception as e:  # noqa: BLE001 - truncated, corrupt: try the older one
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("cannot read %s (%s)", path, reason)
                tried.append(f"{rel} ({reason})")
                continue
            diff = config_difference(fp, state.get("fingerprint") or {})
            if diff:
                raise RunError(f"{path} belongs to another configuration (differs in "
                               f"{', '.join(diff[:5])}); choose another tag= or pass "
                               "trainer.resume=false to start over")
            if tried:
                log.warning("resuming from the older checkpoint %s", path)
            return state, path
        if tried:
            raise RunError(f"cannot resume in {self.path}: no checkpoint reads "
                           f"({'; '.join(tried)}); pass trainer.resume=false to start over")
        return None

    def start_over(self) -> None:
        """Remove the checkpoints and TensorBoard events of an earlier process (a run
        restarted with trainer.resume=false), so that no fallback finds them later."""
        for path in (self.path / self.LAST, self.path / self.PREV):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.path / self.TENSORBOARD, ignore_errors=True)

    def save_checkpoint(self, state: dict) -> None:
        """Write last.pt atomically, keeping the one it replaces as prev.pt."""
        last, prev = self.path / self.LAST, self.path / self.PREV
        if last.exists():
            os.replace(last, prev)
        io.save_torch(last, state)

    def read_history(self) -> list[dict]:
        """`history.csv` as rows of numbers ([] when there is none)."""
        import csv

        try:
            with open(self.path / self.HISTORY, newline="") as f:
                return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        except FileNotFoundError:
            return []

    def write_history(self, rows: list[dict]) -> None:
        if not rows:
            return
        keys = list(rows[0])
        lines = [",".join(keys)]
        for r in rows:
            lines.append(",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k])
                                  for k in keys))
        io.write_text(self.path / self.HISTORY, "\n".join(lines) + "\n")


@contextmanager
def run_lock(run_dir: Path):
    """Exclusive lock on the run directory: two processes never train the same run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"another process is training in {run_dir}; wait for it or "
                           "choose another tag=") from None
        yield


class TensorBoard:
    """Per-epoch scalars and, at the end, the run's hyperparameters with its final metrics
    (TensorBoard's HParams view), as event files under `<run dir>/tb` (tensorboardX: the
    format without TensorFlow or the tensorboard server as a dependency)."""

    def __init__(self, run_dir: Path, enabled: bool, first_epoch: int):
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            # purge_step: after a resume, TensorBoard hides what an earlier process wrote
            # for the epochs that are trained again
            self.writer = SummaryWriter(str(run_dir / RunDir.TENSORBOARD),
                                        purge_step=first_epoch if first_epoch > 1 else None)

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch":
                tag = key.replace("loss_", "loss/").replace("test_", "test/")
                self.writer.add_scalar(tag.replace("train_", "train/"), value, row["epoch"])
        self.writer.flush()

    def finish(self, record: RunRecord) -> None:
        if self.writer is None:
            return
        hparams = {"distiller": record.distiller, "pair": record.pair, "seed": record.seed,
                   "epochs": record.epochs, **{k: v for k, v in record.settings.items()
                                               if isinstance(v, bool | int | float | str)}}
        metrics = {f"hparam/{k}": record.objective(k) for k in ("top1", "top1_best", "top5")
                   if math.isfinite(record.objective(k))}  # none for a pruned run
        self.writer.add_hparams(hparams, metrics, name="hparams")
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class RunBook:
    """The bookkeeping of one run: its directory, record, history, best accuracy and
    TensorBoard events (a packed process keeps one per grid point)."""

    cfg: Any
    dir: RunDir
    fp: dict
    t0: float = field(default_factory=time.time)
    history: list[dict] = field(default_factory=list)
    best: float = -1.0
    teacher_top1: float | None = None
    start: int = 1  # the first epoch to train
    record: RunRecord | None = None
    board: TensorBoard | None = None
    # False: a data-parallel rank other than 0, which keeps the book (history, best) and
    # writes nothing
    writes: bool = True

    def restore(self, ckpt: dict, path: Path) -> None:
        self.history, self.best = ckpt["history"], ckpt["best"]
        self.teacher_top1 = ckpt["teacher_top1"]
        self.start = ckpt["epoch"] + 1
        set_rng_state(ckpt["rng"])
        self.t0 -= ckpt["wall_s"]
        log.info("resumed from %s after epoch %d", path.relative_to(self.dir.path),
                 ckpt["epoch"])

    def checkpoint_to_resume(self, device: torch.device) -> tuple[dict, Path] | None:
        """The checkpoint to resume from (`RunDir.load_checkpoint`); with
        trainer.resume=false none, and the directory starts over (`RunDir.start_over`, by
        the process that writes)."""
        if self.cfg.trainer.resume:
            return self.dir.load_checkpoint(self.fp, device)
        if self.writes:
            self.dir.start_over()
        return None

    def begin(self, device: str, dtype: torch.dtype, world_size: int = 1) -> None:
        """The record (status "running", on the device named `device`) and the TensorBoard
        writer."""
        self.record = RunRecord.from_config(
            self.cfg, self.fp, teacher_sha256=self.fp.get(TEACHER_KEY),
            device=device, precision=str(dtype).removeprefix("torch."),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            world_size=world_size, versions=versions(),
            teacher_verification=verification_record(self.cfg))
        if self.writes:
            self.record.write(self.dir.path)
        self.board = TensorBoard(self.dir.path, self.cfg.trainer.tensorboard and self.writes,
                                 self.start)

    def epoch_done(self, row: dict, training: dict) -> None:
        """Log and store one epoch's row; checkpoint with the `training` state."""
        self.best = max(self.best, row["test_top1"])
        self.history.append(row)
        t = self.cfg.trainer
        if t.progress != "none":
            log.info("epoch %d/%d  lr %.4g  loss %.4f  train %.2f%%  test %.2f%% (best %.2f%%)"
                     "  top5 %.2f%%  %.1fs", row["epoch"], t.epochs, row["lr"], row["loss"],
                     row["train_top1"], row["test_top1"], self.best, row["test_top5"],
                     row["seconds"])
        if not self.writes:
            return
        # the events first: a process killed before the checkpoint trains this epoch again,
        # and the resumed writer purges its events (purge_step), so no epoch is missing
        self.board.epoch(row)
        self.dir.write_history(self.history)
        self.dir.save_checkpoint({
            **training, "epoch": row["epoch"], "best": self.best, "history": self.history,
            "teacher_top1": self.teacher_top1, "rng": rng_state(), "fingerprint": self.fp,
            "wall_s": time.time() - self.t0})

    def finish(self, status: str, message: str | None, student: dict) -> RunRecord:
        """The final record; `student.pt` (and the teacher file of role=teacher) when the
        run completed."""
        rec, cfg = self.record, self.cfg
        final = self.history[-1] if self.history and status == "completed" else {}
        rec.status, rec.message = status, message
        rec.top1, rec.top5 = final.get("test_top1"), final.get("test_top5")
        rec.top1_best = self.best if final else None
        rec.epochs_done = len(self.history)
        rec.pruned_epoch = len(self.history) if status == "pruned" else None
        rec.wall_s = round(time.time() - self.t0, 3)
        rec.teacher_top1 = self.teacher_top1
        if not self.writes:
            return rec
        if status == "completed":
            ckpt = {**student, "top1": rec.top1}
            io.save_torch(self.dir.path / RunDir.STUDENT, ckpt)
            if cfg.role == "teacher":
                io.save_torch(Path(cfg.teacher.checkpoint), ckpt)
                log.info("teacher checkpoint written to %s", cfg.teacher.checkpoint)
        rec.write(self.dir.path)
        self.board.finish(rec)
        if status == "completed":
            log.info("done: top-1 %.2f%% (best %.2f%%), top-5 %.2f%%, %s", rec.top1,
                     rec.top1_best, rec.top5, self.dir.path)
        return rec

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def record_failure(cfg, run_dir: Path, message: str) -> None:
    """A record with status "failed" for a run that raised (tables show it as failed;
    running the same command again retries it).  A finished run's record is never
    replaced (the error may be about that very directory)."""
    try:
        old = read_record(run_dir)
    except RecordError:
        old = None
    if old is not None and old.settled:
        return
    RunRecord.from_config(cfg, fingerprint(cfg), status="failed", message=message,
                          versions=versions()).write(run_dir)


def discard_unused(run_dir: Path, root: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote before the command
    refused its config (`.hydra/`, `train.log`, the lock), and the folders above it up to `root`
    that this leaves empty, so that a mistyped value leaves no directory behind."""
    run_dir, root = Path(run_dir).absolute(), Path(root).absolute()
    try:
        if not {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log", LOCK}:
            return
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        for name in ("train.log", LOCK):
            (run_dir / name).unlink(missing_ok=True)
        folder = run_dir
        while folder != root and root in folder.parents:
            folder.rmdir()  # OSError when not empty: other runs are there
            folder = folder.parent
    except OSError:
        pass
