"""Slurm tests: they need a running cluster (`make slurm-test` starts a one-node cluster on
this machine, runs them and stops it).  Without `sbatch` they skip, with the reason printed;
in CI (CI=true) that skip is a failure, so a CI run cannot pass without testing Slurm."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slurm)


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found: run `make slurm-test` (installs and starts a local cluster)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    if out.returncode != 0:
        return f"no Slurm controller answers (sinfo: {out.stderr.strip()}); run `make slurm-test`"
    if not any(s.startswith(("idle", "mix", "alloc", "comp")) for s in out.stdout.split()):
        return f"no Slurm node takes jobs (sinfo: {out.stdout.strip()})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = _cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true and the Slurm tests cannot run: {problem}", pytrace=False)
    print(f"\nskipping Slurm tests: {problem}")
    pytest.skip(problem)
