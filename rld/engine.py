"""The training engine: one run of a config in one run directory.

It knows models, data, an optimiser and a `Distiller` (a dict of loss terms), nothing about
any specific loss.  A run directory holds `history.csv`, `metrics.json`, `student.pt` and
`checkpoints/last.pt`; the latter is written atomically after every epoch with every state
needed to continue bit-for-bit (model, optimiser, scheduler, best accuracy, history, RNG
states; the data order is a function of (seed, epoch)).  Running again in the same
directory resumes; a completed run returns its recorded result without training.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from copy import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from rld import io
from rld.data import DataError, build_loaders
from rld.data import resolve_device as resolve_data_device
from rld.distillers import Distiller, build_distiller
from rld.models import CheckpointError, build_model, load_checkpoint
from rld.reproduce import fingerprint, rng_state, seed_everything, set_rng_state, versions
from rld.validate import COMPILE_MODES, ConfigError, validate

log = logging.getLogger("rld")

METRICS = "metrics.json"
HISTORY = "history.csv"
LAST = Path("checkpoints") / "last.pt"
# torch.compile modes (trainer.compile_mode); those of CUDAGRAPH_MODES replay CUDA graphs
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


class RunError(ValueError):
    """A run cannot start (missing teacher, busy or mismatched run directory, ...)."""


class Diverged(RuntimeError):
    pass


# --------------------------------------------------------------------------- setup
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


# --------------------------------------------------------------------------- loops
@dataclass
class Step:
    """What one epoch needs; built once per run."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    cudagraphs: bool = False  # compiled models replay CUDA graphs: mark each step's start

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def build_step(student: torch.nn.Module, teacher: torch.nn.Module | None,
               distiller: Distiller, *, device: torch.device, dtype: torch.dtype,
               channels_last: bool, compile: bool, lr: float, momentum: float,
               weight_decay: float, compile_mode: str = "default") -> Step:
    """Models on the device (channels-last on CUDA), SGD over the student's parameters
    only, a gradient scaler for fp16.

    compile: torch.compile the student, the teacher and the distiller's loss function (a
    chain of small kernels) in `compile_mode`, with static shapes: a partial last batch
    compiles one more graph per function instead of a slower dynamic-shape graph for all.
    The loss weights (warm-up ramp, CE) stay outside the graphs, so the epoch number is
    never baked into one.  The caller's `distiller` is left as it is."""
    if compile_mode not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile_mode={compile_mode!r} is not allowed: use one of "
                          f"{', '.join(COMPILE_MODES)}")
    channels_last = channels_last and device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student.to(device, memory_format=fmt)
    if teacher is not None:
        teacher.to(device, memory_format=fmt).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    cudagraphs = False
    if compile:
        def compiled(fn):
            return torch.compile(fn, mode=compile_mode, dynamic=False)

        student = compiled(student)
        teacher = compiled(teacher) if teacher is not None else None
        if distiller.loss_fn is not None:
            distiller = copy(distiller)
            distiller.loss_fn = compiled(distiller.loss_fn)
        cudagraphs = compile_mode in CUDAGRAPH_MODES and device.type == "cuda"
    return Step(student, teacher, distiller, optimizer, scaler, device, dtype, channels_last,
                cudagraphs)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == target.unsqueeze(1)).any(dim=1).sum()


class Progress:
    """A bar on a terminal (refreshed at most every `every` seconds), else nothing here:
    the engine logs one line per epoch."""

    def __init__(self, mode: str, every: float):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "line"
        self.bar = mode == "bar"
        self.every = every
        self.last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if self.bar and now - self.last >= self.every:
            self.last = now
            return True
        return False

    def show(self, epoch: int, epochs: int, step: int, steps: int, loss: float) -> None:
        width = 30
        done = int(width * step / max(steps, 1))
        sys.stderr.write(f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (width - done)}] "
                         f"{step}/{steps} loss {loss:.4f}")
        sys.stderr.flush()

    def end(self) -> None:
        if self.bar:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def train_step(s: Step, x: torch.Tensor, y: torch.Tensor, epoch: int):
    """One optimisation step; returns (loss terms, total loss, student logits), on device.

    With CUDA graphs, compiled outputs live in memory that the next step's replay
    overwrites: the gradients are dropped before the forward, and the returned logits are a
    copy, so every returned tensor may be kept."""
    s.optimizer.zero_grad(set_to_none=True)
    if s.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    x = s.inputs(x)
    with s.autocast():
        logits = s.student(x)
        logits_t = None
        if s.teacher is not None:
            with torch.inference_mode():
                logits_t = s.teacher(x)
    if logits_t is not None:
        logits_t = logits_t.clone()  # a normal tensor: autograd may save it
    terms = s.distiller.terms(logits, logits_t, y, epoch)
    loss = torch.stack(list(terms.values())).sum()
    if s.scaler is not None:
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        loss.backward()
        s.optimizer.step()
    if s.cudagraphs:
        logits = logits.detach().clone()
    return terms, loss, logits


