"""Training a pack: grid points that differ only in their distiller, in one process.

The points of a pack share everything but the distiller (`pack_key`): data set, pair, seed,
optimiser, epochs, teacher.  Their data order and augmentation depend only on (seed, epoch),
so they see identical batches: the pack runs one data pipeline and one teacher forward per
batch for all of them, and steps the K students together (`rld.packed.students`).

Everything else stays per point, as in a separate run (`rld.engine.run`): the fingerprint,
the recall of a finished run, the run lock, the `RunBook` (record, history, TensorBoard,
`checkpoints/last.pt` in the engine's format, `student.pt`), the learning-rate schedule, and
the global RNG state stored in each checkpoint.  A packed point therefore resumes unpacked and
the other way round, and points of a pack may start at different epochs (a lagging point
trains alone until the others' epoch, then joins them).  A point whose loss turns non-finite
stops alone (`diverged`); a point whose config or run directory is unusable fails alone.  An
out-of-memory error on a pack's first step cuts the pack in two and trains the halves one
after the other.

Under torchrun or in a Slurm job of several tasks, every process trains the same pack as
one rank of a data-parallel run (a pack on several GPUs): each point as its separate
data-parallel run (`rld.engine.run_parallel`) trains, rank 0 deciding (recall, locks) and
alone writing, every rank stepping its share of each global batch with one teacher forward
for all points.  The ranks must stay in step, so an error that one rank alone meets (out
of memory included) ends the process, and torchrun or srun the job; running the command
again resumes every point.

Initial weights equal a separate run's: each student is built from the global RNG state a
separate run has at that moment (seeded, data built, teacher built if it distils).  Logit
distillers and the models draw no random numbers while training, so each point's stored RNG
state is also its separate run's.
"""

from __future__ import annotations

import contextvars
import gc
import json
import logging
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rld.config import POINT_KEYS, distills, key_in
from rld.engine import (
    RunBook,
    RunDir,
    RunError,
    build_data,
    build_student,
    check_same_start,
    hold_lock,
    load_teacher,
    load_training_state,
    recall,
    setup_device,
    student_checkpoint,
    training_state_dict,
)
from rld.loop import Progress, evaluate, uses_cudagraphs
from rld.packed.students import build_students, resolve_mode, teacher_output
from rld.reproduce import fingerprint, flatten, rng_state, seed_everything, set_rng_state
from rld.validate import ConfigError, validate
from rld.world import find_world

log = logging.getLogger("rld")

# the distillers a pack can hold: logit distillers without modules of their own
PACKABLE = ("vanilla", "kd", "dkd", "rld")
# config keys in which the points of one pack may differ (entries as in rld.config.key_in):
# the distiller (the teacher too: distilling points are grouped by teacher file apart), where
# a run is filed and what it returns
PER_POINT = ("distiller.", "teacher.", "tag", "objective", "hparams", "hparams.",
             "trainer.resume", "trainer.tensorboard", "paths.sweeps")


class PackTooLarge(RuntimeError):
    """The pack's first step ran out of device memory."""


# ------------------------------------------------------------------------------ grouping
def pack_key(cfg) -> str | None:
    """What the points of one pack share (the composed config without `PER_POINT`), as a
    string; None for a config that cannot be packed (another distiller, or one that does
    not resolve: it runs alone and fails there with its message)."""
    try:
        if str(cfg.distiller.name) not in PACKABLE:
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
    name = str(cfg.distiller.name)
    values = [f"{k}={float(cfg.distiller[k]):g}" for k in POINT_KEYS.get(name, ())]
    return " ".join([name, *values])


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


# ------------------------------------------------------------------------------ the pack
@dataclass
class Point:
    """One grid point of a pack and everything the pack keeps for it."""

    cfg: Any
    run_dir: Path
    fp: dict | None = None
    book: RunBook | None = None
    state: Any = None  # rld.loop.TrainState
    scheduler: Any = None
    rng: dict | None = None  # the global RNG state its separate run would have
    outcome: Any = None  # its RunRecord, or the exception that stopped it

    @property
    def open(self) -> bool:
        return self.outcome is None

    def scope(self):
        return point_scope(self.run_dir, point_label(self.cfg))


