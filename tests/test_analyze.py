"""rld.analyze correlation on a tiny resnet8 trained for a few steps on digits (CPU)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rld import analyze

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, data set, model) of a resnet8 trained briefly on digits."""
    from rld.data import load_dataset
    from rld.models import build_model

    ds = load_dataset(analyze.dataset_config("digits"))
    torch.manual_seed(0)
    model = build_model("resnet8", ds.num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative statistics: usable after few steps
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(12):
        idx = torch.randint(0, len(ds.train_labels), (32,), generator=g)
        x = (ds.train_images[idx].float() / 255 - mean) / std
        loss = torch.nn.functional.cross_entropy(model(x), ds.train_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    torch.save({"model": model.state_dict(), "arch": "resnet8", "num_classes": 10, "top1": 0.0},
               path)  # fmt: skip
    return path, ds, model


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="2")  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "rld.analyze", "correlation", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _softmax(model, images, ds) -> torch.Tensor:
    """Independent reference: normalise as the data set says, softmax in float64."""
    x = images.float() / 255.0
    x = (x - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(x).double(), dim=1)


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_correlation_figure_and_numbers(trained, tmp_path: Path):
    ckpt, ds, model = trained
    r = _cli(tmp_path, "--checkpoint", str(ckpt), "--arch", "resnet8", "--dataset", "digits",
             "--classes", "3,5,8", "--image-index", "2", "--top-k", "4", "--out", "out")  # fmt: skip
    assert r.returncode == 0, r.stderr
    png, csv_path = tmp_path / "out/correlation_digits_resnet8.png", tmp_path / "out/correlation_digits_resnet8.csv"
    assert f"{Path('out/correlation_digits_resnet8.png')}" in r.stdout
    rows = _read(csv_path)
    assert list(rows[0]) == analyze.CSV_COLUMNS
    assert [row["panel"] for row in rows] == [p for p in "abcd" for _ in range(4)]
    assert [int(row["rank"]) for row in rows] == [1, 2, 3, 4] * 4
    by_panel = {p: [row for row in rows if row["panel"] == p] for p in "abcd"}
    for p, cls in zip("abc", "358", strict=True):
        assert f"test images of '{cls}'" in by_panel[p][0]["subject"]
    assert "test image #2 of '8'" in by_panel["d"][0]["subject"]
    # numbers equal an independent computation
    probs = _softmax(model, ds.test_images, ds)
    for p, cls in zip("abc", (3, 5, 8), strict=True):
        ref = probs[ds.test_labels == cls].mean(0)
        vals, idx = torch.topk(ref, 4)
        assert [int(row["class_index"]) for row in by_panel[p]] == idx.tolist()
        assert [row["class_name"] for row in by_panel[p]] == [str(i) for i in idx.tolist()]
        got = [float(row["prob"]) for row in by_panel[p]]
        assert got == pytest.approx(vals.tolist(), abs=2e-6)
        assert got == sorted(got, reverse=True)
        assert all(row["marked"] == "0" for row in by_panel[p])
    img = torch.nonzero(ds.test_labels == 8).flatten()[2]
    vals, idx = torch.topk(probs[img], 4)
    assert [int(row["class_index"]) for row in by_panel["d"]] == idx.tolist()
    assert [float(row["prob"]) for row in by_panel["d"]] == pytest.approx(vals.tolist(), abs=2e-6)
    # marked: in the top-k of class 3 or 5, not in the top-k of class 8
    top = {p: {int(row["class_index"]) for row in by_panel[p]} for p in "abc"}
    special = (top["a"] | top["b"]) - top["c"]
    assert [row["marked"] == "1" for row in by_panel["d"]] == [
        int(row["class_index"]) in special for row in by_panel["d"]
    ]
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        w, h = im.size
        assert im.format == "PNG" and 800 <= w <= 2000 and 300 <= h <= 1600


def test_correlation_unit_marks():
    """Hand-made probabilities: what is marked and which image is picked."""
    probs = torch.tensor(
        [
            [0.7, 0.2, 0.06, 0.04],  # class 0
            [0.1, 0.6, 0.25, 0.05],  # class 1
            [0.04, 0.06, 0.3, 0.6],  # class 3, image #0
            [0.45, 0.1, 0.1, 0.35],  # class 3, image #1
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 1, 3, 3])
    names = ["a0", "b1", "c2", "d3"]
    panels, img = analyze.correlation(probs, labels, [0, 1, 3], names, image_index=1, top_k=2)
    assert img == 3
    assert [p.indices for p in panels] == [[0, 1], [1, 2], [3, 0], [0, 3]]
    assert panels[2].probs == pytest.approx([0.475, 0.245])
    # class 3's top-2 is {3, 0}; classes 0/1 give {0, 1, 2}: only 1 and 2 are "special"
    assert panels[3].marked == [False, False]
    panels, _ = analyze.correlation(probs, labels, [0, 1, 3], names, image_index=0, top_k=3)
    # top-3: class 3 {3, 0, 2}; classes 0/1 {0, 1, 2}: only 1 is "special"
    assert panels[3].indices == [3, 2, 1] and panels[3].marked == [False, False, True]
    assert "test image #0 of 'd3' (predicted 'd3')" == panels[3].subject
    with pytest.raises(analyze.UsageError, match="has 2 test images"):
        analyze.correlation(probs, labels, [0, 3], names, image_index=5, top_k=2)
    with pytest.raises(analyze.UsageError, match="no test images"):
        analyze.correlation(probs, labels, [2, 3], names, image_index=0, top_k=2)


def test_defaults_from_checkpoint(trained, tmp_path: Path, capsys):
    """No --arch (read from the checkpoint), digits' default classes, default top-10."""
    ckpt, _, _ = trained
    out = tmp_path / "o"
    assert analyze.main(["correlation", "--checkpoint", str(ckpt), "--dataset", "digits",
                         "--out", str(out)]) == 0  # fmt: skip
    assert "(d) test image #0 of '8'" in capsys.readouterr().out
    rows = _read(out / "correlation_digits_resnet8.csv")
    assert len(rows) == 40  # 3 classes + 1 image, 10 bars each
    assert [r["subject"].split("'")[1] for r in rows[::10]] == ["3", "5", "8", "8"]
    d = [row for row in rows if row["panel"] == "d"]
    assert sum(float(row["prob"]) for row in d) == pytest.approx(1.0, abs=1e-4)


def test_missing_checkpoint_cli(tmp_path: Path):
    r = _cli(tmp_path, "--checkpoint", str(tmp_path / "nope.pt"), "--dataset", "digits")
    assert r.returncode == 2 and "checkpoint not found" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "results").exists()


