"""Plain Euler samplers: ``euler`` for global-time models, ``euler_pf`` for PF models."""

from __future__ import annotations

import torch

from pf.samplers.base import Sampler


class Euler(Sampler):
    """``x += dt * v(x, s_k)`` with one time per sample, ``t`` of shape (B,). K NFE."""

    name = "euler"

    def run(self, model, x, schedule, y, steps):
        s = schedule.tolist()
        for k in steps:
            self.at_step(k)
            t = torch.full((x.shape[0],), s[k], dtype=self.time_dtype(x), device=x.device)  # (B,)
            v = self.call(model, x, t, y, with_logvar=False).v
            x = x + float(schedule[k + 1] - schedule[k]) * v
        return x

    def expected_nfe(self, num_steps: int) -> int:
        return num_steps


class EulerPF(Sampler):
    """Every patch at ``s_k`` (t of shape (B, N)); ``x += dt * v``. K NFE."""

    name = "euler_pf"
    max_distinct_times = 1

    def run(self, model, x, schedule, y, steps):
        s = schedule.tolist()
        for k in steps:
            self.at_step(k)
            v = self.call(model, x, self.patch_times(model, x, s[k]), y, with_logvar=False).v
            x = x + float(schedule[k + 1] - schedule[k]) * v
        return x

    def expected_nfe(self, num_steps: int) -> int:
        return num_steps
