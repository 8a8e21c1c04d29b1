"""rld.table: aggregation of a hand-made tree of run directories with known numbers."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import rld.table.runs as table_runs
from rld import table
from rld.distillers import DISTILLERS, setting_keys
from rld.record import RECORD, RunRecord

ROOT = Path(__file__).resolve().parents[1]
# every setting a record of this project's first versions held, whatever its distiller (the
# tables read only those of the run's distiller)
DEFAULTS = dict(alpha=1.0, beta=8.0, tau=4.0, scd_tau="${distiller.tau}", warmup=20,
                ce_weight=1.0, kd_weight=1.0, standardize=False, hint_layer=2,
                student_preact=False, feat_dim=128, nce_k=16384, nce_t=0.07,
                nce_momentum=0.5, nce_replace=False)


def write_config(d: Path, *, dataset: str, pair: str, teacher: str, student: str, role: str,
                 distiller: str, seed: int, epochs: int | None, **settings) -> None:
    """.hydra/config.yaml as Hydra saves it: interpolations unresolved."""
    (d / ".hydra").mkdir(parents=True)
    dist = {"name": distiller, **DEFAULTS, **settings}
    cfg = {
        "dataset": {"name": dataset, "epochs": 240, "batch_size": 64},
        "pair": {"name": pair, "teacher": teacher, "student": student,
                 "lr": {"student": 0.05, "teacher": 0.05}, "loss_defaults": {}},
        "distiller": dist,
        "trainer": {"epochs": "${dataset.epochs}" if epochs is None else epochs,
                    "device": "auto"},
        "optim": {"lr": "${pair.lr.${role}}", "momentum": 0.9},
        "role": role, "seed": seed, "tag": "t",
    }  # fmt: skip
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (d / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")


def save_record(rec: RunRecord, d: Path, fast: bool = False) -> None:
    """The record as the engine writes it (RunRecord.write); `fast` writes the same JSON
    layout without the engine's fsync, for trees of thousands of runs."""
    if not fast:
        rec.write(d)
        return
    data = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in rec.to_json().items()}  # fmt: skip
    (d / RECORD).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_run(
    root: Path,
    rel: str,
    *,
    dataset: str = "cifar100",
    pair: str = "vgg13_vgg8",
    teacher: str = "vgg13",
    student: str = "vgg8",
    role: str = "student",
    distiller: str = "vanilla",
    seed: int = 0,
    epochs: int | None = None,
    top1_best: float | None = 70.0,
    top1: float | None = None,
    status: str = "completed",
    teacher_top1: float | None = None,
    record: bool = True,
    fast: bool = False,
    **settings,
) -> Path:
    """A run directory as the engine leaves it: .hydra/config.yaml and, unless
    ``record=False`` (an older version, or killed before the engine wrote it), its record.
    `settings` are distiller settings (scd_tau follows tau unless given)."""
    d = root / rel
    write_config(d, dataset=dataset, pair=pair, teacher=teacher, student=student, role=role,
                 distiller=distiller, seed=seed, epochs=epochs, **settings)  # fmt: skip
    (d / "checkpoints").mkdir()
    if record:
        resolved = {**DEFAULTS, **settings}
        resolved.setdefault("scd_tau", resolved["tau"])
        if resolved["scd_tau"] == "${distiller.tau}":
            resolved["scd_tau"] = resolved["tau"]
        done = status in ("completed", "diverged")
        t1b = top1_best if status != "running" else None
        rec = RunRecord(
            dataset=dataset, pair=pair, role=role,
            student=teacher if role == "teacher" else student,
            teacher=None if distiller == "vanilla" else teacher, distiller=distiller,
            settings={k: resolved[k] for k in DEFAULTS}, seed=seed,
            epochs=epochs or 240, status=status,
            top1=(t1b - 0.3 if t1b is not None else None) if top1 is None else top1,
            top1_best=t1b, top5=90.0 if done else None, epochs_done=(epochs or 240) if done else 1,
            wall_s=12.5, teacher_top1=teacher_top1,
        )  # fmt: skip
        save_record(rec, d, fast)
    return d


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """sweeps/ with two sweep folders (a/ and b/) and known numbers; see the asserts."""
    s = tmp_path / "sweeps"
    c = "a/cifar100/vgg13_vgg8"
    # teacher vgg13 trained alone (role=teacher): 74, 75 -> 74.50 +- 0.71
    for seed, v in [(0, 74.0), (1, 75.0)]:
        write_run(s, f"{c}/teacher/seed={seed}", role="teacher", seed=seed, top1_best=v)
    # student alone: 70, 71, 72 -> 71.00 +- 1.00 (n=3)
    for seed, v in [(0, 70.0), (1, 71.0), (2, 72.0)]:
        write_run(s, f"{c}/vanilla/seed={seed}", seed=seed, top1_best=v)
    # KD over tau only (alpha/beta differ between runs but mean nothing for KD)
    for seed, (t2, t4) in enumerate([(72.0, 73.5), (73.0, 74.5)]):
        write_run(s, f"{c}/kd/tau=2/seed={seed}", distiller="kd", tau=2.0, beta=seed + 1.0,
                  seed=seed, top1_best=t2, teacher_top1=74.6)  # fmt: skip
        write_run(s, f"{c}/kd/tau=4/seed={seed}", distiller="kd", tau=4.0, beta=seed + 5.0,
                  seed=seed, top1_best=t4, teacher_top1=74.6)  # fmt: skip
    # DKD: a single point, one seed
    write_run(s, f"{c}/dkd/seed=0", distiller="dkd", beta=8.0, tau=4.0, top1_best=74.0)
    # RLD grid beta {1,2} x tau {2,4}; (2,4) never run
    rld = dict(distiller="rld", teacher_top1=74.6)
    write_run(s, f"{c}/rld/beta=1,tau=2/seed=0", beta=1.0, tau=2.0, seed=0, top1_best=74.0,
              **rld)  # fmt: skip
    # ... its second seed comes from another sweep folder: pooled
    write_run(s, "b/cifar100/vgg13_vgg8/rld/beta=1,tau=2/seed=1", beta=1.0, tau=2.0, seed=1,
              top1_best=75.0, **rld)  # fmt: skip
    # ... a third seed still running (the engine's record at the start): incomplete
    write_run(s, f"{c}/rld/beta=1,tau=2/seed=2", beta=1.0, tau=2.0, seed=2, status="running",
              **rld)  # fmt: skip
    # (1,4): both seeds diverged (status, or NaN accuracies)
    write_run(s, f"{c}/rld/beta=1,tau=4/seed=0", beta=1.0, tau=4.0, seed=0, top1_best=None,
              status="diverged", **rld)  # fmt: skip
    write_run(s, f"{c}/rld/beta=1,tau=4/seed=1", beta=1.0, tau=4.0, seed=1,
              top1_best=float("nan"), **rld)  # fmt: skip
    # (2,2): 75, 76, 77 -> 76.00 +- 1.00 (n=3), the best point
    for seed, v in [(0, 75.0), (1, 76.0), (2, 77.0)]:
        write_run(s, f"{c}/rld/beta=2,tau=2/seed={seed}", beta=2.0, tau=2.0, seed=seed,
                  top1_best=v, **rld)  # fmt: skip
    # ... seed 2 again in sweep b: a duplicate (a/ sorts first and is kept)
    write_run(s, "b/cifar100/vgg13_vgg8/rld/beta=2,tau=2/seed=2", beta=2.0, tau=2.0, seed=2,
              top1_best=99.0, **rld)  # fmt: skip
    # ... and a short 10-epoch run of the same point: other epochs, never averaged in
    write_run(s, "short/cifar100/vgg13_vgg8/rld/beta=2,tau=2/seed=0", beta=2.0, tau=2.0,
              seed=0, epochs=10, top1_best=20.0, **rld)  # fmt: skip
    # another pair without teacher runs: teacher column from teacher_top1; epochs tie 5 vs 10
    p2 = dict(pair="resnet32x4_resnet8x4", teacher="resnet32x4", student="resnet8x4")
    write_run(s, "a/cifar100/r32x4/kd/e5", distiller="kd", epochs=5, top1_best=60.0,
              teacher_top1=79.1, **p2)  # fmt: skip
    write_run(s, "a/cifar100/r32x4/kd/e10", distiller="kd", epochs=10, top1_best=73.0,
              teacher_top1=79.3, **p2)  # fmt: skip
    # a pair that is not in the paper, on a data set that is not either
    tiny = dict(dataset="digits", pair="tiny", teacher="resnet20", student="resnet8")
    for b, v in [(1.0, 90.0), (2.0, 91.0)]:
        write_run(s, f"a/digits/tiny/rld/beta={b:g}/seed=0", distiller="rld", beta=b, tau=4.0,
                  top1_best=v, teacher_top1=95.0, **tiny)  # fmt: skip
    # sweep-level files that are not runs
    (s / "a" / "multirun.yaml").write_text("hydra: {}\n")
    (s / "a" / "optuna.db").write_bytes(b"SQLite format 3\x00")
    return tmp_path


