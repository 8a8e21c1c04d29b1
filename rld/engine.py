"""The training engine: one run of a config in one run directory.

It knows models, data, an optimiser and a `Distiller`, nothing about any specific method;
the step and epoch loops are in `rld.loop`.  A run directory holds `metrics.json` (the
run's record, `rld.record`: written when the run starts and when it ends), `history.csv`,
`student.pt`, TensorBoard event files (`tb/`) and `checkpoints/last.pt`, written atomically
after every epoch with every state needed to continue bit-for-bit (model, distiller,
optimiser, scheduler, best accuracy, history, RNG states; the data order is a function of
(seed, epoch)); the previous epoch's checkpoint is kept as `checkpoints/prev.pt`.  Running
again in the same directory resumes from the newest checkpoint that reads; a finished run
returns its record without training; a run whose fingerprint (its result-deciding config and
its teacher's identity) differs from the directory's is refused.

Under torchrun or in a Slurm job of several tasks (`rld.world`), a run is data-parallel
(`run_parallel`, `rld.distributed`): rank 0 recalls, locks, logs and writes the run directory
(its `RunBook` writes; the others' keep the same book and write nothing), every rank resumes
from the same checkpoint and trains its share of each global batch, and the numbers of each
epoch are those of the whole global batch and test set.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rld import io
from rld.config import distills, trained_arch
from rld.data import DataError, build_loaders
from rld.data import resolve_device as resolve_data_device
from rld.distillers import build_distiller
from rld.distributed import Group, data_parallel, local_device, process_group
from rld.loop import Diverged, Progress, TrainState, build_train_state, evaluate, train_epoch
from rld.models import CheckpointError, build_model, load_checkpoint
from rld.record import RecordError, RunRecord, read_record
from rld.reproduce import (
    TEACHER_KEY,
    file_sha256,
    fingerprint,
    rng_state,
    seed_everything,
    set_rng_state,
    versions,
)
from rld.teachers import check_teacher, missing_teacher_message, verification_record
from rld.validate import ConfigError, validate
from rld.world import World, find_world

log = logging.getLogger("rld")


class RunError(ValueError):
    """A run cannot start (missing teacher, busy or mismatched run directory, ...)."""


# --------------------------------------------------------------------------- devices
def resolve_device(name: str) -> torch.device:
    """The data layer's resolution ("auto": CUDA when present), refusing absent CUDA."""
    device = resolve_data_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: CUDA is not available here; use auto or cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def device_label(device: torch.device) -> str:
    return str(device) if device.type != "cuda" else torch.cuda.get_device_name(device)


# --------------------------------------------------------------------------- run directory
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
    with open(run_dir / ".lock", "w") as handle:
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
        metrics = {f"hparam/{k}": record.objective(k) for k in ("top1", "top1_best", "top5")}
        self.writer.add_hparams(hparams, metrics, name="hparams")
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------- one run
def teacher_identity(cfg) -> str | None:
    """SHA-256 of the teacher checkpoint of a distillation run (None: no teacher, or no
    file yet: the run stops later with the remedies)."""
    if cfg.role != "student" or not distills(cfg):
        return None
    path = Path(cfg.teacher.checkpoint)
    return file_sha256(path) if path.is_file() else None


def run(cfg, run_dir: Path) -> RunRecord:
    """Train (or resume, or recall) the run of `cfg` in `run_dir`; returns its record.
    Under torchrun or in a Slurm job of several tasks, this process is one rank of a
    data-parallel run (`run_parallel`)."""
    world = find_world()
    validate(cfg, world)
    if world.distributed:
        return run_parallel(cfg, run_dir, world)
    rd = RunDir(run_dir)
    fp, done = recall(cfg, rd)
    if done is not None:
        return done
    with ExitStack() as held:
        hold_lock(rd, held)
        return train(cfg, RunBook(cfg, rd, fp))


def run_parallel(cfg, run_dir: Path, world: World) -> RunRecord:
    """This process's part of a data-parallel run of `cfg` on `world.size` processes.
    Rank 0 takes the decisions (recall, run lock) for all ranks and alone logs and writes
    the run directory; every rank resumes from the same checkpoint and trains its share of
    each global batch."""
    if not world.main:
        log.setLevel(logging.WARNING)
    device, _ = setup_device(cfg.trainer, world)
    rd = RunDir(run_dir)
    with process_group(world, device, cfg.trainer.dist_timeout_s) as group, ExitStack() as held:
        fp, done = recall(cfg, rd, group)
        if done is not None:
            return done
        hold_lock(rd, held, group)
        log.info("data-parallel run on %d processes (%s, rank 0 on %s)", world.size,
                 "nccl" if device.type == "cuda" else "gloo", device)
        return train(cfg, RunBook(cfg, rd, fp, writes=world.main), group)


