"""The worked plugin under examples/rld_example through the real CLI: a model, a data set and
a distiller from a package of the user's own, with no edit to rld.

Loaded with `plugins=[rld_example]` (and its configs with `hydra.searchpath`), or by itself
through the entry-point group `rld.plugins` of an installed distribution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO, run_train, train_env

EXAMPLE = REPO / "examples" / "rld_example"
ENV = {"PYTHONPATH": str(EXAMPLE)}
CONFS = "hydra.searchpath=[pkg://rld_example.conf]"
BASE = ["plugins=[rld_example]", CONFS, "dataset=stripes", "pair=example",
        "dataset.train_size=256", "dataset.test_size=128", "trainer.epochs=2",
        "trainer.progress=line"]


@pytest.fixture(scope="module")
def example_root(tmp_path_factory) -> Path:
    """A project root with the example's teacher (resnet8 on stripes) trained."""
    root = tmp_path_factory.mktemp("example")
    run_train(root, *BASE, "distiller=vanilla", "role=teacher", env=ENV)
    assert (root / "teachers/stripes/resnet8_vanilla/teacher.pth").is_file()
    return root


def test_example_packed_grid_table_and_fingerprint(example_root):
    """A packed 2x2 grid over the plugin distiller's own setting (gamma) and tau, and the
    student alone: every point completes in its own directory named by the registered point
    keys, its record's fingerprint holds gamma, and `rld.table` gives the new column its
    registered label and a gamma x tau grid."""
    root = example_root
    proc = run_train(root, "-m", *BASE, "distiller=ckd", "distiller.gamma=0,2",
                     "distiller.tau=2,4", "hydra/launcher=packed", env=ENV)
    assert "pack of 4 points (loop)" in proc.stdout + proc.stderr
    run_train(root, *BASE, "distiller=vanilla", env=ENV)
    runs = sorted((root / "sweeps/main/stripes/example/ckd").rglob("metrics.json"))
    names = [p.parent.parent.name.split("+")[:2] for p in runs]
    assert names == [["gamma=0", "tau=2"], ["gamma=0", "tau=4"], ["gamma=2", "tau=2"],
                     ["gamma=2", "tau=4"]]
    for path in runs:
        record = json.loads(path.read_text())
        assert record["status"] == "completed" and record["packed"]["points"] == 4
        fp = record["fingerprint"]
        assert fp["distiller.name"] == "ckd" and fp["distiller.gamma"] in (0.0, 2.0)
        assert fp["distiller.gamma"] == record["gamma"] and "distiller.beta" not in fp
    out = root / "results"
    table = subprocess.run([sys.executable, "-m", "rld.table", str(root / "sweeps"), "--out",
                            str(out)], cwd=REPO, capture_output=True, text=True,
                           env=train_env(ENV))  # the records name their plugins
    assert table.returncode == 0, table.stderr[-2000:]
    md = (out / "stripes.md").read_text()
    header = md.splitlines()[next(i for i, line in enumerate(md.splitlines())
                                  if line.startswith("| Pair"))]
    assert "| CKD" in header and "| Student" in header
    assert (out / "stripes/example_ckd_grid.md").read_text().count("|") > 10


def test_example_distiller_is_found_by_its_entry_point(tmp_path):
    """An installed distribution declaring `rld.plugins` is imported by itself: the config
    composes without `plugins=`, typed by the plugin's schemas."""
    info = tmp_path / "rld_example-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rld-example\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[rld.plugins]\nrld_example = rld_example\n")
    env = train_env({"PYTHONPATH": f"{EXAMPLE}:{tmp_path}"})
    cmd = [sys.executable, "-m", "rld.train", CONFS, "dataset=stripes", "pair=example",
           "distiller=ckd", "distiller.gamma=3", "dataset.noise=8", "--cfg", "job"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gamma: 3.0" in proc.stdout and "noise: 8.0" in proc.stdout
    bad = subprocess.run([*cmd[:-2], "distiller.gama=1"], cwd=REPO, capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0 and "gama" in bad.stderr


def test_example_model_without_features_meets_a_feature_distiller_with_one_line(
        example_root):
    proc = run_train(example_root, *BASE, "distiller=fitnet", check=False, env=ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "rld.train: error: pair=example distiller=fitnet: the student (TinyCNN) has no feature "
        "interface (forward_features); choose a model of the zoo or a logit distiller")


def test_example_unknown_plugin_is_one_line(tmp_path):
    proc = run_train(tmp_path, "plugins=[rld_exampel]", "dataset=digits", "pair=tiny",
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("rld.train: error: plugins: module 'rld_exampel' not "
                                   "found; install its package or put it on PYTHONPATH")
