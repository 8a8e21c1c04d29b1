"""Distillers: a loss of `rld.losses` (or a feature loss) with its weights, warm-up and any
extra trainable modules.

    total = ce_weight * CE(z_s, y) + min(epoch / warmup, 1) * kd_weight * L(student, teacher, y)

with 1-based epochs (warmup 0 means no warm-up).  A distiller is an `nn.Module`: the engine
trains its parameters with the student's (same optimiser), saves its state in the run's
checkpoint (not in `student.pt`) and counts them as the method's extra parameters.  The
engine only sees `terms()`, a dict of named scalar tensors whose sum is the training loss,
and what the distiller needs: the teacher (`needs_teacher`), the models' intermediate
features instead of their logits alone (`needs_features`), the batch's sample indices
(`needs_index`), the teacher in training mode (`teacher_train`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from rld.config import DISTILLER_SETTINGS
from rld.losses import dkd_loss, kd_loss, rld_loss

DISTILLERS = tuple(DISTILLER_SETTINGS)


class Distiller(nn.Module):
    """Cross-entropy plus an optional distillation term with linear warm-up.

    Logit distillers pass `loss_fn(logits_student, logits_teacher, target)`; distillers with
    modules or features override `distill`.
    """

    needs_features = False  # terms() gets the models' `Features`, not their logits
    needs_index = False  # terms() gets the batch's sample indices
    # the teacher runs in training mode while the student trains (batch-norm on batch
    # statistics, its running statistics updated and saved with the run's checkpoints)
    teacher_train = False
    # why it cannot train as one run over several processes (None: it can; rld.validate)
    single_process: str | None = None

    def __init__(self, name: str, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 warmup: int = 0,
                 loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None):
        super().__init__()
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

    def distill(self, student: Any, teacher: Any, target: Tensor,
                index: Tensor | None = None) -> Tensor:
        """The distillation loss L before its weights (logit distillers: `loss_fn`)."""
        return self.loss_fn(student, teacher, target)

    def terms(self, student: Any, teacher: Any, target: Tensor, epoch: int,
              index: Tensor | None = None) -> dict[str, Tensor]:
        """Named loss terms of a batch; `student`/`teacher` are logits, or `Features` when
        `needs_features` (then `.logits` holds the logits)."""
        logits = student.logits if self.needs_features else student
        out = {"ce": self.ce_weight * F.cross_entropy(logits.float(), target)}
        if self.needs_teacher:
            distill = self.distill(student, teacher, target, index)
            out[self.name] = self.ramp(epoch) * self.kd_weight * distill
        return out

    def extra_parameters(self) -> int:
        """Numbers the method adds to the student, counted as the reference releases count
        them: trainable parameters and buffers (running statistics, memories)."""
        return (sum(p.numel() for p in self.parameters())
                + sum(b.numel() for b in self.buffers()))


def build_distiller(cfg, **context: Any) -> Distiller:
    """Build from a distiller config (keys of `rld.config.DistillerConfig`).

    `context` carries what distillers with modules need to size them (the student and
    teacher modules, the input size, the number of training samples and, for CRD, their
    labels: see `rld.feature_distillers.build_feature_distiller`); logit distillers ignore it.
    """
    name = cfg.name
    if name not in DISTILLERS:
        raise ValueError(f"distiller.name must be one of {', '.join(DISTILLERS)}, got {name!r}")
    if name == "vanilla":
        return Distiller("vanilla", ce_weight=float(cfg.ce_weight))
    # imported here: rld.feature_distillers imports this module
    from rld.feature_distillers import FEATURE_DISTILLERS, build_feature_distiller

    if name in FEATURE_DISTILLERS:
        return build_feature_distiller(cfg, **context)
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
