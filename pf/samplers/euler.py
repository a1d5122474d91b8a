"""Plain Euler samplers: ``euler`` for global-time models (inpainting by replacement),
``euler_pf`` for PF models (inpainting with kept patches at t = 1)."""

from __future__ import annotations

import torch

from pf.samplers.base import Sampler


class Euler(Sampler):
    """``x += dt * v(x, s_k)`` with one time per sample, ``t`` of shape (B,). K NFE.

    With ``keep`` and ``x_cond`` (inpainting a global-time model: replacement, RePaint without
    resampling, SPEC section 12): before each call the kept region is set to
    ``s_k * x_cond + (1 - s_k) * eps_k``, fresh noise from a generator seeded by
    ``replacement_seed`` at the start of every call; after the last step it is ``x_cond``."""

    name = "euler"
    supports_keep = True
    global_time = True

    def __init__(self, replacement_seed: int = 0):
        super().__init__()
        self.replacement_seed = int(replacement_seed)

    def run(self, model, x, schedule, y, steps):
        s = schedule.tolist()
        noise = None if self._keep is None else torch.Generator(x.device).manual_seed(self.replacement_seed)
        for k in steps:
            self.at_step(k)
            if noise is not None:
                eps = torch.randn(x.shape, generator=noise, device=x.device, dtype=x.dtype)
                x = torch.where(self._keep_px, s[k] * self._x_cond + (1 - s[k]) * eps, x)
            t = torch.full((x.shape[0],), s[k], dtype=self.time_dtype(x), device=x.device)  # (B,)
            v = self.call(model, x, t, y, with_logvar=False).v
            x = x + float(schedule[k + 1] - schedule[k]) * v
        return x if noise is None else torch.where(self._keep_px, self._x_cond, x)

    def expected_nfe(self, num_steps: int) -> int:
        return num_steps


class EulerPF(Sampler):
    """Every patch at ``s_k`` (t of shape (B, N)); ``x += dt * v``. K NFE."""

    name = "euler_pf"
    supports_keep = True
    max_distinct_times = 1

    def run(self, model, x, schedule, y, steps):
        s = schedule.tolist()
        for k in steps:
            self.at_step(k)
            v = self.call(model, x, self.patch_times(model, x, s[k]), y, with_logvar=False).v
            x = self.euler_step(x, v, float(schedule[k + 1] - schedule[k]))
        return x

    def expected_nfe(self, num_steps: int) -> int:
        return num_steps
