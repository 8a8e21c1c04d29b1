"""Feature losses (rld.distillers.feature_losses) against values written from their definitions: hand-
computed numbers and direct float64 numpy formulas, independent of the implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rld.distillers.feature_losses import (
    fitnet_loss,
    hcl_loss,
    nce_loss,
    ofd_loss,
    ofd_margins,
    ofd_partial_l2,
)


def _t(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float32)


def _pool(a: np.ndarray, size: int) -> np.ndarray:
    """Average pool [B, C, H, W] to size x size (H divisible by size)."""
    b, c, h, w = a.shape
    return a.reshape(b, c, size, h // size, size, w // size).mean(axis=(3, 5))


# --------------------------------------------------------------------------- FitNet
def test_fitnet_loss_is_the_mean_squared_error():
    s = [[[[1.0, 2.0], [3.0, 4.0]]]]
    t = [[[[1.0, 0.0], [0.0, 4.0]]]]
    assert fitnet_loss(_t(s), _t(t)).item() == pytest.approx((0 + 4 + 9 + 0) / 4)


# --------------------------------------------------------------------------- OFD
def _negative_part_mean(mean: float, std: float) -> float:
    """E[x | x < 0] for x ~ N(mean, std^2) by numerical integration of the density."""
    x = np.linspace(mean - 40 * std, 0.0, 400001)
    p = np.exp(-0.5 * ((x - mean) / std) ** 2)
    return float(np.trapezoid(x * p, x) / np.trapezoid(p, x))


def test_ofd_margins_are_the_expectation_of_the_negative_part():
    gamma = [1.0, 2.0, 0.5, -1.5, 0.7]
    beta = [0.0, 1.0, -1.0, 0.3, 2.0]
    got = ofd_margins(_t(gamma), _t(beta))
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert got[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)  # half-normal
    for i, (g, b) in enumerate(zip(gamma, beta)):  # |gamma| is the std
        assert got[i].item() == pytest.approx(_negative_part_mean(b, abs(g)), rel=1e-5)


def test_ofd_margin_is_minus_three_std_when_negatives_are_rare():
    # P(x < 0) = Phi(-beta / gamma): Phi(-10) ~ 7.6e-24 and Phi(-3.2) ~ 6.9e-4 are <= 1e-3;
    # Phi(-3.0) ~ 1.35e-3 is not
    got = ofd_margins(_t([0.1, 0.5, 0.5]), _t([1.0, 1.6, 1.5]))
    assert got[0].item() == pytest.approx(-0.3)
    assert got[1].item() == pytest.approx(-1.5)
    assert got[2].item() == pytest.approx(_negative_part_mean(1.5, 0.5), rel=1e-5)


def test_ofd_partial_l2_by_hand():
    # one channel with margin -1: sigma = max(t, -1); no loss where s <= sigma <= 0
    s = [[[[-2.0, 0.0, -0.5]]], [[[0.3, -1.0, 3.0]]]]
    t = [[[[-3.0, -3.0, -0.2]]], [[[-0.2, 2.0, 2.0]]]]
    # per element: 0 (s < sigma=-1), 1 (0 - -1)^2, 0 (s < t <= 0); 0.25, 9 (t > 0), 1 (t > 0)
    # batch mean per position (0.125, 5, 0.5), summed over C, H, W
    got = ofd_partial_l2(_t(s), _t(t), _t([-1.0]))
    assert got.item() == pytest.approx(5.625)


def _partial_l2_reference(s, t, m):
    """OFD's loss in its three-case form (mdistiller feat_loss), float64."""
    loss = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
            + (s - t) ** 2 * (t > 0))
    return loss.mean(axis=0).sum()