def _tables(tmp: Path, metric: str = "top1_best"):
    runs = table.collect_runs([tmp / "sweeps"], cwd=str(tmp))
    return runs, {t.dataset: t for t in table.build_tables(runs, metric)}


def _row(t, pair):
    (row,) = [r for r in t.rows if r.pair == pair]
    return row


def _group(t, unit):
    (g,) = [g for g in t.groups if g.unit == unit]
    return g


def test_collect_runs_statuses_duplicates_and_paths(tree: Path):
    runs, _ = _tables(tree)
    assert len(runs) == 24
    assert [r.path for r in runs] == sorted(r.path for r in runs)
    assert all(not os.path.isabs(r.path) and r.path.startswith("sweeps") for r in runs)
    by_path = {r.path: r for r in runs}
    # a record that says "running" is incomplete, without numbers
    inc = by_path["sweeps/a/cifar100/vgg13_vgg8/rld/beta=1,tau=2/seed=2"]
    assert inc.status == "incomplete" and math.isnan(inc.top1_best) and inc.epochs == 240
    assert by_path["sweeps/a/cifar100/vgg13_vgg8/rld/beta=1,tau=4/seed=1"].status == "diverged"
    dup = by_path["sweeps/b/cifar100/vgg13_vgg8/rld/beta=2,tau=2/seed=2"]
    assert dup.duplicate_of == "sweeps/a/cifar100/vgg13_vgg8/rld/beta=2,tau=2/seed=2"
    assert sum(1 for r in runs if r.duplicate_of) == 1
    short = by_path["sweeps/short/cifar100/vgg13_vgg8/rld/beta=2,tau=2/seed=0"]
    assert short.epochs == 10 and short.settings["scd_tau"] == 2.0
    assert dict(short.point)["scd_tau"] == "tau"  # at its default: follows tau
    assert by_path["sweeps/a/cifar100/vgg13_vgg8/vanilla/seed=0"].epochs == 240
    teach = by_path["sweeps/a/cifar100/vgg13_vgg8/teacher/seed=0"]
    assert teach.arch == "vgg13" and teach.role == "teacher" and teach.unit == ("teacher", "vgg13")
    # KD's point holds only KD's own settings (those it registered), not beta
    kd = by_path["sweeps/a/cifar100/vgg13_vgg8/kd/tau=2/seed=0"]
    assert [k for k, _ in kd.point] == sorted(DISTILLERS.get("kd").setting_names())
    df = table.runs_frame(runs)
    assert list(df.columns) == list(table.run_columns()) and len(df) == 24
    assert set(setting_keys()) <= set(table.run_columns())  # a new setting is a new column


