"""Feature distillation losses as pure functions of feature maps (the modules that produce
the student's side live in `rld.distillers.feature`).

Notation: s, t are the student's and teacher's features (after the student's extra module),
B the batch size, mse(a, b) = mean over every element of (a - b)^2.  Every loss is a scalar
computed in the wider of the inputs' dtype and float32 (bf16/fp16 features from an autocast
region go up to float32); no gradient reaches the teacher's features (they are detached).

- FitNet (Romero et al. 2015):  mse(r(s_h), t_h), r the regressor, h the hint layer.
- OFD (Heo et al. 2019), per stage, with the teacher's pre-ReLU feature t average-pooled to
  the student's spatial size and the channel's margin m:
      sigma = max(t, m)                                   (margin ReLU of the teacher)
      d     = (s - sigma)^2  unless  s <= sigma <= 0,  else 0      (partial L2)
      L_i   = sum over C, H, W of the batch mean of d
  and over the n aligned stages  L = sum_i L_i / 2^(n - 1 - i)  (the last stage weighs 1).
  The margin of a channel whose pre-ReLU value follows N(beta, gamma^2) (the BN's shift and
  scale) is the expectation of its negative part,
      m = E[x | x < 0] = beta - |gamma| * phi(beta / |gamma|) / Phi(-beta / |gamma|),
  or -3 |gamma| where Phi(-beta / |gamma|) <= 1e-3 (phi, Phi: standard normal pdf, cdf).
- ReviewKD (Chen et al. 2021), hierarchical context loss over the fused levels,
      HCL = sum_levels [mse(s, t) + sum_j w_j mse(p_l(s), p_l(t))] / (1 + sum_j w_j),
  p_l the adaptive average pool to l x l for l in (4, 2, 1) with l < H, and w_j = 2^-j for
  the j-th pooled level used (1/2, 1/4, 1/8).
- CRD (Tian et al. 2020), NCE on scores P [B, K + 1] (column 0 the positive, then K
  negatives), P = exp(<v, m> / T) / Z, noise probability 1/N (N training samples):
      L = -(1/B) sum_b [log(P_b0 / (P_b0 + K/N + eps))
                        + sum_{j>=1} log((K/N) / (P_bj + K/N + eps))],  eps = 1e-7;
  CRD's loss is L(student scores) + L(teacher scores).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The narrowest dtype a loss computes in: lower precisions go up to it.
_MIN_DTYPE = torch.float32
# CRD's eps in the NCE posterior (reference value).
NCE_EPS = 1e-7
# OFD: below this probability of a negative value, the margin is -3 std (reference rule).
_MARGIN_MIN_PROB = 1e-3


def _pair(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(s.dtype, _MIN_DTYPE)
    return s.to(dtype), t.detach().to(dtype)


def fitnet_loss(s: Tensor, t: Tensor) -> Tensor:
    """FitNet's hint loss: mse(s, t) between the regressed student and the teacher feature."""
    s, t = _pair(s, t)
    return F.mse_loss(s, t)


def ofd_margins(gamma: Tensor, beta: Tensor) -> Tensor:
    """Per-channel margin E[x | x < 0] of x ~ N(beta, gamma^2) (-3|gamma| where a negative
    value has probability <= 1e-3), in float32, computed in float64."""
    std = gamma.detach().double().abs().clamp_min(1e-12)
    mean = beta.detach().double()
    p_neg = torch.special.ndtr(-mean / std)
    pdf = torch.exp(-0.5 * (mean / std) ** 2) / math.sqrt(2 * math.pi)
    margin = mean - std * pdf / p_neg.clamp_min(1e-300)
    return torch.where(p_neg > _MARGIN_MIN_PROB, margin, -3 * std).float()


def ofd_partial_l2(s: Tensor, t: Tensor, margin: Tensor) -> Tensor:
    """One stage of OFD: sum over C, H, W of the batch mean of the partial L2 distance between
    s and max(t, margin); `margin` broadcasts against t ([C] is taken per channel)."""
    s, t = _pair(s, t)
    margin = margin.to(t.dtype)
    if margin.dim() == 1:
        margin = margin.view(1, -1, *([1] * (t.dim() - 2)))
    target = torch.maximum(t, margin)
    keep = (s > target) | (target > 0)
    return ((s - target).square() * keep).mean(dim=0).sum()


def ofd_loss(students: list[Tensor], teachers: list[Tensor], margins: list[Tensor]) -> Tensor:
    """OFD over aligned stages: the teacher's features are average-pooled to the student's
    spatial size, stage i of n weighs 1 / 2^(n - 1 - i)."""
    n = len(students)
    total = 0.0
    for i, (s, t, m) in enumerate(zip(students, teachers, margins, strict=True)):
        t = F.adaptive_avg_pool2d(t.detach(), s.shape[-2:])
        total = total + ofd_partial_l2(s, t, m) / 2 ** (n - 1 - i)
    return total


def hcl_loss(students: list[Tensor], teachers: list[Tensor]) -> Tensor:
    """ReviewKD's hierarchical context loss, summed over the levels."""
    total = 0.0
    for s, t in zip(students, teachers, strict=True):
        s, t = _pair(s, t)
        loss, weight, norm = F.mse_loss(s, t), 1.0, 1.0
        for size in (4, 2, 1):
            if size >= s.shape[-2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size),
                                              F.adaptive_avg_pool2d(t, size))
            norm += weight
        total = total + loss / norm
    return total


def nce_loss(scores: Tensor, num_data: int) -> Tensor:
    """CRD's NCE loss of scores [B, K + 1] (positive first) with noise probability
    1/num_data."""
    scores = scores.to(torch.promote_types(scores.dtype, _MIN_DTYPE))
    noise = (scores.shape[1] - 1) / num_data  # K * Pn
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + NCE_EPS))
    log_d0 = torch.log(noise / (neg + noise + NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]
