"""Launchers: the GPU slot pool of `hydra/launcher=gpus`, and the launcher configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # hydra_plugins/ of this checkout, installed or not
    sys.path.insert(0, str(REPO))

from hydra_plugins.rld_plugins import _gpus  # noqa: E402

TINY = ["dataset=synthetic", "pair=tiny", "trainer.epochs=1", "dataset.train_size=64",
        "dataset.test_size=64", "trainer.batch_size=32", "trainer.progress=none"]


def cli(root: Path, *args: str, env: dict | None = None, timeout: float = 600):
    flags = [a for a in args if a.startswith("-")]
    rest = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "-m", "rld.train", *flags, f"paths.root={root}", *rest]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# ------------------------------------------------------------------------ device discovery
def test_parse_visible_devices():
    assert _gpus.parse_visible("0,1, 3") == ["0", "1", "3"]
    assert _gpus.parse_visible("") == []
    assert _gpus.parse_visible("2,-1,3") == ["2"]  # CUDA stops at the first invalid entry
    assert _gpus.parse_visible("GPU-ab12,MIG-cd34") == ["GPU-ab12", "MIG-cd34"]
    assert _gpus.visible_devices(environ={"CUDA_VISIBLE_DEVICES": "4,5"}) == ["4", "5"]
    assert _gpus.visible_devices(environ={"CUDA_VISIBLE_DEVICES": ""}) == []
    assert _gpus.visible_devices([1, 3], environ={"CUDA_VISIBLE_DEVICES": "0"}) == ["1", "3"]


def test_slots_spread_over_gpus_first(tmp_path):
    pool = _gpus.SlotPool(("0", "1"), jobs_per_gpu=2, slot_dir=str(tmp_path))
    assert pool.slots == [("0", 0), ("1", 0), ("0", 1), ("1", 1)]


HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from hydra_plugins.rld_plugins import _gpus
    pool = _gpus.SlotPool(("0", "1"), 1, {slots!r})
    print(_gpus.pin_process(pool), time.time(), flush=True)
    time.sleep(float(sys.argv[1]))
""")


def test_slot_pool_never_shares_a_gpu(tmp_path):
    """Three workers, two GPUs: the third waits until a GPU is free, then takes that one."""
    code = HOLD.format(repo=str(REPO), slots=str(tmp_path / "slots"))

    def start(hold: float):
        return subprocess.Popen([sys.executable, "-c", code, str(hold)], text=True,
                                stdout=subprocess.PIPE, env={**os.environ,
                                                             "CUDA_VISIBLE_DEVICES": "0,1"})

    first, second = start(3.0), start(0.5)
    got = [p.stdout.readline().split() for p in (first, second)]
    assert sorted(g[0] for g in got) == ["0", "1"]
    third = start(0.0)
    dev, _ = third.stdout.readline().split()
    # both GPUs are taken until the second worker exits: its GPU is the one the third gets
    assert dev == got[1][0]
    for p in (first, second, third):
        assert p.wait(timeout=30) == 0


# ------------------------------------------------------------------------ the real CLI
@pytest.mark.slow
def test_gpus_launcher_runs_jobs_in_parallel_one_gpu_each(tmp_path):
    """4 jobs, 4 faked GPUs: all run at the same time, each sees its own device."""
    from omegaconf import OmegaConf

    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "RLD_GPU_SLOT_DIR": str(tmp_path / "slots")}
    t0 = time.time()
    cli(tmp_path, "-m", *TINY, "distiller=vanilla", "hydra/launcher=gpus", "seed=0,1,2,3",
        "tag=gpus", env=env)
    elapsed = time.time() - t0
    runs = sorted((tmp_path / "sweeps/gpus").rglob("metrics.json"))
    assert len(runs) == 4, runs
    devices, spans, jobs = [], [], []
    for m in runs:
        metrics = json.loads(m.read_text())
        assert metrics["status"] == "completed"
        devices.append(metrics["cuda_visible_devices"])
        start = (m.parent / ".hydra" / "config.yaml").stat().st_mtime  # written at job start
        spans.append((start, m.stat().st_mtime))
        job = OmegaConf.load(m.parent / ".hydra" / "hydra.yaml").hydra.job
        jobs.append((job.num, job.id))
    assert sorted(devices) == ["0", "1", "2", "3"]
    # each job got its number and id, as Hydra's own launchers give them
    assert sorted(jobs) == [(i, f"train_{i}") for i in range(4)], jobs
    # in parallel: every job started before any job finished
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans
    print(f"gpus launcher, 4 jobs: {elapsed:.1f}s")