def recall(cfg, rd: RunDir, group: Group | None = None) -> tuple[dict, RunRecord | None]:
    """The run's fingerprint (agreed by the ranks of `group`) and, when the run already
    finished, its record (rank 0 reads it for every rank)."""
    if group is None:
        fp = fingerprint(cfg, teacher_identity(cfg))
        done = rd.recall(fp)
    else:
        fp = agreed_fingerprint(cfg, group)
        done = group.on_main(lambda: rd.recall(fp))
    if done is not None:
        log.info("run already finished (%s): %s", done.status, rd.path)
    return fp, done


def hold_lock(rd: RunDir, held: ExitStack, group: Group | None = None) -> None:
    """Take the run directory's lock into `held` (rank 0's for every rank of `group`);
    RunError, on every rank, when another process holds it."""
    if group is None:
        held.enter_context(run_lock(rd.path))
    else:
        group.on_main(lambda: held.enter_context(run_lock(rd.path)))


def agreed_fingerprint(cfg, group: Group) -> dict:
    """The run's fingerprint, with the teacher identity taken by rank 0 (which alone writes
    its hash cache); RunError unless every rank composed the same configuration."""
    fps = group.gather(fingerprint(cfg))
    odd = [r for r, fp in enumerate(fps) if fp != fps[0]]
    if odd:
        diff = config_difference(fps[odd[0]], fps[0]) or ["their keys"]
        raise RunError(f"the ranks of this job composed different configurations (rank "
                       f"{odd[0]} differs from rank 0 in {', '.join(diff[:5])}): every rank "
                       "must run the same command")
    return fingerprint(cfg, group.on_main(lambda: teacher_identity(cfg)))


def train(cfg, book: RunBook, group: Group | None = None) -> RunRecord:
    """Set up, resume (or evaluate the teacher), train the remaining epochs, finish; as one
    rank of `group`'s data-parallel run when given."""
    world = group.world if group is not None else None
    device, dtype = setup_device(cfg.trainer, world)
    seed_everything(cfg.seed)
    data = build_data(cfg, device, world)
    teacher = load_teacher(cfg, data.num_classes, device) if distills(cfg) else None
    state, scheduler = build_student(cfg, data, teacher, device, dtype)
    if group is not None:
        t = cfg.trainer
        data_parallel(state, group, sync_bn=t.sync_bn, compile=t.compile,
                      compile_mode=t.compile_mode)
    found = book.checkpoint_to_resume(device)
    if group is not None:
        check_same_start(group, book.dir, found)
    if found is not None:
        load_training_state(state, scheduler, found[0])
        book.restore(*found)
    elif teacher is not None:
        book.teacher_top1, _ = evaluate(state, data.test, model=teacher)
        log.info("teacher %s: test top-1 %.2f%%", cfg.pair.teacher, book.teacher_top1)
    book.begin(device, dtype, world_size=group.size if group is not None else 1)
    try:
        status, message = train_epochs(cfg, book, state, scheduler, data)
        return book.finish(status, message, student_checkpoint(cfg, state, data))
    finally:
        book.close()


def check_same_start(group: Group, rd: RunDir, found: tuple[dict, Path] | None) -> None:
    """RunError unless every rank found the same checkpoint (a file system that shows the
    ranks different files would make them train different models)."""
    starts = group.gather(None if found is None else (found[1].name, found[0]["epoch"]))
    if any(s != starts[0] for s in starts):
        raise RunError(f"the ranks found different checkpoints in {rd.path} ({starts}): is "
                       "the run directory on a file system that every node sees alike?")


def train_epochs(cfg, book: RunBook, state: TrainState, scheduler, data) -> tuple[str, str | None]:
    """Train the epochs the book has not seen; returns (status, message)."""
    t = cfg.trainer
    progress = Progress(t.progress if book.writes else "none", t.log_every_s)
    for epoch in range(book.start, t.epochs + 1):
        e0 = time.time()
        lr = state.optimizer.param_groups[0]["lr"]
        data.train.set_epoch(epoch)
        try:
            stats = train_epoch(state, data.train, epoch, t.epochs, progress)
        except Diverged as e:
            log.error("%s: stopping this run", e)
            return "diverged", str(e)
        top1, top5 = evaluate(state, data.test)
        scheduler.step()
        book.epoch_done({"epoch": epoch, "lr": lr, **stats, "test_top1": top1,
                         "test_top5": top5, "seconds": time.time() - e0},
                        training_state_dict(state, scheduler))
    return "completed", None


# --------------------------------------------------------------------------- the parts
def setup_device(t, world: World | None = None) -> tuple[torch.device, torch.dtype]:
    """The device and precision of `trainer` settings, with cuDNN/TF32 set for CUDA; on
    `world`, this rank's GPU (`rld.distributed.local_device`), made the current one."""
    device = resolve_device(t.device)
    if world is not None:
        device = local_device(device, world)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not t.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, resolve_precision(t.precision, device)


