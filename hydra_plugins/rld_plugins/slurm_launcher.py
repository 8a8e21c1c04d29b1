"""`hydra/launcher=slurm` and `hydra/launcher=submitit_local`: hydra-submitit-launcher's
launchers with a few adjustments for rld's recipes.

* `gpus_per_node: 0` (CPU partitions) sends no GPU request at all, as `null` does.
* A job that hits its time limit or is preempted is requeued by submitit (SIGUSR2 ->
  `checkpoint()` -> `scontrol requeue`, up to `max_num_timeout` times for time-outs, without
  limit for preemptions) and simply runs the same Hydra job again: rld's run directory is
  deterministic and the run resumes from its `checkpoints/last.pt`, so `checkpoint()` only
  has to resubmit the same call, which is what the upstream launcher does.
* `submitit_local` with `gpus_per_node: 1`: submitit's local executor sets
  `CUDA_VISIBLE_DEVICES=0` for every job, so all jobs would share GPU 0.  Here each job
  takes a slot of the `gpus` launcher's pool (`_gpus.SlotPool`: the sweeper's
  CUDA_VISIBLE_DEVICES, else every GPU; lock files shared with the `gpus` launcher) and is
  pinned to that GPU before CUDA starts; a batch runs in waves of one job per GPU.
* Several tasks per job (`tasks_per_node`, `nodes`): each grid point is one data-parallel
  run over the job's tasks (`rld.distributed`: each task finds its rank in submitit's job
  environment).  Rank 0 alone writes the run directory: the other tasks' Hydra jobs write
  no `.hydra/` and log to their Slurm output only (`rld.world.rank_overrides`).  srun ends
  every task when one fails (SLURM_KILL_BAD_EXIT=1), so a dead rank ends the job at once;
  a requeued job (time limit, preemption, `scontrol requeue`) runs all its tasks again and
  resumes from the run's checkpoint, as a one-task job does.
* `pack: N` (`slurm`; `+hydra.launcher.pack=N` for `submitit_local`, whose schema is
  hydra-submitit-launcher's): one submitit job per pack of at most N jobs that differ only
  in their distiller, trained together (`_packed.py`, `rld.packing`); a requeued pack
  resumes each of its points from its own checkpoint.  `pack_mode`: auto | loop | vmap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from .packed_launcher import check_pack


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    if not params.get("gpus_per_node"):
        params["gpus_per_node"] = None
    if "additional_parameters" in params:  # drop unset entries (e.g. from ${oc.env:...})
        extra = dict(params["additional_parameters"] or {})
        params["additional_parameters"] = {k: v for k, v in extra.items() if v is not None}
    return params


def _pop_pack(params: dict[str, Any]) -> tuple[int | None, str]:
    """The packing options (not sbatch's): `pack` and `pack_mode`, checked."""
    mode = params.pop("pack_mode", None) or "auto"
    return check_pack(params.pop("pack", None), mode), mode


def _require_slurm() -> None:
    """ConfigError (one line) where submitit's Slurm executor would stop with a traceback:
    it needs `srun` on PATH, as on a cluster's login or compute nodes."""
    import shutil

    from rld.errors import ConfigError

    if shutil.which("srun") is None:
        raise ConfigError("hydra/launcher=slurm submits to a Slurm cluster, and srun is not on "
                          "PATH here: run the command on a node of the cluster, or use "
                          "hydra/launcher=submitit_local, gpus or basic on this machine")


def _tasks(params: dict[str, Any]) -> int:
    return int(params.get("tasks_per_node") or 1) * int(params.get("nodes") or 1)


class RldSlurmLauncher(SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        pack, mode = _pop_pack(params)
        super().__init__(**params)
        self.params = _clean(self.params)
        self.pack, self.pack_mode = pack, mode
        if _tasks(self.params) > 1:  # srun (in submitit's batch script) reads it
            self.params["setup"] = ["export SLURM_KILL_BAD_EXIT=1",
                                    *(self.params.get("setup") or [])]

    def setup(self, **kwargs: Any) -> None:
        """Called by the sweeper before it makes anything (a sweep folder, a study): a
        machine without Slurm stops here, in one line."""
        _require_slurm()
        super().setup(**kwargs)

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int,
                 job_id: str, singleton_state: dict) -> JobReturn:
        """One task of the job: a data-parallel rank other than 0 composes its job with
        `rank_overrides`, leaving the run directory's Hydra files and log to rank 0."""
        from rld.world import rank_overrides

        overrides = [*sweep_overrides, *rank_overrides(sweep_overrides)]
        return super().__call__(overrides, job_dir_key, job_num, job_id, singleton_state)

    @property
    def parallelism(self) -> int:
        """Jobs running at a time (the Optuna sweeper sizes its batches with it): jobs of a
        batch at once, times the points of a pack."""
        return int(self.params.get("array_parallelism") or 1) * (self.pack or 1)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        if self.pack is None:
            return super().launch(job_overrides, initial_job_idx)
        from . import _packed

        return _packed.launch_submitit(self, job_overrides, initial_job_idx)

    def open_slots(self, capacity: int):
        """One Slurm job per job or pack, submitted as slots free up (`_slots.SubmititSlots`)."""
        from ._slots import SubmititSlots

        return SubmititSlots(self, capacity, poll_s=5.0)


class RldLocalLauncher(LocalLauncher):
    """submitit's local executor, each job on a GPU of its own (gpus_per_node: 1) or on the
    CPU (0).  The GPU slots are the `gpus` launcher's (lock files in $RLD_GPU_SLOT_DIR or the
    default slot directory: hydra-submitit-launcher's schema of this config takes no new key).
    """

    def __init__(self, **params: Any) -> None:
        pack, mode = _pop_pack(params)
        super().__init__(**params)
        self.params = _clean(self.params)
        self.pack, self.pack_mode = pack, mode
        gpus = self.params.get("gpus_per_node") or 0
        if not isinstance(gpus, int) or gpus not in (0, 1):
            raise ValueError(f"hydra.launcher.gpus_per_node: an rld job runs on one GPU; "
                             f"0 (CPU) or 1 allowed, got {gpus}")
        # set in the sweeper's process by launch(), used in each job's process by __call__
        self.slot_pool = None

    @property
    def parallelism(self) -> int:
        """Jobs run at a time: one per visible GPU, or one per cpus_per_task CPUs."""
        import os

        from . import _gpus

        if self.params.get("gpus_per_node"):
            jobs = max(1, len(_gpus.visible_devices()))
        else:
            jobs = max(1, (os.cpu_count() or 1) // int(self.params.get("cpus_per_task") or 1))
        return jobs * (self.pack or 1)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from . import _gpus

        self.slot_pool = _gpus.local_pool(self.params.get("gpus_per_node") or 0)
        if self.pack is not None:
            from . import _packed

            wave = len(self.slot_pool.slots) if self.slot_pool is not None else None
            return _packed.launch_submitit(self, job_overrides, initial_job_idx, wave)
        return _gpus.launch_in_waves(super().launch, self.slot_pool, job_overrides, initial_job_idx)

    def open_slots(self, capacity: int):
        """One local job per job or pack, started as slots free up (each takes a GPU slot
        when it starts: no waves)."""
        from . import _gpus
        from ._slots import SubmititSlots

        self.slot_pool = _gpus.local_pool(self.params.get("gpus_per_node") or 0)
        if self.slot_pool is not None:  # a job must not spend its time waiting for a GPU
            capacity = min(capacity, len(self.slot_pool.slots) * (self.pack or 1))
        return SubmititSlots(self, capacity)

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int,
                 job_id: str, singleton_state: dict) -> JobReturn:
        """The job, in its own process: take a GPU slot and pin the process to it first.
        With several tasks (`tasks_per_node`, CPU only), one data-parallel run over them,
        as on Slurm."""
        from rld.world import rank_overrides

        if self.slot_pool is not None:
            import logging

            from . import _gpus

            device = _gpus.pin_process(self.slot_pool)
            logging.getLogger(__name__).info("job #%d: CUDA_VISIBLE_DEVICES=%s", job_num,
                                             device)
        overrides = [*sweep_overrides, *rank_overrides(sweep_overrides)]
        return super().__call__(overrides, job_dir_key, job_num, job_id, singleton_state)
