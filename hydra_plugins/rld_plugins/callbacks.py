"""Hydra callbacks of rld (conf/train.yaml `hydra.callbacks`).

`MultirunPreflight`: the checks a multirun makes once, in the process that sweeps, before any
job starts, where every point would otherwise fail alike (`rld.teachers.status
.check_multirun_teacher`): the command stops with the message a single run gives, exit
code 2.  Hydra turns an exception raised by a callback into a warning and goes on, so the
callback ends the process itself (SystemExit passes through).
"""

import sys
import traceback
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class MultirunPreflight(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from rld import cli
        from rld.teachers.status import check_multirun_teacher

        try:
            check_multirun_teacher(config)
        except cli.user_errors() as e:
            cli.stop("rld.train", e, sys.argv[1:])  # its message, exit 2; returns under --debug
            traceback.print_exc()
            raise SystemExit(cli.EXIT_USAGE) from e
