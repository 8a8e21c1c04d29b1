"""Logit distillation losses as pure functions of logits and targets.

Notation: z_s, z_t are the student's and teacher's logits [B, C], y the true classes [B],
p = softmax(z / tau), KL(a || b) = sum_c a_c (log a_c - log b_c).  Every loss is a scalar,
the mean over the batch, computed in the wider of the student logits' dtype and float32
(bf16/fp16 logits go up to float32, float64 stays float64).  Log-probabilities
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
from torch.autograd.function import once_differentiable

# Masked logits are set this far below everything else: exp() of it is exactly 0 in
# float32, so the softmax over the kept classes is exact, and unlike -inf it keeps every
# product 0 * (log a - log b) finite (no NaN in values or gradients).
_MASKED = -1e9

# The narrowest dtype a loss computes in: lower precisions go up to it.
_MIN_DTYPE = torch.float32


def standardize_logits(z: Tensor) -> Tensor:
    """(z - mean) / (std + 1e-7) per row, unbiased std (logit standardisation)."""
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-7)


def _prepare(z_s: Tensor, z_t: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(z_s.dtype, _MIN_DTYPE)
    z_s, z_t = z_s.to(dtype), z_t.detach().to(dtype)
    if standardize:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    return z_s, z_t


# The losses below are autograd Functions whose forward also computes the gradient with
# respect to the student's logits in closed form, without an autograd graph: at CIFAR
# sizes a training step on a GPU is bound by kernel launches, and autograd through the
# composite formulas triples their number.  Student and teacher are stacked into one
# [2, B, C] tensor so that each step is one kernel for both.  No gradient flows to the
# teacher (its logits are detached).

class _KD(torch.autograd.Function):
    """tau^2 * mean_i KL(p_t || p_s), p = softmax(z / tau); d/dz_s = tau * (p_s - p_t) / B."""

    @staticmethod
    def forward(ctx, z_s: Tensor, z_t: Tensor, tau: float) -> Tensor:
        logp = F.log_softmax(torch.stack([z_s, z_t]) / tau, dim=2)
        p = logp.exp()
        scale = tau / len(z_s)
        ctx.save_for_backward((p[0] - p[1]) * scale)
        return (p[1] * (logp[1] - logp[0])).sum() * (tau * scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return ctx.saved_tensors[0] * grad, None, None


class _BinaryMaskedKL(torch.autograd.Function):
    """The weighted parts shared by DKD and RLD,

        w_b * mean_i binary_i + w_m * mean_i masked_i,
        binary = KL([a, 1 - a] || [q, 1 - q]),  a = q_t(top_t), q = q_s(top_s),
        masked = KL(r_t || r_s),

    with q = softmax(z / tau_b) and r = softmax(z / tau_m) restricted to the kept classes:
    those not in `drop` [B, C], or (drop=None, DKD, tau_m = tau_b) those not in `top`.
    `top` [2, B] holds top_s and top_t.  log(1 - q) is a logsumexp over the other classes,
    exact even where q rounds to 1.  A row that keeps no class has every logit masked, so
    r_s = r_t (uniform): it gives 0 and a gradient of exactly 0.  Per row, with y = top_s
    and u = softmax(z_s / tau_b) restricted to the classes c != y (u_y = 0):

        d binary / d z_s = (q - a) * (onehot(y) - u) / tau_b
        d masked / d z_s = (r_s - r_t) / tau_m      (0 outside the kept classes)
    """

    @staticmethod
    def forward(ctx, z_s: Tensor, z_t: Tensor, top: Tensor, drop: Tensor | None,
                tau_b: float, tau_m: float, w_b: float, w_m: float) -> Tensor:
        n = len(z_s)
        z = torch.stack([z_s, z_t])
        top = top.unsqueeze(2)
        zb = z / tau_b
        logq = F.log_softmax(zb, dim=2)
        rest = logq.scatter(2, top, _MASKED)
        if drop is None:  # DKD: r = u
            masked = rest
        else:
            masked = (zb if tau_m == tau_b else z / tau_m).masked_fill(drop, _MASKED)
        # per row: log q(top), log(1 - q(top)), log r  (student [0], teacher [1])
        logs = torch.cat([logq.gather(2, top), torch.logsumexp(rest, dim=2, keepdim=True),
                          F.log_softmax(masked, dim=2)], dim=2)
        p = logs.exp()
        kl = p[1] * (logs[1] - logs[0])
        loss = torch.add(kl[:, :2].sum() * (w_b / n), kl[:, 2:].sum(), alpha=w_m / n)
        dp = p[0] - p[1]  # q - a, then r_s - r_t
        u = p[0, :, 2:] if drop is None else F.softmax(rest[0], dim=1)
        u = u.scatter(1, top[0], -1.0)  # u - onehot(y)
        grad = torch.addcmul(dp[:, 2:] * (w_m / (n * tau_m)), dp[:, :1], u,
                             value=-w_b / (n * tau_b))
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (ctx.saved_tensors[0] * grad,) + (None,) * 7


def kd_loss(logits_student: Tensor, logits_teacher: Tensor, tau: float,
            standardize: bool = False) -> Tensor:
    """KD: tau^2 * mean_i KL(softmax(z_t/tau) || softmax(z_s/tau))."""
    return _KD.apply(*_prepare(logits_student, logits_teacher, standardize), tau)


def dkd_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, alpha: float,
             beta: float, tau: float, standardize: bool = False) -> Tensor:
    """DKD: alpha * TCKD + beta * NCKD (binary target-class KL + non-target-class KL)."""
    z_s, z_t = _prepare(logits_student, logits_teacher, standardize)
    return _BinaryMaskedKL.apply(z_s, z_t, target.expand(2, -1), None, tau, tau,
                                 alpha * tau**2, beta * tau**2)


def _rld(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, scd_tau: float,
         tau: float, w_scd: float, w_mcd: float, standardize: bool) -> Tensor:
    """w_scd * SCD / scd_tau^2 + w_mcd * MCD / tau^2."""
    z_s, z_t = _prepare(logits_student, logits_teacher, standardize)
    drop = z_t >= z_t.gather(1, target.unsqueeze(1))
    top = torch.stack([target, z_t.argmax(dim=1)])
    return _BinaryMaskedKL.apply(z_s, z_t, top, drop, scd_tau, tau, w_scd, w_mcd)


def scd_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, tau: float,
             standardize: bool = False) -> Tensor:
    """Sample confidence distillation: the teacher's top-class confidence becomes the
    student's target confidence in the true class."""
    return _rld(logits_student, logits_teacher, target, tau, tau, tau**2, 0.0, standardize)


def mcd_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, tau: float,
             standardize: bool = False) -> Tensor:
    """Masked correlation distillation: KL over the classes the teacher ranks below y."""
    return _rld(logits_student, logits_teacher, target, tau, tau, 0.0, tau**2, standardize)


def rld_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, alpha: float,
             beta: float, tau: float, scd_tau: float | None = None,
             standardize: bool = False) -> Tensor:
    """RLD: alpha * SCD (at scd_tau, default tau) + beta * MCD (at tau)."""
    scd_tau = tau if scd_tau is None else scd_tau
    return _rld(logits_student, logits_teacher, target, scd_tau, tau, alpha * scd_tau**2,
                beta * tau**2, standardize)
