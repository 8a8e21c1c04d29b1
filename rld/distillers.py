"""Distillers: a loss function of `rld.losses` plus its cross-entropy weight and warm-up.

    total = ce_weight * CE(z_s, y) + min(epoch / warmup, 1) * kd_weight * L(z_s, z_t, y)

with 1-based epochs (warmup 0 means no warm-up).  The engine only sees `terms()`, a dict of
named scalar tensors whose sum is the training loss, and `needs_teacher`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor

from rld.losses import dkd_loss, kd_loss, rld_loss

DISTILLERS = ("vanilla", "kd", "dkd", "rld")


class Distiller:
    """Cross-entropy plus an optional distillation term with linear warm-up."""

    def __init__(self, name: str, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 warmup: int = 0,
                 loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None):
        self.name = name
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.warmup = warmup
        self.loss_fn = loss_fn

    @property
    def needs_teacher(self) -> bool:
        return self.loss_fn is not None

    def ramp(self, epoch: int) -> float:
        """Warm-up factor min(epoch / warmup, 1) for the 1-based epoch."""
        return 1.0 if self.warmup <= 0 else min(epoch / self.warmup, 1.0)

    def terms(self, logits_student: Tensor, logits_teacher: Tensor | None, target: Tensor,
              epoch: int) -> dict[str, Tensor]:
        out = {"ce": self.ce_weight * F.cross_entropy(logits_student.float(), target)}
        if self.loss_fn is not None:
            distill = self.loss_fn(logits_student, logits_teacher, target)
            out[self.name] = self.ramp(epoch) * self.kd_weight * distill
        return out


def build_distiller(cfg) -> Distiller:
    """Build from a distiller config (keys of `rld.config.DistillerConfig`)."""
    name = cfg.name
    if name not in DISTILLERS:
        raise ValueError(f"distiller.name must be one of {', '.join(DISTILLERS)}, got {name!r}")
    if name == "vanilla":
        return Distiller("vanilla", ce_weight=float(cfg.ce_weight))
    # plain floats, read once: the config object is not touched on the training hot path
    alpha, beta, tau = float(cfg.alpha), float(cfg.beta), float(cfg.tau)
    standardize = bool(cfg.standardize)
    if name == "kd":
        fn = partial(_kd, tau=tau, standardize=standardize)
    elif name == "dkd":
        fn = partial(dkd_loss, alpha=alpha, beta=beta, tau=tau, standardize=standardize)
    else:
        fn = partial(rld_loss, alpha=alpha, beta=beta, tau=tau, scd_tau=float(cfg.scd_tau),
                     standardize=standardize)
    return Distiller(name, float(cfg.ce_weight), float(cfg.kd_weight), int(cfg.warmup), fn)


def _kd(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, tau: float,
        standardize: bool) -> Tensor:
    return kd_loss(logits_student, logits_teacher, tau, standardize)
