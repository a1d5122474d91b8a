"""Dual-loop sampler: certain patches take the full outer step, uncertain ones n_inner
small steps (SPEC.md section 6)."""

from __future__ import annotations

import torch

import pf_kernels
from pf.samplers.base import PatchSelection, Sampler, check_fraction


class DualLoop(Sampler):
    """At ``s_k`` one guided call gives ``v`` and the difficulty map. Patches below the
    ``p``-quantile of predicted variance take ``dt``; the rest take ``dt/n_inner``, then
    ``n_inner - 1`` more calls (per-patch times: certain at ``s_{k+1}``, uncertain at their
    running time) each move only the uncertain patches by ``dt/n_inner``.
    ``n_inner`` NFE per outer step; every patch reaches ``s_{k+1}``. Kept patches (``keep``)
    stay at t = 1 and the quantile orders the generated ones only."""

    name = "dual_loop"
    supports_keep = True
    max_distinct_times = 2  # certain patches at one time, uncertain at another
    needs_uncertainty = True

    def __init__(self, p: float = 0.4, n_inner: int = 4, selection: str = "uncertainty", selection_seed: int = 0):
        super().__init__()
        if int(n_inner) != n_inner or n_inner < 1:
            raise ValueError(f"n_inner must be a positive integer, got {n_inner}")
        self.p, self.n_inner = check_fraction(p), int(n_inner)
        self.selection = selection
        self._select = PatchSelection(selection, selection_seed)

    def run(self, model, x, schedule, y, steps):
        s = schedule.tolist()
        ps = model.patch_size
        self._select.reset(x.device)
        for k in steps:
            self.at_step(k)
            dt = float(schedule[k + 1] - schedule[k])
            h = dt / self.n_inner
            t = self.patch_times(model, x, s[k])  # (B, N)
            g = self.call(model, x, t, y, with_logvar=True)
            certain = self._select(g.logvar, ps, self.p, self._keep)  # (B, N) bool, of the generated patches
            step = torch.full(t.shape, h, dtype=x.dtype, device=x.device).masked_fill(certain, dt)  # (B, N)
            t = torch.where(certain, s[k + 1], t + h)
            if self._keep is not None:  # kept patches count as certain, stay at t = 1 and never move
                certain = certain | self._keep
                step, t = step.masked_fill(self._keep, 0.0), t.masked_fill(self._keep, 1.0)
            x = pf_kernels.patch_euler(x, g.v, step, ps)
            uncertain = ~certain
            small = torch.full(t.shape, h, dtype=x.dtype, device=x.device)
            for _ in range(self.n_inner - 1):
                g = self.call(model, x, t, y, with_logvar=False)
                x = pf_kernels.patch_euler(x, g.v, small, ps, mask=uncertain)
                t = torch.where(certain, t, t + h)
        return x

    def expected_nfe(self, num_steps: int) -> int:
        return num_steps * self.n_inner
