"""The inner loop of training: one optimisation step, one epoch, evaluation and progress.

Used by the engine (`rld.engine`, which owns run directories, resume and records) and by
the benchmarks (`rld.bench`).  Nothing here reads a config: `build_train_state` takes plain
values.  Loss terms and accuracies accumulate on the device and are read once per epoch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from copy import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rld.distillers import Distiller

# the torch.compile modes (rld.validate.COMPILE_MODES) that replay CUDA graphs
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def uses_cudagraphs(compile: bool, compile_mode: str, device: torch.device) -> bool:
    """Whether callables compiled so replay CUDA graphs (each step must mark its start)."""
    return bool(compile) and compile_mode in CUDAGRAPH_MODES and device.type == "cuda"


class Diverged(RuntimeError):
    """The training loss turned non-finite."""


@dataclass
class TrainState:
    """Everything a training step touches: the models (as modules, whose state is the run's,
    and as the callables a step runs, compiled or not), the distiller, the optimiser and the
    numeric settings."""

    student: nn.Module
    teacher: nn.Module | None
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    forward: Callable[[Tensor], Any]  # the student's training output: logits or Features
    teacher_forward: Callable[[Tensor], Any] | None
    predict: Callable[[Tensor], Tensor]  # the student's logits, for evaluation
    cudagraphs: bool = False  # compiled callables replay CUDA graphs: mark each step's start
    # sums a tensor over the processes of a data-parallel run (None: one process)
    all_reduce: Callable[[Tensor], Tensor] | None = None
    # one rank of a data-parallel run (rld.distributed.DataParallel: loss_scales(loader),
    # after_backward(), end_epoch()); None: one process
    parallel: Any = None

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def inputs(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train(self, mode: bool = True) -> None:
        self.student.train(mode)
        self.distiller.train(mode)
        if self.teacher is not None:
            self.teacher.train(mode and self.distiller.teacher_train)


def build_train_state(student: nn.Module, teacher: nn.Module | None, distiller: Distiller, *,
                      device: torch.device, dtype: torch.dtype, channels_last: bool,
                      compile: bool, lr: float, momentum: float, weight_decay: float,
                      compile_mode: str = "default") -> TrainState:
    """Models and distiller on the device (channels-last on CUDA), SGD over the student's
    and the distiller's parameters (same lr, momentum and weight decay), a gradient scaler
    for fp16.

    compile: torch.compile the student's and the teacher's forward and the distiller's loss
    (a logit distiller's loss function, a chain of small kernels; a feature distiller's
    `distill`, its modules included) in `compile_mode` (checked by rld.validate), with
    static shapes: a partial last batch compiles one more graph per function instead of a
    slower dynamic-shape graph for all.  The loss weights (warm-up ramp, CE) stay outside the
    graphs, so the epoch number is never baked into one.  The caller's `distiller` object is
    left as it is (a shallow copy holds the compiled loss)."""
    channels_last = channels_last and device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student.to(device, memory_format=fmt)
    distiller.to(device, memory_format=fmt)
    if teacher is not None:
        teacher.to(device, memory_format=fmt).eval()
    params = list(student.parameters()) + list(distiller.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    features = distiller.needs_features

    def wrap(fn):
        return torch.compile(fn, mode=compile_mode, dynamic=False) if compile else fn

    forward = wrap(student.forward_features if features else student)
    predict = wrap(student) if features else forward
    teacher_forward = None
    if teacher is not None:
        teacher_forward = wrap(teacher.forward_features if features else teacher)
    if compile:  # logit distillers: their loss function; others: their whole `distill`
        distiller = copy(distiller)
        if distiller.loss_fn is not None:
            distiller.loss_fn = wrap(distiller.loss_fn)
        else:
            distiller.distill = wrap(distiller.distill)
    cudagraphs = uses_cudagraphs(compile, compile_mode, device)
    return TrainState(student, teacher, distiller, optimizer, scaler, device, dtype,
                      channels_last, forward, teacher_forward, predict, cudagraphs)


def topk_correct(logits: Tensor, target: Tensor, k: int) -> Tensor:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == target.unsqueeze(1)).any(dim=1).sum()


def _detached_copy(out: Any) -> Any:
    """A copy of the teacher's output out of the CUDA graphs' memory pool, which the next
    replay overwrites (outputs made under no_grad are otherwise normal tensors that autograd
    may save as they are)."""
    if isinstance(out, Tensor):
        return out.clone()
    if isinstance(out, list | tuple):
        items = [_detached_copy(o) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    return out


def train_step(s: TrainState, x: Tensor, y: Tensor, epoch: int, index: Tensor | None = None,
               loss_scale: float | None = None):
    """One optimisation step; returns (loss terms, total loss, student logits), on device.

    `loss_scale` multiplies the loss that is differentiated (not the returned one): a rank
    of a data-parallel run scales its mean over b_r samples by b_r * W / B.

    With CUDA graphs, compiled outputs live in memory that the next step's replay
    overwrites: the gradients are dropped before the forward, and the returned logits are a
    copy, so every returned tensor may be kept."""
    s.optimizer.zero_grad(set_to_none=True)
    if s.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    x = s.inputs(x)
    with s.autocast():
        out = s.forward(x)
        out_t = None
        if s.teacher_forward is not None:
            with torch.no_grad():
                out_t = s.teacher_forward(x)
            if s.cudagraphs:
                out_t = _detached_copy(out_t)
        terms = s.distiller.terms(out, out_t, y, epoch, index)
    loss = torch.stack(list(terms.values())).sum()
    _descend(s, loss if loss_scale is None or loss_scale == 1.0 else loss * loss_scale)
    logits = out.logits if s.distiller.needs_features else out
    if s.cudagraphs:
        logits = logits.detach().clone()
    return terms, loss, logits


def _descend(s: TrainState, loss: Tensor) -> None:
    """Backward pass of `loss` and the optimiser's step (through the gradient scaler with
    fp16; the gradients of a data-parallel rank agreed between the two)."""
    if s.scaler is not None:
        s.scaler.scale(loss).backward()
    else:
        loss.backward()
    if s.parallel is not None:
        s.parallel.after_backward()
    if s.scaler is not None:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()


def empty_step(s: TrainState, x: Tensor) -> None:
    """A data-parallel rank's empty share of a last global batch (`rld.data.sharding`):
    the student's forward and a zero loss, so that the rank takes part in the gradient
    all-reduce and steps with the others' gradients (the losses would be means over no
    sample).  No teacher, no distiller."""
    s.optimizer.zero_grad(set_to_none=True)
    if s.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    with s.autocast():
        out = s.forward(s.inputs(x))
    logits = out.logits if s.distiller.needs_features else out
    _descend(s, logits.float().sum() * 0.0)


class Progress:
    """A tqdm bar on a terminal (refreshed at most every `every` seconds; its loss read is
    the only host read it makes), else nothing here: the engine logs one line per epoch."""

    def __init__(self, mode: str, every: float):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "line"
        self.enabled = mode == "bar"
        self.every = every
        self.bar = None
        self.last = 0.0

    def start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False,
                            mininterval=self.every, file=sys.stderr, dynamic_ncols=True)

    def update(self, loss: Callable[[], float]) -> None:
        """One step done; `loss` (a host read) is called only when the bar is redrawn."""
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.bar.set_postfix_str(f"loss {loss():.4f}", refresh=False)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _batches(loader, index: bool):
    """(x, y, sample indices or None) of each batch."""
    for batch in loader:
        x, y, *rest = batch
        yield x, y, (rest[0] if index and rest else None)


def train_epoch(s: TrainState, loader, epoch: int, epochs: int, progress: Progress) -> dict:
    """One epoch.  Loss terms and accuracy accumulate on the device and are read once at
    the end (plus the progress bar's reads, a few per second at most); in a data-parallel
    run they are summed over the processes first, so every process returns the whole
    epoch's numbers."""
    s.train()
    sums, count, names = None, 0, []
    first_bad = torch.full((), -1.0, device=s.device)
    scales = s.parallel.loss_scales(loader) if s.parallel is not None else None
    progress.start(epoch, epochs, len(loader))
    for step, (x, y, index) in enumerate(_batches(loader, s.distiller.needs_index)):
        n = y.shape[0]  # batch sizes are host metadata: no device read
        if n == 0:  # this rank's empty share of the last global batch (never its first)
            empty_step(s, x)
        else:
            terms, loss, logits = train_step(s, x, y, epoch, index,
                                             None if scales is None else scales[step])
            names = list(terms)
            with torch.no_grad():
                count += n
                row = torch.stack([*(t.detach() * n for t in terms.values()),
                                   loss.detach() * n, (logits.argmax(1) == y).sum().float()])
                sums = row if sums is None else sums + row
                bad = ~torch.isfinite(loss.detach()) & (first_bad < 0)
                first_bad = torch.where(bad, float(step + 1), first_bad)
        progress.update(lambda: sums[-2].item() / count)  # noqa: B023 - called at once
    progress.end()
    if sums is None:
        raise ValueError("the training loader gave no batch")
    if s.parallel is not None:
        s.parallel.end_epoch()
    bad = (first_bad > 0).float()
    stats = torch.cat([sums.float(), torch.stack([torch.full_like(bad, count), bad,
                                                  first_bad.clamp(min=0) * bad])])
    if s.all_reduce is not None:
        stats = s.all_reduce(stats)
    *values, n, n_bad, bad_steps = stats.tolist()  # the epoch's one host read
    if n_bad > 0:  # the first non-finite step (averaged over the processes that saw one)
        raise Diverged(f"non-finite loss at epoch {epoch}, step {round(bad_steps / n_bad)}")
    out = {f"loss_{name}": v / n for name, v in zip(names, values)}
    out["loss"] = values[-2] / n
    out["train_top1"] = 100.0 * values[-1] / n
    return out


@torch.inference_mode()
def evaluate(s: TrainState, loader, model: nn.Module | None = None) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) of `model` (default: the student, through its compiled
    `predict`) in eval mode over the loader; summed over the processes of a data-parallel
    run."""
    (model or s.student).eval()
    predict = model or s.predict
    sums, n = torch.zeros(2, device=s.device), 0
    for batch in loader:
        x, y = batch[0], batch[1]
        if s.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with s.autocast():
            logits = predict(s.inputs(x))
        sums += torch.stack([topk_correct(logits, y, 1), topk_correct(logits, y, 5)]).float()
        n += y.shape[0]
    sums = torch.cat([sums, sums.new_full((1,), n)])
    if s.all_reduce is not None:
        sums = s.all_reduce(sums)
    top1, top5, n = sums.tolist()
    return 100.0 * top1 / n, 100.0 * top5 / n
