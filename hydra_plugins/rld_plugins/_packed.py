"""Packing a sweep's jobs (the `packed` launcher and the `pack` option of the `gpus` and
`slurm` launchers).

The jobs of a batch are composed as Hydra composes them; those that differ only in their
distiller are grouped into packs of at most `pack` points (`rld.packed.plan_packs`).  A pack
is one unit of work (one process, one GPU, one Slurm job): each of its jobs gets its output
directory and `.hydra/` files from Hydra's own `run_job` (with a task that only records the
job's config), then `rld.packed.train_pack` trains them together, and each job's
`JobReturn` carries its objective (NaN for a diverged or failed point, which is recorded as
`rld.train` records it).  A unit of one job runs through `run_job` and `rld.train` as with
any launcher.  Each point logs to its own `train.log` (its lines and the pack's); the
console shows every point's lines, prefixed with its label.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ._gpus import start_sweep

log = logging.getLogger(__name__)

Unit = list[tuple[int, list[str]]]  # (job number, overrides) of the jobs of one pack


def basic_job_id(idx: int, config: DictConfig) -> Any:
    """Hydra's basic launcher numbers jobs 0..n-1 (id = num)."""
    return idx


def sweep_config(hydra_context: Any, config: DictConfig, idx: int, overrides: Sequence[str],
                 job_id: Callable[[int, DictConfig], Any] = basic_job_id) -> DictConfig:
    """Job `idx`'s config as Hydra's launchers compose it (with hydra.job.id/num)."""
    cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = job_id(idx, cfg)
        cfg.hydra.job.num = idx
    return cfg


def task_config(cfg: DictConfig) -> DictConfig:
    """The config the task sees: without the `hydra` node."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def plan(hydra_context: Any, config: DictConfig, job_overrides: Sequence[Sequence[str]],
         initial_job_idx: int, pack: int | None) -> list[Unit]:
    """The batch's jobs grouped into packs (units of work), in job order."""
    from rld.packed import plan_packs

    jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
    cfgs = []
    for idx, overrides in jobs:
        try:
            cfgs.append(task_config(sweep_config(hydra_context, config, idx, overrides)))
        except Exception:  # noqa: BLE001 - it fails alone, through run_job and rld.train
            cfgs.append(None)
    valid = [i for i, c in enumerate(cfgs) if c is not None]
    units = [[valid[j] for j in u] for u in plan_packs([cfgs[i] for i in valid], pack)]
    units += [[i] for i, c in enumerate(cfgs) if c is None]
    return [[jobs[i] for i in u] for u in sorted(units, key=lambda u: u[0])]


def log_plan(units: list[Unit], where: str) -> None:
    sizes = [len(u) for u in units]
    log.info("%d job(s) in %d pack(s) of %s job(s), %s", sum(sizes), len(units),
             "/".join(map(str, sorted(set(sizes), reverse=True))), where)
    for n, unit in enumerate(units):
        for idx, overrides in unit:
            log.info("\tpack %d #%d : %s", n, idx, " ".join(filter_overrides(overrides)))


