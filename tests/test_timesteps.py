"""Timestep samplers of SPEC section 4: shapes, ranges and distributions."""

import math

import numpy as np
import pytest
import torch

import spec_reference as ref
from pf import timesteps
from pf.timesteps import SAMPLERS


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_shape_and_range(name):
    t = timesteps.make(name)(64, 37, generator=torch.Generator().manual_seed(0))
    assert t.shape == (64, 37) and t.dtype == torch.float32
    assert (t >= 0).all() and (t <= 1).all()


def test_ltg_matches_independent_reference_distribution():
    t = timesteps.make("ltg")(20000, 16, generator=torch.Generator().manual_seed(0))
    t_ref, tbar_ref, resampled = ref.ltg(4000, 16, torch.Generator().manual_seed(1))
    for stat in (lambda v: v.max(1).values, lambda v: v.mean(1), lambda v: v.std(1)):
        assert _ks(stat(t).numpy(), stat(t_ref).numpy()) < 0.04
    # the row maximum never exceeds tbar, whose law is logit-normal(0.7, 1)
    logit = torch.logit(t.max(1).values.double().clamp(1e-9, 1 - 1e-9))
    assert logit.mean().item() < 0.7 + 0.05  # max <= tbar, and close to it
    assert 0.035 < resampled.double().mean().item() < 0.055  # about 4.5% resampled


def test_ltg_every_patch_below_its_tbar():
    g = torch.Generator().manual_seed(3)
    n0, n, u = torch.randn(500, generator=g), torch.randn(500, 64, generator=g), torch.rand(500, 64, generator=g)
    t = timesteps.ltg_from_noise(n0, n, u, 0.7, 1.0, 0.6)
    tbar = torch.sigmoid(0.7 + n0)[:, None]
    assert (t <= tbar + 1e-7).all() and (t >= 0).all()
    resampled = (tbar - n.abs() * torch.clamp(tbar / 2, max=0.6)) < 0
    torch.testing.assert_close(t[resampled], (u * tbar)[resampled])


def test_global_samplers_share_one_time_per_sample():
    for name in ("uniform", "logit_normal"):
        t = timesteps.make(name)(8, 10)
        assert (t == t[:, :1]).all()
    t = timesteps.make("independent")(8, 10)
    assert (t != t[:, :1]).any()


def test_srm_controls_the_mean():
    t = timesteps.make("srm")(4000, 16, generator=torch.Generator().manual_seed(0))
    means = t.mean(1).numpy()
    assert _ks(means, np.random.default_rng(0).uniform(size=4000)) < 0.05  # mean ~ U(0, 1)
    assert (t.std(1) > 0).float().mean() > 0.9


def test_gaussian_stays_near_its_mean():
    t = timesteps.make("gaussian", std=0.2)(2000, 256, generator=torch.Generator().manual_seed(0))
    spread = t.std(1)
    assert spread.max().item() < 0.2 * 1.25  # sd <= std = 0.2 (max over 2000 rows of 256 draws)
    assert 0.05 < spread.mean().item() < 0.2


@pytest.mark.parametrize("name,params,err", [
    ("lgt", {}, ValueError), ("ltg", {"std": 0.0}, ValueError), ("ltg", {"loc": math.inf}, ValueError),
    ("ltg", {"sharpness": 2}, TypeError),
])
def test_bad_timestep_sampler_arguments(name, params, err):
    with pytest.raises(err):
        timesteps.make(name, **params)
    with pytest.raises(ValueError):
        timesteps.make("uniform")(-1, 4)


def _ltg_marginal_cdf(x: np.ndarray, loc=0.7, scale=1.0, std=0.6) -> np.ndarray:
    """P(t <= x) of one patch of LTG, from SPEC section 4's definition, in float64: averaged
    over tbar = sigmoid(loc + scale z) (z on a fine grid, normal weights); given tbar, with
    sd = min(tbar/2, std) and p = P(tbar - |n| sd < 0) = 2(1 - Phi(tbar/sd)):
    P(t <= x | tbar) = 2(1 - Phi((tbar - x)/sd)) - p + p x / tbar for x < tbar, else 1."""
    from scipy.stats import norm
    z = np.linspace(-8, 8, 8001)
    w = norm.pdf(z)
    w /= w.sum()
    tbar = 1 / (1 + np.exp(-(loc + scale * z)))[:, None]  # (Z, 1)
    sd = np.minimum(tbar / 2, std)
    p = 2 * (1 - norm.cdf(tbar / sd))
    xs = x[None, :]
    below = 2 * (1 - norm.cdf((tbar - xs) / sd)) - p + p * xs / tbar
    return (w[:, None] * np.where(xs < tbar, below, 1.0)).sum(0)


@pytest.mark.parametrize("loc", [0.7, 2.0863])
def test_ltg_marginal_draws_one_time_from_ltgs_per_patch_law(loc):
    pytest.importorskip("scipy")
    t = timesteps.make("ltg_marginal", loc=loc)(100_000, 5, generator=torch.Generator().manual_seed(0))
    assert (t == t[:, :1]).all()  # one time per sample, shared by its patches
    one = np.sort(t[:, 0].double().numpy())
    grid = np.linspace(0.01, 0.99, 99)
    empirical = np.searchsorted(one, grid, side="right") / len(one)
    assert np.abs(empirical - _ltg_marginal_cdf(grid, loc=loc)).max() < 0.006
    # the same law as the patches of LTG itself (its compiled sampler, pooled over patches)
    patches = timesteps.make("ltg", loc=loc, seed=5)(4000, 16).flatten().numpy()
    assert _ks(one[::10], patches) < 0.03
