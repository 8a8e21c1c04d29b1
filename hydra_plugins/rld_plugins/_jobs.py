"""The job plumbing every rld launcher shares: a sweep's start, each job's config as
Hydra's launchers compose it, the grouping of a batch's jobs into units of work, and running
one unit in a process.

A unit is one job (an unpacked point: run through Hydra's `run_job` and the task,
`rld.train`, as any launcher runs it) or a pack of jobs that differ only in their distiller
(`rld.packing.plan_packs`): each of its jobs gets its output directory and `.hydra/` files
from Hydra's own `run_job` (with a task that only records the job's config), then
`rld.engine.train_points` trains them together, and each job's `JobReturn` carries its
objective (NaN for a diverged or failed point, which is recorded as `rld.train` records it).
Each point of a pack logs to its own `train.log` (its lines and the pack's); the console
shows every point's lines, prefixed with its label.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

Job = tuple[int, list[str]]  # a job's number and overrides
Unit = list[Job]  # the jobs of one unit


def start_sweep(config: Any, log_config: bool = True) -> Path:
    """What a launcher does before its first job: Hydra's globals, its logging, the sweep
    directory (returned)."""
    from hydra.core.utils import configure_log, setup_globals

    setup_globals()
    if log_config:
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir


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
    """The batch's jobs grouped into packs of at most `pack` points (units of work), in job
    order."""
    jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
    return plan_packed(hydra_context, config, jobs, pack)


def plan_jobs(hydra_context: Any, config: DictConfig, jobs: Sequence[Job],
              pack: int | None) -> list[Unit]:
    """Numbered jobs as units of work: packs of at most `pack` jobs, or with `pack` None one
    unit per job (no config composed here)."""
    if pack is None:
        return [[(idx, list(o))] for idx, o in jobs]
    return plan_packed(hydra_context, config, jobs, pack)


def plan_packed(hydra_context: Any, config: DictConfig, jobs: Sequence[Job],
                pack: int | None) -> list[Unit]:
    """Numbered jobs grouped into packs of at most `pack` points, in job order."""
    from rld.packing import plan_packs

    jobs = [(idx, list(o)) for idx, o in jobs]
    cfgs = []
    for idx, overrides in jobs:
        try:
            cfgs.append(task_config(sweep_config(hydra_context, config, idx, overrides)))
        except Exception:  # noqa: BLE001 - it fails alone, through run_job and rld.train
            cfgs.append(None)
    valid = [i for i, c in enumerate(cfgs) if c is not None]
    note_unpackable([cfgs[i] for i in valid])
    units = [[valid[j] for j in u] for u in plan_packs([cfgs[i] for i in valid], pack)]
    units += [[i] for i, c in enumerate(cfgs) if c is None]
    return [[jobs[i] for i in u] for u in sorted(units, key=lambda u: u[0])]


def note_unpackable(cfgs: list[DictConfig]) -> None:
    """One line naming the distillers among `cfgs` that cannot share a pack (their points
    train one per unit, as without packing)."""
    from collections import Counter

    from rld.config import distiller_spec

    alone: Counter[str] = Counter()
    for cfg in cfgs:
        try:
            spec = distiller_spec(cfg)
        except Exception:  # noqa: BLE001 - not registered: it fails alone, with its message
            continue
        if not spec.packable:
            alone[spec.name] += 1
    if alone:
        names = ", ".join(f"{name} ({n} point{'s' * (n > 1)})" for name, n in alone.items())
        log.warning("not packed: %s; a distiller with modules of its own does not pack, so "
                    "each of these points trains alone", names)


def units(hydra_context: Any, config: DictConfig, job_overrides: Sequence[Sequence[str]],
          initial_job_idx: int, pack: int | None) -> list[Unit]:
    """The batch's units of work (`plan_jobs`)."""
    jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
    return plan_jobs(hydra_context, config, jobs, pack)


def in_job_order(units_: list[Unit], returns: Sequence[Sequence[JobReturn]],
                 initial_job_idx: int, n: int) -> list[JobReturn]:
    """The JobReturns of the units' jobs (per unit, in its order) in job order."""
    by_job = {idx: ret for unit, rets in zip(units_, returns, strict=True)
              for (idx, _), ret in zip(unit, rets, strict=True)}
    return [by_job[initial_job_idx + i] for i in range(n)]


def log_plan(units_: list[Unit], where: str) -> None:
    """The batch's jobs, by unit when some hold several jobs (packs)."""
    sizes = [len(u) for u in units_]
    if max(sizes, default=1) == 1:
        log.info("%d job(s), %s", len(units_), where)
    else:
        log.info("%d job(s) in %d pack(s) of %s job(s), %s", sum(sizes), len(units_),
                 "/".join(map(str, sorted(set(sizes), reverse=True))), where)
    for n, unit in enumerate(units_):
        for idx, overrides in unit:
            pack = f"pack {n} " if len(unit) > 1 or max(sizes) > 1 else ""
            log.info("\t%s#%d : %s", pack, idx, " ".join(filter_overrides(overrides)))


def run_unit(hydra_context: Any, config: DictConfig, task_function: Any, unit: Unit,
             mode: str = "auto",
             job_id: Callable[[int, DictConfig], Any] = basic_job_id) -> list[JobReturn]:
    """Run one unit of work in this process: a single job as any launcher runs it (its
    task, `rld.train`), a pack through `rld.engine.train_points`.  One JobReturn per job,
    in the unit's order."""
    setup_globals()
    if len(unit) == 1:
        idx, overrides = unit[0]
        cfg = sweep_config(hydra_context, config, idx, overrides, job_id)
        return [run_job(hydra_context=hydra_context, task_function=task_function, config=cfg,
                        job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")]
    jobs = [prepare_job(hydra_context, sweep_config(hydra_context, config, idx, o, job_id))
            for idx, o in unit]
    from rld.engine import train_points

    cfgs = [ret.cfg for ret, _ in jobs]
    dirs = [run_dir for _, run_dir in jobs]
    with pack_logging([ret.hydra_cfg for ret, _ in jobs], dirs):
        outcomes = train_points(cfgs, dirs, mode)
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
    from rld.packing import point_label, point_scope
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
    records and the pack's (`rld.packing.PointFilter`), and console lines prefixed with the
    point's label."""
    from rld.packing import PointFilter, PointFormatter

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


