"""The training engine: the one path that trains runs, each in its own run directory.

A unit is K >= 1 runs ("points") trained together in one process: a single run is a unit of
one; a pack (`rld.packing`) is the points of a sweep that differ only in their distiller,
which share one data pipeline and one teacher forward per batch.  One process is a one-rank
group; under torchrun or in a Slurm job of several tasks (`rld.world`) every process trains
the same unit as one rank of a data-parallel run (`rld.distributed`): rank 0 decides
(recall, locks) and alone writes, every rank steps its share of each global batch.

`train_points` sets a unit up in one order (device, seed, data, teacher, each point's
student from the RNG state its separate run would have, data-parallel wrap, resume or
teacher evaluation), then trains every point's remaining epochs (`rld.loop.train_epoch`;
the students step one after another or batched: `rld.students`), evaluates them and
keeps each point's books (`rld.rundir.RunBook`: record, history, TensorBoard, checkpoints,
`student.pt`).  A packed point therefore resumes unpacked and the other way round, and the
points of a unit may start at different epochs (a lagging point trains alone until the
others' epoch).  A point whose loss turns non-finite stops alone (`diverged`); a point whose
config or run directory is unusable fails alone.  An out-of-memory error at a pack's first
step cuts the pack in two and trains the halves one after the other.  In a data-parallel
unit the ranks must stay in step, so an error that one rank alone meets ends the process,
and torchrun or srun the job; running the command again resumes every point.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rld.config import distills, trained_arch
from rld.data import build_loaders
from rld.data import resolve_device as resolve_data_device
from rld.distillers import build_distiller
from rld.distributed import Group, data_parallel, local_device, process_group
from rld.errors import CheckpointError, ConfigError, DataError, RunError
from rld.loop import (
    PackTooLarge,
    Progress,
    TrainState,
    build_train_state,
    compiled,
    evaluate_model,
    train_epoch,
    uses_cudagraphs,
)
from rld.models import build_model, load_checkpoint
from rld.packing import pack_key, point_label, point_scope
from rld.pruning import reporter_for
from rld.record import RunRecord
from rld.reproduce import file_sha256, fingerprint, rng_state, seed_everything, set_rng_state
from rld.rundir import RunBook, RunDir, config_difference, record_failure, run_lock
from rld.students import build_students, resolve_mode
from rld.teachers import check_teacher, require_teacher_file
from rld.validate import validate
from rld.world import World, find_world

log = logging.getLogger("rld")

__all__ = ["RunError", "device_label", "point_failed", "resolve_device", "resolve_precision",
           "run", "train_points"]


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


def setup_device(t, world: World) -> tuple[torch.device, torch.dtype]:
    """The device and precision of `trainer` settings, with cuDNN/TF32 set for CUDA; on a
    data-parallel `world`, this rank's GPU (`rld.distributed.local_device`), made the
    current one."""
    device = local_device(resolve_device(t.device), world)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not t.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, resolve_precision(t.precision, device)


# --------------------------------------------------------------------------- entry points
def run(cfg, run_dir: Path) -> RunRecord:
    """Train (or resume, or recall) the run of `cfg` in `run_dir`, a unit of one; returns
    its record, or raises what stopped it."""
    outcome = train_points([cfg], [run_dir])[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


@dataclass
class Point:
    """One run of a unit and everything the engine keeps for it."""

    cfg: Any
    run_dir: Path
    fp: dict | None = None
    book: RunBook | None = None
    state: TrainState | None = None
    scheduler: Any = None
    rng: dict | None = None  # the global RNG state its separate run would have
    outcome: Any = None  # its RunRecord, or the exception that stopped it
    reporter: Any = None  # its Optuna trial's (rld.pruning.TrialReporter), under the sweeper

    @property
    def open(self) -> bool:
        return self.outcome is None

    def scope(self):
        return point_scope(self.run_dir, point_label(self.cfg))


def train_points(cfgs: list, run_dirs: list, mode: str = "auto") -> list:
    """Train (or resume, or recall) the runs `cfgs` in `run_dirs` as one unit in this
    process (one rank of a data-parallel unit under torchrun or a multi-task Slurm job);
    per run its `RunRecord` or the exception that stopped it (ConfigError, RunError, ...:
    the caller records it as a failure).  Several runs must form one pack (`pack_key`);
    `mode`: how they step together (auto | loop | vmap, `rld.students.resolve_mode`)."""
    points = [Point(cfg, Path(d)) for cfg, d in zip(cfgs, run_dirs, strict=True)]
    firsts: dict[Path, Point] = {}
    for p in points:  # a run directory named twice (the same run configured twice)
        firsts.setdefault(p.run_dir.resolve(), p)
    unique = list(firsts.values())
    world = find_world()
    for p in unique:
        with p.scope():
            _check(p, world, alone=len(unique) == 1)
    valid = [p for p in unique if p.open]
    keys = {pack_key(p.cfg) for p in valid}
    teachers = {str(p.cfg.teacher.checkpoint) for p in valid if distills(p.cfg)}
    if len(valid) > 1 and (len(keys) > 1 or len(teachers) > 1):
        raise ValueError("train_points: the runs differ in more than their distiller, or "
                         "distil from different teachers (group them with plan_packs)")
    if valid:
        if not world.main:
            log.setLevel(logging.WARNING)
        t = valid[0].cfg.trainer
        device, _ = setup_device(t, world)
        with process_group(world, device, t.dist_timeout_s) as group:
            _lock_and_train(valid, mode, group)
    return [firsts[p.run_dir.resolve()].outcome for p in points]


def _check(p: Point, world: World, alone: bool) -> None:
    """The point's config, checked before any work (the same on every rank)."""
    try:
        validate(p.cfg, world)
        if not alone and pack_key(p.cfg) is None:
            raise ConfigError(f"distiller={p.cfg.distiller.name} does not pack (it has "
                              "modules of its own): train it alone")
    except (ConfigError, RunError) as e:
        p.outcome = e


