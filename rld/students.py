"""How K >= 1 students take a training step together on one batch (a single run is K = 1).

Both strategies get the batch and the teacher's output once (computed by the engine's
epoch, `rld.loop.train_epoch`) and return a `StepOut`: every point's loss terms, total loss
and correct predictions, each kind in one tensor (a few kernels per step for the
bookkeeping, whatever K).

* `LoopStudents`: the K students one after another, each with `rld.loop.train_step` on its
  own `TrainState` (its model, optimiser, gradient scaler), the teacher's forward replaced by
  the pack's output.  Every point computes exactly what its separate run computes (the same
  kernels in the same order), and holds one student's activations at a time.
* `VmapStudents`: one batched student.  The K students' parameters and batch-norm buffers are
  stacked (`torch.func.stack_module_state`) and the forward is `torch.func.vmap` over
  `functional_call`, so each layer is one kernel for all K points (convolutions become
  grouped convolutions): K times fewer launches, the lever on a launch-bound GPU.  Batch-norm
  running statistics update per point in place (vmap's batch-norm rule with batched buffers;
  `num_batches_tracked` too), each point's loss is its own distiller's on its slice of the
  logits, and one SGD over the stacked tensors is elementwise, hence K separate SGDs
  (momentum, weight decay and learning rate per point).  Per-point models and optimisers are
  kept beside the stack and brought up to date by `sync()` (checkpoints, evaluation,
  `student.pt` use them), so a packed point's files are a separate run's.

Data-parallel (a pack over the ranks of torchrun or a multi-task Slurm job): every rank steps
its share of each global batch.  In the loop each point's `TrainState` is a DDP rank
(`rld.distributed.data_parallel`, as in its separate data-parallel run); in vmap the stacked
gradients are averaged over the ranks in one all-reduce per step and the stacked batch-norm
buffers follow rank 0's at each epoch's end, which is what DDP gives a separate run.  Each
rank's loss is scaled by b_r * W / B (`rld.distributed.loss_scales`), and a rank's empty
share of a last global batch takes part in the all-reduce with zero gradients.

Measured on a 2-core CPU (resnet32x4 -> resnet8x4, batch 64, fp32): vmap's grouped
convolutions are slower than K plain ones there (mkldnn's grouped backward), so the CPU
default is the loop; on CUDA the default is vmap (see README, "Packing").
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from rld.loop import TrainState, empty_step, evaluate, train_step, uses_cudagraphs

MODES = ("auto", "loop", "vmap")


class StepOut(NamedTuple):
    """One step of the K points of a pack, on the device."""

    names: list[list[str]]  # each point's loss term names
    values: Tensor  # point after point: its terms' values, then its total loss
    losses: Tensor  # [K] each point's total loss
    correct: Tensor  # [K] each point's correct top-1 predictions on the batch (float)


def point_row(terms: dict, loss: Tensor) -> Tensor:
    """One point's terms and total loss, detached, in a new tensor (kept safe from the
    next CUDA-graph replay)."""
    return torch.stack([*(t.detach() for t in terms.values()), loss.detach()])


def step_out(names: list[list[str]], rows: list[Tensor], logits: Tensor, y: Tensor) -> StepOut:
    """The `StepOut` of the points' `point_row`s and their logits [K, B, C]."""
    correct = (logits.argmax(-1) == y).sum(-1).float()
    return StepOut(names, torch.cat(rows), torch.stack([r[-1] for r in rows]), correct)


def resolve_mode(mode: str, device: torch.device, dtype: torch.dtype,
                 sync_bn: bool = False) -> str:
    """`auto`: vmap on CUDA, the loop elsewhere, with fp16 (whose gradient scaler skips
    steps per point, which one stacked optimiser cannot do) and with batch norm synchronised
    over ranks (`sync_bn`: its all-reduce inside the layer cannot run under vmap)."""
    from rld.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"pack mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        vmap_ok = device.type == "cuda" and dtype != torch.float16 and not sync_bn
        return "vmap" if vmap_ok else "loop"
    if mode == "vmap" and dtype == torch.float16:
        raise ConfigError("pack mode vmap does not take fp16 (one gradient scaler per "
                          "point): use mode loop or trainer.precision=bf16")
    if mode == "vmap" and sync_bn:
        raise ConfigError("pack mode vmap does not take trainer.sync_bn=true (batch norm "
                          "synchronised over the ranks): use mode loop")
    return mode


