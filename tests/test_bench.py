"""`python -m rld.bench step` (the supplement's Figure 2): eight methods timed in one process,
their extra parameters, top-1 measured or reported, the CSV and the figure."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from rld.bench.step import main, measured_top1


def _rows(path: Path) -> dict[str, dict]:
    return {r["method"]: r for r in csv.DictReader(path.open())}


def test_step_bench_writes_eight_methods_and_the_figure(tmp_path, capsys):
    # two finished RLD points and a failed KD run of `tiny`; a duplicate and a short run,
    # which the table does not count
    runs = tmp_path / "runs.csv"
    runs.write_text(
        "dataset,pair,role,distiller,alpha,beta,tau,scd_tau,warmup,ce_weight,kd_weight,"
        "standardize,status,epochs,duplicate_of,top1_best\n"
        "synthetic,tiny,student,rld,1,2,4,4,20,1,1,False,completed,240,,61.5\n"
        "synthetic,tiny,student,rld,1,8,4,4,20,1,1,False,completed,240,,63.25\n"
        "synthetic,tiny,student,rld,1,8,4,4,20,1,1,False,completed,240,sweeps/a,99.0\n"
        "synthetic,tiny,student,rld,1,16,4,4,20,1,1,False,completed,2,,98.0\n"
        "synthetic,tiny,student,kd,1,8,4,4,0,0.1,0.9,False,failed,240,,\n")
    out = tmp_path / "res"
    assert main(["--pair", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
                 "--runs", str(runs), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = _rows(out / "efficiency.csv")
    assert list(rows) == ["vanilla", "KD", "FitNet", "OFD", "ReviewKD", "CRD", "DKD", "RLD"]
    for name in ("vanilla", "KD", "DKD", "RLD"):
        assert rows[name]["extra_params"] == "0"
    for name in ("FitNet", "OFD", "ReviewKD", "CRD"):
        assert int(rows[name]["extra_params"]) > 0
    # CRD counts its memory: two embeddings and 2 x 50,000 x 128 memory rows
    assert int(rows["CRD"]["extra_params"]) > 2 * 50_000 * 128
    assert rows["RLD"]["top1"] == "63.25" and rows["RLD"]["top1_source"] == "measured"
    assert rows["KD"]["top1"] == ""  # failed runs are no measurement; no literature for tiny
    kd_ms = float(rows["KD"]["ms_per_batch"])
    for r in rows.values():
        assert float(r["vs_kd"]) == pytest.approx(float(r["ms_per_batch"]) / kd_ms, rel=1e-2)
    assert all(float(r["ms_per_batch"]) > 0 and float(r["images_per_s"]) > 0
               for r in rows.values())
    assert "RLD/KD batch-time ratio" in text and "CPUs" in text
    assert (out / "efficiency.png").stat().st_size > 10_000


def test_reported_top1_is_labelled_as_such(tmp_path):
    from rld.bench.step import Pair, reported_top1

    values = reported_top1(Pair("resnet32x4_resnet8x4"))
    # the supplement's Figure 2 accuracies (the literature's values, packaged)
    assert values["rld"] == pytest.approx(76.64) and values["crd"] == pytest.approx(75.51)
    assert values["vanilla"] == pytest.approx(72.50)
    assert measured_top1(str(tmp_path / "absent.csv"), "resnet32x4_resnet8x4") == {}


def test_pairs_take_their_zoo_and_input_size():
    from rld.bench.step import Pair

    for name, family, size in (("resnet34_resnet18", "imagenet", 224),
                               ("resnet50_mobilenetv1", "imagenet", 224),
                               ("resnet50_mobilenetv2", "cifar", 32), ("tiny", "cifar", 32)):
        pair = Pair(name)
        assert (pair.family, pair.image_size) == (family, size), name


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["--methods", "kd,nope"])
    assert "--methods: unknown nope" in capsys.readouterr().err
