"""A pool of GPU slots for parallel jobs on one machine (the `gpus` launcher).

Each GPU offers `jobs_per_gpu` slots.  A slot is a lock file (`fcntl.flock`) in a slot
directory shared by every process of the machine.  A worker process of the launcher takes a
free slot before its first job, sets `CUDA_VISIBLE_DEVICES` to that slot's GPU (before
anything in the process can initialise CUDA) and keeps the slot until the process exits
(the kernel drops the lock even when the process is killed).  Loky reuses worker
processes, so a worker that finishes early simply takes the next job on its own GPU: no two
running jobs ever share a slot, whatever order the jobs finish in.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SLOT_DIR = os.path.join(tempfile.gettempdir(), "rld-gpu-slots")
# the slot directory's environment variable (conf/hydra/launcher/gpus.yaml reads it too)
SLOT_DIR_ENV = "RLD_GPU_SLOT_DIR"


def parse_visible(value: str) -> list[str]:
    """Devices named by a CUDA_VISIBLE_DEVICES value, in order.

    CUDA ignores everything from the first invalid entry on (e.g. "-1"), and an empty value
    hides all GPUs.  Entries may be indices, GPU-/MIG- UUIDs: they are kept verbatim.
    """
    out: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break
        out.append(item)
    return out


_COUNT_CACHE: int | None = None


def count_gpus() -> int:
    """Number of GPUs of this machine, without initialising CUDA in this process."""
    global _COUNT_CACHE
    if _COUNT_CACHE is not None:
        return _COUNT_CACHE
    n = None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0:
                n = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            n = None
    if n is None:
        torch = sys.modules.get("torch")
        if torch is not None and not torch.backends.cuda.is_built():
            n = 0
        else:  # ask torch in a child process: this one must not touch CUDA
            code = "import torch; print(torch.cuda.device_count())"
            try:
                out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                     text=True, timeout=120)
                n = int(out.stdout.strip() or 0) if out.returncode == 0 else 0
            except (OSError, subprocess.SubprocessError, ValueError):
                n = 0
    _COUNT_CACHE = n
    return n


def visible_devices(devices: Sequence[Any] | None = None,
                    environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs jobs may use: `devices` if given, else CUDA_VISIBLE_DEVICES if set, else
    every GPU of the machine (0..n-1)."""
    if devices is not None:
        return [str(d) for d in devices]
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        return parse_visible(env["CUDA_VISIBLE_DEVICES"])
    return [str(i) for i in range(count_gpus())]


@dataclass(frozen=True)
class SlotPool:
    """What a worker needs to take a slot: picklable, sent along with every job."""

    devices: tuple[str, ...]
    jobs_per_gpu: int
    slot_dir: str
    cpu_threads: int | None = None  # CPU-only pools: torch threads per job

    @property
    def slots(self) -> list[tuple[str, int]]:
        # breadth first: with 2 jobs per GPU the first jobs still land on distinct GPUs
        return [(d, k) for k in range(self.jobs_per_gpu) for d in self.devices]

    def lock_path(self, device: str, k: int) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", device)
        return Path(self.slot_dir) / f"gpu-{safe}.{k}.lock"


# the slot this process holds: (pool, device, open file); released when the process exits
_HELD: tuple[SlotPool, str, Any] | None = None


def release_slot() -> None:
    global _HELD
    if _HELD is not None:
        _HELD[2].close()  # closing the file drops the flock
        _HELD = None


def acquire_slot(pool: SlotPool, poll_s: float = 0.5, warn_after_s: float = 60.0) -> str:
    """Take a free slot of `pool` (blocking) and return its device; idempotent per process."""
    global _HELD
    if _HELD is not None:
        if _HELD[0] == pool:
            return _HELD[1]
        release_slot()
    Path(pool.slot_dir).mkdir(parents=True, exist_ok=True)
    t0 = last_warn = time.monotonic()
    while True:
        for device, k in pool.slots:
            path = pool.lock_path(device, k)
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.uname().nodename} {os.getpid()}\n")
            handle.flush()
            _HELD = (pool, device, handle)
            return device
        now = time.monotonic()
        if now - last_warn >= warn_after_s:
            last_warn = now
            log.warning("waiting %.0fs for a free GPU slot in %s (all %d taken)", now - t0,
                        pool.slot_dir, len(pool.slots))
        time.sleep(poll_s)


def pin_process(pool: SlotPool) -> str | None:
    """Run in a worker before its job: take a slot and pin the process to its GPU.

    Returns the device, or None for a CPU-only pool.
    """
    if not pool.devices:
        if pool.cpu_threads:
            os.environ["OMP_NUM_THREADS"] = str(pool.cpu_threads)
            torch = sys.modules.get("torch")
            if torch is not None:
                torch.set_num_threads(pool.cpu_threads)
        return None
    device = acquire_slot(pool)
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    torch = sys.modules.get("torch")
    if previous != device and torch is not None and torch.cuda.is_initialized():
        raise RuntimeError(f"worker {os.getpid()} already initialised CUDA on device "
                           f"{previous!r}; it cannot move to {device!r}")
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    return device


