"""Data-parallel training of one run over several processes (torch.distributed).

Who the processes are: `rld.world` (`find_world`, re-exported here).

`process_group` starts the group (NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on the
CPU) with a timeout on every collective, so a rank that dies or hangs ends the job instead
of stalling it, and destroys it when the process ends.  `Group` holds the few collectives the engine
needs around training (rank 0 decides, every rank learns the outcome), and
`data_parallel` turns a `rld.loop.TrainState` into one rank of a data-parallel run:

* DistributedDataParallel over the student (its `forward_features` for feature distillers);
  the gradients of the distiller's own modules are averaged after each backward pass;
* the loss of a rank's b_r samples (a mean over them) is scaled by b_r * W / B, B the step's
  global batch, so DDP's average over the W ranks is the mean over the global batch: W ranks
  compute the 1-rank step (an empty share takes part with a zero loss);
* batch-norm statistics per rank (as DataParallel gave the reference releases), with rank
  0's running statistics kept (DDP broadcasts them at every forward and `end_epoch` before
  evaluation and checkpoints); `sync_bn=True` converts the student's BN layers to
  SyncBatchNorm (torch's on CUDA; on the CPU, where torch has no kernels for it,
  `CpuSyncBatchNorm`, the same statistics from sums all-reduced over gloo).  The BN layers
  of a feature distiller's modules and of OFD's teacher (in training mode) stay per rank:
  a rank with an empty share of a last batch runs neither, so they cannot take part in
  collectives;
* compile: the DDP-wrapped student is compiled (DDP's graph splitting at bucket
  boundaries), without CUDA graphs, which do not capture DDP's gradient all-reduce: the
  modes that replay them compile the student in `default` / `max-autotune-no-cudagraphs`
  (the teacher and the loss keep the mode).
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from rld.world import World, find_world, world_problem

log = logging.getLogger("rld")
__all__ = ["World", "find_world", "world_problem", "Group", "process_group", "data_parallel",
           "DataParallel", "CpuSyncBatchNorm", "convert_sync_batchnorm", "local_device",
           "close_process_group", "ddp_compile_mode", "loss_scales", "average_gradients",
           "broadcast_buffers"]

# compile modes that replay CUDA graphs (rld.loop.CUDAGRAPH_MODES) -> the student's mode under
# DDP, whose gradient all-reduce runs between the graphs
_NO_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def ddp_compile_mode(mode: str) -> str:
    """The compile mode of a data-parallel rank's student for `trainer.compile_mode`: the
    same, without CUDA graphs (which do not capture the gradient all-reduce)."""
    return _NO_CUDAGRAPHS.get(mode, mode)


def loss_scales(loader, world_size: int) -> list[float]:
    """Per step of a sharded `loader` (`rld.data.PlannedLoader`): b_r * W / B, the factor
    that makes the average over W ranks of their scaled means the global batch's mean
    (1.0 for a full batch)."""
    plan = loader.plan
    return [plan.local_sizes[i] * world_size / plan.global_size(i) for i in range(len(plan))]


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Replace each parameter's gradient by its average over the ranks, in one all-reduce
    (a parameter without a gradient counts as zeros)."""
    if not params:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n


def broadcast_buffers(modules_or_tensors: list) -> None:
    """Every rank takes rank 0's values of these tensors (of these modules' buffers)."""
    import torch.distributed as dist

    for item in modules_or_tensors:
        for b in (item.buffers() if isinstance(item, nn.Module) else (item,)):
            dist.broadcast(b, src=0)


def local_device(device: torch.device, world: World) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (modulo the GPUs it sees, so a task bound
    to one GPU takes it) on CUDA, the CPU as it is."""
    if device.type != "cuda" or not world.distributed:
        return device
    return torch.device("cuda", world.local_rank % max(1, torch.cuda.device_count()))


# --------------------------------------------------------------------------- the group
class Group:
    """The process group of a run and the collectives around training.  One process is a
    one-rank group: its collectives are the identity, and `on_main` simply calls."""

    def __init__(self, world: World, device: torch.device):
        self.world, self.device = world, device

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    def all_reduce(self, t: Tensor) -> Tensor:
        """The sum of `t` over the ranks (a new tensor; `t` itself on one rank)."""
        if self.size == 1:
            return t
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out)
        return out

    def gather(self, obj: Any) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Rank 0 calls `fn`; every rank returns its result or raises its exception, so a
        decision (a recall, a lock, a refusal) is the same on all ranks."""
        if self.size == 1:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        error = None
        if self.world.main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - handed to every rank, raised there
                error = e
                # the input errors (RunError, ConfigError, ...) as they are; others named
                sent = e if isinstance(e, ValueError) and len(e.args) == 1 else RuntimeError(
                    f"rank 0 failed: {type(e).__name__}: {e}")
                box[0] = ("error", sent)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if error is not None:
            raise error
        if kind == "error":
            raise value
        return value


