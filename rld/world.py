"""Who the processes of a run are (read from the environment alone: no torch import, so the
command line can ask before Hydra starts).

* torchrun (or any launcher that exports them): RANK, WORLD_SIZE, LOCAL_RANK, with
  MASTER_ADDR/MASTER_PORT for the ``env://`` rendezvous;
* a submitit job of several tasks (`hydra/launcher=slurm` with `tasks_per_node`/`nodes`, or
  submitit's local executor): each task's place from submitit's job environment, the address
  of the job's first node and a port derived from the job id
  (`submitit.helpers.TorchDistributedEnvironment`);
* anything else: one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a data-parallel run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # index among the processes of this node: picks the GPU
    init_method: str = "env://"
    source: str = "single"  # single | env (torchrun) | submitit

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that decides, logs and writes the run's files."""
        return self.rank == 0


def find_world(environ: dict | None = None) -> World:
    """The world of this process, from torchrun's variables or a multi-task submitit job;
    a single process otherwise."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                     "env://", "env")
    if env.get("SUBMITIT_EXECUTOR") and environ is None:
        return _submitit_world()
    return World()


def _submitit_world() -> World:
    """Inside a submitit job: its tasks (one World of size 1 for a one-task job)."""
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return World()
    place = TorchDistributedEnvironment()
    return World(place.rank, place.world_size, place.local_rank,
                 f"tcp://{place.master_addr}:{place.master_port}", "submitit")


def world_problem(cfg, world: World) -> tuple[str, Any, str] | None:
    """(key, value, what is allowed) of the first trainer setting this world cannot run; None
    when it can (rld.validate turns it into a ConfigError; a distiller's own limits:
    `rld.distillers.DistillerSpec.single_process`)."""
    if not world.distributed:
        return None
    t, w = cfg.trainer, world.size
    if int(t.batch_size) % w:
        return ("trainer.batch_size", t.batch_size,
                f"the global batch must divide over the {w} ranks of this job; use a "
                f"multiple of {w}")
    if str(t.device).startswith("cuda:"):
        return ("trainer.device", str(t.device),
                f"each of the {w} ranks takes cuda:LOCAL_RANK: use auto or cuda")
    return None


def rank_overrides(overrides: list[str]) -> list[str]:
    """Hydra overrides for a rank other than 0 of a data-parallel run (none for rank 0 or a
    single process), which leaves the run directory to rank 0: no `.hydra/` files, and logs
    to the console (stdout) instead of the run's `train.log`, unless `overrides` chose their
    own `hydra/job_logging`."""
    if find_world().main:
        return []
    out = ["hydra.output_subdir=null"]
    if not any(str(a).startswith(("hydra/job_logging=", "hydra.job_logging")) for a in overrides):
        out.append("hydra/job_logging=stdout")
    return out