# ------------------------------------------------------------------------ submitit_local
def test_submitit_local_pool_and_waves(monkeypatch, tmp_path):
    """The sweeper's visible GPUs make the pool (not submitit's 0..n-1); a batch larger than
    the pool runs in waves of one job per GPU, job numbers continuing across waves."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setenv("RLD_GPU_SLOT_DIR", str(tmp_path))  # the gpus launcher's slots
    pool = _gpus.local_pool(1)
    assert pool.devices == ("2", "3") and pool.jobs_per_gpu == 1
    assert pool.slot_dir == str(tmp_path)
    assert _gpus.local_pool(0) is None  # CPU jobs: no pool
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _gpus.local_pool(1) is None  # no GPU: CPU jobs (with a warning)

    calls = []

    def submit(overrides, idx):
        calls.append((overrides, idx))
        return [f"ret{idx + k}" for k in range(len(overrides))]

    jobs = [[f"seed={i}"] for i in range(5)]
    assert _gpus.launch_in_waves(submit, pool, jobs, 10) == [f"ret{i}" for i in range(10, 15)]
    assert calls == [(jobs[0:2], 10), (jobs[2:4], 12), (jobs[4:5], 14)]
    calls.clear()
    _gpus.launch_in_waves(submit, None, jobs, 0)
    assert calls == [(jobs, 0)]


def test_submitit_local_launcher_config(monkeypatch):
    from omegaconf import OmegaConf

    from hydra_plugins.rld_plugins.slurm_launcher import RldLocalLauncher

    cfg = compose("hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=1")
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("RldLocalLauncher")
    launcher = RldLocalLauncher(**params)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,5")
    assert launcher.parallelism == 3
    with pytest.raises(ValueError, match="hydra.launcher.gpus_per_node.*0 \\(CPU\\) or 1"):
        RldLocalLauncher(**{**params, "gpus_per_node": 2})


@pytest.mark.slow
def test_submitit_local_jobs_get_a_gpu_each(tmp_path):
    """3 jobs, 2 faked GPUs (2 and 3, which submitit alone would turn into 0 for every job):
    two jobs at a time, each on its own GPU, the third after the first two."""
    env = {"CUDA_VISIBLE_DEVICES": "2,3", "RLD_GPU_SLOT_DIR": str(tmp_path / "slots")}
    cli(tmp_path, "-m", *TINY, "distiller=vanilla", "hydra/launcher=submitit_local",
        "hydra.launcher.gpus_per_node=1", "seed=0,1,2", "tag=local", env=env)
    runs = {}
    for m in (tmp_path / "sweeps/local").rglob("metrics.json"):
        metrics = json.loads(m.read_text())
        assert metrics["status"] == "completed"
        start = (m.parent / ".hydra" / "config.yaml").stat().st_mtime
        runs[metrics["seed"]] = (metrics["cuda_visible_devices"], start, m.stat().st_mtime)
    assert sorted(runs) == [0, 1, 2]
    assert sorted(runs[s][0] for s in (0, 1)) == ["2", "3"] and runs[2][0] in ("2", "3")
    assert runs[2][1] > max(runs[0][2], runs[1][2])  # second wave


# ------------------------------------------------------------------------ configs
def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rld.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_config(monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("SBATCH_PARTITION", "gpu-long")
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    cfg = compose("hydra/launcher=slurm", "hydra.launcher.qos=high")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("RldSlurmLauncher")
    assert launcher["gpus_per_node"] == 1
    assert launcher["partition"] == "gpu-long" and launcher["account"] is None
    assert launcher["qos"] == "high"
    assert launcher["max_num_timeout"] > 0 and launcher["additional_parameters"]["requeue"]

    from hydra_plugins.rld_plugins.slurm_launcher import RldSlurmLauncher

    launcher.pop("_target_")
    launcher["gpus_per_node"] = 0  # CPU partitions: no GPU request at all
    assert RldSlurmLauncher(**launcher).params["gpus_per_node"] is None


def test_gpus_launcher_parallelism_without_gpus(monkeypatch, caplog):
    from hydra_plugins.rld_plugins.gpu_launcher import GpuLauncher

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    launcher = GpuLauncher(n_jobs=None)
    assert launcher.parallelism == (os.cpu_count() or 1)
    assert "no GPU visible" in caplog.text
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert GpuLauncher(jobs_per_gpu=2).parallelism == 6
    assert GpuLauncher(n_jobs=8).parallelism == 3  # never more jobs than GPU slots


def test_pack_options_of_the_launchers(monkeypatch):
    """`pack` / `pack_mode` of the packed, gpus and slurm launchers: checked, kept out of
    sbatch's parameters, and counted in the parallelism the Optuna sweeper batches by."""
    from omegaconf import OmegaConf

    from hydra_plugins.rld_plugins.gpu_launcher import GpuLauncher
    from hydra_plugins.rld_plugins.packed_launcher import PackedLauncher
    from hydra_plugins.rld_plugins.slurm_launcher import RldSlurmLauncher

    cfg = compose("hydra/launcher=packed")
    assert cfg.hydra.launcher._target_.endswith("PackedLauncher")
    assert (cfg.hydra.launcher.pack, cfg.hydra.launcher.pack_mode) == (None, "auto")
    assert PackedLauncher().parallelism == 16 and PackedLauncher(pack=4).parallelism == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    gpus = GpuLauncher(pack=8)
    assert (gpus.workers, gpus.parallelism) == (2, 16)
    params = OmegaConf.to_container(
        compose("hydra/launcher=slurm", "hydra.launcher.pack=4").hydra.launcher, resolve=True)
    params.pop("_target_")
    slurm = RldSlurmLauncher(**params)
    assert (slurm.pack, slurm.pack_mode) == (4, "auto")
    assert "pack" not in slurm.params and "pack_mode" not in slurm.params
    assert slurm.parallelism == 256 * 4
    for bad in (0, -2, "x", True):
        with pytest.raises(ValueError, match="hydra.launcher.pack=.* an integer >= 1, or null"):
            PackedLauncher(pack=bad)
    with pytest.raises(ValueError, match="hydra.launcher.pack_mode='fast'"):
        GpuLauncher(pack=2, pack_mode="fast")