# --------------------------------------------------------------------------- recall, locks
def teacher_identity(cfg) -> str | None:
    """SHA-256 of the teacher checkpoint of a distillation run (None: no teacher, or no
    file yet: the run stops later with the remedies)."""
    if cfg.role != "student" or not distills(cfg):
        return None
    path = Path(cfg.teacher.checkpoint)
    return file_sha256(path) if path.is_file() else None


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


def _lock_and_train(points: list[Point], mode: str, group: Group) -> None:
    """Recall the finished points, lock the others' run directories and train them (rank 0
    decides for every rank of `group`)."""
    with ExitStack() as locks:
        todo = []
        for p in points:
            try:
                with p.scope():
                    rd = RunDir(p.run_dir)
                    p.fp = agreed_fingerprint(p.cfg, group)
                    p.outcome = group.on_main(lambda rd=rd, fp=p.fp: rd.adopt_legacy()
                                              or rd.recall(fp))
                    if p.outcome is not None:
                        log.info("run already finished (%s): %s", p.outcome.status, rd.path)
                if p.open:
                    group.on_main(lambda rd=rd: locks.enter_context(run_lock(rd.path)))
                    todo.append(p)
            except (ConfigError, RunError) as e:
                p.outcome = e
        if todo:
            _train_cut(todo, mode, group)


def _train_cut(points: list[Point], mode: str, group: Group) -> None:
    """Train the unit; when its first step runs out of memory, the two halves one after
    the other (a unit of one fails with the error).  Any other error stops every point
    still open with it; in a data-parallel unit, an error that is not the same on every
    rank (all but the input errors) ends the process."""
    try:
        _train(points, mode, group)
        return
    except PackTooLarge as e:
        # only its message is kept: the exception's frames (the failed step's tensors, the
        # stacked students) are released when this block ends, before the halves train
        too_large = str(e)
    except Exception as e:  # noqa: BLE001 - the points fail (recorded by the caller)
        if group.size > 1 and not isinstance(e, ConfigError | RunError):
            raise
        log.error("training stopped: %s: %s", type(e).__name__, e)
        for p in points:
            if p.open:
                p.outcome = e
        return
    if group.size > 1:  # one rank's memory: the others wait in a collective
        raise RuntimeError(f"out of device memory on rank {group.rank} with {len(points)} "
                           f"point(s) ({too_large}): set hydra.launcher.pack="
                           f"{max(1, len(points) // 2)} or lower trainer.batch_size")
    for p in points:
        p.state = p.scheduler = p.book = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(points) == 1:
        points[0].outcome = RunError(f"out of device memory ({too_large}); lower "
                                     "trainer.batch_size")
        return
    half = (len(points) + 1) // 2
    log.warning("a pack of %d points does not fit in device memory: training packs of "
                "%d and %d (set hydra.launcher.pack=%d to start there)", len(points),
                half, len(points) - half, half)
    _train_cut(points[:half], mode, group)
    _train_cut(points[half:], mode, group)


