"""Interpolant and velocity target (pf.flow) and losses (pf.training.objective) of SPEC sections 1 and 3."""

import math

import torch

from model_helpers import tiny_global_model, tiny_model
from pf import flow
from pf.training import objective


def test_interpolant_applies_each_patch_time_to_its_pixels():
    x1 = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    x0 = torch.randn_like(x1)
    t = torch.rand(2, 6, dtype=torch.float64)  # 2x3 grid of 2x2 patches
    xt, u = flow.interpolate(x1, x0, t, 2)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                ti = t[b, i * 3 + j]
                sl = (b, slice(None), slice(2 * i, 2 * i + 2), slice(2 * j, 2 * j + 2))
                torch.testing.assert_close(xt[sl], ti * x1[sl] + (1 - ti) * x0[sl])
    torch.testing.assert_close(u, x1 - x0)


def test_training_loss_formula():
    model = tiny_model()
    x1 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    x0 = torch.randn_like(x1)
    t = torch.rand(2, 16, dtype=torch.float64)
    y = torch.tensor([1, 2])
    out = objective.training_loss(model, x1, y, t, x0)
    xt, u = flow.interpolate(x1, x0, t, 2)
    v, lv = model(xt, t, y, return_uncertainty=True)
    lv = lv.clamp(-30, 20)
    nll = 0.5 * (math.log(2 * math.pi) + lv + (u - v) ** 2 / lv.exp())
    torch.testing.assert_close(out["mse"].double(), ((v - u) ** 2).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out["loss"].double(), ((v - u) ** 2).mean() + 0.01 * nll.mean(), rtol=1e-6, atol=0)


def test_nll_does_not_train_the_velocity_and_clamps_logvar():
    x1 = torch.randn(2, 3, 8, 8)
    xt, u = flow.interpolate(x1, torch.randn_like(x1), torch.rand(2, 16), 2)
    v = torch.randn_like(u, requires_grad=True)
    lv = torch.full((2, 1, 8, 8), 50.0, requires_grad=True)
    objective.gaussian_nll(u, v, lv).mean().backward()
    assert v.grad is None or v.grad.abs().max() == 0  # stop-gradient on v
    assert lv.grad.abs().max() == 0  # clamped at 20: no gradient beyond the clamp


def test_global_model_loss_and_validation_segments():
    model = tiny_global_model(dtype=torch.float32)
    x1 = torch.randn(4, 3, 8, 8)
    out = objective.training_loss(model, x1, torch.tensor([0, 1, 2, 3]), torch.rand(4))
    assert out["nll"] == 0 and torch.isfinite(out["loss"])
    val = objective.validation_loss(model, x1, torch.tensor([0, 1, 2, 3]), torch.randn_like(x1))
    assert len(val["segments"]) == 8
    assert abs(val["val_loss"] - sum(val["segments"]) / 8) < 1e-9
    # segment k is the MSE at t = (k + 0.5) / 8
    x0 = torch.randn_like(x1)
    val = objective.validation_loss(model, x1, torch.tensor([0, 1, 2, 3]), x0)
    t = torch.full((4,), 2.5 / 8)
    xt, u = flow.interpolate(x1, x0, t, 2)
    assert abs(val["segments"][2] - ((model(xt, t, torch.tensor([0, 1, 2, 3])) - u) ** 2).mean().item()) < 1e-6
