"""The logit distillers: vanilla (no teacher), KD, DKD and RLD, each declared once.

The losses are the pure functions of `rld.distillers.losses`; here they get their settings
(the reference releases' defaults: megvii-research/mdistiller, zju-SWJ/RLD) and their place
in the tables.  The recipe's weights differ from `DistillationWeights` where the releases
say so: KD 0.1 CE + 0.9 KD without warm-up; DKD and RLD a 20-epoch warm-up.
"""

from __future__ import annotations

from typing import Annotated

from torch import Tensor

from rld.distillers.base import (
    NON_NEGATIVE,
    POSITIVE,
    STANDARDIZE,
    Setting,
    Vanilla,
    register_distiller,
)
from rld.distillers.losses import dkd_loss, kd_loss, rld_loss

register_distiller("vanilla")(Vanilla)

TAU = Setting("temperature of the softmaxes", POSITIVE)


@register_distiller("kd", label="KD", point=("tau",), table=True,
                    defaults={"ce_weight": 0.1, "kd_weight": 0.9})
def kd(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, *,
       tau: Annotated[float, TAU] = 4.0,
       standardize: Annotated[bool, STANDARDIZE] = False) -> Tensor:
    """KD (Hinton et al. 2015): tau^2 KL between the teacher's and the student's softmax."""
    return kd_loss(logits_student, logits_teacher, tau, standardize)


@register_distiller("dkd", label="DKD", point=("beta", "tau"), table=True,
                    defaults={"warmup": 20})
def dkd(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, *,
        alpha: Annotated[float, Setting("weight of TCKD (target class)", NON_NEGATIVE)] = 1.0,
        beta: Annotated[float, Setting("weight of NCKD (non-target classes)",
                                       NON_NEGATIVE)] = 8.0,
        tau: Annotated[float, TAU] = 4.0,
        standardize: Annotated[bool, STANDARDIZE] = False) -> Tensor:
    """DKD (Zhao et al. 2022): alpha TCKD + beta NCKD; per-pair beta from the pair file."""
    return dkd_loss(logits_student, logits_teacher, target, alpha, beta, tau, standardize)


@register_distiller("rld", label="RLD", point=("beta", "tau"), table=True,
                    defaults={"warmup": 20, "scd_tau": "${distiller.tau}"})
def rld(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, *,
        alpha: Annotated[float, Setting("weight of SCD (sample confidence)",
                                        NON_NEGATIVE)] = 1.0,
        beta: Annotated[float, Setting("weight of MCD (masked correlation)",
                                       NON_NEGATIVE)] = 8.0,
        tau: Annotated[float, Setting("temperature of MCD", POSITIVE)] = 4.0,
        scd_tau: Annotated[float | None, Setting("temperature of SCD (default: tau)",
                                                 POSITIVE)] = None,
        standardize: Annotated[bool, STANDARDIZE] = False) -> Tensor:
    """RLD (Sun et al. 2024): alpha SCD (at scd_tau) + beta MCD (at tau)."""
    return rld_loss(logits_student, logits_teacher, target, alpha, beta, tau, scd_tau,
                    standardize)