def test_errors_are_short(trained, tmp_path: Path, capsys):
    ckpt, _, _ = trained
    out = str(tmp_path / "o")
    base = ["correlation", "--dataset", "digits", "--out", out, "--checkpoint"]
    assert analyze.main([*base, str(ckpt), "--classes", "3,leopard"]) == 2
    err = capsys.readouterr().err
    assert "unknown class 'leopard' for digits; allowed: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in err
    assert analyze.main([*base, str(ckpt), "--image-index", "1000"]) == 2
    assert "out of range: '8' has 35 test images" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "arch": "resnet8"}, bad)
    assert analyze.main([*base, str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rld.analyze: error: ") and "bad.pt" in err and len(err.splitlines()) == 1
    assert analyze.main([*base, str(ckpt), "--arch", "nonet"]) == 2
    assert "model='nonet' is not a registered cifar model" in capsys.readouterr().err
    assert not Path(out).exists()


def test_the_output_goes_beside_the_checkpoint_by_default(trained, tmp_path: Path,
                                                          monkeypatch):
    """Without --out, the figure and numbers go to analysis/ beside the checkpoint (its run
    directory), never into the current directory."""
    ckpt = trained[0]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "student.pt")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert analyze.main(["correlation", "--checkpoint", str(run / "student.pt"),
                         "--dataset", "digits"]) == 0
    assert sorted(p.name for p in (run / "analysis").iterdir()) == [
        "correlation_digits_resnet8.csv", "correlation_digits_resnet8.png"]
    assert list(cwd.iterdir()) == []