def test_table_numbers(tree: Path):
    _, tables = _tables(tree)
    assert sorted(tables) == ["cifar100", "digits"]
    t = tables["cifar100"]
    # paper order: resnet32x4/resnet8x4 is row 1 of paper_results.csv, vgg13/vgg8 row 2
    assert [r.pair for r in t.rows] == ["resnet32x4_resnet8x4", "vgg13_vgg8"]
    assert t.methods == ["teacher", "student", "kd", "dkd", "rld"]
    row = _row(t, "vgg13_vgg8")
    c = row.cells
    assert (row.teacher, row.student, row.teacher_source) == ("vgg13", "vgg8", "runs")
    assert c["teacher"].text == "74.50 ± 0.71 (n=2)" and c["teacher"].paper == 74.64
    assert c["student"].text == "71.00 ± 1.00 (n=3)"
    assert c["student"].paper_text() == "70.36 (Δ +0.64)"
    assert c["kd"].ours() == "74.00 ± 0.71 (n=2) @ τ=4"
    assert c["dkd"].ours() == "74.00 (n=1) @ β=8, τ=4" and c["dkd"].n == 1
    # best RLD point (2,2): the duplicate (99) and the 10-epoch run (20) are not averaged in
    assert c["rld"].ours() == "76.00 ± 1.00 (n=3) @ β=2, τ=2"
    assert c["rld"].epochs == 240
    assert c["rld"].paper_text() == "74.93 (Δ +1.07)"
    # second pair: teacher from the loaded checkpoint's accuracy, epochs tie -> larger
    row2 = _row(t, "resnet32x4_resnet8x4")
    assert row2.teacher_source == "checkpoint"
    assert row2.cells["teacher"].ours() == "79.20 ± 0.14 (n=2)†"
    assert row2.cells["kd"].text == "73.00 (n=1)" and row2.cells["kd"].epochs == 10
    assert row2.cells["student"].text == table.NA and row2.cells["student"].paper == 72.50
    notes = "\n".join(t.notes)
    assert "24 run directories" not in notes  # digits runs are counted in their own table
    assert "22 run directories; 18 completed, 2 diverged, 0 failed, 1 incomplete" in notes
    assert "1 duplicates ignored, 2 left out for other epochs" in notes
    assert "vgg13_vgg8 RLD: 3 grid points run; 1 missing; 1 point without a finished run" in notes
    assert "2 diverged runs; 1 incomplete run; epochs=240 used, left out 1 at epochs=10" in notes
    assert "1 duplicate ignored." in notes
    assert "resnet32x4_resnet8x4 KD: epochs=10 used, left out 1 at epochs=5." in notes
    assert "† the evaluated accuracy of the loaded teacher checkpoint" in notes
    assert "Unreadable" not in notes
    # digits: no paper values at all -> no paper columns; pair not in the paper still listed
    d = tables["digits"]
    assert not d.has_paper and [r.pair for r in d.rows] == ["tiny"]
    assert "paper (Δ)" not in "\n".join(d.notes) and "paper (Δ)" in notes
    assert _row(d, "tiny").cells["rld"].ours() == "91.00 (n=1) @ β=2, τ=4"


