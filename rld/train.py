"""`python -m rld.train [overrides]`: one run, or with `-m` one job per grid point.

    python -m rld.train dataset=cifar100 pair=vgg13_vgg8 distiller=rld
    python -m rld.train -m distiller.beta=2,4,8,16 distiller.tau=2,3,4,5
    python -m rld.train pair=vgg13_vgg8 distiller=vanilla role=teacher

Returns the metric named by `objective` (NaN for a diverged or failed run) so that Hydra's
sweepers can optimise it.  Bad input (Hydra's composition errors included) stops with one line
on stderr and exit code 2 (`--debug`: the traceback); inside a multirun a failed point is
logged and recorded and the sweep goes on.  Ctrl-C or SIGTERM stops with one line and exit
code 130, the runs it stopped recorded as "interrupted" (the same command resumes them).

Under torchrun every process runs this command; the ranks other than 0 leave the run
directory to rank 0: no `.hydra/`, no `train.log` (`rld.world.rank_overrides`), no files
from the engine, log messages from warnings up only.

    torchrun --nproc_per_node=8 -m rld.train dataset=imagenet pair=resnet34_resnet18
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rld.config import register_configs
from rld.world import find_world, rank_overrides

register_configs()
log = logging.getLogger("rld")


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from rld import cli, engine  # heavy imports after Hydra has parsed the command line
    from rld.errors import ConfigError, RunError
    from rld.rundir import discard_unused

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    launcher = hc.runtime.choices.get("hydra/launcher")
    if not multirun and launcher not in (None, "basic"):
        log.warning("hydra/launcher=%s launches the jobs of a multirun (-m): this single run "
                    "trains here, in this process (add -m to launch it)", launcher)
    try:
        record = engine.run(cfg, run_dir)
    except Exception as e:
        user = isinstance(e, ConfigError | RunError)
        if multirun and (user or not find_world().distributed):
            return engine.point_failed(cfg, run_dir, e)  # recorded; the sweep goes on
        # a single run, or a data-parallel rank (the ranks cannot go on in step, so the
        # process ends: torchrun or srun ends the others; the rerun resumes)
        if isinstance(e, cli.user_errors()):
            discard_unused(run_dir, Path(cfg.paths.sweeps))  # refused before it began: no directory left behind
        cli.stop("rld.train", e, sys.argv[1:])  # a user error: one line, exit 2 (here: Hydra would add a
        raise  # line of its own); a bug: the traceback
    return record.objective(cfg.objective)


def load_command_line_plugins(argv: list[str]) -> None:
    """Import the modules of `plugins=[...]` before Hydra composes the config, and register
    the config schemas they add."""
    from rld.registry import load_plugins, plugins_from_argv

    load_plugins(plugins_from_argv(argv))
    register_configs()


def cli() -> None:
    """The command: Hydra's, with every user error as one line and exit code 2 (`--debug`
    or HYDRA_FULL_ERROR=1: the traceback), an interrupt as one line and exit code 130."""
    import os

    from rld import cli as errors

    errors.debug_requested(sys.argv)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises; `errors.run` reports
    errors.catch_sigterm()
    argv = sys.argv[1:]
    errors.run("rld.train", lambda: load_command_line_plugins(argv), argv)
    sys.argv += rank_overrides(argv)
    errors.run("rld.train", main, argv)
    from rld.distributed import close_process_group

    close_process_group()  # every rank leaves together (a no-op without a process group)


if __name__ == "__main__":
    cli()
