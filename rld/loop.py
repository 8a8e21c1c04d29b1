"""The inner loop of training: one optimisation step, one epoch, evaluation and progress.

Used by the engine (`rld.engine`, which owns run directories, resume and records) and by
the benchmarks (`rld.bench`).  Nothing here reads a config: `build_train_state` takes plain
values.  An epoch steps K >= 1 students together (`rld.students`: one after another, or
batched); a single run is K = 1.  Loss terms and accuracies accumulate on the device and
are read once per epoch, for all K points at once.
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

from rld.distillers import Distiller, LossDistiller

# the torch.compile modes (rld.validate.COMPILE_MODES) that replay CUDA graphs
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def uses_cudagraphs(compile: bool, compile_mode: str, device: torch.device) -> bool:
    """Whether callables compiled so replay CUDA graphs (each step must mark its start)."""
    return bool(compile) and compile_mode in CUDAGRAPH_MODES and device.type == "cuda"


class PackTooLarge(RuntimeError):
    """The first step of a unit's first epoch ran out of device memory."""


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
    # sums a tensor over the processes of a data-parallel run (one process: the tensor)
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t  # noqa: E731
    # one rank of a data-parallel run (rld.distributed.DataParallel: after_backward(),
    # end_epoch()); None: one process
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


def compiled(fn: Callable, compile: bool, compile_mode: str = "default") -> Callable:
    """`fn` compiled in `compile_mode` with static shapes (as is without `compile`)."""
    return torch.compile(fn, mode=compile_mode, dynamic=False) if compile else fn


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
        return compiled(fn, compile, compile_mode)

    forward = wrap(student.forward_features if features else student)
    predict = wrap(student) if features else forward
    teacher_forward = None
    if teacher is not None:
        teacher_forward = wrap(teacher.forward_features if features else teacher)
    if compile and distiller.needs_teacher:  # logit distillers: their loss function; others:
        distiller = copy(distiller)  # their whole `distill`
        if isinstance(distiller, LossDistiller):
            distiller.loss_fn = wrap(distiller.loss_fn)
        else:
            distiller.distill = wrap(distiller.distill)
    cudagraphs = uses_cudagraphs(compile, compile_mode, device)
    return TrainState(student, teacher, distiller, optimizer, scaler, device, dtype,
                      channels_last, forward, teacher_forward, predict, cudagraphs)


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


def teacher_output(state: TrainState, teacher_fn, x: Tensor, cudagraphs: bool = False):
    """The teacher's output on the batch (logits, or `Features` for distillers on features),
    once for all the students of a step, computed as `train_step` computes it (the state's
    input format and autocast, no graph).  With `cudagraphs`: the step's start marked, and
    the output copied out of the graphs' pool, which the students' replays may reuse."""
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    with torch.no_grad(), state.autocast():
        out = teacher_fn(state.inputs(x))
    return _detached_copy(out) if cudagraphs else out


def _batches(loader, index: bool):
    """(x, y, sample indices or None) of each batch."""
    for batch in loader:
        x, y, *rest = batch
        yield x, y, (rest[0] if index and rest else None)


