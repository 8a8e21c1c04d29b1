"""`hydra/launcher=slurm` and `hydra/launcher=submitit_local`: hydra-submitit-launcher's
launchers with two adjustments for rld's recipes.

* `gpus_per_node: 0` (CPU partitions) sends no GPU request at all, as `null` does.
* A job that hits its time limit or is preempted is requeued by submitit (SIGUSR2 ->
  `checkpoint()` -> `scontrol requeue`, up to `max_num_timeout` times for time-outs, without
  limit for preemptions) and simply runs the same Hydra job again: rld's run directory is
  deterministic and the run resumes from its `checkpoints/last.pt`, so `checkpoint()` only
  has to resubmit the same call, which is what the upstream launcher does.
"""

from __future__ import annotations

from typing import Any

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
    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.params = _clean(self.params)

    @property
    def parallelism(self) -> int:
        """Local jobs run all at once: let the sweeper run one GPU's (or one CPU's) worth."""
        import os

        from . import _gpus

        gpus = int(self.params.get("gpus_per_node") or 0)
        if gpus:
            return max(1, len(_gpus.visible_devices()) // gpus)
        return max(1, (os.cpu_count() or 1) // int(self.params.get("cpus_per_task") or 1))