def train_epoch(s: Step, loader, epoch: int, epochs: int, progress: Progress) -> dict:
    """One epoch.  Loss terms and accuracy accumulate on the device and are read once at
    the end (plus the progress bar's reads, a few per second at most)."""
    s.student.train()
    sums, count = None, 0
    first_bad = torch.full((), -1, dtype=torch.long, device=s.device)
    steps = len(loader)
    for step, (x, y) in enumerate(loader):
        terms, loss, logits = train_step(s, x, y, epoch)
        with torch.no_grad():
            n = y.shape[0]
            count += n  # batch sizes are host metadata: no device read
            row = torch.stack([*(t.detach() * n for t in terms.values()), loss.detach() * n,
                               (logits.argmax(1) == y).sum().float()])
            sums = row if sums is None else sums + row
            bad = ~torch.isfinite(loss.detach()) & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, step + 1), first_bad)
        if progress.due():
            progress.show(epoch, epochs, step + 1, steps, sums[-2].item() / count)
    progress.end()
    *values, bad_step = torch.cat([sums, first_bad.to(sums.dtype).unsqueeze(0)]).tolist()
    bad_step = int(bad_step)  # values and the first bad step: the epoch's one host read
    if bad_step > 0:
        raise Diverged(f"non-finite loss at epoch {epoch}, step {bad_step}")
    out = {f"loss_{name}": v / count for name, v in zip(terms, values)}
    out["loss"] = values[-2] / count
    out["train_top1"] = 100.0 * values[-1] / count
    return out


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader, s: Step) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) over the loader."""
    model.eval()
    sums, n = torch.zeros(2, device=s.device), 0
    for x, y in loader:
        if s.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with s.autocast():
            logits = model(s.inputs(x))
        sums += torch.stack([topk_correct(logits, y, 1), topk_correct(logits, y, 5)]).float()
        n += y.shape[0]
    top1, top5 = sums.tolist()
    return 100.0 * top1 / n, 100.0 * top5 / n


# --------------------------------------------------------------------------- one run
def _completed(run_dir: Path, fp: dict) -> dict | None:
    path = run_dir / METRICS
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    if metrics.get("status") == "failed":
        return None  # an error stopped it before: try again
    if metrics.get("fingerprint") != fp:
        old = metrics.get("fingerprint") or {}
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        raise RunError(f"{run_dir} holds a finished run of another configuration (differs in "
                       f"{', '.join(diff[:5])}); choose another tag= or remove that directory")
    return metrics


def _load_teacher(cfg, num_classes: int, device: torch.device) -> torch.nn.Module:
    path = Path(cfg.teacher.checkpoint)
    arch = cfg.pair.teacher
    if not path.exists():
        raise RunError(
            f"teacher checkpoint not found: {path}\n"
            f"  train it:  python -m rld.train dataset={cfg.dataset.name} pair={cfg.pair.name} "
            f"distiller=vanilla role=teacher\n"
            f"  or put the published file there (cifar_teachers.tar unpacks to "
            f"<arch>_vanilla/ckpt_epoch_240.pth under paths.teachers={cfg.paths.teachers}),"
            f"\n  or pass teacher.checkpoint=PATH")
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


def _history_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = [",".join(keys)]
    for r in rows:
        lines.append(",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k])
                              for k in keys))
    return "\n".join(lines) + "\n"


def run(cfg, run_dir: Path) -> dict:
    """Train (or resume, or recall) the run of `cfg` in `run_dir`; returns metrics.json."""
    validate(cfg)
    run_dir = Path(run_dir)
    fp = fingerprint(cfg)
    done = _completed(run_dir, fp)
    if done is not None:
        log.info("run already finished (%s): %s", done["status"], run_dir)
        return done
    with run_lock(run_dir):
        return _train(cfg, run_dir, fp)


def _train(cfg, run_dir: Path, fp: dict) -> dict:
    t0 = time.time()
    t = cfg.trainer
    device = resolve_device(t.device)
    dtype = resolve_precision(t.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not t.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    try:
        data = build_loaders(cfg.dataset, t.batch_size, device, cfg.seed, drop_last=t.drop_last,
                             test_batch_size=max(t.batch_size, 256))
    except DataError as e:
        raise RunError(str(e)) from None
    num_classes = data.num_classes
    distiller = build_distiller(cfg.distiller)
    teacher = None
    if distiller.needs_teacher:
        teacher = _load_teacher(cfg, num_classes, device)
    arch = cfg.pair.teacher if cfg.role == "teacher" else cfg.pair.student
    student = build_model(arch, num_classes, cfg.dataset.family)
    s = build_step(student, teacher, distiller, device=device, dtype=dtype,
                   channels_last=t.channels_last, compile=t.compile, lr=cfg.optim.lr,
                   momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                   compile_mode=t.compile_mode)
    optimizer, scaler = s.optimizer, s.scaler
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.optim.milestones),
                                                     gamma=cfg.optim.gamma)

    history: list[dict] = []
    best, teacher_top1, start = -1.0, None, 1
    last = run_dir / LAST
    if t.resume and last.exists():
        state = torch.load(last, map_location=device, weights_only=False)
        if state["fingerprint"] != fp:
            raise RunError(f"{last} belongs to another configuration; choose another tag= "
                           "or pass trainer.resume=false to start over")
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, best, teacher_top1 = state["history"], state["best"], state["teacher_top1"]
        start = state["epoch"] + 1
        set_rng_state(state["rng"])
        t0 -= state["wall_s"]
        log.info("resumed from %s after epoch %d", last, state["epoch"])
    elif teacher is not None:
        teacher_top1, _ = evaluate(teacher, data.test, s)
        log.info("teacher %s: test top-1 %.2f%%", cfg.pair.teacher, teacher_top1)

    progress = Progress(t.progress, t.log_every_s)
    status, message = "completed", None
    for epoch in range(start, t.epochs + 1):
        e0 = time.time()
        lr = optimizer.param_groups[0]["lr"]
        data.train.set_epoch(epoch)
        try:
            train_stats = train_epoch(s, data.train, epoch, t.epochs, progress)
        except Diverged as e:
            status, message = "diverged", str(e)
            log.error("%s: stopping this run", message)
            break
        top1, top5 = evaluate(s.student, data.test, s)
        scheduler.step()
        best = max(best, top1)
        row = {"epoch": epoch, "lr": lr, **train_stats, "test_top1": top1, "test_top5": top5,
               "seconds": time.time() - e0}
        history.append(row)
        if t.progress != "none":
            log.info("epoch %d/%d  lr %.4g  loss %.4f  train %.2f%%  test %.2f%% (best %.2f%%)"
                     "  top5 %.2f%%  %.1fs", epoch, t.epochs, lr, row["loss"],
                     row["train_top1"], top1, best, top5, row["seconds"])
        io.write_text(run_dir / HISTORY, _history_csv(history))
        io.save_torch(last, {
            "model": student.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": epoch, "best": best, "history": history, "teacher_top1": teacher_top1,
            "rng": rng_state(), "fingerprint": fp, "wall_s": time.time() - t0})

    final = history[-1] if history else {}
    nan = float("nan")
    metrics = {
        "status": status, "message": message,
        "top1": final.get("test_top1", nan) if status == "completed" else nan,
        "top1_best": best if status == "completed" else nan,
        "top5": final.get("test_top5", nan) if status == "completed" else nan,
        "epochs": t.epochs, "wall_s": round(time.time() - t0, 3),
        "dataset": cfg.dataset.name, "pair": cfg.pair.name, "role": cfg.role,
        "teacher": cfg.pair.teacher if distiller.needs_teacher else None,
        "student": arch, "distiller": cfg.distiller.name,
        **{k: cfg.distiller[k] for k in ("alpha", "beta", "tau", "scd_tau", "standardize",
                                        "warmup", "ce_weight", "kd_weight")},
        "seed": cfg.seed, "teacher_top1": teacher_top1,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": str(dtype).removeprefix("torch."),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "versions": versions(), "fingerprint": fp,
    }
    if status == "completed":
        ckpt = {"model": student.state_dict(), "arch": arch, "num_classes": num_classes,
                "family": cfg.dataset.family, "dataset": cfg.dataset.name,
                "top1": metrics["top1"], "epochs": t.epochs}
        io.save_torch(run_dir / "student.pt", ckpt)
        if cfg.role == "teacher":
            io.save_torch(Path(cfg.teacher.checkpoint), ckpt)
            log.info("teacher checkpoint written to %s", cfg.teacher.checkpoint)
    io.write_json(run_dir / METRICS, metrics)
    if status == "completed":
        log.info("done: top-1 %.2f%% (best %.2f%%), top-5 %.2f%%, %s", metrics["top1"],
                 metrics["top1_best"], metrics["top5"], run_dir)
    return metrics


def record_failure(cfg, run_dir: Path, message: str) -> None:
    """metrics.json with status "failed" for a run that raised (tables show it as failed;
    running the same command again retries it).  A finished run's record is never
    replaced (the error may be about that very directory)."""
    path = Path(run_dir) / METRICS
    if path.exists():
        try:
            if json.loads(path.read_text()).get("status") != "failed":
                return
        except ValueError:
            pass
    keys = ("alpha", "beta", "tau", "scd_tau", "standardize", "warmup", "ce_weight",
            "kd_weight")
    distiller = {k: cfg.distiller.get(k) for k in keys}
    io.write_json(path, {
        "status": "failed", "message": message, "top1": None, "top1_best": None,
        "top5": None, "epochs": cfg.trainer.epochs, "dataset": cfg.dataset.name,
        "pair": cfg.pair.name, "role": cfg.role, "student": cfg.pair.student,
        "distiller": cfg.distiller.name, **distiller, "seed": cfg.seed,
        "versions": versions()})


def objective_value(metrics: dict, key: str) -> float:
    value = metrics.get(key)
    return float("nan") if value is None or not math.isfinite(value) else float(value)