def train_pack(cfgs: list, run_dirs: list, mode: str = "auto") -> list:
    """Train (or resume, or recall) the points `cfgs` (one `pack_key`) in `run_dirs`, in this
    process (one rank of a data-parallel pack under torchrun or a multi-task Slurm job); per
    point its `RunRecord` or the exception that stopped it (ConfigError, RunError, ...: the
    caller records it as a failure)."""
    points = [Point(cfg, Path(d)) for cfg, d in zip(cfgs, run_dirs, strict=True)]
    firsts: dict[Path, Point] = {}
    for p in points:  # a run directory named twice (a setting its distiller does not read)
        firsts.setdefault(p.run_dir.resolve(), p)
    unique = list(firsts.values())
    world = find_world()
    for p in unique:
        with p.scope():
            _check(p, world)
    keys = {pack_key(p.cfg) for p in unique if p.open}
    teachers = {str(p.cfg.teacher.checkpoint) for p in unique if p.open and distills(p.cfg)}
    if len(keys) > 1 or len(teachers) > 1:
        raise ValueError("train_pack: the points differ in more than their distiller, or "
                         "distil from different teachers (group them with plan_packs)")
    valid = [p for p in unique if p.open]
    if valid and world.distributed:
        from rld.distributed import process_group

        if not world.main:
            log.setLevel(logging.WARNING)
        t = valid[0].cfg.trainer
        device, _ = setup_device(t, world)
        with process_group(world, device, t.dist_timeout_s) as group:
            _lock_and_train(valid, mode, group)
    elif valid:
        _lock_and_train(valid, mode, None)
    return [firsts[p.run_dir.resolve()].outcome for p in points]


def _check(p: Point, world) -> None:
    """The point's config, checked before any work (the same on every rank)."""
    try:
        validate(p.cfg, world)
        if pack_key(p.cfg) is None:
            raise ConfigError(f"distiller={p.cfg.distiller.name}: a pack holds "
                              f"{', '.join(PACKABLE)} points only")
    except (ConfigError, RunError) as e:
        p.outcome = e


def _lock_and_train(points: list[Point], mode: str, group) -> None:
    """Recall the finished points, lock the others' run directories and train them (rank 0
    decides for every rank of `group`)."""
    with ExitStack() as locks:
        todo = []
        for p in points:
            try:
                with p.scope():
                    p.fp, p.outcome = recall(p.cfg, RunDir(p.run_dir), group)
                if p.open:
                    hold_lock(RunDir(p.run_dir), locks, group)
                    todo.append(p)
            except (ConfigError, RunError) as e:
                p.outcome = e
        if todo:
            _train_cut(todo, mode, group)


def _train_cut(points: list[Point], mode: str, group) -> None:
    """Train the pack; when its first step runs out of memory, the two halves one after
    the other (a pack of one fails with the error).  Any other error stops every point
    still open with it; in a data-parallel pack, an error that is not the same on every rank
    (all but the input errors) ends the process."""
    try:
        _train(points, mode, group)
        return
    except PackTooLarge as e:
        # only its message is kept: the exception's frames (the failed step's tensors, the
        # stacked students) are released when this block ends, before the halves train
        too_large = str(e)
    except Exception as e:  # noqa: BLE001 - the points fail (recorded by the caller)
        if group is not None and not isinstance(e, ConfigError | RunError):
            raise
        log.error("the pack stopped: %s: %s", type(e).__name__, e)
        for p in points:
            if p.open:
                p.outcome = e
        return
    if group is not None:  # one rank's memory: the others wait in a collective
        raise RuntimeError(f"out of device memory on rank {group.rank} with a pack of "
                           f"{len(points)} points ({too_large}): set hydra.launcher.pack="
                           f"{max(1, len(points) // 2)} or lower trainer.batch_size")
    for p in points:
        p.state = p.scheduler = p.book = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(points) == 1:
        points[0].outcome = RunError(f"out of device memory with a pack of one point "
                                     f"({too_large}); lower trainer.batch_size")
        return
    half = (len(points) + 1) // 2
    log.warning("a pack of %d points does not fit in device memory: training packs of "
                "%d and %d (set hydra.launcher.pack=%d to start there)", len(points),
                half, len(points) - half, half)
    _train_cut(points[:half], mode, group)
    _train_cut(points[half:], mode, group)


def _eager(cfg):
    """The config with trainer.compile off (vmap mode compiles its batched forward itself)."""
    return OmegaConf.merge(cfg, {"trainer": {"compile": False}}) if cfg.trainer.compile else cfg