# --------------------------------------------------------------------------- set-up
def _train(points: list[Point], mode: str, group: Group) -> None:
    """Set up the shared parts and every point (resume or fresh), train, finish."""
    cfg0 = points[0].cfg
    t = cfg0.trainer
    device, dtype = setup_device(t, group.world)
    mode = "loop" if len(points) == 1 else resolve_mode(
        mode, device, dtype, sync_bn=group.size > 1 and bool(t.sync_bn))
    seed_everything(int(cfg0.seed))
    data = build_data(cfg0, device, group.world)
    rng_plain, teacher = rng_state(), None
    distilling = [p for p in points if distills(p.cfg)]
    if distilling:
        try:
            teacher = load_teacher(distilling[0].cfg, data.num_classes, device)
        except RunError as e:
            for p in distilling:
                p.outcome = e
    rng_teacher = rng_state()
    for p in points:
        if p.open:
            with p.scope():
                set_rng_state(rng_teacher if distills(p.cfg) else rng_plain)
                _setup_point(p, data, teacher, device, dtype, mode, group)
    live = [p for p in points if p.open]
    try:
        _evaluate_teacher(live, teacher, data)
        for p in live:
            with p.scope():
                p.book.begin(device_label(device), dtype, world_size=group.size)
                if len(live) > 1:
                    p.book.record.extra["packed"] = {"points": len(live), "mode": mode}
                    if p.book.writes:
                        p.book.record.write(p.run_dir)
                p.reporter = reporter_for(p.cfg)
                _report(p, group, data)  # a resumed point's epochs its trial lacks
        running = [p for p in live if p.open]
        if running:
            _log_start(running, mode, device, group)
            _run_epochs(running, data, teacher, mode, group)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (rld.cli): recorded, then the command
        _record_interrupt(live, e)  # stops (the same command resumes)
        raise
    finally:
        for p in live:
            if p.book is not None:
                p.book.close()


def _record_interrupt(live: list[Point], e: KeyboardInterrupt) -> None:
    """Record `status: "interrupted"` with the last finished epoch for every point still
    training (its checkpoints stay: a rerun resumes it)."""
    what = str(e) or "Ctrl-C"
    for p in live:
        if p.open and p.book is not None and p.book.record is not None:
            with p.scope():
                done = len(p.book.history)
                p.outcome = p.book.finish("interrupted", f"interrupted ({what}) after epoch "
                                                         f"{done}", {})
                log.warning("interrupted after epoch %d: run the same command again to "
                            "resume", done)


def _log_start(live: list[Point], mode: str, device: torch.device, group: Group) -> None:
    ranks = f"{group.size} processes ({device.type}, rank 0 on {device})"
    if len(live) > 1:
        log.info("pack of %d points (%s) on %s", len(live), mode,
                 ranks if group.size > 1 else device)
    elif group.size > 1:
        log.info("data-parallel run on %s, %s", ranks,
                 "nccl" if device.type == "cuda" else "gloo")


def build_data(cfg, device: torch.device, world: World):
    """The run's train/test loaders (`rld.data.Loaders`); on a data-parallel `world`, this
    rank's share of every global batch."""
    t = cfg.trainer
    try:
        # with the batch's sample indices (CRD's memory): a view of the epoch's order, free
        data = build_loaders(cfg.dataset, t.batch_size, device, cfg.seed,
                             drop_last=t.drop_last, test_batch_size=max(t.batch_size, 256),
                             with_index=True, rank=world.rank, world_size=world.size)
    except DataError as e:
        raise RunError(str(e)) from None
    if data.num_train < world.size:
        raise RunError(f"dataset {cfg.dataset.name} has {data.num_train} training samples, "
                       f"fewer than the {world.size} ranks of this job")
    return data


