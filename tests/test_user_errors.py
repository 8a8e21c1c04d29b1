"""A newcomer's mistakes through the real CLIs: one line on stderr naming the culprit, exit
code 2, no traceback, nothing changed on disk; interrupts recorded and resumed; run
directory names that depend only on what decides the run and that a shell takes as they are.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import REPO, SMALL, run_train, train_command, train_env

from rld.config import renamed_point, run_name

RUNS = Path("synthetic/tiny")
SHELL_SAFE = re.compile(r"^[A-Za-z0-9._=+-]+$")


def files(root: Path) -> dict[str, int]:
    """Every file under `root` with its modification time (what "unchanged" compares)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file()} if root.exists() else {}


def assert_one_line(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    """Exit code 2 and one line on stderr, `<prog> [subcommand]: error: ...`, holding every
    needle."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len(lines) == 1 and re.match(rf"{re.escape(prog)}( \w+)?: error: ", lines[0]), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run_cli(module: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=train_env())


# ------------------------------------------------------------------ the numbered cases
@pytest.mark.parametrize("override", ["distiller.bta=2", "+distiller.bta=2"])
def test_a_misspelt_key_is_refused_with_or_without_plus(tmp_path, override):
    """(1) Following Hydra's `+key` advice no longer trains the default beta silently."""
    proc = run_train(tmp_path, *SMALL, override, check=False)
    assert_one_line(proc, "rld.train", "distiller.bta", "distiller.beta")
    assert files(tmp_path) == {}


@pytest.mark.parametrize("override, needles", [
    ("pair=nosuch", ("pair=nosuch", "vgg13_vgg8")),
    ("distiller.beta=abc", ("distiller.beta='abc'", "a number")),
    ("trainer.epochz=3", ("trainer.epochz", "trainer.epochs")),
    ("seed=-1", ("seed=-1", "[0, 2**32)")),
])
def test_composition_and_value_errors_are_one_line(tmp_path, override, needles):
    """(5), (6): Hydra's composition errors and out-of-range values, exit 2, nothing
    written (not even the directory Hydra made for the run)."""
    proc = run_train(tmp_path, *SMALL, override, check=False)
    assert_one_line(proc, "rld.train", *needles)
    assert files(tmp_path) == {}


def test_sweeps_under_a_file_is_one_line(tmp_path):
    """(4) paths.sweeps below a file: the override named, no pathlib traceback."""
    (tmp_path / "a_file").write_text("x")
    proc = run_train(tmp_path, *SMALL, f"paths.sweeps={tmp_path}/a_file/sweeps", check=False)
    assert_one_line(proc, "rld.train", f"paths.sweeps={tmp_path}/a_file/sweeps",
                    "Not a directory")


@pytest.mark.parametrize("sweep", [
    ["distiller.beta=2,4"],
    ["hparams=grid", "dataset.grid_beta=[2]", "dataset.grid_tau=[2,4]"],
], ids=["basic", "optuna"])
def test_a_multirun_without_its_teacher_stops_before_any_job(tmp_path, sweep):
    """Every point would fail alike: the sweep stops once, before any job or study, with the
    single run's message (the command that trains the teacher where the runs look)."""
    proc = run_train(tmp_path, "-m", *SMALL, *sweep, check=False)
    assert_one_line(proc, "rld.train", "teacher checkpoint not found",
                    f"python -m rld.teachers train dataset=synthetic pair=tiny "
                    f"paths.root={tmp_path} dataset.train_size=256")
    assert files(tmp_path) == {}


def test_a_multirun_over_teachers_lets_each_point_say_it(tmp_path):
    """With the distiller swept (vanilla needs no teacher) the points differ: no refusal up
    front; the point without its teacher fails alone and the sweep goes on."""
    proc = run_train(tmp_path, "-m", *SMALL, "trainer.epochs=1", "distiller=kd,vanilla")
    records = {p.parts[-4]: json.loads(p.read_text())["status"]
               for p in (tmp_path / "sweeps").rglob("metrics.json")}
    assert records == {"kd": "failed", "vanilla": "completed"}, (records, proc.stderr[-2000:])


def test_the_slurm_launcher_without_slurm_is_one_line(tmp_path):
    """hydra/launcher=slurm where srun is not on PATH: one line naming the launcher and what
    to use instead, before any folder or study is made (not submitit's traceback)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    for sweep in (["distiller.beta=2,4"], ["hparams=grid"]):
        proc = run_train(tmp_path, "-m", *SMALL, "hydra/launcher=slurm", "distiller=vanilla",
                         *sweep, check=False, env={"PATH": str(empty)})
        assert_one_line(proc, "rld.train", "hydra/launcher=slurm", "srun is not on PATH",
                        "submitit_local")
        assert files(tmp_path) == {}


def test_debug_keeps_the_traceback(tmp_path):
    proc = run_train(tmp_path, *SMALL, "seed=-1", "--debug", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


@pytest.mark.slow
def test_an_optuna_grid_recalls_the_runs_of_the_same_multirun_grid(teacher_root):
    """(2) Sweep-definition keys stay out of names and fingerprints: an Optuna grid over
    the points a `-m` grid finished recalls them all, including a directory named by the
    previous scheme (commas, brackets, the grid's keys), which is moved into its new name."""
    root, tag = teacher_root, "recall21"
    run_train(root, "-m", *SMALL, "distiller=rld", "distiller.beta=8", "distiller.tau=2,4",
              "trainer.epochs=1", f"tag={tag}")
    base = root / "sweeps" / tag / RUNS / "rld"
    names = sorted(p.name for p in base.iterdir())
    suffix = "+dataset.test_size=128+dataset.train_size=256+trainer.batch_size=64+" \
             "trainer.epochs=1"
    assert names == [f"beta=8+tau=2{suffix}", f"beta=8+tau=4{suffix}"]
    assert all(SHELL_SAFE.match(n) for n in names)
    legacy = ("beta=8,tau=4,dataset.grid_tau=[2,4],dataset.test_size=128,dataset.train_size=256,"
              "trainer.batch_size=64,trainer.epochs=1")
    (base / names[1]).rename(base / legacy)
    before = {p.relative_to(base): p.read_bytes() for p in base.rglob("metrics.json")}

    proc = run_train(root, *SMALL, "distiller=rld", "hparams=grid", "dataset.grid_beta=[8]",
                     "dataset.grid_tau=[2,4]", "trainer.epochs=1", f"tag={tag}")
    out = proc.stdout + proc.stderr
    assert out.count("run already finished (completed)") == 2, out[-3000:]
    assert "run directory renamed" in out
    assert sorted(p.name for p in base.iterdir()) == names
    after = {p.relative_to(base): p.read_bytes() for p in base.rglob("metrics.json")}
    moved = {Path(str(k).replace(legacy, names[1])): v for k, v in before.items()}
    assert after == moved


def test_the_name_scheme():
    """Names are shell-friendly; placement and sweep-definition keys never enter them."""
    name = run_name("student", {"name": "rld", "beta": 2.0, "tau": 4.0},
                    ["distiller.beta=2", "optim.milestones=[150,180,210]", "trainer.epochs=3",
                     "dataset.grid_beta=[2,8]", "hparams=grid", "hydra/launcher=packed",
                     "trainer.device=cuda:1", "paths.root=/a b", "tag=x", "seed=3",
                     "+distiller.alpha=2", "dataset.root='/my data'"])
    assert name == "rld/beta=2+tau=4+alpha=2+optim.milestones=150_180_210+trainer.epochs=3"
    assert renamed_point("beta=2,tau=4,dataset.grid_beta=[2,8],optim.milestones=[5,7]") \
        == "beta=2+tau=4+optim.milestones=5_7"
    assert renamed_point("tau=4") is None and renamed_point("beta=2+tau=4") is None


def _signal_mid_run(root: Path, args: list[str], run_dir: Path, sig: int) -> subprocess.Popen:
    """Start `rld.train args`, send `sig` once `run_dir` has its first checkpoint."""
    proc = subprocess.Popen(train_command(root, *args), cwd=REPO, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints/last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def _interrupted(proc: subprocess.Popen, what: str) -> None:
    err = proc.stderr.read()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == \
        f"rld.train: interrupted ({what}); run the same command again to resume"


@pytest.mark.parametrize("sig, what", [
    (signal.SIGINT, "Ctrl-C"),
    pytest.param(signal.SIGTERM, "SIGTERM", marks=pytest.mark.slow),
])
def test_an_interrupted_run_is_recorded_and_resumes(teacher_root, sig, what):
    """(3) Ctrl-C / SIGTERM: one line, exit 130, status "interrupted" with the last
    finished epoch; the same command resumes it to the end."""
    root, tag = teacher_root, f"interrupt{int(sig)}"
    args = [*SMALL, "distiller=kd", "trainer.epochs=4", f"tag={tag}"]
    run_dir = root / "sweeps" / tag / RUNS / ("kd/tau=4+dataset.test_size=128+dataset."
                                              "train_size=256+trainer.batch_size=64+"
                                              "trainer.epochs=4") / "seed=0"
    proc = _signal_mid_run(root, args, run_dir, sig)
    _interrupted(proc, what)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted", record
    done = record["epochs_done"]
    assert 1 <= done < 4 and record["message"] == f"interrupted ({what}) after epoch {done}"
    out = run_train(root, *args)
    assert f"after epoch {done}" in out.stdout + out.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_an_interrupted_multirun_stops_and_its_rerun_continues(teacher_root):
    """(3) Ctrl-C in a sweep: the running point is recorded as interrupted, the sweep
    stops with one line, and the same command finishes every point."""
    root, tag = teacher_root, "interrupt_sweep"
    args = ["-m", *SMALL, "distiller=kd", "distiller.tau=2,4", "trainer.epochs=3", f"tag={tag}"]
    base = root / "sweeps" / tag / RUNS / "kd"
    first = base / ("tau=2+dataset.test_size=128+dataset.train_size=256+trainer.batch_size="
                    "64+trainer.epochs=3") / "seed=0"
    proc = _signal_mid_run(root, args, first, signal.SIGINT)
    _interrupted(proc, "Ctrl-C")
    assert json.loads((first / "metrics.json").read_text())["status"] == "interrupted"
    assert len(list(base.iterdir())) == 1  # the second point never started
    run_train(root, *args)
    records = [json.loads(p.read_text()) for p in base.rglob("metrics.json")]
    assert [r["status"] for r in records] == ["completed", "completed"]


@pytest.mark.slow
def test_the_launchers_say_what_they_do_instead(teacher_root):
    """(7) A launcher without -m, and a distiller that cannot share a pack: one line each
    saying what happens instead."""
    root, tag = teacher_root, "launcher21"
    single = run_train(root, *SMALL, "distiller=kd", "trainer.epochs=1", f"tag={tag}",
                       "hydra/launcher=packed")
    assert "hydra/launcher=packed launches the jobs of a multirun (-m): this single run " \
           "trains here" in single.stdout
    sweep = run_train(root, "-m", *SMALL, "distiller=kd,fitnet", "trainer.epochs=1",
                      f"tag={tag}", "hydra/launcher=packed")
    assert "not packed: fitnet (1 point); a distiller with modules of its own does not " \
           "pack" in sweep.stdout + sweep.stderr


# ------------------------------------------------------- 39 more mistakes, as a table
def _file(root: Path) -> Path:
    (root / "a_file").write_text("x")
    return root / "a_file"


# (module, arguments: {root} is a temp folder, {file} a file in it; needles of the line)
MISTAKES = [
    ("rld.train", ["trainer.epochz=3"], ["trainer.epochz", "trainer.epochs"]),
    ("rld.train", ["+foo=1"], ["foo is not a key"]),
    ("rld.train", ["pair=nosuch"], ["pair=nosuch", "tiny"]),
    ("rld.train", ["distiller=kdd"], ["distiller=kdd", "kd"]),
    ("rld.train", ["dataset=cifar10"], ["dataset=cifar10", "cifar100"]),
    ("rld.train", ["distiller.beta=abc"], ["distiller.beta", "a number"]),
    ("rld.train", ["seed=x"], ["seed='x'", "an integer"]),
    ("rld.train", ["seed=4294967296"], ["seed=4294967296", "[0, 2**32)"]),
    ("rld.train", ["trainer.epochs=0"], ["trainer.epochs=0", ">= 1"]),
    ("rld.train", ["optim.momentum=1.5"], ["optim.momentum=1.5", "[0, 1)"]),
    ("rld.train", ["trainer.precision=fp64"], ["trainer.precision", "bf16"]),
    ("rld.train", ["objective=top3"], ["objective", "top1_best"]),
    ("rld.train", ["trainer.device=tpu"], ["trainer.device", "cuda:N"]),
    ("rld.train", ["hydra/launcher=gpuz"], ["hydra/launcher=gpuz", "gpus"]),
    ("rld.train", ["plugins=[no_such_module]"], ["no_such_module"]),
    ("rld.train", ["x=["], ["cannot parse the override"]),
    ("rld.train", ["role=boss"], ["role", "student, teacher"]),
    ("rld.train", ["dataset.num_classes=1"], ["dataset.num_classes=1", ">= 2"]),
    ("rld.train", ["pair.student=resnet9999"], ["pair.student", "resnet8"]),
    ("rld.train", ["distiller=kd", "teacher.checkpoint={root}/none.pth"],
     ["teacher checkpoint not found", "none.pth"]),
    ("rld.train", ["paths.sweeps={file}/x"], ["paths.sweeps=", "Not a directory"]),
    ("rld.train", ["distiller.tau=-1"], ["distiller.tau", "> 0"]),
    ("rld.table", ["--nosuch"], ["--nosuch"]),
    ("rld.table", ["{root}/nonexistent"], ["no such directory"]),
    ("rld.table", ["--metric", "top3"], ["--metric", "top1_best"]),
    ("rld.table", ["--out", "{file}/x", "{root}"], ["--out {file}/x", "is a file"]),
    ("rld.analyze", ["correlation"], ["--checkpoint"]),
    ("rld.analyze", ["correlation", "--checkpoint", "{root}/none.pt"], ["not found"]),
    ("rld.analyze", ["correlation", "--checkpoint", "{file}", "--top-k", "0"], ["--top-k"]),
    ("rld.analyze", ["correlation", "--checkpoint", "{file}", "--dataset", "nosuch"],
     ["--dataset", "digits"]),
    ("rld.analyze", ["correlation", "--checkpoint", "{file}", "--out", "{file}/x"],
     ["--out {file}/x", "is a file"]),
    ("rld.bench", ["nosuch"], ["nosuch", "step"]),
    ("rld.bench", ["step", "--batch-size", "-3"], ["--batch-size", ">= 0"]),
    ("rld.bench", ["grid", "--points", "0"], ["--points"]),
    ("rld.bench", ["grid", "--outt", "x"], ["--outt", "--out"]),
    ("rld.teachers", ["nosuch"], ["nosuch", "list"]),
    ("rld.teachers", ["list", "pair=nosuch"], ["pair=nosuch"]),
    ("rld.teachers", ["list", "dataset.bta=3"], ["dataset.bta"]),
    ("rld.teachers", ["fetch", "--sha256", "xx"], ["--sha256"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("module, args, needles", MISTAKES,
                         ids=[f"{m}:{' '.join(a)}" for m, a, _ in MISTAKES])
def test_a_mistake_is_one_line_and_changes_nothing(tmp_path, module, args, needles):
    root = tmp_path / "root"
    root.mkdir()
    file = _file(root)
    fill = {"root": str(root), "file": str(file)}
    args = [a.format(**fill) for a in args]
    if module == "rld.train":
        args = [f"paths.root={root}", *SMALL, *args]
    before = files(root)
    proc = run_cli(module, *args, cwd=tmp_path)
    assert_one_line(proc, module.removeprefix("python -m "),
                    *(n.format(**fill) for n in needles))
    assert files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # nothing in the cwd


def test_no_stray_directory_from_a_refused_run_is_left_in_a_shared_sweep(teacher_root):
    """A refused run removes only what Hydra made for it: other runs stay."""
    root, tag = teacher_root, "stray21"
    run_train(root, *SMALL, "distiller=kd", "trainer.epochs=1", f"tag={tag}")
    before = files(root / "sweeps" / tag)
    proc = run_train(root, *SMALL, "distiller=kd", "trainer.epochs=1", f"tag={tag}",
                     "optim.lr=-1", check=False)
    assert_one_line(proc, "rld.train", "optim.lr=-1.0")
    assert files(root / "sweeps" / tag) == before
    shutil.rmtree(root / "sweeps" / tag)

