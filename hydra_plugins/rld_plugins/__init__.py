"""Hydra plugins of rld: the `gpus` launcher, the Slurm launcher with requeue defaults and the
`rld_optuna` sweeper (Optuna with resumable grids and a duplicate-point guard).

Hydra imports every public module of `hydra_plugins.*` at start-up, so the public modules
here only declare classes and configs; the work lives in the private `_*.py` modules, which
are imported when a launcher or sweeper is actually used.
"""

__version__ = "0.1.0"