class LoopStudents:
    """The K students stepped one after another, each exactly as in its separate run."""

    def __init__(self, states: list[TrainState]):
        self._teacher_out = None
        # the same modules and optimisers; the teacher's forward is the step's shared output
        # (given to `step`), else the state's own
        self.states = [replace(s, teacher_forward=self._shared(s.teacher_forward))
                       if s.teacher_forward is not None else s for s in states]

    def _shared(self, own):
        def forward(x: Tensor):
            return own(x) if self._teacher_out is None else self._teacher_out
        return forward

    def train(self) -> None:
        for s in self.states:
            s.train()

    def set_lr(self, lr: float) -> None:
        """Nothing: each point's optimiser follows its own scheduler."""

    def step(self, x: Tensor, y: Tensor, teacher_out, epoch: int,
             loss_scale: float | None = None, index: Tensor | None = None) -> StepOut:
        self._teacher_out = teacher_out
        names, rows, logits = [], [], []
        try:
            for s in self.states:
                terms, loss, out = train_step(s, x, y, epoch, index, loss_scale)
                names.append(list(terms))
                rows.append(point_row(terms, loss))  # before the next point's replays
                logits.append(out)  # a copy already with CUDA graphs (train_step)
        finally:
            self._teacher_out = None
        with torch.no_grad():
            return step_out(names, rows, torch.stack(logits), y)

    def empty_step(self, x: Tensor) -> None:
        """A data-parallel rank's empty share of a last global batch (`rld.loop.empty_step`)."""
        for s in self.states:
            empty_step(s, x)

    def end_epoch(self) -> None:
        """Data-parallel: every rank takes rank 0's buffers."""
        for s in self.states:
            if s.parallel is not None:
                s.parallel.end_epoch()

    def sync(self) -> None:
        """Nothing: the points' own models and optimisers are the ones trained."""

    def evaluate(self, loader) -> list[tuple[float, float]]:
        """Top-1 and top-5 (%) of every point, in one pass over the loader: each student's
        compiled `predict` (`rld.loop.evaluate`)."""
        for s in self.states:
            s.student.eval()

        def predict(x: Tensor) -> Tensor:
            out = []
            for s in self.states:
                if s.cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out.append(s.predict(x))
            return torch.stack(out)

        return evaluate(self.states[0], loader, predict, len(self.states))


