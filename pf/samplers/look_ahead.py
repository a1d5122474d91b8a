"""Look-ahead sampler: certain patches are moved ahead to ``s_k * ratio`` as context for
the uncertain ones (SPEC.md section 6)."""

from __future__ import annotations

import math

import torch

import pf_kernels
from pf.samplers.base import PatchSelection, Sampler, check_fraction

WARMUP_TIME = 0.05  # at or below this time every patch takes a plain (conditional) Euler step


class LookAhead(Sampler):
    """At ``s_k`` one guided call gives ``v``, ``v_c`` and the difficulty map. While
    ``s_k <= 0.05``: ``x += dt * v_c``. Otherwise certain patches jump to
    ``t_ctx = min(s_k * ratio, 1)`` along ``v_c``; a second guided call on that context
    gives ``v_ctx``; ``x += dt * (v on certain, v_ctx on uncertain)``. 2 NFE per step.
    Kept patches (``keep``) stay at t = 1 as context and never move; the quantile orders the
    generated ones only."""

    name = "look_ahead"
    supports_keep = True
    max_distinct_times = 2  # certain patches at one time, uncertain at another
    needs_uncertainty = True

    def __init__(self, p: float = 0.4, context_t_ratio: float = 1.4, selection: str = "uncertainty",
                 selection_seed: int = 0):
        super().__init__()
        if not 1.0 <= context_t_ratio < math.inf:
            raise ValueError(f"context_t_ratio must be a finite number >= 1, got {context_t_ratio}")
        self.p, self.context_t_ratio = check_fraction(p), float(context_t_ratio)
        self.selection = selection
        self._select = PatchSelection(selection, selection_seed)

    def _warmup(self, s_k: torch.Tensor) -> bool:
        return bool(s_k <= torch.tensor(WARMUP_TIME, dtype=torch.float32))  # host tensors: no sync

    def run(self, model, x, schedule, y, steps):
        s = schedule.tolist()
        ps = model.patch_size
        self._select.reset(x.device)
        for k in steps:
            self.at_step(k)
            dt = float(schedule[k + 1] - schedule[k])
            t = self.patch_times(model, x, s[k])  # (B, N)
            g = self.call(model, x, t, y, with_logvar=True)
            if self._warmup(schedule[k]):
                x = self.euler_step(x, g.v_cond, dt)
                continue
            d = min(s[k] * self.context_t_ratio, 1.0) - s[k]
            certain = self._select(g.logvar, ps, self.p, self._keep)  # (B, N) bool, never a kept patch
            x_ctx = pf_kernels.patch_euler(x, g.v_cond, torch.full_like(t, d, dtype=x.dtype), ps, mask=certain)
            t_ctx = torch.where(certain, t + d, t)
            v_ctx = self.call(model, x_ctx, t_ctx, y, with_logvar=False).v
            x = pf_kernels.patch_euler(x, g.v, self.patch_steps(t, x, dt), ps, v_other=v_ctx, mask=certain)
        return x

    def expected_nfe(self, num_steps: int) -> int:
        schedule = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float32)
        return sum(1 if self._warmup(schedule[k]) else 2 for k in range(num_steps))