def test_grid_cells(tree: Path):
    _, tables = _tables(tree)
    g = _group(tables["cifar100"], ("rld", "vgg13_vgg8"))
    (grid,) = g.grids
    assert grid.axes == ("beta", "tau") and grid.values == ([1.0, 2.0], [2.0, 4.0])
    assert grid.best == (2.0, 2.0) and grid.n_missing == 1 and grid.n_failed_points == 1
    assert table.cell_text(grid, 1.0, 2.0) == "74.50 ± 0.71 (n=2) [+1 incomplete]"
    assert table.cell_text(grid, 1.0, 4.0) == "2 diverged"
    assert table.cell_text(grid, 2.0, 4.0) == "missing"
    md = table.grid_markdown(grid, "top1_best")
    assert "| β \\ τ |" in md and "**76.00 ± 1.00 (n=3)** (best)" in md
    assert "4 cells: 3 run, 1 missing, 1 without a finished run" in md
    assert "1 runs with epochs other than 240 left out" in md
    # KD's grid is over tau alone (one row), even though its runs carry different betas
    kd = _group(tables["cifar100"], ("kd", "vgg13_vgg8"))
    (kg,) = kd.grids
    assert len(kd.points) == 2 and kg.axes == ("tau",) and kg.rows == [None]
    assert kg.best == (4.0,) and "| τ " in table.grid_markdown(kg, "top1_best")


def test_metric_last_epoch(tree: Path):
    _, tables = _tables(tree, metric="top1")
    c = _row(tables["cifar100"], "vgg13_vgg8").cells
    assert c["rld"].text == "75.70 ± 1.00 (n=3)"  # top1 = top1_best - 0.3 in the fixture
    assert "at the last epoch" in table.table_markdown(tables["cifar100"])


def _run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "rld.table", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_cli_writes_everything_byte_identically(tree: Path):
    r1 = _run_cli(tree)
    assert r1.returncode == 0, r1.stderr
    out = tree / "results"
    first = _snapshot(out)
    assert set(first) == {
        "runs.csv",
        "cifar100.md", "cifar100.csv", "cifar100.tex",
        "digits.md", "digits.csv", "digits.tex",
        "cifar100/vgg13_vgg8_rld_grid.md", "cifar100/vgg13_vgg8_rld_grid.png",
        "cifar100/vgg13_vgg8_kd_grid.md", "cifar100/vgg13_vgg8_kd_grid.png",
        "digits/tiny_rld_grid.md", "digits/tiny_rld_grid.png",
    }  # fmt: skip
    assert "| vgg13_vgg8" in r1.stdout and "results/runs.csv" in r1.stdout
    assert "Metric: top-1 accuracy (%) at the best epoch" in r1.stdout
    r2 = _run_cli(tree, "sweeps", "--out", "results")
    assert r2.returncode == 0 and r2.stdout == r1.stdout
    second = _snapshot(out)
    assert [k for k in first if first[k] != second[k]] == []
    runs_csv = first["runs.csv"].decode().splitlines()
    assert runs_csv[0].split(",")[:3] == ["dataset", "pair", "role"]
    assert len(runs_csv) == 25
    assert sum(",incomplete," in line for line in runs_csv) == 1


def test_markdown_and_csv_shape(tree: Path):
    _, tables = _tables(tree)
    md = table.table_markdown(tables["cifar100"])
    lines = md.splitlines()
    head = [i for i, line in enumerate(lines) if line.startswith("| Pair")][0]
    assert lines[head - 2].startswith("Metric: ")
    header = [c.strip() for c in lines[head].strip("|").split("|")]
    assert header == ["Pair", "Teacher", "paper (Δ)", "Student", "paper (Δ)", "KD", "paper (Δ)",
                      "DKD", "paper (Δ)", "RLD", "paper (Δ)"]  # fmt: skip
    assert set(lines[head + 1].replace("|", "").replace(" ", "")) == {"-"}
    rows = [line for line in lines[head + 2 :] if line.startswith("|")]
    assert len(rows) == 2 and all(r.count("|") == 12 for r in rows)
    assert any(line.startswith("- Teacher column:") for line in lines)
    rows_csv = list(csv.DictReader(io.StringIO(table.table_csv(tables["cifar100"]))))
    assert [r["pair"] for r in rows_csv] == ["resnet32x4_resnet8x4", "vgg13_vgg8"]
    row = rows_csv[1]
    assert row["teacher_source"] == "runs" and row["rld_paper"] == "74.9300"
    assert row["rld_best"] == "β=2, τ=2" and row["kd_best"] == "τ=4"
    assert row["pair"] == "vgg13_vgg8" and row["rld_mean"] == "76.0000" and row["rld_n"] == "3"
    assert row["rld_diff"] == "1.0700"


