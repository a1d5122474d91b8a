"""Heun's 2nd-order ODE sampler for global-time models (SPEC.md section 13, SiT's ``heun2``)."""

from __future__ import annotations

import torch

from pf.samplers.base import Sampler


class Heun(Sampler):
    """On the grid ``s_k = linspace(0, 1, K+1)``: ``d1 = v(x, s_k)``, ``x' = x + dt * d1``,
    ``d2 = v(x', s_{k+1})``, ``x += dt * (d1 + d2) / 2``; the last step too ends at ``t = 1``
    with a corrector call there, as SiT's fixed-grid ``heun2``. 2K NFE, both calls of step
    ``k`` guided as step ``k`` is (SPEC section 10)."""

    name = "heun"
    global_time = True

    def run(self, model, x, schedule, y, steps):
        s = schedule.tolist()
        for k in steps:
            self.at_step(k)
            dt = float(schedule[k + 1] - schedule[k])
            d1 = self.call(model, x, self._times(x, s[k]), y, with_logvar=False).v
            x_pred = x + dt * d1  # Euler predictor
            d2 = self.call(model, x_pred, self._times(x, s[k + 1]), y, with_logvar=False).v
            x = x + dt * 0.5 * (d1 + d2)
        return x

    def _times(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full((x.shape[0],), value, dtype=self.time_dtype(x), device=x.device)  # (B,)

    def expected_nfe(self, num_steps: int) -> int:
        return 2 * num_steps
