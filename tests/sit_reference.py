"""An independent float64 implementation of SPEC.md section 13 (SiT's Heun and SDE samplers,
with the guidance of sections 5 and 10), for the tests, and an analytic flow to sample.

Written from the SPEC text with plain arithmetic over a velocity function
``velocity(x, t, labels)`` (t a Python float): it shares no code with ``pf``. The
Gaussian-mixture flow gives the exact velocity and marginal of a 2-D target, so a sampler
can be checked against the true distribution.
"""

from __future__ import annotations

import math

import numpy as np
import torch

f64 = torch.float64


class RefSiT:
    """Heun and SDE of SPEC section 13 on ``velocity``, guided as sections 5 and 10 say."""

    def __init__(self, velocity, y, cfg_scale=1.0, interval=None, null_class=None):
        self.velocity, self.y, self.scale, self.interval = velocity, y, cfg_scale, interval
        self.null = None if null_class is None else torch.full_like(y, null_class)
        self.nfe = 0

    def _scale_at(self, t_start):
        """Section 10: the step starting at ``t_start`` is guided when lo <= t <= hi (float32)."""
        if self.interval is None:
            return self.scale
        t32 = np.float32(t_start)
        lo, hi = np.float32(self.interval[0]), np.float32(self.interval[1])
        return self.scale if lo <= t32 <= hi else 1.0

    def v(self, x, t, s):
        self.nfe += 1
        if s == 1.0:
            return self.velocity(x, t, self.y)
        vu, vc = self.velocity(x, t, self.null), self.velocity(x, t, self.y)
        return vu + s * (vc - vu)

    def heun(self, x, k_steps):
        s32 = np.linspace(0, 1, k_steps + 1, dtype=np.float32)  # the float32 outer schedule
        x = x.to(f64)
        for k in range(k_steps):
            g = self._scale_at(s32[k])
            dt = float(s32[k + 1] - s32[k])
            d1 = self.v(x, float(s32[k]), g)
            d2 = self.v(x + dt * d1, float(s32[k + 1]), g)
            x = x + dt * (d1 + d2) / 2
        return x

    def sde(self, x, m, gen, form="sigma", norm=1.0, last_step_size=0.04, sample_eps=1e-3):
        t0 = sample_eps if form == "sbdm" else 0.0
        t = np.linspace(t0, 1.0 - last_step_size, m)  # float64
        x = x.to(f64)

        def w_of(ti):
            return norm * (1 - ti) if form == "sigma" else norm * (1 - ti) / ti

        for i in range(m):
            ti = float(t[i])
            v = self.v(x, ti, self._scale_at(ti))
            f = v + w_of(ti) * (ti * v - x) / (1 - ti)
            if i < m - 1:
                dt = float(t[i + 1] - t[i])
                xi = torch.randn(x.shape, generator=gen, dtype=f64)
                x = x + f * dt + math.sqrt(2 * w_of(ti)) * math.sqrt(dt) * xi
            else:
                x = x + f * last_step_size
        return x


class GaussianMixtureFlow(torch.nn.Module):
    """The exact velocity of the linear path to a 2-D isotropic Gaussian mixture, as a "model".

    Data ``x1 ~ sum_k pi_k N(mu_k, sd_k^2 I)``, noise ``x0 ~ N(0, I)``, ``x_t = t x1 + (1-t) x0``.
    Per component ``x_t ~ N(t mu_k, var_k I)``, ``var_k = t^2 sd_k^2 + (1-t)^2``, and
    ``E[x1 - x0 | x_t = x, k] = mu_k + (t sd_k^2 - (1 - t)) / var_k * (x - t mu_k)``; the
    velocity weighs these by the posterior of k. Called as ``model(x, t, y)`` with x (B, 2, 1, 1).
    """

    num_classes = 1
    per_token = False

    def __init__(self, weights, means, sds):
        super().__init__()
        self.pi = torch.tensor(weights, dtype=f64)  # (K,)
        self.mu = torch.tensor(means, dtype=f64)  # (K, 2)
        self.sd = torch.tensor(sds, dtype=f64)  # (K,)

    def forward(self, x, t, y=None, return_uncertainty=False):
        z = x.reshape(x.shape[0], 2).to(f64)  # (B, 2)
        tt = t.to(f64).reshape(-1, 1)  # (B, 1)
        var = tt**2 * self.sd**2 + (1 - tt) ** 2  # (B, K)
        diff = z[:, None, :] - tt[:, :, None] * self.mu  # (B, K, 2)
        logp = torch.log(self.pi) - diff.pow(2).sum(-1) / (2 * var) - torch.log(var)  # 2-D: log of var^(d/2)
        r = torch.softmax(logp, dim=1)  # (B, K) posterior of the component
        vk = self.mu + ((tt * self.sd**2 - (1 - tt)) / var)[..., None] * diff  # (B, K, 2)
        v = (r[..., None] * vk).sum(1)
        return v.reshape(x.shape).to(x.dtype)

    def sample_data(self, n, gen):
        k = torch.multinomial(self.pi, n, replacement=True, generator=gen)
        return self.mu[k] + self.sd[k, None] * torch.randn(n, 2, generator=gen, dtype=f64)

    def log_density(self, z):
        """log p_1(z) of the target, z (B, 2)."""
        diff = z[:, None, :] - self.mu  # (B, K, 2)
        var = self.sd**2
        logp = torch.log(self.pi) - diff.pow(2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var)
        return torch.logsumexp(logp, dim=1)