def test_latex_shape(tree: Path):
    _, tables = _tables(tree)
    tex = table.table_latex(tables["cifar100"])
    for cmd in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}", "\\end{table}"):
        assert tex.count(cmd) == 1, cmd
    assert tex.index("\\toprule") < tex.index("\\midrule") < tex.index("\\bottomrule")
    assert "vgg13\\_vgg8" in tex and "resnet32x4\\_resnet8x4" in tex
    assert "76.00 $\\pm$ 1.00 (n=3) @ $\\beta$=2, $\\tau$=2" in tex
    body = tex[tex.index("\\midrule") : tex.index("\\bottomrule")]
    assert "_" not in body.replace("\\_", "")
    for line in body.splitlines()[1:]:
        assert line.endswith("\\\\") and line.count(" & ") == 10
    assert "±" not in tex and "β" not in tex and "—" not in tex
    assert "\\multicolumn{2}{c}{RLD}" in tex
    # a data set with no paper values has one column per method
    dtex = table.table_latex(tables["digits"])
    assert "\\begin{tabular}{lccccc}" in dtex


def _red_pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and "Software" not in im.info
        w, h = im.size
        assert 300 <= w <= 2000 and 200 <= h <= 1600
        px = im.convert("RGB").tobytes()
    return sum(1 for i in range(0, len(px), 3)
               if px[i] > 200 and px[i + 1] < 60 and px[i + 2] < 60)  # fmt: skip


def test_heatmap_png(tree: Path):
    _, tables = _tables(tree)
    g = _group(tables["cifar100"], ("rld", "vgg13_vgg8"))
    table.grid_png(g.grids[0], "top1_best", tree / "h.png")
    assert _red_pixels(tree / "h.png") > 50  # the best cell's red frame is drawn
    # a one-setting grid (KD over tau) is a one-row heatmap, best framed too
    kd = _group(tables["cifar100"], ("kd", "vgg13_vgg8"))
    table.grid_png(kd.grids[0], "top1_best", tree / "k.png")
    assert _red_pixels(tree / "k.png") > 50


def test_cli_errors_and_empty(tmp_path: Path):
    r = _run_cli(tmp_path, "nope")
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "sweeps").mkdir()
    r = _run_cli(tmp_path)
    assert r.returncode == 0 and "no run directories" in r.stderr
    assert (tmp_path / "results" / "runs.csv").read_text().startswith("dataset,pair,")


def test_many_runs_fast(tmp_path: Path):
    s = tmp_path / "sweeps"
    n = 0
    for b in range(10):
        for t in range(10):
            for seed in range(12):
                write_run(s, f"big/rld/b{b}_t{t}/s{seed}", distiller="rld", beta=b + 1.0,
                          tau=t + 1.0, seed=seed, top1_best=70 + b * 0.1 + t * 0.01 + seed * 0.001,
                          fast=True)  # fmt: skip
                n += 1
    t0 = time.process_time()  # CPU time: robust to a busy machine
    runs = table.collect_runs([s], cwd=str(tmp_path))
    tables = table.build_tables(runs, "top1_best")
    elapsed = time.process_time() - t0
    assert len(runs) == n == 1200
    (t,) = tables
    c = _row(t, "vgg13_vgg8").cells["rld"]
    assert c.n == 12 and c.point == "β=10, τ=10"
    # README: 3,000 run directories in about 0.6 s; the limit leaves room for a slow machine
    assert elapsed < 5, elapsed


def test_a_record_is_read_without_the_config(tmp_path: Path, monkeypatch):
    """A directory with a record never needs its saved config (nor OmegaConf)."""
    d = write_run(tmp_path / "sweeps", "kd", distiller="kd", tau=4.0, top1_best=70.0)
    (d / ".hydra" / "config.yaml").write_text("tau: [unclosed\n")

    def fail(run_dir):
        raise AssertionError(f"config read for {run_dir}")

    monkeypatch.setattr(table_runs, "read_saved_config", fail)
    (run,) = table.collect_runs([tmp_path / "sweeps"], cwd=str(tmp_path))
    assert run.status == "completed" and run.settings["tau"] == 4.0 and run.top1_best == 70.0


