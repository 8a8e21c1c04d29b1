"""Logit distillation losses as pure functions of logits and targets.

Notation: z_s, z_t are the student's and teacher's logits [B, C], y the true classes [B],
p = softmax(z / tau), KL(a || b) = sum_c a_c (log a_c - log b_c).  Every loss is a scalar,
the mean over the batch, computed in float32 whatever the input dtype.  Log-probabilities
come from log-softmax / logsumexp (never log of a softmax), so values and gradients stay
finite for logits up to |z| ~ 1e4.

- KD  (Hinton et al. 2015):  tau^2 * mean_i KL(p_t || p_s).
- DKD (Zhao et al. 2022):    alpha * TCKD + beta * NCKD, with
    TCKD = tau^2 * mean KL([p_t(y), 1 - p_t(y)] || [p_s(y), 1 - p_s(y)])
    NCKD = tau^2 * mean KL of the softmaxes over the classes c != y.
- RLD (Sun et al. 2024):     alpha * SCD + beta * MCD, with
    SCD  = tau_s^2 * mean KL([q_t(k), 1 - q_t(k)] || [q_s(y), 1 - q_s(y)]),
           q = softmax(z / tau_s), k = argmax z_t (the teacher's own top class);
    MCD  = tau^2 * mean KL of the softmaxes over the classes c with z_t[c] < z_t[y]
           (y and every class the teacher ranks at or above y, ties included, are masked;
           a row with nothing left contributes 0).
- standardize=True applies logit standardisation (Sun et al., CVPR 2024) to both logits
  first: z <- (z - mean(z)) / (std(z) + 1e-7) per row, unbiased std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Masked logits are set this far below everything else: exp() of it is exactly 0 in
# float32, so the softmax over the kept classes is exact, and unlike -inf it keeps every
# product 0 * (log a - log b) finite (no NaN in values or gradients).
_MASKED = -1e9


def standardize_logits(z: Tensor) -> Tensor:
    """(z - mean) / (std + 1e-7) per row, unbiased std (logit standardisation)."""
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-7)


def _prepare(z_s: Tensor, z_t: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    z_s, z_t = z_s.float(), z_t.detach().float()
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    return z_s, z_t


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Per-row KL(a || b) from log-probabilities [B, K]."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=1)


def _masked_kl_rows(z_s: Tensor, z_t: Tensor, keep: Tensor) -> Tensor:
    """Per-row KL between the teacher's and student's softmax over the kept classes only.

    Rows that keep no class give 0 (they are computed unmasked and then zeroed, so their
    gradient is exactly 0 rather than NaN).
    """
    has_kept = keep.any(dim=1)
    keep = keep | ~has_kept.unsqueeze(1)
    log_s = F.log_softmax(z_s.masked_fill(~keep, _MASKED), dim=1)
    log_t = F.log_softmax(z_t.masked_fill(~keep, _MASKED), dim=1)
    return _kl_rows(log_t, log_s) * has_kept


def _log_binary(z: Tensor, index: Tensor) -> Tensor:
    """log [p_k, 1 - p_k] per row for p = softmax(z) and class k = index, [B, 2].

    log(1 - p_k) is computed as logsumexp over the other classes minus logsumexp over all,
    which stays exact when p_k is 1 to float precision.
    """
    onehot = F.one_hot(index, z.shape[1]).bool()
    lse_all = torch.logsumexp(z, dim=1)
    log_p = z.gather(1, index.unsqueeze(1)).squeeze(1) - lse_all
    log_rest = torch.logsumexp(z.masked_fill(onehot, _MASKED), dim=1) - lse_all
    return torch.stack([log_p, log_rest], dim=1)


def kd_loss(logits_student: Tensor, logits_teacher: Tensor, tau: float,
            standardize: bool = False) -> Tensor:
    """KD: tau^2 * mean_i KL(softmax(z_t/tau) || softmax(z_s/tau))."""
    z_s, z_t = _prepare(logits_student, logits_teacher, standardize)
    log_s = F.log_softmax(z_s / tau, dim=1)
    log_t = F.log_softmax(z_t / tau, dim=1)
    return _kl_rows(log_t, log_s).mean() * tau**2


def dkd_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, alpha: float,
             beta: float, tau: float, standardize: bool = False) -> Tensor:
    """DKD: alpha * TCKD + beta * NCKD (binary target-class KL + non-target-class KL)."""
    z_s, z_t = _prepare(logits_student, logits_teacher, standardize)
    z_s, z_t = z_s / tau, z_t / tau
    tckd = _kl_rows(_log_binary(z_t, target), _log_binary(z_s, target))
    not_target = ~F.one_hot(target, z_s.shape[1]).bool()
    nckd = _masked_kl_rows(z_s, z_t, not_target)
    return (alpha * tckd.mean() + beta * nckd.mean()) * tau**2


def scd_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, tau: float,
             standardize: bool = False) -> Tensor:
    """Sample confidence distillation: the teacher's top-class confidence becomes the
    student's target confidence in the true class."""
    z_s, z_t = _prepare(logits_student, logits_teacher, standardize)
    z_s, z_t = z_s / tau, z_t / tau
    top = z_t.argmax(dim=1)
    return _kl_rows(_log_binary(z_t, top), _log_binary(z_s, target)).mean() * tau**2


def mcd_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, tau: float,
             standardize: bool = False) -> Tensor:
    """Masked correlation distillation: KL over the classes the teacher ranks below y."""
    z_s, z_t = _prepare(logits_student, logits_teacher, standardize)
    keep = z_t < z_t.gather(1, target.unsqueeze(1))
    return _masked_kl_rows(z_s / tau, z_t / tau, keep).mean() * tau**2


def rld_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, alpha: float,
             beta: float, tau: float, scd_tau: float | None = None,
             standardize: bool = False) -> Tensor:
    """RLD: alpha * SCD (at scd_tau, default tau) + beta * MCD (at tau)."""
    scd_tau = tau if scd_tau is None else scd_tau
    scd = scd_loss(logits_student, logits_teacher, target, scd_tau, standardize)
    mcd = mcd_loss(logits_student, logits_teacher, target, tau, standardize)
    return alpha * scd + beta * mcd