def load_teacher(cfg, num_classes: int, device: torch.device) -> torch.nn.Module:
    path = require_teacher_file(cfg)
    arch = cfg.pair.teacher
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


def _eager(cfg):
    """The config with trainer.compile off (vmap mode compiles its batched forward itself)."""
    return OmegaConf.merge(cfg, {"trainer": {"compile": False}}) if cfg.trainer.compile else cfg


def _setup_point(p: Point, data, teacher, device, dtype, mode: str, group: Group) -> None:
    """The point's student, optimiser and schedule (from the global RNG state its separate
    run has here), resumed from its checkpoint if any.  In loop mode the student steps as
    in its separate run (compiled with trainer.compile; a DDP rank in a data-parallel
    unit)."""
    try:
        cfg = p.cfg if mode == "loop" else _eager(p.cfg)
        p.state, p.scheduler = build_student(cfg, data, teacher if distills(p.cfg) else None,
                                             device, dtype)
        p.state.all_reduce = group.all_reduce
        if group.size > 1 and mode == "loop":
            t = cfg.trainer
            data_parallel(p.state, group, sync_bn=t.sync_bn, compile=t.compile,
                          compile_mode=t.compile_mode)
        p.book = RunBook(p.cfg, RunDir(p.run_dir), p.fp, writes=group.world.main)
        found = p.book.checkpoint_to_resume(device)
        check_same_start(group, p.book.dir, found)
        if found is not None:
            load_training_state(p.state, p.scheduler, found[0])
            p.book.restore(*found)
        p.rng = rng_state()
    except (ConfigError, RunError) as e:
        p.outcome = e


def check_same_start(group: Group, rd: RunDir, found: tuple[dict, Path] | None) -> None:
    """RunError unless every rank found the same checkpoint (a file system that shows the
    ranks different files would make them train different models)."""
    starts = group.gather(None if found is None else (found[1].name, found[0]["epoch"]))
    if any(s != starts[0] for s in starts):
        raise RunError(f"the ranks found different checkpoints in {rd.path} ({starts}): is "
                       "the run directory on a file system that every node sees alike?")


def load_training_state(state: TrainState, scheduler, ckpt: dict) -> None:
    state.student.load_state_dict(ckpt["model"])
    state.distiller.load_state_dict(ckpt.get("distiller") or {})
    if ckpt.get("teacher") is not None:
        state.teacher.load_state_dict(ckpt["teacher"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])


def training_state_dict(state: TrainState, scheduler) -> dict:
    """What a checkpoint holds of the training itself (the book adds its own parts); the
    teacher's state too where training changes it (`Distiller.teacher_train`)."""
    out = {"model": state.student.state_dict(), "distiller": state.distiller.state_dict(),
           "optimizer": state.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
           "scaler": state.scaler.state_dict() if state.scaler is not None else None}
    if state.distiller.teacher_train:
        out["teacher"] = state.teacher.state_dict()
    return out


def student_checkpoint(cfg, state: TrainState, data) -> dict:
    """`student.pt`: the trained model alone, loadable as a teacher."""
    return {"model": state.student.state_dict(), "arch": trained_arch(cfg),
            "num_classes": data.num_classes, "family": cfg.dataset.family,
            "dataset": cfg.dataset.name, "epochs": int(cfg.trainer.epochs)}


def _evaluate_teacher(points: list[Point], teacher, data) -> None:
    """The teacher's test top-1, once, for the fresh distilling points."""
    fresh = [p for p in points if distills(p.cfg) and p.book.start == 1]
    if teacher is None or not fresh:
        return
    top1, _ = evaluate_model(fresh[0].state, data.test, model=teacher)
    log.info("teacher %s: test top-1 %.2f%%", fresh[0].cfg.pair.teacher, top1)
    for p in fresh:
        p.book.teacher_top1 = top1


# --------------------------------------------------------------------------- epochs
def _teacher_fn(live: list[Point], teacher, t):
    """The teacher's forward for the unit's steps (its features for distillers on
    features), compiled with trainer.compile; None without a distilling point."""
    if teacher is None or not any(distills(p.cfg) for p in live):
        return None
    features = any(p.state.distiller.needs_features for p in live)
    return compiled(teacher.forward_features if features else teacher, t.compile,
                    str(t.compile_mode))