@contextmanager
def process_group(world: World, device: torch.device, timeout_s: float) -> Iterator[Group]:
    """The default process group of `world` (NCCL on CUDA, gloo on the CPU), every
    collective bounded by `timeout_s`.  Started by the first run of the process and kept
    for the next ones (the grid points of a multirun: a group started again after
    `destroy_process_group` does not rendezvous under torchrun); destroyed at exit.  One
    process: a one-rank `Group`, nothing started."""
    if not world.distributed:
        yield Group(world, device)
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the group to this rank's GPU at once
        dist.init_process_group(backend, init_method=world.init_method, rank=world.rank,
                                world_size=world.size, timeout=timedelta(seconds=timeout_s),
                                **kwargs)
        atexit.register(_destroy_process_group)
    elif dist.get_backend() != backend:
        from rld.errors import ConfigError

        raise ConfigError(f"trainer.device={device} is not allowed here: this process's "
                          f"earlier runs started a {dist.get_backend()} group; one device "
                          "type per command")
    yield Group(world, device)


def close_process_group() -> None:
    """After a command's last run, on every rank: wait for the others, then tear the group
    down.  Without the barrier the first rank to leave closes its connections while the
    others' gloo threads still use them, and a rank can abort at exit ("terminate called
    without an active exception").  Called on the way out of a command that ended well
    only: a rank that failed leaves at once (`_destroy_process_group`), so that torchrun
    sees it and ends the others rather than leaving them in a barrier until the timeout."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- sync BN
class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient, the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        import torch.distributed as dist

        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _SumOverRanks.apply(grad.contiguous())


class CpuSyncBatchNorm:
    """Batch norm synchronised over the process group for CPU tensors (torch's
    SyncBatchNorm has CUDA kernels only, and DDP refuses it on the CPU): in training, the
    mean and biased variance of the whole global batch from per-channel sums all-reduced
    over the group, differentiably (the backward pass sums the gradients of the statistics
    over the ranks, as torch's does); running statistics updated with the unbiased
    variance; computed in float64 (a CPU facility: tests, CPU runs).  In eval mode, or
    outside a process group, the layer's own BatchNorm.  Mixed
    into a BatchNorm class (`CPU_SYNC_BATCHNORM`); the layer keeps its state and keys."""

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        factor = self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if factor is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # in float64, as torch's CPU batch norm accumulates: W ranks then round like 1 rank
        x64 = x.double()
        count = x64.new_full((1,), x.numel() // x.shape[1])
        total = _SumOverRanks.apply(torch.cat([x64.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x64 - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


CPU_SYNC_BATCHNORM = {bn: type(f"CpuSync{bn.__name__}", (CpuSyncBatchNorm, bn), {})
                      for bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> None:
    """Synchronise every BatchNorm layer of `module` over the process group, in place (same
    parameters, buffers and state-dict keys): torch's SyncBatchNorm on CUDA, the
    `CpuSyncBatchNorm` version of each layer on the CPU."""
    if device.type != "cpu":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        if converted is not module:
            raise ValueError("convert_sync_batchnorm: the module itself is a BatchNorm layer")
        return
    for m in module.modules():
        cls = CPU_SYNC_BATCHNORM.get(type(m))
        if cls is not None:
            m.__class__ = cls  # same state, the synchronised forward


# --------------------------------------------------------------------------- DDP
class DataParallel:
    """What one rank adds to a `TrainState` (`TrainState.parallel`, called by rld.loop and
    rld.students): the distiller's gradient average and the end-of-epoch agreement of
    buffers."""

    def __init__(self, group: Group, distiller_params: list[nn.Parameter],
                 shared: list[nn.Module]):
        self.group = group
        self.distiller_params = distiller_params
        self.shared = shared  # modules whose buffers follow rank 0's at each epoch's end

    def after_backward(self) -> None:
        """Average the gradients of the distiller's own modules (DDP averages the
        student's); a rank whose modules got none sends zeros."""
        average_gradients(self.distiller_params, self.group.size)

    def end_epoch(self) -> None:
        """Every rank takes rank 0's buffers (BN running statistics of the student, the
        distiller and a teacher in training mode): the model each rank evaluates is the
        one rank 0 saves."""
        broadcast_buffers(self.shared)


def data_parallel(state, group: Group, *, sync_bn: bool, compile: bool,
                  compile_mode: str = "default") -> DataParallel:
    """Make `state` (a `rld.loop.TrainState` on `group.device`) one rank of a data-parallel
    run: DDP over the student as `state.forward`, the statistics summed over the ranks,
    `state.parallel` set.  `state.student` stays the plain module (checkpoints and
    `student.pt` keep their keys)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from rld.models.features import FeaturesCall

    device, distiller = group.device, state.distiller
    shared: list[nn.Module] = [state.student, distiller]
    if distiller.teacher_train and state.teacher is not None:
        shared.append(state.teacher)
    if sync_bn:  # the student only: a rank with an empty share runs no teacher, no distiller
        convert_sync_batchnorm(state.student, device)
    module = FeaturesCall(state.student) if distiller.needs_features else state.student
    # buffers (BN running statistics) follow rank 0's at every forward: DDP's default
    ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    forward: Callable = ddp
    if compile:
        forward = torch.compile(ddp, mode=ddp_compile_mode(compile_mode), dynamic=False)
    state.forward = forward
    state.all_reduce = group.all_reduce
    params = [p for p in distiller.parameters() if p.requires_grad]
    state.parallel = DataParallel(group, params, shared)
    return state.parallel