def _train(points: list[Point], mode: str, group) -> None:
    """Set up the shared parts and every point (resume or fresh), train, finish."""
    cfg0 = points[0].cfg
    t = cfg0.trainer
    world = group.world if group is not None else None
    device, dtype = setup_device(t, world)
    mode = resolve_mode(mode, device, dtype, sync_bn=group is not None and bool(t.sync_bn))
    seed_everything(int(cfg0.seed))
    data = build_data(cfg0, device, world)
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
                _setup_point(p, data, teacher, device, dtype,
                             rng_teacher if distills(p.cfg) else rng_plain, mode, group)
    live = [p for p in points if p.open]
    size = group.size if group is not None else 1
    try:
        _evaluate_teacher(live, teacher, data)
        for p in live:
            with p.scope():
                p.book.begin(device, dtype, world_size=size)
                p.book.record.extra["packed"] = {"points": len(live), "mode": mode}
                if p.book.writes:
                    p.book.record.write(p.run_dir)
        if live:
            where = f"{size} processes ({device.type}, rank 0 on {device})" if size > 1 \
                else str(device)
            log.info("pack of %d points (%s) on %s", len(live), mode, where)
            _run_epochs(live, data, teacher, mode, group)
    finally:
        for p in live:
            if p.book is not None:
                p.book.close()


def _setup_point(p: Point, data, teacher, device, dtype, rng: dict, mode: str,
                 group) -> None:
    """The point's student, optimiser and schedule, resumed from its checkpoint if any.  In
    loop mode the student steps as in its separate run (compiled with trainer.compile; a
    DDP rank in a data-parallel pack)."""
    try:
        set_rng_state(rng)
        cfg = p.cfg if mode == "loop" else _eager(p.cfg)
        p.state, p.scheduler = build_student(cfg, data, teacher if distills(p.cfg) else None,
                                             device, dtype)
        if group is not None and mode == "loop":
            from rld.distributed import data_parallel

            t = cfg.trainer
            data_parallel(p.state, group, sync_bn=t.sync_bn, compile=t.compile,
                          compile_mode=t.compile_mode)
        elif group is not None:  # vmap: the stack averages its gradients itself
            p.state.all_reduce = group.all_reduce
        p.book = RunBook(p.cfg, RunDir(p.run_dir), p.fp,
                         writes=group is None or group.world.main)
        found = p.book.checkpoint_to_resume(device)
        if group is not None:
            check_same_start(group, p.book.dir, found)
        if found is not None:
            load_training_state(p.state, p.scheduler, found[0])
            p.book.restore(*found)
        p.rng = rng_state()
    except (ConfigError, RunError) as e:
        p.outcome = e


def _evaluate_teacher(points: list[Point], teacher, data) -> None:
    """The teacher's test top-1, once, for the fresh distilling points."""
    fresh = [p for p in points if distills(p.cfg) and p.book.start == 1]
    if teacher is None or not fresh:
        return
    top1, _ = evaluate(fresh[0].state, data.test, model=teacher)
    log.info("teacher %s: test top-1 %.2f%%", fresh[0].cfg.pair.teacher, top1)
    for p in fresh:
        p.book.teacher_top1 = top1


# ------------------------------------------------------------------------------ epochs
def _run_epochs(live: list[Point], data, teacher, mode: str, group) -> None:
    """Every point's remaining epochs; at each epoch the points that have reached it train
    together (lagging points alone first)."""
    t = live[0].cfg.trainer
    epochs = int(t.epochs)
    compile_mode = str(t.compile_mode)
    teacher_fn = None
    if teacher is not None:
        teacher_fn = torch.compile(teacher, mode=compile_mode, dynamic=False) if t.compile \
            else teacher
    cudagraphs = uses_cudagraphs(t.compile, compile_mode, live[0].state.device)
    progress = Progress(t.progress if live[0].book.writes else "none", t.log_every_s)
    members, students, first = None, None, True
    for epoch in range(min(p.book.start for p in live), epochs + 1):
        active = [p for p in live if p.open and p.book.start <= epoch]
        if not active:
            continue
        if active != members:
            members = active
            students = build_students([p.state for p in active], mode, bool(t.compile),
                                      compile_mode, group)
        e0 = time.time()
        lr = active[0].state.optimizer.param_groups[0]["lr"]
        students.train()
        students.set_lr(lr)
        data.train.set_epoch(epoch)
        stats = _train_epoch(students, active, data.train, teacher_fn, epoch, epochs,
                             progress, first, cudagraphs, group)
        first = False
        students.end_epoch()
        students.sync()
        scores = students.evaluate(data.test)
        for p, stat, (top1, top5) in zip(active, stats, scores, strict=True):
            with p.scope():
                _epoch_done(p, stat, epoch, lr, top1, top5, e0, data)
    for p in live:
        if p.open:
            with p.scope():
                p.outcome = p.book.finish("completed", None,
                                          student_checkpoint(p.cfg, p.state, data))


