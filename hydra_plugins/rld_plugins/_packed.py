"""Packed launching: the `packed` launcher (packs one after another in this process) and
one submitit job per pack (the `pack` option of the `slurm` and `submitit_local`
launchers).  The jobs of a batch that differ only in their distiller are grouped into packs
of at most `pack` points (`_jobs.plan`); each pack is one unit of work (`_jobs.run_unit`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, setup_globals
from omegaconf import OmegaConf

from . import _jobs

log = logging.getLogger(__name__)


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[JobReturn]:
    """The `packed` launcher: the batch's packs one after another in this process."""
    config = launcher.config
    _jobs.start_sweep(config)
    todo = _jobs.plan(launcher.hydra_context, config, job_overrides, initial_job_idx,
                      launcher.pack)
    _jobs.log_plan(todo, "one after another in this process")
    state = Singleton.get_state()
    returns = []
    for unit in todo:
        Singleton.set_state(state)
        returns.append(_jobs.run_unit(launcher.hydra_context, config, launcher.task_function,
                                      unit, launcher.pack_mode))
    return _jobs.in_job_order(todo, returns, initial_job_idx, len(job_overrides))


# ------------------------------------------------------------------------------ submitit
class PackJob:
    """The work of one submitit job (Slurm, or submitit's local executor): one pack.
    submitit pickles it; on a time-out or a preemption, `checkpoint` resubmits the same
    call, and every point of the pack resumes from its own `checkpoints/last.pt`."""

    def __init__(self, launcher: Any) -> None:
        self.hydra_context = launcher.hydra_context
        self.config = launcher.config
        self.task_function = launcher.task_function
        self.pack_mode = launcher.pack_mode
        self.slot_pool = getattr(launcher, "slot_pool", None)  # submitit_local on GPUs

    def __call__(self, unit: _jobs.Unit, singleton_state: dict) -> list[JobReturn]:
        import submitit

        if self.slot_pool is not None:
            from . import _gpus

            device = _gpus.pin_process(self.slot_pool)
            log.info("pack of %d job(s): CUDA_VISIBLE_DEVICES=%s", len(unit), device)
        from rld.world import rank_overrides

        Singleton.set_state(singleton_state)
        setup_globals()
        job_id = submitit.JobEnvironment().job_id
        # the tasks of a multi-task job are the ranks of a data-parallel pack: rank 0 alone
        # writes the jobs' Hydra files and logs
        unit = [(idx, [*o, *rank_overrides(o)]) for idx, o in unit]
        return _jobs.run_unit(self.hydra_context, self.config, self.task_function, unit,
                              self.pack_mode, job_id=lambda idx, cfg: job_id)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submitit_executor(launcher: Any) -> Any:
    """The executor hydra-submitit-launcher builds from the launcher's parameters."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    kind = launcher._EXECUTOR  # "slurm" | "local" (hydra-submitit-launcher's class attribute)
    params = dict(launcher.params)
    init_keys = {"max_num_timeout"}
    executor = submitit.AutoExecutor(
        cluster=kind, folder=params["submitit_folder"],
        **{f"{kind}_{k}": v for k, v in params.items() if k in init_keys})
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"{kind}_{k}": v
                                  for k, v in params.items()
                                  if k not in init_keys | {"submitit_folder"}})
    return executor


def launch_submitit(launcher: Any, job_overrides: Sequence[Sequence[str]],
                    initial_job_idx: int, wave: int | None = None) -> list[JobReturn]:
    """One submitit job per pack (a job array per batch; `wave` packs at a time at most)."""
    config = launcher.config
    _jobs.start_sweep(config, log_config=False)
    units = _jobs.plan(launcher.hydra_context, config, job_overrides, initial_job_idx,
                       launcher.pack)
    _jobs.log_plan(units, f"one submitit '{launcher._EXECUTOR}' job per pack")
    executor = submitit_executor(launcher)
    state = Singleton.get_state()
    returns = []
    size = wave or len(units)
    for start in range(0, len(units), size):
        chunk = units[start:start + size]
        jobs = executor.map_array(PackJob(launcher), chunk, [state] * len(chunk))
        returns += [job.results()[0] for job in jobs]
    return _jobs.in_job_order(units, returns, initial_job_idx, len(job_overrides))