def test_old_layout_without_record_is_incomplete(tmp_path: Path):
    """A run directory with only .hydra/config.yaml (killed before the engine wrote its
    record, or an older version): incomplete, described by its config or its path."""
    s = tmp_path / "sweeps"
    d = write_run(s, "t/cifar100/vgg13_vgg8/kd/tau=4/seed=3", distiller="kd", seed=3,
                  record=False, tau="${oc.select:pair.loss_defaults.kd.tau,4.0}")  # fmt: skip
    # a config naming a resolver only Hydra's process knows: the rest still resolves
    d2 = write_run(s, "t/cifar100/vgg13_vgg8/rld/beta=2,tau=4/seed=0", distiller="rld",
                   record=False, beta=2.0, kd_weight="${not_registered:runtime.num}")  # fmt: skip
    # a config that is not even YAML: what the path says
    d3 = write_run(s, "t/digits/tiny/dkd/beta=1,tau=4/seed=5", record=False)
    (d3 / ".hydra" / "config.yaml").write_text("{ not: yaml: at all\n")
    runs = {r.path: r for r in table.collect_runs([s], cwd=str(tmp_path))}
    kd = runs[str(d.relative_to(tmp_path))]
    assert (kd.status, kd.dataset, kd.pair, kd.distiller, kd.seed) == (
        "incomplete", "cifar100", "vgg13_vgg8", "kd", 3)
    assert kd.settings["tau"] == 4.0 and kd.epochs == 240 and kd.student == "vgg8"
    rld = runs[str(d2.relative_to(tmp_path))]
    assert (rld.status, rld.distiller, rld.settings["beta"], rld.epochs) == (
        "incomplete", "rld", 2.0, 240)
    assert rld.settings["kd_weight"] == "${not_registered:runtime.num}"  # as written
    bad = runs[str(d3.relative_to(tmp_path))]
    assert (bad.status, bad.dataset, bad.pair, bad.distiller, bad.seed) == (
        "incomplete", "digits", "tiny", "dkd", 5)
    (t, _) = table.build_tables(list(runs.values()), "top1_best")
    assert "0 failed, 2 incomplete (running, or no metrics.json)" in "\n".join(t.notes)


@pytest.mark.parametrize("content, reason", [
    ('{"status": "compl', "is not valid JSON"),
    ('[1, 2]', "holds a JSON list, not a record"),
])  # fmt: skip
def test_unreadable_record_is_failed_and_named(tmp_path: Path, content: str, reason: str):
    s = tmp_path / "sweeps"
    write_run(s, "t/cifar100/vgg13_vgg8/kd/tau=2/seed=0", distiller="kd", tau=2.0)
    bad = write_run(s, "t/cifar100/vgg13_vgg8/kd/tau=3/seed=0", distiller="kd", tau=3.0)
    (bad / RECORD).write_text(content)
    runs = table.collect_runs([s], cwd=str(tmp_path))
    (run,) = [r for r in runs if r.unreadable]
    shown = "sweeps/t/cifar100/vgg13_vgg8/kd/tau=3/seed=0/metrics.json"
    assert run.status == "failed" and run.message.startswith(shown) and reason in run.message
    assert (run.dataset, run.pair, run.distiller, run.settings["tau"]) == (
        "cifar100", "vgg13_vgg8", "kd", 3.0)  # from the saved config
    (t,) = table.build_tables(runs, "top1_best")
    notes = "\n".join(t.notes)
    assert f"Unreadable, counted as failed: {shown} " in notes and reason in notes
    assert "1 completed, 0 diverged, 1 failed" in notes
    assert reason in table.runs_csv(runs)


def test_variants_failed_and_explicit_scd_tau(tmp_path: Path):
    """Settings beyond the first two that vary split the grid; odd statuses are 'failed'."""
    s = tmp_path / "sweeps"
    for std in (False, True):
        for b, v in [(1.0, 70.0), (2.0, 71.0 + 5 * std)]:
            write_run(s, f"v/std={std}/b={b}", distiller="rld", beta=b, tau=4.0, top1_best=v,
                      standardize=std)  # fmt: skip
    # scd_tau set on its own (not the ${distiller.tau} default): a setting that varies
    write_run(s, "v/scd/b=1", distiller="rld", beta=1.0, tau=4.0, scd_tau=1.0, top1_best=99.0)
    # a run killed by the scheduler (a status this version does not know): failed
    write_run(s, "v/killed", distiller="kd", tau=2.0, status="killed", top1_best=50.0)
    write_run(s, "v/failed", distiller="kd", tau=3.0, status="failed", top1_best=None)
    runs = table.collect_runs([s], cwd=str(tmp_path))
    assert sorted(r.status for r in runs if r.distiller == "kd") == ["failed", "failed"]
    (t,) = table.build_tables(runs, "top1_best")
    g = _group(t, ("rld", "vgg13_vgg8"))
    # beta and scd_tau (varying, beta first: a POINT_KEY) are the axes; standardize splits
    assert len(g.points) == 5 and len(g.grids) == 2
    assert {gr.axes for gr in g.grids} == {("beta", "scd_tau")}
    names = sorted(table.grid_name(gr) for gr in g.grids)
    assert names == ["vgg13_vgg8_rld_standardize=false_grid", "vgg13_vgg8_rld_standardize=true_grid"]
    c = _row(t, "vgg13_vgg8").cells["rld"]
    assert c.ours() == "99.00 (n=1) @ β=1, τ=4, scd_tau=1, standardize=false"
    assert _row(t, "vgg13_vgg8").cells["kd"].text == "2 failed"
    assert "vgg13_vgg8 KD: 2 grid points run; 2 points without a finished run; 2 failed runs." in t.notes
    written, _ = table.write_outputs(runs, tmp_path / "out", "top1_best")
    assert tmp_path / "out/cifar100/vgg13_vgg8_rld_standardize=true_grid.png" in written
    md = (tmp_path / "out/cifar100/vgg13_vgg8_rld_standardize=true_grid.md").read_text()
    assert "**76.00 (n=1)** (best)" in md and "standardize=true" in md
    assert "| β \\ scd_tau |" in md


