"""`hydra/launcher=gpus`: one process per job on this machine, each pinned to its own GPU.

Config: conf/hydra/launcher/gpus.yaml.  The work is done in `_gpus.py` (imported lazily).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from .packed_launcher import check_pack

log = logging.getLogger(__name__)


class GpuLauncher(Launcher):
    """Joblib (loky) launcher whose workers each hold one GPU slot.

    n_jobs: jobs at a time; None = number of slots (GPUs x jobs_per_gpu), or the number of
        CPUs when no GPU is visible (with a warning).  Capped at the number of slots.
    jobs_per_gpu: slots per GPU (1: jobs never share a GPU).
    devices: GPUs to use; None = CUDA_VISIBLE_DEVICES when set, else all GPUs of the machine.
    slot_dir: lock files of the slots, shared by all sweeps of the machine so that two
        sweeps started side by side also never share a GPU.
    cpu_threads: CPU-only: torch threads per job (None: CPUs // n_jobs).
    pack: each worker trains up to `pack` jobs that differ only in their distiller together
        (a unit of work, `_jobs.py`); None: one job at a time per worker.
    pack_mode: how a pack's students step together: auto | loop | vmap.
    Other keyword arguments go to joblib.Parallel (verbose, timeout, pre_dispatch, ...).
    """

    def __init__(self, n_jobs: int | None = None, jobs_per_gpu: int = 1,
                 devices: Sequence[Any] | None = None, slot_dir: str | None = None,
                 cpu_threads: int | None = None, pack: int | None = None,
                 pack_mode: str = "auto", **joblib: Any) -> None:
        self.pack = check_pack(pack, pack_mode)
        self.pack_mode = pack_mode
        self.n_jobs = n_jobs
        self.jobs_per_gpu = int(jobs_per_gpu)
        if self.jobs_per_gpu < 1:
            raise ValueError(f"hydra.launcher.jobs_per_gpu must be >= 1, got {jobs_per_gpu}")
        if OmegaConf.is_config(devices):
            devices = OmegaConf.to_container(devices, resolve=True)
        if isinstance(devices, str | int):
            devices = [d for d in str(devices).split(",") if d.strip()]
        self.devices = devices
        self.slot_dir = slot_dir
        self.cpu_threads = cpu_threads
        self.joblib = {k: v for k, v in joblib.items() if v is not None or k == "timeout"}
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self._pool = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def pool(self):
        """The slot pool (devices found once per launcher)."""
        if self._pool is None:
            from . import _gpus

            devices = _gpus.visible_devices(self.devices)
            slot_dir = self.slot_dir or _gpus.DEFAULT_SLOT_DIR
            cpus = os.cpu_count() or 1
            if devices:
                slots = len(devices) * self.jobs_per_gpu
                n = slots if not self.n_jobs or self.n_jobs < 0 else int(self.n_jobs)
                if n > slots:
                    log.warning("gpus launcher: n_jobs=%d > %d GPU slot(s) (%d GPU(s) x "
                                "jobs_per_gpu=%d): running %d at a time", n, slots,
                                len(devices), self.jobs_per_gpu, slots)
                    n = slots
                threads = None
            else:
                n = cpus if not self.n_jobs or self.n_jobs < 0 else int(self.n_jobs)
                threads = self.cpu_threads or max(1, cpus // n)
                log.warning("gpus launcher: no GPU visible (CUDA_VISIBLE_DEVICES=%r): running "
                            "%d CPU job(s) in parallel, %d thread(s) each",
                            os.environ.get("CUDA_VISIBLE_DEVICES"), n, threads)
            self._pool = _gpus.SlotPool(tuple(devices), self.jobs_per_gpu, slot_dir, threads)
            self._n = max(1, n)
        return self._pool

    @property
    def workers(self) -> int:
        """Worker processes at a time (one per GPU slot)."""
        self.pool()
        return self._n

    @property
    def parallelism(self) -> int:
        """Jobs run at a time (the Optuna sweeper sizes its batches with it): workers times
        the points of a pack."""
        return self.workers * (self.pack or 1)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from . import _gpus

        return _gpus.launch(self, job_overrides, initial_job_idx)

    def open_slots(self, capacity: int):
        """Jobs started as workers free up (`_slots.PoolSlots`: the Optuna sweeper's way)."""
        from ._slots import PoolSlots

        return PoolSlots(self, capacity)
