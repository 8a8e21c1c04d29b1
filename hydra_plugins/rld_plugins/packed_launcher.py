"""`hydra/launcher=packed`: the sweep's jobs that differ only in their distiller trained
together, one pack per process, packs one after another (like Hydra's basic launcher).

Config: conf/hydra/launcher/packed.yaml.  The work is done in `_packed.py` (imported lazily)
and `rld.engine` / `rld.packing`.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

# Optuna batches when `pack` is null: the size of the paper's CIFAR-100 grid
DEFAULT_PARALLELISM = 16


def check_pack(pack, mode: str) -> int | None:
    """`pack` as an int (None: no limit) and `pack_mode`, checked; ValueError names the key."""
    if pack is not None and (isinstance(pack, bool) or not str(pack).isdigit()
                             or int(pack) < 1):
        raise ValueError(f"hydra.launcher.pack={pack!r} is not allowed: an integer >= 1, "
                         "or null")
    from rld.students import MODES

    if mode not in MODES:
        raise ValueError(f"hydra.launcher.pack_mode={mode!r} is not allowed: use "
                         f"{', '.join(MODES)}")
    return None if pack is None else int(pack)


class PackedLauncher(Launcher):
    """pack: most points per process (None: the whole group of jobs that differ only in
        their distiller).
    pack_mode: how a pack's students step together: auto (vmap on CUDA, loop on the CPU),
        loop (one after another, each exactly as a separate run) or vmap (batched)."""

    def __init__(self, pack: int | None = None, pack_mode: str = "auto") -> None:
        self.pack = check_pack(pack, pack_mode)
        self.pack_mode = pack_mode
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    @property
    def parallelism(self) -> int:
        """Points trained at once (the Optuna sweeper sizes its batches with it)."""
        return self.pack or DEFAULT_PARALLELISM

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from . import _packed

        return _packed.launch(self, job_overrides, initial_job_idx)

    def open_slots(self, capacity: int):
        """One pack per `launch` (`_slots.LaunchSlots`): the next pack starts as soon as one
        ends, its points taken from the trials the sweeper started meanwhile."""
        from ._slots import LaunchSlots

        return LaunchSlots(self, capacity, per_call=self.pack)