def test_a_failed_record_is_failed_not_diverged(tmp_path: Path):
    """The engine records a run that raised as status "failed" with null accuracies; a
    record written by an older version may lack most keys."""
    write_run(tmp_path / "sweeps", "f", distiller="rld", status="failed", top1_best=None)
    write_run(tmp_path / "sweeps", "d", distiller="rld", beta=2.0, status="diverged",
              top1_best=None)  # fmt: skip
    old = tmp_path / "sweeps/t/cifar100/vgg13_vgg8/rld/default/seed=4"
    write_config(old, dataset="cifar100", pair="vgg13_vgg8", teacher="vgg13", student="vgg8",
                 role="student", distiller="rld", seed=4, epochs=None)  # fmt: skip
    (old / RECORD).write_text(json.dumps({"status": "failed", "message": "boom\n  at x"}))
    runs = table.collect_runs([tmp_path / "sweeps"], cwd=str(tmp_path))
    assert sorted((r.settings.get("beta"), r.status) for r in runs if r.seed != 4) == [
        (2.0, "diverged"), (8.0, "failed")]
    (o,) = [r for r in runs if r.seed == 4]
    assert (o.status, o.dataset, o.pair, o.distiller, o.message) == (
        "failed", "cifar100", "vgg13_vgg8", "rld", "boom at x")  # identity from its path


def test_literature_merges_both_files():
    rows = {(p.dataset, p.teacher, p.student): p.values for p in table.load_literature()}
    r = rows[("cifar100", "resnet32x4", "resnet8x4")]
    assert (r["rld"], r["fitnet"], r["ofd"], r["crd"], r["reviewkd"]) == (
        76.64, 73.50, 74.95, 75.51, 75.63)
    assert "fitnet" not in rows[("cifar100", "vgg13", "vgg8")]
    assert "rld" not in rows[("cifar100", "resnet32x4", "ShuffleV1")]  # not reported


def test_feature_methods_columns_and_two_setting_grid(tmp_path: Path, monkeypatch):
    """Feature distillers get columns (in a fixed order, then others by name) with the
    literature's values; CRD's grid over kd_weight x nce_t, one per nce_momentum."""
    # a grid's axes: the distiller's point keys that vary, then the other varying settings
    crd = dataclasses.replace(DISTILLERS.get("crd"), point=("kd_weight", "nce_t"))
    monkeypatch.setitem(DISTILLERS._entries, "crd", crd)
    s = tmp_path / "sweeps"
    p = dict(pair="resnet32x4_resnet8x4", teacher="resnet32x4", student="resnet8x4")
    i = 0
    for mom in (0.5, 0.9):
        for kw in (0.5, 0.8):
            for nce_t in (0.05, 0.1):
                i += 1
                write_run(s, f"t/c/crd/{i}", distiller="crd", nce_momentum=mom, kd_weight=kw,
                          nce_t=nce_t, beta=float(i), top1_best=70 + i / 10, **p)  # fmt: skip
    write_run(s, "t/c/fitnet/0", distiller="fitnet", kd_weight=100.0, top1_best=73.0, **p)
    write_run(s, "t/c/zeta/0", distiller="zeta", top1_best=71.0, **p)
    runs = table.collect_runs([s], cwd=str(tmp_path))
    (t,) = table.build_tables(runs, "top1_best")
    assert t.methods == ["teacher", "student", "kd", "dkd", "rld", "fitnet", "crd", "zeta"]
    c = _row(t, "resnet32x4_resnet8x4").cells
    assert c["fitnet"].ours() == "73.00 (n=1)" and c["fitnet"].paper_text() == "73.50 (Δ -0.50)"
    # beta varies too, but it is not a setting of CRD
    assert c["crd"].ours() == "70.80 (n=1) @ kd_weight=0.8, nce_t=0.1, nce_momentum=0.9"
    assert c["crd"].paper == 75.51 and math.isnan(c["zeta"].paper)
    header = [h.strip() for h in table.table_markdown(t).splitlines()[4].strip("|").split("|")]
    assert header[11:] == ["FitNet", "paper (Δ)", "CRD", "paper (Δ)", "zeta", "paper (Δ)"]
    g = _group(t, ("crd", "resnet32x4_resnet8x4"))
    assert [(gr.axes, gr.tag) for gr in g.grids] == [
        (("kd_weight", "nce_t"), "nce_momentum=0.5"), (("kd_weight", "nce_t"), "nce_momentum=0.9")]
    written, _ = table.write_outputs(runs, tmp_path / "o1", "top1_best")
    stem = tmp_path / "o1/cifar100/resnet32x4_resnet8x4_crd_nce_momentum=0.5_grid"
    assert Path(f"{stem}.md") in written and Path(f"{stem}.png") in written
    md = Path(f"{stem}.md").read_text()
    assert "| kd_weight \\ nce_t | 0.05" in md and "**70.40 (n=1)** (best)" in md
    assert "Other settings: " in md and "nce_momentum=0.5" in md
    assert "4 cells: 4 run, 0 missing" in md
    assert _red_pixels(Path(f"{stem}.png")) > 50
    # identical input, identical bytes (tables, grids and PNGs)
    table.write_outputs(runs, tmp_path / "o2", "top1_best")
    a, b = _snapshot(tmp_path / "o1"), _snapshot(tmp_path / "o2")
    assert len(a) == 8 and a == b


