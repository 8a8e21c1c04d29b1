"""Checks of a composed config that types cannot express, run before any work starts.

Each failure is a `ConfigError` whose message names the key, the value and what is allowed.
The plugins the config names (`plugins`) are imported first, so that their models, data sets
and distillers are known.
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

from rld.errors import ConfigError
from rld.registry import closest, load_plugins

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PROGRESS = ("auto", "bar", "line", "none")
OBJECTIVES = ("top1_best", "top1", "top5")
# torch.compile modes (trainer.compile_mode; the benchmarks' --compile-mode takes the same)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

__all__ = ["COMPILE_MODES", "OBJECTIVES", "PRECISIONS", "PROGRESS", "ConfigError",
           "unknown_keys", "validate"]


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _choice(key: str, value, allowed) -> None:
    _require(value in allowed, key, value, f"use one of {', '.join(map(str, allowed))}")


def unknown_keys(node: DictConfig, schema: type | None, prefix: str = "") -> None:
    """ConfigError for the first key of `node` that its schema (a dataclass; None: the
    node's own type) does not have, such as one added with `+key=...`, with the closest
    valid keys.  Nodes typed `dict` are open."""
    schema = schema or OmegaConf.get_type(node)
    if schema is None or not dataclasses.is_dataclass(schema):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            near = closest(str(key), fields)
            hint = f" (did you mean {', '.join(prefix + k for k in near)}?)" if near else ""
            raise ConfigError(f"{prefix}{key} is not a key of this config{hint}; "
                              f"{prefix.rstrip('.') or 'the top level'} has "
                              f"{', '.join(sorted(fields))}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            unknown_keys(child, None, f"{prefix}{key}.")


def _check_distiller(cfg) -> None:
    """The distiller is registered, every key is one of its settings, and its values pass
    their checks."""
    from rld.distillers import DISTILLERS

    d = cfg.distiller
    spec = DISTILLERS.get(str(d.name))
    names = spec.setting_names()
    for key in d:
        if key != "name" and key not in names:
            near = closest(str(key), names)
            hint = f" (did you mean {', '.join('distiller.' + k for k in near)}?)" if near \
                else ""
            raise ConfigError(f"distiller.{key} is not a setting of {spec.name}{hint}; its "
                              f"settings: {', '.join(names) or 'none'}")
    problem = spec.problem(spec.settings_of(d))
    if problem is not None:
        raise ConfigError(problem)
    if cfg.role == "teacher":
        _require(not spec.needs_teacher, "distiller", spec.name,
                 "role=teacher trains the teacher alone: use distiller=vanilla")


def _check_models(cfg) -> None:
    from rld.data import DATASETS
    from rld.distillers import check_pair
    from rld.models import model_names

    DATASETS.get(str(cfg.dataset.name))
    family = model_names(str(cfg.dataset.family))
    for role in ("teacher", "student"):
        arch = cfg.pair[role]
        _require(arch in family, f"pair.{role}", arch,
                 f"dataset {cfg.dataset.name} takes {cfg.dataset.family} models: "
                 f"{', '.join(family)}")
    check_pair(cfg)


def _check_trainer(cfg) -> None:
    t, o = cfg.trainer, cfg.optim
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.progress", t.progress, PROGRESS)
    _choice("trainer.compile_mode", t.compile_mode, COMPILE_MODES)
    _choice("objective", cfg.objective, OBJECTIVES)
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _require(o.gamma > 0, "optim.gamma", o.gamma, "must be > 0")
    _require(all(m >= 1 for m in o.milestones), "optim.milestones", list(o.milestones),
             "epochs >= 1")
    _require(t.epochs >= 1, "trainer.epochs", t.epochs, "must be >= 1")
    _require(t.batch_size >= 1, "trainer.batch_size", t.batch_size, "must be >= 1")
    _require(t.dist_timeout_s > 0, "trainer.dist_timeout_s", t.dist_timeout_s, "must be > 0")
    device = str(t.device)
    _require(device in ("auto", "cpu", "cuda", "mps") or device.startswith("cuda:"),
             "trainer.device", device, "use auto, cpu, cuda or cuda:N")


def validate(cfg, world=None) -> None:
    """Raise ConfigError for the first bad value in `cfg` (a composed TrainConfig), for a
    run on `world` (a `rld.world.World`; None: one process)."""
    from rld.config import TrainConfig, distiller_spec
    from rld.data.imagenet import DECODERS

    load_plugins(cfg.get("plugins"))
    _choice("role", cfg.role, ("student", "teacher"))
    _require(0 <= cfg.seed < 2**32, "seed", cfg.seed, "an integer in [0, 2**32)")
    _check_distiller(cfg)  # its keys first: the message names its settings
    unknown_keys(cfg, TrainConfig)
    _choice("dataset.decoder", cfg.dataset.decoder, DECODERS)
    _require(cfg.dataset.num_classes >= 2, "dataset.num_classes", cfg.dataset.num_classes,
             "must be >= 2")
    _check_trainer(cfg)
    if world is not None and world.distributed:
        from rld.world import world_problem

        problem = world_problem(cfg, world)
        if problem is not None:
            _require(False, *problem)
        reason = distiller_spec(cfg).single_process
        _require(reason is None, "distiller", str(cfg.distiller.name),
                 f"{reason} ({world.size} here): run it on one process")
    _check_models(cfg)
