"""What a run directory holds and how damage to it is handled, through the real CLI: the
record, checkpoint fallback, TensorBoard event files, the teacher's identity."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import torch
from cli_helpers import SMALL, run_train

from rld.record import read_record

KD = [*SMALL, "distiller=kd", "trainer.epochs=2"]


def _run_dir(root: Path, tag: str) -> Path:
    [path] = (root / "sweeps" / tag).rglob("metrics.json")
    return path.parent


def _events(folder: Path) -> list:
    """Every Event of the TensorBoard event files under `folder` (TFRecord framing: length,
    its CRC, the serialised Event, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            events.append(Event.FromString(data[pos + 12: pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_tensorboard_scalars_and_hparams(teacher_root):
    run_train(teacher_root, *KD, "tag=tb")
    run_dir = _run_dir(teacher_root, "tb")
    scalars: dict[str, dict[int, float]] = {}
    plugins = set()
    for e in _events(run_dir / "tb"):
        for v in e.summary.value:
            plugins.add(v.metadata.plugin_data.plugin_name)
            if v.HasField("simple_value"):
                scalars.setdefault(v.tag, {})[e.step] = v.simple_value
    for tag in ("loss/ce", "loss/kd", "loss", "train/top1", "test/top1", "test/top5", "lr",
                "seconds"):
        assert set(scalars[tag]) == {1, 2}, tag
    history = (run_dir / "history.csv").read_text().splitlines()
    header, last = history[0].split(","), history[-1].split(",")
    assert abs(scalars["test/top1"][2] - float(last[header.index("test_top1")])) < 1e-3
    assert "hparams" in plugins  # the HParams view: hyperparameters with final metrics
    record = read_record(run_dir)
    assert abs(scalars["hparam/top1_best"][0] - record.top1_best) < 1e-3

    run_train(teacher_root, *KD, "tag=notb", "trainer.tensorboard=false")
    assert not (_run_dir(teacher_root, "notb") / "tb").exists()


def test_replaced_teacher_is_not_recalled(teacher_root, tmp_path):
    root = teacher_root
    run_train(root, *KD, "tag=teacherid")
    record = read_record(_run_dir(root, "teacherid"))
    teacher = root / "teachers/synthetic/resnet14_vanilla/teacher.pth"
    assert record.status == "completed"
    assert record.teacher_sha256 and record.fingerprint["teacher.sha256"] == record.teacher_sha256

    other = tmp_path / "retrained.pth"  # the same architecture, one weight changed
    ckpt = torch.load(teacher, weights_only=True)
    ckpt["model"]["fc.bias"] += 1.0
    torch.save(ckpt, other)
    proc = run_train(root, *KD, "tag=teacherid", f"teacher.checkpoint={other}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "finished run of another configuration (differs in teacher.sha256)" in proc.stderr
    # the original teacher (its hash cached beside it) is still recalled
    proc = run_train(root, *KD, "tag=teacherid")
    assert "already finished" in proc.stdout + proc.stderr


def test_damaged_checkpoints_and_record(teacher_root):
    root = teacher_root
    run_train(root, *KD, "tag=damaged")
    run_dir = _run_dir(root, "damaged")
    before = read_record(run_dir)
    last, prev = run_dir / "checkpoints/last.pt", run_dir / "checkpoints/prev.pt"
    assert prev.exists()  # the previous epoch's checkpoint is kept beside the latest

    # a cut copy: metrics.json and last.pt truncated -> resumes from prev.pt, same result
    (run_dir / "metrics.json").write_text('{"status": "compl')
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    proc = run_train(root, *KD, "tag=damaged")
    out = proc.stdout + proc.stderr
    assert "metrics.json is not valid JSON" in out and "cannot read" in out
    assert "resumed from checkpoints/prev.pt after epoch 1" in out
    after = read_record(run_dir)
    assert (after.status, after.top1, after.top1_best) == ("completed", before.top1,
                                                           before.top1_best)

    # nothing readable: one line naming the files and the remedy
    (run_dir / "metrics.json").write_text("[1, 2")
    for path in (last, prev):
        path.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    proc = run_train(root, *KD, "tag=damaged", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "no checkpoint reads" in err[0]
    assert "checkpoints/last.pt" in err[0] and "checkpoints/prev.pt" in err[0]
    assert "trainer.resume=false" in err[0]
    run_train(root, *KD, "tag=damaged", "trainer.resume=false")
    assert read_record(run_dir).status == "completed"
    for path in (last, prev):  # started over: the damaged files are gone, not kept as prev
        assert not path.exists() or not path.read_bytes().startswith(b"PK\x03\x04 not")


def test_failed_record_is_replaced_but_a_finished_one_never(teacher_root, tmp_path):
    from omegaconf import OmegaConf

    from rld.rundir import record_failure

    saved = OmegaConf.load(_run_dir(teacher_root, "tb") / ".hydra/config.yaml")
    target = tmp_path / "run"
    shutil.copytree(_run_dir(teacher_root, "tb"), target)
    record_failure(saved, target, "boom")
    assert read_record(target).status == "completed"  # a finished record stays
    (target / "metrics.json").unlink()
    record_failure(saved, target, "boom")
    failed = read_record(target)
    assert (failed.status, failed.message, failed.distiller) == ("failed", "boom", "kd")