def _run_epochs(live: list[Point], data, teacher, mode: str, group: Group) -> None:
    """Every point's remaining epochs; at each epoch the points that have reached it train
    together (lagging points alone first)."""
    from rld.distributed import loss_scales

    t = live[0].cfg.trainer
    epochs = int(t.epochs)
    teacher_fn = _teacher_fn(live, teacher, t)
    cudagraphs = uses_cudagraphs(t.compile, str(t.compile_mode), live[0].state.device)
    progress = Progress(t.progress if live[0].book.writes else "none", t.log_every_s)
    scales = loss_scales(data.train, group.size) if group.size > 1 else None
    members, students, first = None, None, True
    for epoch in range(min(p.book.start for p in live), epochs + 1):
        active = [p for p in live if p.open and p.book.start <= epoch]
        if not active:
            continue
        if active != members:
            members = active
            students = build_students([p.state for p in active], mode, bool(t.compile),
                                      str(t.compile_mode), group)
        e0 = time.time()
        lr = active[0].state.optimizer.param_groups[0]["lr"]
        students.train()
        students.set_lr(lr)
        data.train.set_epoch(epoch)
        alone = active[0] if len(active) == 1 else None
        if alone is not None:  # a run's own random draws (CRD's negatives) go on from its state
            set_rng_state(alone.rng)
        stats = train_epoch(students, data.train, epoch, epochs, progress, teacher_fn=teacher_fn,
                            scales=scales, cudagraphs=cudagraphs, first=first)
        if alone is not None:
            alone.rng = rng_state()
        first = False
        students.end_epoch()
        students.sync()
        scores = students.evaluate(data.test)
        for p, stat, (top1, top5) in zip(active, stats, scores, strict=True):
            with p.scope():
                _epoch_done(p, stat, epoch, lr, top1, top5, e0, data)
                _report(p, group, data)
    for p in live:
        if p.open:
            with p.scope():
                p.outcome = p.book.finish("completed", None,
                                          student_checkpoint(p.cfg, p.state, data))


def _epoch_done(p: Point, stat: dict | str, epoch: int, lr: float, top1: float,
                top5: float, e0: float, data) -> None:
    """One point's end of epoch: diverged, or its schedule and its book."""
    if isinstance(stat, str):
        log.error("%s: stopping this run", stat)
        p.outcome = p.book.finish("diverged", stat, student_checkpoint(p.cfg, p.state, data))
        return
    with warnings.catch_warnings():  # vmap mode steps the stack, not the point's optimiser
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        p.scheduler.step()
    set_rng_state(p.rng)  # the checkpoint stores the point's own RNG state
    p.book.epoch_done({"epoch": epoch, "lr": lr, **stat, "test_top1": top1,
                       "test_top5": top5, "seconds": time.time() - e0},
                      training_state_dict(p.state, p.scheduler))


def _report(p: Point, group: Group, data) -> None:
    """Report the point's checkpointed epochs to its Optuna trial and finish it as pruned
    when the trial's pruner says so (rank 0 asks, every rank learns the answer); a pruned
    point of a pack leaves it at the next epoch, its checkpoints kept for a promotion."""
    if p.reporter is None or not p.open:
        return
    rng = rng_state()  # the reporter's retries draw jitter: the run's draws stay its own
    why = group.on_main(lambda: p.reporter.update(p.book.history))
    set_rng_state(rng)
    if why is not None:
        log.info("%s", why)
        p.outcome = p.book.finish("pruned", why, student_checkpoint(p.cfg, p.state, data))


# --------------------------------------------------------------------------- failures
def point_failed(cfg, run_dir: Path, error: BaseException) -> float:
    """A grid point that raised `error`: logged (an input error as its message, anything
    else with its traceback), recorded by rank 0 (`rld.rundir.record_failure`); its
    objective, NaN."""
    import traceback

    if isinstance(error, ConfigError | RunError):
        log.error("this grid point failed: %s", error)
        message = str(error)
    else:
        log.error("this grid point failed:\n%s", "".join(traceback.format_exception(error)))
        message = f"{type(error).__name__}: {error}"
    if find_world().main:
        record_failure(cfg, run_dir, message)
    return float("nan")
