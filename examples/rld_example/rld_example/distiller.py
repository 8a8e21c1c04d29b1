"""`ckd`: confidence-weighted KD, a logit distiller declared with one loss function.

    L = tau^2 * mean_i  w_i KL(p_t,i || p_s,i),   w_i = q_t,i(y_i)^gamma / mean_j q_t,j(y_j)^gamma

with p = softmax(z / tau) and q_t = softmax(z_t), the teacher's (untempered) confidence in the
true class: samples the teacher gets right with confidence weigh more (gamma > 0), the mean
weight is 1, and gamma = 0 is KD.  Its settings are the function's keyword-only parameters:
KD's `tau` and its own `gamma`; rld adds the weights `warmup`, `ce_weight`, `kd_weight`.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor

import rld
from rld.distillers import NON_NEGATIVE, POSITIVE, Setting


@rld.register_distiller("ckd", label="CKD", point=("gamma", "tau"), table=True,
                        defaults={"ce_weight": 0.1, "kd_weight": 0.9})
def ckd(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, *,
        tau: Annotated[float, Setting("temperature of the softmaxes", POSITIVE)] = 4.0,
        gamma: Annotated[float, Setting("power of the teacher's true-class confidence in "
                                        "each sample's weight (0: KD)", NON_NEGATIVE)] = 1.0,
        ) -> Tensor:
    """Confidence-weighted KD (a worked example of a plugin's distiller)."""
    z_s, z_t = logits_student.float(), logits_teacher.detach().float()
    log_p_s = F.log_softmax(z_s / tau, dim=1)
    log_p_t = F.log_softmax(z_t / tau, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    confidence = F.softmax(z_t, dim=1).gather(1, target[:, None]).squeeze(1)
    weight = confidence.pow(gamma)
    weight = weight / weight.mean().clamp_min(torch.finfo(weight.dtype).tiny)
    return tau**2 * (weight * kl).mean()
