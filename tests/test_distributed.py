"""Data-parallel training (rld.distributed) on the CPU with gloo: torchrun through the real CLI
on the synthetic set and the `tiny` pair, submitit's multi-task environment, and the parts
(rank discovery, checks, CPU SyncBatchNorm, loss scales, a rank that writes nothing)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, SMALL, TORCHRUN, run_train, train_command, train_env
from torch import nn

from rld.data import BatchPlan
from rld.world import World, find_world

# 193 samples in global batches of 64: the last holds 1 sample, so rank 0's share is empty
EQUAL = ["dataset=synthetic", "pair=tiny", "dataset.train_size=193", "dataset.test_size=101",
         "trainer.batch_size=64", "trainer.progress=line", "trainer.epochs=2",
         "distiller=rld", "optim.lr=0.01", "trainer.sync_bn=true", "trainer.dist_timeout_s=60"]


def torchrun(root: Path, *overrides: str, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m rld.train paths.root=ROOT ...`."""
    return run_train(root, *overrides, check=check, timeout=timeout, launch=TORCHRUN)


def _run_dir(root: Path, tag: str, point: str = "") -> Path:
    [path] = (root / "sweeps" / tag).rglob(f"{point}*/seed=0/metrics.json")
    return path.parent


def _history(run_dir: Path) -> list[dict]:
    """The history at full precision (history.csv rounds to 6 digits)."""
    ckpt = torch.load(run_dir / "checkpoints/last.pt", map_location="cpu", weights_only=False)
    return [{k: v for k, v in row.items() if k != "seconds"} for row in ckpt["history"]]


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from rld.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=["dataset=synthetic", "pair=tiny", *overrides])


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)).split(".tfevents.")[0]
                  for p in run_dir.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_only_rank_0_writes(teacher_root):
    """sync BN, RLD with the teacher on each rank's shard, an empty share in the last global
    batch: the 2-rank history equals the 1-rank one to 1e-5 (rounding, amplified by
    training, is all that differs), and the run directory is the one a single process
    writes.  The 2-rank command is a multirun of two points: the processes' group serves
    both."""
    root = teacher_root
    run_train(root, *EQUAL, "tag=ddp1")
    out = torchrun(root, "-m", *EQUAL, "distiller.beta=8,2", "tag=ddp2")
    one, two = _run_dir(root, "ddp1"), _run_dir(root, "ddp2", "beta=8+")
    assert json.loads((_run_dir(root, "ddp2", "beta=2+") / "metrics.json").read_text())[
        "status"] == "completed"
    h1, h2 = _history(one), _history(two)
    assert [r["epoch"] for r in h2] == [1, 2]
    for a, b in zip(h1, h2):
        for key in ("loss", "loss_ce", "loss_rld"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=0), (a["epoch"], key)
        for key, n in (("train_top1", 193), ("test_top1", 101), ("test_top5", 101)):
            # every sample counted once; one prediction may flip on a near tie
            assert abs(b[key] - a[key]) < 1.01 * 100 / n, (a["epoch"], key)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m2["status"] == "completed" and m2["teacher_top1"] == m1["teacher_top1"]
    # rank 0 alone: the same files as one process, one line of each in its log and console
    assert _files(two) == _files(one)
    assert sorted(p.name for p in (two / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml"]
    log = (two / "train.log").read_text()
    assert log.count("epoch 2/2") == 1 and log.count("data-parallel run on 2 processes") == 1
    assert (out.stdout + out.stderr).count("done: top-1") == 2  # rank 0's, one per point


def _descendant_with_rank(parent: int, rank: int) -> int | None:
    """The process under `parent` whose environment says RANK=`rank` (torchrun's worker)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.slow
def test_killed_rank_ends_the_job_and_the_rerun_resumes_exactly(teacher_root):
    """Per-rank BN (the default), FitNet (its regressor's gradients averaged by hand, its
    BN statistics rank 0's at each epoch's end): SIGKILL to rank 1 mid-run ends the job
    promptly and non-zero; the same command resumes from rank 0's last checkpoint and ends
    with exactly the history and metrics of an uninterrupted 2-rank run, here a 2-task
    submitit job (the local executor: Slurm's path to the ranks, without a cluster)."""
    root = teacher_root
    args = [*SMALL, "dataset.train_size=384", "distiller=fitnet", "trainer.epochs=3",
            "trainer.dist_timeout_s=30"]
    run_train(root, "-m", *args, "hydra/launcher=submitit_local",
              "hydra.launcher.tasks_per_node=2", "tag=ddp_straight")
    straight = _run_dir(root, "ddp_straight")
    assert json.loads((straight / "metrics.json").read_text())["world_size"] == 2
    log = (straight / "train.log").read_text()  # submitit logs its end in each task's
    assert "data-parallel run on 2" in log and log.count("Job completed successfully") == 1
    proc = subprocess.Popen(train_command(root, *args, "tag=ddp_killed", launch=TORCHRUN),
                            cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list((root / "sweeps/ddp_killed").rglob("checkpoints/last.pt")):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint came"
            time.sleep(0.05)
        rank1 = _descendant_with_rank(proc.pid, 1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGKILL)
        t0 = time.time()
        assert proc.wait(timeout=60) != 0
        assert time.time() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = _run_dir(root, "ddp_killed")
    assert json.loads((killed / "metrics.json").read_text())["status"] == "running"
    done = len(_history(killed))
    assert 1 <= done < 3
    out = torchrun(root, *args, "tag=ddp_killed")
    assert f"after epoch {done}" in out.stdout + out.stderr
    assert _history(killed) == _history(straight)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, killed))
    for key in ("top1", "top1_best", "top5", "teacher_top1", "world_size"):
        assert a[key] == b[key], key


def _assert_same_history(a: Path, b: Path) -> None:
    """b's loss history equals a's to 1e-5 relative; accuracies within one sample."""
    h1, h2 = _history(a), _history(b)
    assert [r["epoch"] for r in h1] == [r["epoch"] for r in h2] == [1, 2]
    for x, y in zip(h1, h2):
        for key in ("loss", "loss_ce", "loss_rld"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=0), (x["epoch"], key)
        for key, n in (("train_top1", 193), ("test_top1", 101), ("test_top5", 101)):
            assert abs(y[key] - x[key]) < 1.01 * 100 / n, (x["epoch"], key)


@pytest.mark.slow
def test_a_pack_on_two_ranks_trains_each_point_as_its_data_parallel_run(teacher_root):
    """A pack of two RLD points on two ranks.  Loop mode under torchrun, sync BN: the point
    equals its one-process run to 1e-5 (each student a DDP rank), rank 0 alone writes.  vmap
    mode in a 2-task submitit job (the Slurm path), per-rank BN: the point equals its
    separate 2-rank torchrun run to 1e-5 (stacked gradients averaged over the ranks, rank
    0's stacked BN buffers)."""
    root = teacher_root
    run_train(root, *EQUAL, "tag=pack1")
    out = torchrun(root, "-m", *EQUAL, "distiller.beta=8,2", "hydra/launcher=packed",
                   "tag=pack2")
    one, two = _run_dir(root, "pack1"), _run_dir(root, "pack2", "beta=8+")
    _assert_same_history(one, two)
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["packed"] == {"points": 2, "mode": "loop"}
    assert _files(two) == _files(one)
    log = (two / "train.log").read_text()
    assert log.count("epoch 2/2") == 1 and log.count("pack of 2 points (loop) on 2 proc") == 1
    assert (out.stdout + out.stderr).count("done: top-1") == 2  # rank 0's, one per point

    per_rank_bn = [o for o in EQUAL if not o.startswith("trainer.sync_bn")]
    torchrun(root, *per_rank_bn, "tag=ddp_bn")
    run_train(root, "-m", *per_rank_bn, "distiller.beta=8,2", "hydra/launcher=submitit_local",
              "hydra.launcher.tasks_per_node=2", "+hydra.launcher.pack=2",
              "+hydra.launcher.pack_mode=vmap", "tag=pack_vmap")
    vm = _run_dir(root, "pack_vmap", "beta=8+")
    _assert_same_history(_run_dir(root, "ddp_bn"), vm)
    m = json.loads((vm / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["packed"] == {"points": 2, "mode": "vmap"}
    assert sorted(p.name for p in (vm / ".hydra").iterdir()) == [
        "config.yaml", "hydra.yaml", "overrides.yaml"]


def test_indivisible_global_batch_is_one_line_before_any_work(tmp_path):
    proc = torchrun(tmp_path, *SMALL, "trainer.batch_size=63", check=False, timeout=120)
    assert proc.returncode != 0
    line = ("rld.train: error: trainer.batch_size=63 is not allowed: the global batch must "
            "divide over the 2 ranks of this job; use a multiple of 2")
    assert line in proc.stderr
    assert f'File "{REPO / "rld"}' not in proc.stderr  # no traceback of ours (torchrun's own)
    assert not list(tmp_path.rglob("*.pt"))


# --------------------------------------------------------------------------- the parts
def test_world_from_torchrun_variables_or_a_single_process():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h"}
    assert find_world(env) == World(3, 4, 1, "env://", "env")
    assert find_world({}) == World() and not World().distributed and World().main


@pytest.mark.parametrize(("overrides", "key"), [
    (["distiller=crd"], "distiller='crd'"),
    (["trainer.device=cuda:1"], "trainer.device='cuda:1'"),
    (["trainer.batch_size=7"], "trainer.batch_size=7"),
])
def test_what_a_data_parallel_run_refuses(overrides, key):
    from rld.errors import ConfigError
    from rld.validate import validate

    cfg = _compose(*overrides)
    validate(cfg, World(0, 1))  # one process takes them (CUDA is checked later)
    with pytest.raises(ConfigError, match=r"^" + key.replace("(", r"\(")):
        validate(cfg, World(1, 2))


def test_pack_mode_under_sync_bn_is_the_loop():
    """Batch norm synchronised over ranks cannot run under vmap: auto picks the loop there,
    vmap asked for is refused with the key to change."""
    from rld.errors import ConfigError
    from rld.students import resolve_mode

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert resolve_mode("auto", cuda, bf16) == "vmap"
    assert resolve_mode("auto", cuda, bf16, sync_bn=True) == "loop"
    with pytest.raises(ConfigError, match="trainer.sync_bn"):
        resolve_mode("vmap", cuda, bf16, sync_bn=True)


def test_rank_overrides_keep_hydra_files_to_rank_0(monkeypatch):
    from rld.world import rank_overrides

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert rank_overrides([]) == []
    monkeypatch.setenv("RANK", "1")
    assert rank_overrides(["x=1"]) == ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    assert rank_overrides(["hydra/job_logging=none"]) == ["hydra.output_subdir=null"]


def test_loss_scales_make_the_ranks_mean_the_global_mean():
    """b_r * W / B per step: 1 for full batches; a 1-sample last batch puts all its weight
    on the rank that holds it (rank 0's share is empty)."""
    from types import SimpleNamespace

    from rld.distributed import loss_scales

    for rank, last in ((0, 0.0), (1, 2.0)):
        loader = SimpleNamespace(plan=BatchPlan(193, 64, rank=rank, world_size=2))
        assert loss_scales(loader, 2) == [1.0, 1.0, 1.0, last]


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group (file rendezvous), destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_is_batchnorm_over_the_group(gloo_group):
    """Values, gradients and running statistics of BatchNorm2d (a group of one process
    holds the whole batch); its keys unchanged."""
    from rld.distributed import convert_sync_batchnorm

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    sync = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    sync.load_state_dict(ref.state_dict())
    convert_sync_batchnorm(sync, torch.device("cpu"))
    assert type(sync[1]).__name__ == "CpuSyncBatchNorm2d"
    assert sync.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(6, 3, 8, 8) * 3 + 1
    for _ in range(2):
        for m in (ref, sync):
            m.zero_grad()
            (m(x) ** 2).mean().backward()
    assert torch.allclose(sync(x), ref(x), atol=1e-5)
    for (name, a), b in zip(ref.named_parameters(), sync.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.allclose(sync.state_dict()[key].double(), ref.state_dict()[key].double(),
                              rtol=1e-5), key
    sync.eval()
    ref.eval()
    assert torch.allclose(sync(x), ref(x), atol=1e-5)


def test_a_rank_other_than_0_writes_nothing(tmp_path):
    from rld.rundir import RunBook, RunDir

    cfg = _compose("distiller=vanilla", "trainer.epochs=1")
    book = RunBook(cfg, RunDir(tmp_path / "run"), {"k": 1}, writes=False)
    book.begin("cpu", torch.float32, world_size=2)
    book.epoch_done({"epoch": 1, "lr": 0.1, "loss": 1.0, "train_top1": 50.0,
                     "test_top1": 40.0, "test_top5": 90.0, "seconds": 1.0}, {})
    rec = book.finish("completed", None, {"model": {}})
    assert rec.top1 == 40.0 and rec.world_size == 2 and book.history
    assert not (tmp_path / "run").exists()