def test_pruned_points_show_their_epoch_never_a_number(tmp_path: Path):
    """A run an Optuna pruner stopped is 'pruned at epoch e' in its cell (even a record that
    holds accuracies: a pruned run's numbers are not results), counted in the footnotes,
    hatched in its own way in the heatmap; the best point is a completed one."""
    s = tmp_path / "sweeps"
    write_run(s, "p/b1t2", distiller="rld", beta=1.0, tau=2.0, top1_best=70.0)
    write_run(s, "p/b1t4", distiller="rld", beta=1.0, tau=4.0, top1_best=71.0)
    pruned = write_run(s, "p/b2t2", distiller="rld", beta=2.0, tau=2.0, top1_best=99.0,
                       status="pruned")
    write_run(s, "p/b2t4s0", distiller="rld", beta=2.0, tau=4.0, top1_best=72.0)
    both = write_run(s, "p/b2t4s1", distiller="rld", beta=2.0, tau=4.0, seed=1,
                     top1_best=None, status="pruned")
    for d, epoch in ((pruned, 30), (both, 9)):
        data = json.loads((d / RECORD).read_text())
        data.update(pruned_epoch=epoch, epochs_done=epoch)
        (d / RECORD).write_text(json.dumps(data))
    runs = table.collect_runs([s], cwd=str(tmp_path))
    assert sorted((r.status, r.pruned_epoch) for r in runs) == [
        ("completed", None)] * 3 + [("pruned", 9), ("pruned", 30)]
    (t,) = table.build_tables(runs, "top1_best")
    (grid,) = _group(t, ("rld", "vgg13_vgg8")).grids
    assert table.cell_text(grid, 2.0, 2.0) == "pruned at epoch 30"
    assert table.cell_text(grid, 2.0, 4.0) == "72.00 (n=1) [+pruned at epoch 9]"
    assert grid.best == (2.0, 4.0) and grid.n_pruned_points == 1
    assert _row(t, "vgg13_vgg8").cells["rld"].ours() == "72.00 (n=1) [+pruned at epoch 9] @ β=2, τ=4"
    notes = "\n".join(t.notes)
    assert "3 completed, 0 diverged, 0 failed, 0 incomplete (running, or no metrics.json), " \
           "2 pruned (stopped early by an Optuna pruner" in notes
    assert "2 pruned runs" in notes
    md = table.grid_markdown(grid, "top1_best")
    assert "(1 of them pruned: stopped early by an Optuna pruner)" in md
    csv_rows = list(csv.DictReader(io.StringIO(table.runs_csv(runs))))
    assert sorted(r["pruned_epoch"] for r in csv_rows) == ["", "", "", "30", "9"]

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from rld.table.render import _draw_cell

    fig, ax = plt.subplots()
    _draw_cell(ax, 0, 0, grid.cell(2.0, 2.0), 0.0, 1.0)  # pruned only
    _draw_cell(ax, 0, 1, grid.cell(1.0, 2.0), 0.0, 1.0)  # completed
    patch, = ax.patches
    assert patch.get_hatch() == "\\\\"
    texts = [x.get_text() for x in ax.texts]
    assert texts == ["pruned\nat epoch 30", "70.00\nn=1"]
    plt.close(fig)
