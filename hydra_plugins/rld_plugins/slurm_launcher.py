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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    if not params.get("gpus_per_node"):
        params["gpus_per_node"] = None
    if "additional_parameters" in params:  # drop unset entries (e.g. from ${oc.env:...})
        extra = dict(params["additional_parameters"] or {})
        params["additional_parameters"] = {k: v for k, v in extra.items() if v is not None}
    return params


class RldSlurmLauncher(SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.params = _clean(self.params)

    @property
    def parallelism(self) -> int:
        """Jobs running at a time (the Optuna sweeper sizes its batches with it)."""
        return int(self.params.get("array_parallelism") or 1)


class RldLocalLauncher(LocalLauncher):
    """submitit's local executor, each job on a GPU of its own (gpus_per_node: 1) or on the
    CPU (0).  The GPU slots are the `gpus` launcher's (lock files in $RLD_GPU_SLOT_DIR or the
    default slot directory: hydra-submitit-launcher's schema of this config takes no new key).
    """

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.params = _clean(self.params)
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
            return max(1, len(_gpus.visible_devices()))
        return max(1, (os.cpu_count() or 1) // int(self.params.get("cpus_per_task") or 1))

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from . import _gpus

        self.slot_pool = _gpus.local_pool(self.params.get("gpus_per_node") or 0)
        return _gpus.launch_in_waves(super().launch, self.slot_pool, job_overrides, initial_job_idx)

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int,
                 job_id: str, singleton_state: dict) -> JobReturn:
        """The job, in its own process: take a GPU slot and pin the process to it first."""
        if self.slot_pool is not None:
            import logging

            from . import _gpus

            device = _gpus.pin_process(self.slot_pool)
            logging.getLogger(__name__).info("job #%d: CUDA_VISIBLE_DEVICES=%s", job_num,
                                             device)
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id,
                                singleton_state)
