"""The inner loop (rld.loop): epoch statistics of K students, divergence per student, the
data-parallel reduction hook and the progress bar."""

from __future__ import annotations

import io

import pytest
import torch

from rld.bench.common import distiller_config
from rld.distillers import build_distiller
from rld.loop import Progress, build_train_state, evaluate_model, train_epoch
from rld.students import LoopStudents


def _state(name: str = "kd", lr: float = 0.05):
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))

    return build_train_state(net(), net().eval(), build_distiller(distiller_config(name)),
                             device=torch.device("cpu"), dtype=torch.float32,
                             channels_last=False, compile=False, lr=lr, momentum=0.9,
                             weight_decay=5e-4)


def _batches(n_batches: int = 3, b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 2, 2, generator=g), torch.randint(0, 5, (b,), generator=g))
            for _ in range(n_batches)]


class _Loader(list):
    def set_epoch(self, epoch):
        pass


def test_epoch_statistics_are_sample_weighted_means():
    s, batches = _state(), _Loader(_batches() + [_batches(1, 2, seed=7)[0]])  # a partial batch
    ref = _state()  # the same steps by hand
    from rld.loop import train_step

    sums, n = {"ce": 0.0, "kd": 0.0, "loss": 0.0, "correct": 0.0}, 0
    for x, y in batches:
        terms, loss, logits = train_step(ref, x, y, 1)
        for k in ("ce", "kd"):
            sums[k] += terms[k].item() * len(y)
        sums["loss"] += loss.item() * len(y)
        sums["correct"] += (logits.argmax(1) == y).sum().item()
        n += len(y)
    (out,) = train_epoch(LoopStudents([s]), batches, 1, 1, Progress("none", 1.0))
    assert out["loss_ce"] == pytest.approx(sums["ce"] / n, rel=1e-6)
    assert out["loss_kd"] == pytest.approx(sums["kd"] / n, rel=1e-6)
    assert out["loss"] == pytest.approx(sums["loss"] / n, rel=1e-6)
    assert out["train_top1"] == pytest.approx(100 * sums["correct"] / n)


def test_two_students_equal_two_separate_epochs_and_diverge_alone():
    """K = 2 students in one epoch: each one's stats equal its own epoch's exactly; a student
    whose loss turns non-finite gets the message of its first bad step, the other its
    stats."""
    alone = [train_epoch(LoopStudents([_state(name)]), _Loader(_batches()), 1, 1,
                         Progress("none", 1.0))[0] for name in ("kd", "rld")]
    both = train_epoch(LoopStudents([_state("kd"), _state("rld")]), _Loader(_batches()), 1, 1,
                       Progress("none", 1.0))
    assert both == alone
    out = None
    for _ in range(3):  # the huge lr overflows within a few steps
        out = train_epoch(LoopStudents([_state("kd"), _state(lr=1e30)]), _Loader(_batches(4)),
                          3, 3, Progress("none", 1.0))
    assert isinstance(out[0], dict)
    assert out[1].startswith("non-finite loss at epoch 3, step ")


def test_all_reduce_hook_sums_the_statistics_of_the_processes():
    """A stand-in for two identical processes: every statistic doubled, means unchanged."""
    calls = []

    def twice(t):
        calls.append(t.shape)
        return t * 2

    s1, s2 = _state(), _state()
    s2.all_reduce = twice
    (a,) = train_epoch(LoopStudents([s1]), _Loader(_batches()), 1, 1, Progress("none", 1.0))
    (b,) = train_epoch(LoopStudents([s2]), _Loader(_batches()), 1, 1, Progress("none", 1.0))
    assert a == pytest.approx(b) and len(calls) == 1  # one reduction per epoch
    assert evaluate_model(s1, _batches()) == evaluate_model(s2, _batches())
    assert len(calls) == 2


def test_progress_bar_reads_the_loss_only_when_redrawn(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    clock = iter([10.0, 10.1, 10.2, 15.0, 15.1, 15.2])
    monkeypatch.setattr("rld.loop.time.monotonic", lambda: next(clock))
    reads = []
    p = Progress("bar", every=1.0)
    p.start(2, 9, steps=6)
    for i in range(6):
        p.update(lambda i=i: reads.append(i) or 0.5)
    p.end()
    assert reads == [0, 3]  # at the first step, then once `every` seconds have passed
    assert "epoch 2/9" in err.getvalue()
    line = Progress("line", every=1.0)
    line.start(1, 1, 3)
    line.update(lambda: pytest.fail("no bar: no host read"))
    line.end()
