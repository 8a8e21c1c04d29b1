"""`verify`: load each teacher strictly, evaluate it on the test set (fp32, no TF32, the
engine's `rld.loop.evaluate_model` over `rld.data.build_loaders`' test loader) and compare its top-1
with the published one (`published.csv`) or another table (`--expected CSV`); the result is
cached beside the file with its SHA-256 (`rld.teachers.status`)."""

from __future__ import annotations

import csv
from pathlib import Path

from rld.teachers.configs import Selection, Teacher, UsageError, published_table
from rld.teachers.status import Verification, write_verification

TOLERANCE = 0.1  # points of top-1


def expected_table(path: Path | None, dataset: str) -> dict[str, tuple[float, str]]:
    """{teacher architecture: (expected top-1, its source)} for `dataset`: published.csv,
    or a CSV with columns teacher and top1 (or teacher_top1, as rld/data/paper_results.csv)
    and optionally dataset."""
    if path is None:
        return {arch: (row.top1, row.source) for (ds, arch), row in published_table().items()
                if ds == dataset}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"--expected {path} cannot be read: {e}") from None
    column = next((c for c in ("top1", "teacher_top1") if rows and c in rows[0]), None)
    if column is None or "teacher" not in rows[0]:
        raise UsageError(f"--expected {path} needs the columns teacher and top1 (or "
                         "teacher_top1), and optionally dataset")
    table: dict[str, tuple[float, str]] = {}
    for row in rows:
        if row.get("dataset", dataset) != dataset or not (row[column] or "").strip():
            continue
        try:
            value = float(row[column])
        except ValueError:
            raise UsageError(f"--expected {path}: {column}={row[column]!r} is not a "
                             "number") from None
        if table.get(row["teacher"], (value,))[0] != value:
            raise UsageError(f"--expected {path} gives {row['teacher']} two accuracies on "
                             f"{dataset}: {table[row['teacher']][0]} and {value}")
        table[row["teacher"]] = (value, str(path))
    return table


def evaluate_file(t: Teacher, data, device) -> tuple[float, float]:
    """(top-1, top-5) of the teacher file on the test loader; CheckpointError when it does
    not load strictly into its architecture."""
    import torch

    from rld.distillers import Vanilla
    from rld.loop import build_train_state, evaluate_model
    from rld.models import build_model, load_checkpoint

    model = build_model(t.arch, data.num_classes, str(t.cfg.dataset.family))
    load_checkpoint(model, t.path)
    state = build_train_state(model, None, Vanilla("vanilla"), device=device,
                              dtype=torch.float32, channels_last=device.type == "cuda",
                              compile=False, lr=0.0, momentum=0.0, weight_decay=0.0)
    return evaluate_model(state, data.test)


def evaluation_data(sel: Selection):
    """The data set's test loader (and the device) of the first teacher's config."""
    import torch

    from rld.data import build_loaders
    from rld.engine import resolve_device
    from rld.errors import ConfigError, DataError

    cfg = sel.teachers[0].cfg
    try:
        device = resolve_device(str(cfg.trainer.device))
        batch = int(cfg.trainer.batch_size)
        data = build_loaders(cfg.dataset, batch, device, 0, test_batch_size=max(batch, 256))
    except (ConfigError, DataError) as e:
        raise UsageError(str(e)) from None
    # the reference numbers are fp32: no TF32 convolutions or matmuls
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return data, device


def judge(t: Teacher, top1: float, expected: dict, tolerance: float, sha: str) -> Verification:
    from rld.teachers.fetch import now

    found = expected.get(t.arch)
    if found is None:
        return Verification("unverified", sha, top1, reason=(
            f"no expected top-1 for {t.arch} on {t.cfg.dataset.name} (pass --expected CSV)"),
            checked=now())
    value, source = found
    ok = abs(top1 - value) <= tolerance + 1e-9  # 1e-9: a difference of exactly `tolerance`
    return Verification("verified" if ok else "failed", sha, round(top1, 4), value, tolerance,
                        source, checked=now())


def verify(sel: Selection, expected_csv: Path | None, tolerance: float, say) -> int:
    """Verify every present teacher of the selection; the number not verified (missing,
    not loading, off by more than `tolerance`, or without an expected accuracy)."""
    from rld.models import CheckpointError
    from rld.reproduce import file_sha256

    expected = expected_table(expected_csv, str(sel.dataset.name))
    present = [t for t in sel.teachers if t.present]
    bad = len(sel.teachers) - len(present)
    for t in sel.teachers:
        if not t.present:
            say(f"missing   {t.path} ({t.arch}): fetch or train it first")
    if not present:
        return bad
    data, device = evaluation_data(sel)
    for t in present:
        try:
            top1, _ = evaluate_file(t, data, device)
        except CheckpointError as e:
            say(f"failed    {t.path}: {e}")
            bad += 1
            continue
        result = judge(t, top1, expected, tolerance, file_sha256(t.path))
        write_verification(t.path, result)
        say(f"{result.status:<9} {t.path} ({t.arch}): {result.describe()}")
        bad += result.status != "verified"
    return bad