class VmapStudents:
    """The K students as one batched model: stacked parameters and buffers, vmap'd forward,
    one SGD over the stack.  Needs students of one architecture and logit distillers
    without parameters of their own (the packable ones).  With `group`
    (`rld.distributed.Group`), one rank of a data-parallel pack."""

    def __init__(self, states: list[TrainState], compile: bool = False,
                 compile_mode: str = "default", group=None):
        if any(s.scaler is not None for s in states):
            raise ValueError("VmapStudents does not take fp16 gradient scalers")
        if any(list(s.distiller.parameters()) for s in states):
            raise ValueError("VmapStudents takes distillers without parameters only")
        self.states = states
        self.group = group if group is not None and group.size > 1 else None
        if self.group is not None:
            from rld.distributed import ddp_compile_mode

            compile_mode = ddp_compile_mode(compile_mode)
        models = [s.student for s in states]
        self.params, self.buffers = stack_module_state(models)
        # the structure alone, without memory: functional_call supplies every tensor
        self.base = copy.deepcopy(models[0]).to("meta")
        hyper = states[0].optimizer.param_groups[0]
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=hyper["lr"],
                                         momentum=hyper["momentum"],
                                         weight_decay=hyper["weight_decay"])
        self._stack_momentum()
        forward = vmap(self._call, in_dims=(0, 0, None))
        self.forward = (torch.compile(forward, mode=compile_mode, dynamic=False) if compile
                        else forward)
        # compiled with CUDA graphs: every replay (training step, evaluation batch) marks
        # its start
        self.cudagraphs = uses_cudagraphs(compile, compile_mode, states[0].device)

    def _call(self, params: dict, buffers: dict, x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    @torch.no_grad()
    def _stack_momentum(self) -> None:
        """The points' momentum buffers, stacked (zeros for a point without one yet: its
        first step then gives exactly the buffer a fresh SGD starts with, the gradient)."""
        stacked = self.optimizer.state
        named = [dict(s.student.named_parameters()) for s in self.states]
        for name, big in self.params.items():
            bufs = [s.optimizer.state.get(params[name], {}).get("momentum_buffer")
                    for s, params in zip(self.states, named, strict=True)]
            if all(b is None for b in bufs):
                continue
            stacked[big]["momentum_buffer"] = torch.stack(
                [torch.zeros_like(big[0]) if b is None else b for b in bufs])

    def train(self) -> None:
        self.base.train()
        for s in self.states:
            s.train()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, x: Tensor, y: Tensor, teacher_out, epoch: int,
             loss_scale: float | None = None, index: Tensor | None = None) -> StepOut:
        """One step of every point; a point's loss is its separate run's on its slice
        (scaled by `loss_scale` for the backward pass of a data-parallel rank).  Its
        distillers take no sample indices (`index` is unused)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        s0 = self.states[0]
        with s0.autocast():
            logits = self.forward(self.params, self.buffers, s0.inputs(x))
            terms = [s.distiller.terms(logits[k], teacher_out, y, epoch)
                     for k, s in enumerate(self.states)]
        losses = torch.stack([torch.stack(list(t.values())).sum() for t in terms])
        # the sum's gradient is 1 for every point: each slice gets its own point's gradient
        total = losses.sum()
        (total if loss_scale is None or loss_scale == 1.0 else total * loss_scale).backward()
        self._descend()
        with torch.no_grad():
            return step_out([list(t) for t in terms],
                            [point_row(t, loss) for t, loss in zip(terms, losses)],
                            logits.detach(), y)

    def empty_step(self, x: Tensor) -> None:
        """A data-parallel rank's empty share of a last global batch: zero gradients into
        the all-reduce, then the step with the other ranks' average."""
        self.optimizer.zero_grad(set_to_none=True)
        self._descend()

    def _descend(self) -> None:
        if self.group is not None:
            from rld.distributed import average_gradients

            average_gradients(list(self.params.values()), self.group.size)
        self.optimizer.step()

    def end_epoch(self) -> None:
        """Data-parallel: every rank takes rank 0's stacked buffers (BN running statistics,
        which DDP gives a separate run)."""
        if self.group is not None:
            from rld.distributed import broadcast_buffers

            broadcast_buffers(list(self.buffers.values()))

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the stacked parameters, buffers and momentum into each point's own model and
        optimiser (their state dicts are then a separate run's)."""
        stacked = self.optimizer.state
        for k, s in enumerate(self.states):
            for name, p in s.student.named_parameters():
                big = self.params[name]
                p.copy_(big[k])
                buf = stacked.get(big, {}).get("momentum_buffer")
                if buf is not None:
                    s.optimizer.state[p]["momentum_buffer"] = buf[k].clone()
            for name, b in s.student.named_buffers():
                b.copy_(self.buffers[name][k])

    def evaluate(self, loader) -> list[tuple[float, float]]:
        """Top-1 and top-5 (%) of every point over the loader, batched like training
        (`rld.loop.evaluate`)."""
        self.base.eval()

        def predict(x: Tensor) -> Tensor:
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            return self.forward(self.params, self.buffers, x)

        try:
            return evaluate(self.states[0], loader, predict, len(self.states))
        finally:
            self.base.train()


def build_students(states: list[TrainState], mode: str, compile: bool = False,
                   compile_mode: str = "default", group=None):
    """The strategy `mode` (resolved: loop | vmap) over the points' states; with `group`
    (`rld.distributed.Group`), one rank of a data-parallel unit (loop: the states are DDP
    ranks already)."""
    if mode == "vmap":
        return VmapStudents(states, compile, compile_mode, group)
    return LoopStudents(states)
