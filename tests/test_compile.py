"""torch.compile paths of the engine and the benchmarks, on the CPU.

Inductor's C++ compilation is slow on a CPU, so `torch.compile` is swapped for a light
backend (`aot_eager`: Dynamo capture and AOT autograd, eager kernels; or Dynamo alone) and the
models are small: the tests check the control flow (what is compiled, with which mode and
shapes; CUDA-graph step marks; no compilation inside a timed region) and that a compiled step
computes what an eager one does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from rld.bench.common import distiller_config
from rld.config import TrainerConfig
from rld.distillers import build_distiller
from rld.loop import build_train_state, evaluate_model, train_step
from rld.validate import COMPILE_MODES, ConfigError, validate

RLD = distiller_config("rld", warmup=5)
CPU = torch.device("cpu")


def _light_compile(monkeypatch, backend: str) -> list:
    """torch.compile -> `backend`; returns the list of each call's (mode, dynamic)."""
    real, calls = torch.compile, []

    def fake(fn, *, mode=None, dynamic=None, **kwargs):
        calls.append((mode, dynamic))
        return real(fn, backend=backend, dynamic=dynamic)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", fake)
    return calls


@pytest.fixture
def compiles(monkeypatch):
    yield _light_compile(monkeypatch, "aot_eager")
    torch._dynamo.reset()


@pytest.fixture
def dynamo_only(monkeypatch):
    yield _light_compile(monkeypatch, "eager")
    torch._dynamo.reset()


def _net(arch: str = "", num_classes: int = 10, *args) -> torch.nn.Module:
    """A small CNN (fast to trace): convolution, batch norm (buffers updated in training),
    linear head; stands in for `rld.models.build_model`."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, num_classes))


def _step(compile: bool, mode: str = "default"):
    torch.manual_seed(0)
    student, teacher = _net(), _net()
    return build_train_state(student, teacher, build_distiller(RLD), device=CPU,
                      dtype=torch.float32, channels_last=True, compile=compile, lr=0.05,
                      momentum=0.9, weight_decay=5e-4, compile_mode=mode)


def test_compiled_step_trains_like_eager(compiles):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
               for n in (8, 8, 4)]  # the last one partial: one more graph, same numbers
    eager, compiled = _step(False), _step(True, "reduce-overhead")
    assert not compiled.cudagraphs  # CUDA graphs on CUDA only
    assert compiled.distiller is not eager.distiller
    assert compiles == [("reduce-overhead", False)] * 3  # student, teacher, loss; static shapes
    for epoch, (x, y) in enumerate(batches, 1):  # epochs 1..3 of a 5-epoch warm-up ramp
        terms_e, loss_e, logits_e = train_step(eager, x, y, epoch)
        terms_c, loss_c, logits_c = train_step(compiled, x, y, epoch)
        assert terms_c.keys() == terms_e.keys() == {"ce", "rld"}
        for k in terms_e:
            torch.testing.assert_close(terms_c[k], terms_e[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-4)
    # the epoch is not baked into any graph: student, teacher and loss, two shapes each
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] == 6


def test_bad_compile_mode_is_rejected_by_the_config_check_and_the_benchmarks():
    from hydra import compose, initialize_config_dir

    from rld.config import register_configs

    register_configs()
    assert TrainerConfig().compile_mode == "default" and "default" in COMPILE_MODES
    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=["trainer.compile_mode=fast"])
    with pytest.raises(ConfigError, match="trainer.compile_mode='fast'.*reduce-overhead"):
        validate(cfg)
    from rld.bench import epoch, grid, step

    for bench in (step, epoch, grid):  # argparse: exit status 2 and the choices named
        with pytest.raises(SystemExit) as stop:
            bench.parse_args(["--compile-mode", "fast"])
        assert stop.value.code == 2


def test_cuda_graph_steps_are_marked(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    s = dataclasses.replace(_step(False), cudagraphs=True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, _, logits = train_step(s, x, y, 1)
    assert len(marks) == 1 and not logits.requires_grad  # a copy, safe to keep
    evaluate_model(s, [(x, y), (x, y)])
    assert len(marks) == 3  # and one per evaluation batch


def test_epoch_bench_compiles_nothing_while_timed(dynamo_only, monkeypatch, tmp_path, capsys):
    import rld.models
    from rld.bench.epoch import main

    monkeypatch.setattr(rld.models, "build_model", _net)
    assert main(["--device", "cpu", "--images", "80", "--batch-size", "32",
                 "--compile", "--compile-mode", "reduce-overhead", "--skip-reference",
                 "--out", str(tmp_path / "e.csv")]) == 0
    out = capsys.readouterr().out
    assert "compile reduce-overhead" in out
    assert "graphs compiled while timed: 0" in out  # 80 = 2 x 32 + 16: both shapes warmed
    assert (tmp_path / "e.csv").read_text().splitlines()[0].endswith(",warmup_s")
    with pytest.raises(SystemExit):
        main(["--compile-mode", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