def build_data(cfg, device: torch.device, world: World | None = None):
    """The run's train/test loaders (`rld.data.Loaders`); on `world`, this rank's share of
    every global batch."""
    t = cfg.trainer
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    try:
        # with the batch's sample indices (CRD's memory): a view of the epoch's order, free
        data = build_loaders(cfg.dataset, t.batch_size, device, cfg.seed,
                             drop_last=t.drop_last, test_batch_size=max(t.batch_size, 256),
                             with_index=True, rank=rank, world_size=size)
    except DataError as e:
        raise RunError(str(e)) from None
    if data.num_train < size:
        raise RunError(f"dataset {cfg.dataset.name} has {data.num_train} training samples, "
                       f"fewer than the {size} ranks of this job")
    return data


def build_student(cfg, data, teacher, device: torch.device, dtype: torch.dtype):
    """A fresh student, its distiller, optimiser (`TrainState`) and learning-rate schedule."""
    t, o = cfg.trainer, cfg.optim
    student = build_model(trained_arch(cfg), data.num_classes, cfg.dataset.family)
    distiller = build_distiller(cfg.distiller, student=student, teacher=teacher,
                                image_size=int(cfg.dataset.image_size),
                                num_train=data.num_train,
                                train_labels=getattr(data.train, "labels", None))
    state = build_train_state(student, teacher, distiller, device=device, dtype=dtype,
                              channels_last=t.channels_last, compile=t.compile,
                              compile_mode=t.compile_mode, lr=o.lr, momentum=o.momentum,
                              weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(state.optimizer, list(o.milestones),
                                                     gamma=o.gamma)
    return state, scheduler


def training_state_dict(state: TrainState, scheduler) -> dict:
    """What a checkpoint holds of the training itself (the book adds its own parts); the
    teacher's state too where training changes it (`Distiller.teacher_train`)."""
    out = {"model": state.student.state_dict(), "distiller": state.distiller.state_dict(),
           "optimizer": state.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
           "scaler": state.scaler.state_dict() if state.scaler is not None else None}
    if state.distiller.teacher_train:
        out["teacher"] = state.teacher.state_dict()
    return out


def load_training_state(state: TrainState, scheduler, ckpt: dict) -> None:
    state.student.load_state_dict(ckpt["model"])
    state.distiller.load_state_dict(ckpt.get("distiller") or {})
    if ckpt.get("teacher") is not None:
        state.teacher.load_state_dict(ckpt["teacher"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])


def student_checkpoint(cfg, state: TrainState, data) -> dict:
    """`student.pt`: the trained model alone, loadable as a teacher."""
    return {"model": state.student.state_dict(), "arch": trained_arch(cfg),
            "num_classes": data.num_classes, "family": cfg.dataset.family,
            "dataset": cfg.dataset.name, "epochs": int(cfg.trainer.epochs)}


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

    def begin(self, device: torch.device, dtype: torch.dtype, world_size: int = 1) -> None:
        """The record (status "running") and the TensorBoard writer."""
        self.record = RunRecord.from_config(
            self.cfg, self.fp, teacher_sha256=self.fp.get(TEACHER_KEY),
            device=device_label(device), precision=str(dtype).removeprefix("torch."),
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


def load_teacher(cfg, num_classes: int, device: torch.device) -> torch.nn.Module:
    path = Path(cfg.teacher.checkpoint)
    arch = cfg.pair.teacher
    if not path.exists():
        raise RunError(missing_teacher_message(cfg))
    refused = check_teacher(cfg, path)  # logs verified / warns unverified; failed: a reason
    if refused:
        raise RunError(refused)
    teacher = build_model(arch, num_classes, cfg.dataset.family)
    try:
        load_checkpoint(teacher, path)
    except CheckpointError as e:
        raise RunError(f"teacher.checkpoint does not fit pair.teacher={arch} with "
                       f"{num_classes} classes (dataset {cfg.dataset.name}): {e}") from None
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def point_failed(cfg, run_dir: Path, error: BaseException) -> float:
    """A grid point that raised `error`: logged (an input error as its message, anything
    else with its traceback), recorded by rank 0 (`record_failure`); its objective, NaN."""
    import traceback

    from rld.validate import ConfigError

    if isinstance(error, ConfigError | RunError):
        log.error("this grid point failed: %s", error)
        message = str(error)
    else:
        log.error("this grid point failed:\n%s", "".join(traceback.format_exception(error)))
        message = f"{type(error).__name__}: {error}"
    if find_world().main:
        record_failure(cfg, run_dir, message)
    return float("nan")


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