def _epoch_done(p: Point, stat: dict | str, epoch: int, lr: float, top1: float,
                top5: float, e0: float, data) -> None:
    """One point's end of epoch, as the engine's: diverged, or schedule + book."""
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


def _train_epoch(students, active: list[Point], loader, teacher_fn, epoch: int, epochs: int,
                 progress: Progress, first: bool, cudagraphs: bool,
                 group) -> list[dict | str]:
    """One epoch of every active point; per point its stats (as `rld.loop.train_epoch`
    returns them, over the global batches of a data-parallel pack) or the message of its
    first non-finite step.  The sums of every point stay in one device tensor, read once."""
    s0 = active[0].state
    k = len(active)
    needs_teacher = teacher_fn is not None and any(distills(p.cfg) for p in active)
    acc, names, count = None, None, 0  # acc: [StepOut.values, K correct] summed
    first_bad = torch.full((k,), -1.0, device=s0.device)
    scales = None
    if group is not None:
        from rld.distributed import loss_scales

        scales = loss_scales(loader, group.size)

    def mean_loss() -> float:  # the progress bar's read, a few times a second at most
        values, end = acc.tolist(), 0
        total = 0.0
        for point in names:  # each point's total loss follows its terms
            end += len(point) + 1
            total += values[end - 1]
        return total / (count * k)

    progress.start(epoch, epochs, len(loader))
    for step, batch in enumerate(loader):
        x, y = s0.inputs(batch[0]), batch[1]  # the format every student takes, once
        if y.shape[0] == 0:  # this rank's empty share of the last global batch (never its
            students.empty_step(x)  # first: the sums exist)
            progress.update(mean_loss)
            continue
        try:
            out_t = teacher_output(s0, teacher_fn, x, cudagraphs) if needs_teacher else None
            out = students.step(x, y, out_t, epoch, None if scales is None else scales[step])
        except torch.OutOfMemoryError as e:
            if first and step == 0:
                raise PackTooLarge(str(e).splitlines()[0]) from None
            raise
        with torch.no_grad():
            n = y.shape[0]  # host metadata: no device read
            count += n
            names = out.names
            row = torch.cat([out.values * n, out.correct])
            acc = row if acc is None else acc + row
            bad = ~torch.isfinite(out.losses) & (first_bad < 0)
            first_bad = torch.where(bad, float(step + 1), first_bad)
        progress.update(mean_loss)
    progress.end()
    if acc is None:
        raise ValueError("the training loader gave no batch")
    return _epoch_stats(acc, names, count, first_bad, epoch, group)


def _epoch_stats(acc, names: list[list[str]], count: int, first_bad, epoch: int,
                 group) -> list[dict | str]:
    """Per point: its epoch's mean loss terms and train top-1 from the device sums `acc`
    ([`StepOut.values`, K correct]; summed over the ranks of `group`), or the message of its
    first non-finite step; one host read."""
    k = len(names)
    bad = (first_bad > 0).float()
    stats = torch.cat([acc.float(), first_bad.new_full((1,), count), bad,
                       first_bad.clamp(min=0) * bad])
    if group is not None:
        stats = group.all_reduce(stats)
    values = stats.tolist()
    width = sum(len(t) + 1 for t in names)  # every point's terms and total loss
    correct, count = values[width:width + k], values[width + k]
    n_bad, bad_steps = values[-2 * k:-k], values[-k:]
    out: list[dict | str] = []
    start = 0
    for j in range(k):
        row = values[start:start + len(names[j]) + 1]
        start += len(row)
        if n_bad[j] > 0:  # the first non-finite step (averaged over the ranks that saw one)
            out.append(f"non-finite loss at epoch {epoch}, step {round(bad_steps[j] / n_bad[j])}")
            continue
        stat = {f"loss_{name}": v / count for name, v in zip(names[j], row)}
        stat["loss"] = row[-1] / count
        stat["train_top1"] = 100.0 * correct[j] / count
        out.append(stat)
    return out
