"""Run the real CLI in a subprocess, as a user would, in a temp project root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A tiny synthetic problem: a couple of seconds per CLI run on a 2-core CPU.
SMALL = ["dataset=synthetic", "pair=tiny", "dataset.train_size=256", "dataset.test_size=128",
         "trainer.batch_size=64", "trainer.progress=line"]


# what runs `-m rld.train` as two data-parallel ranks (launch= of `run_train`)
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def train_command(root: Path, *overrides: str,
                  launch: tuple[str, ...] = (sys.executable,)) -> list[str]:
    """`<launch> -m rld.train paths.root=ROOT <overrides>` (flags first, as argparse wants)."""
    flags = [o for o in overrides if o.startswith("-")]
    rest = [o for o in overrides if not o.startswith("-")]
    return [*launch, "-m", "rld.train", *flags, f"paths.root={root}", *rest]


def train_env(env: dict | None = None) -> dict:
    """The environment of a CLI test: one thread per process, short errors."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}


def run_train(root: Path, *overrides: str, check: bool = True, timeout: float = 300,
              env: dict | None = None,
              launch: tuple[str, ...] = (sys.executable,)) -> subprocess.CompletedProcess:
    """`python -m rld.train paths.root=ROOT <overrides>` in a subprocess (`launch`: what runs
    `-m rld.train`, e.g. `TORCHRUN`)."""
    cmd = train_command(root, *overrides, launch=launch)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=train_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