def train_epoch(students, loader, epoch: int, epochs: int, progress: Progress, *,
                teacher_fn=None, scales: list[float] | None = None, cudagraphs: bool = False,
                first: bool = False) -> list[dict | str]:
    """One epoch of the K students of `students` (`rld.students`); per student its stats
    (mean loss terms `loss_<name>`, `loss`, `train_top1`) over the epoch's samples (summed
    over the ranks of a data-parallel run), or the message of its first non-finite step.

    teacher_fn: the teacher's forward, run once per batch for all students (None: each
    student's own `TrainState.teacher_forward`); scales: per step, the loss scale of this
    rank's share (`rld.distributed.loss_scales`); first: the unit's first epoch (an
    out-of-memory error at its first step is `PackTooLarge`).  The sums of every student
    stay in one device tensor, read once at the end (and by the progress bar, a few times a
    second at most)."""
    s0 = students.states[0]
    acc, names, count = None, None, 0  # acc: [StepOut.values, K correct], sums
    first_bad = torch.full((len(students.states),), -1.0, device=s0.device)
    index = any(s.distiller.needs_index for s in students.states)

    def mean_loss() -> float:  # each point's total loss follows its terms
        ends = [sum(len(t) + 1 for t in names[:j + 1]) - 1 for j in range(len(names))]
        values = acc.tolist()
        return sum(values[e] for e in ends) / (count * len(names))

    progress.start(epoch, epochs, len(loader))
    for step, (x, y, idx) in enumerate(_batches(loader, index)):
        x = s0.inputs(x)  # the format every student takes, once
        if y.shape[0] == 0:  # this rank's empty share of the last global batch (never its
            students.empty_step(x)  # first: the sums exist)
            progress.update(mean_loss)
            continue
        try:
            out_t = None if teacher_fn is None else teacher_output(s0, teacher_fn, x, cudagraphs)
            out = students.step(x, y, out_t, epoch, None if scales is None else scales[step],
                                idx)
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
    return _epoch_stats(acc, names, count, first_bad, epoch, s0.all_reduce)


def _epoch_stats(acc: Tensor, names: list[list[str]], count: int, first_bad: Tensor,
                 epoch: int, all_reduce) -> list[dict | str]:
    """Per point: its epoch's mean loss terms and train top-1 from the device sums `acc`
    ([`StepOut.values`, K correct]; summed over the ranks by `all_reduce`), or the message
    of its first non-finite step; one host read."""
    k = len(names)
    bad = (first_bad > 0).float()
    stats = all_reduce(torch.cat([acc.float(), first_bad.new_full((1,), count), bad,
                                  first_bad.clamp(min=0) * bad]))
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


def topk_counts(logits: Tensor, y: Tensor) -> Tensor:
    """[K, 2]: each of K models' correct top-1 and top-5 predictions (float) from their
    logits [K, B, C] on the batch's targets [B]."""
    target = y.view(1, -1, 1)
    k5 = min(5, logits.shape[-1])
    return torch.stack([(logits.topk(k, dim=-1).indices == target).any(-1).sum(-1)
                        for k in (1, k5)], dim=1).float()


@torch.inference_mode()
def evaluate(s: TrainState, loader, predict: Callable[[Tensor], Tensor],
             k: int = 1) -> list[tuple[float, float]]:
    """Top-1 and top-5 accuracy (%) of `k` models over the loader: `predict(x)` gives their
    logits [k, B, C] (models in eval mode; the state's input format and autocast); summed
    over the processes of a data-parallel run; one host read."""
    sums, n = None, 0
    for batch in loader:
        x, y = s.inputs(batch[0]), batch[1]
        with s.autocast():
            row = topk_counts(predict(x), y)
        sums = row if sums is None else sums + row
        n += y.shape[0]
    if sums is None:  # a rank without test samples
        sums = torch.zeros(k, 2, device=s.device)
    total = s.all_reduce(torch.cat([sums.reshape(-1), sums.new_full((1,), n)]))
    *values, n = total.tolist()
    return [(100.0 * values[2 * k] / n, 100.0 * values[2 * k + 1] / n)
            for k in range(len(values) // 2)]


def evaluate_model(s: TrainState, loader, model: nn.Module | None = None) -> tuple[float, float]:
    """Top-1 and top-5 (%) of one model in eval mode (default: the student, through its
    compiled `predict`)."""
    (model or s.student).eval()
    predict = model or s.predict

    def one(x: Tensor) -> Tensor:
        if s.cudagraphs and model is None:
            torch.compiler.cudagraph_mark_step_begin()
        return predict(x).unsqueeze(0)

    return evaluate(s, loader, one)[0]
