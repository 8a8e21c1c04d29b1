"""Checks of a composed config that types cannot express, run before any work starts.

Each failure is a `ConfigError` whose message names the key, the value and what is allowed.
"""

from __future__ import annotations

from rld.data.imagenet import DECODERS
from rld.distillers import DISTILLERS


class ConfigError(ValueError):
    """Bad user input: reported as one short message, without a traceback."""


DATASETS = ("cifar100", "imagenet", "synthetic", "digits")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PROGRESS = ("auto", "bar", "line", "none")
OBJECTIVES = ("top1_best", "top1", "top5")
# torch.compile modes (trainer.compile_mode; the benchmarks' --compile-mode takes the same)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _choice(key: str, value, allowed) -> None:
    _require(value in allowed, key, value, f"use one of {', '.join(map(str, allowed))}")


def validate(cfg, world=None) -> None:
    """Raise ConfigError for the first bad value in `cfg` (a composed TrainConfig), for a
    run on `world` (a `rld.distributed.World`; None: one process)."""
    from rld.models import MODELS

    d, t, o = cfg.distiller, cfg.trainer, cfg.optim
    _choice("dataset.name", cfg.dataset.name, DATASETS)
    _choice("dataset.family", cfg.dataset.family, sorted(MODELS))
    _choice("dataset.decoder", cfg.dataset.decoder, DECODERS)
    _choice("distiller.name", d.name, DISTILLERS)
    _choice("role", cfg.role, ("student", "teacher"))
    if cfg.role == "teacher":
        _require(d.name == "vanilla", "distiller", d.name,
                 "role=teacher trains the teacher alone: use distiller=vanilla")
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.progress", t.progress, PROGRESS)
    _choice("trainer.compile_mode", t.compile_mode, COMPILE_MODES)
    _choice("objective", cfg.objective, OBJECTIVES)
    for key in ("tau", "scd_tau"):
        _require(d[key] > 0, f"distiller.{key}", d[key], "must be > 0")
    for key in ("alpha", "beta", "warmup", "ce_weight", "kd_weight"):
        _require(d[key] >= 0, f"distiller.{key}", d[key], "must be >= 0")
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _require(o.gamma > 0, "optim.gamma", o.gamma, "must be > 0")
    _require(all(m >= 1 for m in o.milestones), "optim.milestones", list(o.milestones),
             "epochs >= 1")
    _require(t.epochs >= 1, "trainer.epochs", t.epochs, "must be >= 1")
    _require(t.batch_size >= 1, "trainer.batch_size", t.batch_size, "must be >= 1")
    _require(t.dist_timeout_s > 0, "trainer.dist_timeout_s", t.dist_timeout_s, "must be > 0")
    if world is not None:
        from rld.feature_distillers import data_parallel_problem
        from rld.world import world_problem

        problem = world_problem(cfg, world)
        if problem is not None:
            _require(False, *problem)
        reason = data_parallel_problem(str(d.name), world.size)
        _require(reason is None, "distiller", str(d.name), reason)
    _require(cfg.dataset.num_classes >= 2, "dataset.num_classes", cfg.dataset.num_classes,
             "must be >= 2")
    device = str(t.device)
    _require(device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:"),
             "trainer.device", device, "use auto, cpu, cuda or cuda:N")
    family = MODELS[cfg.dataset.family]
    for role in ("teacher", "student"):
        arch = cfg.pair[role]
        _require(arch in family, f"pair.{role}", arch,
                 f"dataset {cfg.dataset.name} takes {cfg.dataset.family} models: "
                 f"{', '.join(sorted(family))}")
    from rld.feature_distillers import check_feature_pair

    check_feature_pair(cfg)