def run_pinned_unit(pool: SlotPool, unit: Sequence[Any], hydra_context: Any, config: Any,
                    task_function: Any, singleton_state: dict, pack_mode: str) -> list[Any]:
    """A joblib task: pin this worker, then run one unit of work (`_jobs.run_unit`)."""
    from hydra.core.singleton import Singleton

    from . import _jobs

    device = pin_process(pool)
    if device is not None:
        log.info("job(s) #%s: CUDA_VISIBLE_DEVICES=%s (worker %d)",
                 ",".join(str(idx) for idx, _ in unit), device, os.getpid())
    Singleton.set_state(singleton_state)
    return _jobs.run_unit(hydra_context, config, task_function, list(unit), pack_mode,
                          job_id=gpus_job_id)


def joblib_kwargs(settings: dict[str, Any], n_jobs: int) -> dict[str, Any]:
    """joblib.Parallel's keyword arguments from the launcher's settings: numbers given as
    strings become ints (pre_dispatch "2*n_jobs" stays an expression), the backend is loky
    (processes: a worker's CUDA_VISIBLE_DEVICES is its own)."""
    out = dict(settings)
    for key in ("pre_dispatch", "batch_size", "max_nbytes"):
        value = out.get(key)
        if isinstance(value, str) and value.strip().isdigit():
            out[key] = int(value)
    out["n_jobs"] = n_jobs
    out["backend"] = "loky"
    return out


def gpus_job_id(idx: int, config: Any) -> str:
    """The job id this launcher gives job `idx` (hydra's joblib launcher's)."""
    return f"{config.hydra.job.name}_{idx}"


def where(launcher: Any, pool: SlotPool) -> str:
    """Where the launcher's units run, for the log."""
    what = "job(s)" if launcher.pack is None else "pack(s)"
    return (f"GPUs {','.join(pool.devices)} x {pool.jobs_per_gpu} {what} per GPU"
            if pool.devices else f"CPU, {pool.cpu_threads} thread(s) per unit")


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[Any]:
    """The batch's units of work (one job each, or packs of `pack` jobs), one per worker
    at a time, each worker pinned to its GPU slot."""
    from hydra.core.singleton import Singleton
    from joblib import Parallel, delayed

    from . import _jobs

    config = launcher.config
    _jobs.start_sweep(config)
    pool = launcher.pool()
    n_jobs = launcher.workers
    todo = _jobs.units(launcher.hydra_context, config, job_overrides, initial_job_idx,
                       launcher.pack)
    _jobs.log_plan(todo, f"{n_jobs} at a time on {where(launcher, pool)}")
    state = Singleton.get_state()
    returns = Parallel(**joblib_kwargs(launcher.joblib, n_jobs))(
        delayed(run_pinned_unit)(pool, unit, launcher.hydra_context, config,
                                 launcher.task_function, state, launcher.pack_mode)
        for unit in todo)
    return _jobs.in_job_order(todo, returns, initial_job_idx, len(job_overrides))


# ------------------------------------------------------------------ submitit's local executor
def local_pool(gpus_per_node: int) -> SlotPool | None:
    """The slot pool of `hydra/launcher=submitit_local` jobs: one slot per visible GPU (the
    sweeper's CUDA_VISIBLE_DEVICES, else every GPU), in the slot directory of the `gpus`
    launcher ($RLD_GPU_SLOT_DIR, else the default); None for CPU jobs or without a GPU."""
    if not gpus_per_node:
        return None
    devices = visible_devices()
    if not devices:
        log.warning("submitit_local: gpus_per_node=%d but no GPU visible "
                    "(CUDA_VISIBLE_DEVICES=%r): jobs run on the CPU", gpus_per_node,
                    os.environ.get("CUDA_VISIBLE_DEVICES"))
        return None
    return SlotPool(tuple(devices), 1, os.environ.get(SLOT_DIR_ENV) or DEFAULT_SLOT_DIR)


def launch_in_waves(submit: Any, pool: SlotPool | None, job_overrides: Sequence[Sequence[str]],
                    initial_job_idx: int) -> list[Any]:
    """`submit(overrides, initial_job_idx)` in waves of at most one job per slot of `pool`
    (all at once without a pool): submitit's local executor starts a batch's jobs together,
    and a job must not spend its time limit waiting for a GPU of its own batch."""
    size = len(pool.slots) if pool is not None else max(1, len(job_overrides))
    if pool is not None and len(job_overrides) > size:
        log.info("submitit_local: %d job(s) on %d GPU(s) (%s): %d at a time",
                 len(job_overrides), len(pool.devices), ",".join(pool.devices), size)
    returns: list[Any] = []
    for start in range(0, len(job_overrides), size):
        returns.extend(submit(list(job_overrides[start:start + size]), initial_job_idx + start))
    return returns