def test_ofd_loss_pools_the_teacher_and_weighs_the_stages():
    rng = np.random.default_rng(0)
    s = [rng.normal(size=(3, 4, 4, 4)), rng.normal(size=(3, 2, 2, 2))]
    t = [rng.normal(size=(3, 4, 8, 8)), rng.normal(size=(3, 2, 2, 2))]
    m = [-np.abs(rng.normal(size=4)), -np.abs(rng.normal(size=2))]
    want = sum(_partial_l2_reference(si, _pool(ti, si.shape[-1]), mi[None, :, None, None]) * w
               for si, ti, mi, w in zip(s, t, m, (0.5, 1.0)))
    got = ofd_loss([_t(a) for a in s], [_t(a) for a in t], [_t(a) for a in m])
    assert got.item() == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- ReviewKD
def _hcl_reference(s, t):
    total = 0.0
    for a, b in zip(s, t):
        h = a.shape[2]
        loss, norm, w = ((a - b) ** 2).mean(), 1.0, 1.0
        for size in (4, 2, 1):
            if size < h:
                w /= 2
                loss += w * ((_pool(a, size) - _pool(b, size)) ** 2).mean()
                norm += w
        total += loss / norm
    return total


def test_hcl_pyramid_against_a_direct_formula():
    rng = np.random.default_rng(1)
    shapes = [(2, 3, 8, 8), (2, 3, 4, 4), (2, 5, 1, 1)]
    s = [rng.normal(size=sh) for sh in shapes]
    t = [rng.normal(size=sh) for sh in shapes]
    got = hcl_loss([_t(a) for a in s], [_t(a) for a in t])
    assert got.item() == pytest.approx(_hcl_reference(s, t), rel=1e-5)


def test_hcl_levels_are_normalised_by_their_weights():
    # s - t = 0.5 everywhere: every pooled mse is 0.25, so every level gives exactly 0.25
    # (8x8: (1 + 1/2 + 1/4 + 1/8) * 0.25 / 1.875; 4x4: (1 + 1/2 + 1/4) * 0.25 / 1.75)
    t = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 1, 1)]
    assert hcl_loss([a + 0.5 for a in t], t).item() == pytest.approx(3 * 0.25)
    # an error only in the spatial mean of an 8x8 map: every pooled level sees it
    t8 = torch.zeros(1, 1, 8, 8)
    assert hcl_loss([t8 + 1.0], [t8]).item() == pytest.approx(1.0)
    pattern = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4).view(1, 1, 8, 8)
    # a zero-mean 2x2 checkerboard: pooled levels see nothing -> 1 / 1.875
    assert hcl_loss([pattern], [t8]).item() == pytest.approx(1 / 1.875)


# --------------------------------------------------------------------------- CRD
def test_nce_loss_by_hand():
    # B = 1, K = 1, N = 2: noise K/N = 1/2; P = (1, 1):
    # -(log(1 / 1.5) + log(0.5 / 1.5)) = log(4.5)   (eps 1e-7 is below the tolerance)
    assert nce_loss(_t([[1.0, 1.0]]), num_data=2).item() == pytest.approx(math.log(4.5))


def test_nce_loss_against_a_direct_formula():
    rng = np.random.default_rng(2)
    p = rng.uniform(1e-4, 2.0, size=(4, 9))
    n = 50
    noise = 8 / n
    want = -(np.log(p[:, 0] / (p[:, 0] + noise + 1e-7)).sum()
             + np.log(noise / (p[:, 1:] + noise + 1e-7)).sum()) / 4
    assert nce_loss(_t(p), n).item() == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------- all
@pytest.mark.parametrize("name", ["fitnet", "ofd", "hcl", "nce"])
def test_losses_compute_in_float32_and_never_reach_the_teacher(name):
    s = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = {"fitnet": lambda: fitnet_loss(s, t),
            "ofd": lambda: ofd_loss([s], [t], [torch.full((3,), -0.5)]),
            "hcl": lambda: hcl_loss([s], [t]),
            "nce": lambda: nce_loss(s.flatten(1).exp(), 100)}[name]()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