def run_unit(hydra_context: Any, config: DictConfig, task_function: Any, unit: Unit,
             mode: str = "auto",
             job_id: Callable[[int, DictConfig], Any] = basic_job_id) -> list[JobReturn]:
    """Run one unit of work in this process: a single job as any launcher runs it, a pack
    through `rld.packed.train_pack`.  One JobReturn per job, in the unit's order."""
    setup_globals()
    if len(unit) == 1:
        idx, overrides = unit[0]
        cfg = sweep_config(hydra_context, config, idx, overrides, job_id)
        return [run_job(hydra_context=hydra_context, task_function=task_function, config=cfg,
                        job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")]
    jobs = [prepare_job(hydra_context, sweep_config(hydra_context, config, idx, o, job_id))
            for idx, o in unit]
    from rld.packed import train_pack

    cfgs = [ret.cfg for ret, _ in jobs]
    dirs = [run_dir for _, run_dir in jobs]
    with pack_logging([ret.hydra_cfg for ret, _ in jobs], dirs):
        outcomes = train_pack(cfgs, dirs, mode)
        for (ret, run_dir), outcome in zip(jobs, outcomes, strict=True):
            ret.return_value = job_value(ret.cfg, run_dir, outcome)
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    return [ret for ret, _ in jobs]


def prepare_job(hydra_context: Any, cfg: DictConfig) -> tuple[JobReturn, Path]:
    """Hydra's `run_job` with a task that records the job's output directory: the
    directory, `.hydra/` files, callbacks and JobReturn of the job, without training."""
    found: dict = {}

    def record(task_cfg: DictConfig) -> None:
        found["dir"] = Path(HydraConfig.get().runtime.output_dir)

    ret = run_job(hydra_context=hydra_context, task_function=record, config=cfg,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir",
                  configure_logging=False)
    _ = ret.return_value  # re-raises what the recording task raised (nothing expected)
    return ret, found["dir"]


def job_value(cfg: DictConfig, run_dir: Path, outcome: Any) -> float:
    """The objective of a packed job; a failed point is logged and recorded (status
    "failed") as `rld.train` records it in a multirun, and gives NaN."""
    from rld import engine
    from rld.packed import point_label, point_scope
    from rld.record import RunRecord

    if isinstance(outcome, RunRecord):
        return outcome.objective(cfg.objective)
    with point_scope(run_dir, point_label(cfg)):
        return engine.point_failed(cfg, run_dir, outcome)


def _log_files(hydra_cfg: DictConfig) -> list[Path]:
    """The files a job's logging config writes (Hydra's default: <output dir>/train.log)."""
    handlers = OmegaConf.select(hydra_cfg, "hydra.job_logging.handlers") or {}
    out = []
    for name in handlers:
        filename = OmegaConf.select(hydra_cfg, f"hydra.job_logging.handlers.{name}.filename")
        if filename:
            out.append(Path(str(filename)))
    return out


@contextmanager
def pack_logging(hydra_cfgs: list[DictConfig], run_dirs: list[Path]):
    """The jobs' logging config, with one log file per point that takes that point's
    records and the pack's (`rld.packed.PointFilter`), and console lines prefixed with the
    point's label."""
    from rld.packed import PointFilter, PointFormatter

    first = hydra_cfgs[0].hydra
    configure_log(first.job_logging, first.verbose)
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    formatter = files[0].formatter if files else None
    for h in files:
        root.removeHandler(h)
        h.close()
    for h in root.handlers:
        h.setFormatter(PointFormatter(h.formatter))
    added, opened = [], set()
    for hydra_cfg, run_dir in zip(hydra_cfgs, run_dirs, strict=True):
        for path in _log_files(hydra_cfg):
            if path.resolve() in opened:  # a run named twice in the pack
                continue
            opened.add(path.resolve())
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, mode="a")
            handler.setFormatter(formatter)
            handler.addFilter(PointFilter(run_dir))
            root.addHandler(handler)
            added.append(handler)
    try:
        yield
    finally:
        for h in added:
            root.removeHandler(h)
            h.close()


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[JobReturn]:
    """The `packed` launcher: the batch's packs one after another in this process."""
    config = launcher.config
    start_sweep(config)
    units = plan(launcher.hydra_context, config, job_overrides, initial_job_idx, launcher.pack)
    log_plan(units, "one after another in this process")
    state = Singleton.get_state()
    returns: dict[int, JobReturn] = {}
    for unit in units:
        Singleton.set_state(state)
        rets = run_unit(launcher.hydra_context, config, launcher.task_function, unit,
                        launcher.pack_mode)
        returns.update({idx: ret for (idx, _), ret in zip(unit, rets, strict=True)})
    return [returns[initial_job_idx + i] for i in range(len(job_overrides))]


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

    def __call__(self, unit: Unit, singleton_state: dict) -> list[JobReturn]:
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
        return run_unit(self.hydra_context, self.config, self.task_function, unit,
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
    start_sweep(config, log_config=False)
    units = plan(launcher.hydra_context, config, job_overrides, initial_job_idx, launcher.pack)
    log_plan(units, f"one submitit '{launcher._EXECUTOR}' job per pack")
    executor = submitit_executor(launcher)
    state = Singleton.get_state()
    returns: dict[int, JobReturn] = {}
    size = wave or len(units)
    for start in range(0, len(units), size):
        chunk = units[start:start + size]
        jobs = executor.map_array(PackJob(launcher), chunk, [state] * len(chunk))
        for unit, job in zip(chunk, jobs, strict=True):
            rets = job.results()[0]
            returns.update({idx: ret for (idx, _), ret in zip(unit, rets, strict=True)})
    return [returns[initial_job_idx + i] for i in range(len(job_overrides))]
