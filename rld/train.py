"""`python -m rld.train [overrides]`: one run, or with `-m` one job per grid point.

    python -m rld.train dataset=cifar100 pair=vgg13_vgg8 distiller=rld
    python -m rld.train -m distiller.beta=2,4,8,16 distiller.tau=2,3,4,5
    python -m rld.train pair=vgg13_vgg8 distiller=vanilla role=teacher

Returns the metric named by `objective` (NaN for a diverged or failed run) so that Hydra's
sweepers can optimise it.  Bad input stops a single run with one line on stderr and exit
code 2; inside a multirun a failed point is logged and the sweep goes on.

Under torchrun every process runs this command; the ranks other than 0 leave the run
directory to rank 0: no `.hydra/`, no `train.log` (`rld.world.rank_overrides`), no files
from the engine, log messages from warnings up only.

    torchrun --nproc_per_node=8 -m rld.train dataset=imagenet pair=resnet34_resnet18
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rld.config import register_configs
from rld.world import find_world, rank_overrides

register_configs()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from rld import engine  # heavy imports after Hydra has parsed the command line
    from rld.errors import ConfigError, RunError

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        record = engine.run(cfg, run_dir)
    except (ConfigError, RunError) as e:
        if not multirun:
            print(f"rld.train: error: {e}", file=sys.stderr)
            sys.exit(2)
        return engine.point_failed(cfg, run_dir, e)
    except Exception as e:
        if not multirun or find_world().distributed:
            # a data-parallel rank alone may meet it: the ranks cannot go on in step, so
            # the process ends (torchrun or srun ends the others; the rerun resumes)
            raise
        return engine.point_failed(cfg, run_dir, e)  # one broken point: the sweep goes on
    return record.objective(cfg.objective)


def load_command_line_plugins(argv: list[str]) -> None:
    """Import the modules of `plugins=[...]` before Hydra composes the config, and register
    the config schemas they add; a plugin that does not import is one line, exit 2."""
    from rld.errors import ConfigError
    from rld.registry import load_plugins, plugins_from_argv

    try:
        load_plugins(plugins_from_argv(argv))
    except ConfigError as e:
        print(f"rld.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    register_configs()


if __name__ == "__main__":
    load_command_line_plugins(sys.argv[1:])
    sys.argv += rank_overrides(sys.argv[1:])
    main()
    from rld.distributed import close_process_group

    close_process_group()  # every rank leaves together (a no-op without a process group)
