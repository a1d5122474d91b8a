"""The per-patch schedule sampler (SPEC.md section 12, docs/per_patch_schedules.md): every
patch walks its own column of a user-given table of times, starting from the interpolant
of noise and its clean value ``x_cond`` at its first time."""

from __future__ import annotations

import torch

from pf.flow import time_to_pixels
from pf.samplers.base import Sampler, check_x_cond, outer_schedule


def check_schedule(schedule, batch: int, num_patches: int) -> torch.Tensor:
    """The table as a host float32 (B or 1, K+1, N) tensor, or one line naming what is wrong:
    shape (K+1, N) or (B, K+1, N) with K >= 1, times in [0, 1], non-decreasing per patch."""
    s = torch.as_tensor(schedule).detach().to("cpu", torch.float32)
    if s.dim() == 2:
        s = s[None]
    if s.dim() != 3 or s.shape[1] < 2 or s.shape[2] != num_patches or s.shape[0] not in (1, batch):
        raise ValueError(f"a per-patch schedule is (K+1, N) or (B, K+1, N) with K >= 1, N = {num_patches} patches "
                         f"and B = {batch}; got shape {tuple(torch.as_tensor(schedule).shape)}")
    if not bool(((s >= 0) & (s <= 1)).all()):  # also false for NaN
        bad = s[~((s >= 0) & (s <= 1))][0].item()
        raise ValueError(f"schedule times must lie in [0, 1] (0 = noise, 1 = data); found {bad}")
    falls = s[:, 1:] < s[:, :-1]  # (B, K, N)
    if bool(falls.any()):
        b, k, n = (int(i) for i in falls.nonzero()[0])
        raise ValueError(f"a schedule must be non-decreasing per patch: patch {n} (sample {b}) goes from "
                         f"{s[b, k, n].item():g} at step {k} to {s[b, k + 1, n].item():g}")
    return s


class Scheduled(Sampler):
    """Sample with a per-patch schedule ``S``: ``sampler(model, x, S, x_cond=..., y=...)``.

    ``S`` (K+1, N) or (B, K+1, N): ``S[k, n]`` is patch n's time before step k (an int K
    means the uniform grid: every column ``linspace(0, 1, K+1)``, which is ``EulerPF``).
    If any ``S[0, n] > 0``, ``x_cond`` (a clean image like x) is required and each patch
    starts at ``S[0] * x_cond + (1 - S[0]) * noise``. Step k: one guided call at patch times
    ``S[k]`` gives ``v``; ``x += (S[k+1] - S[k]) * v`` per patch. K NFE. A patch whose column
    stays at 1 is ``x_cond`` exactly throughout. The guidance interval compares the step's
    earliest time, ``min_n S[k, n]`` over the batch, with ``[lo, hi]`` (the uniform grid's
    ``s_k``; kept patches at 1 do not change it)."""

    name = "scheduled"
    max_distinct_times = None  # set by the table: see distinct_times

    def __init__(self):
        super().__init__()
        self._table: torch.Tensor | None = None  # (B or 1, K+1, N) host float32

    def __call__(self, model, x, timesteps, *, x_cond=None, keep=None, **options):
        if keep is not None:
            raise ValueError("Scheduled takes kept patches through the schedule: give their columns all ones")
        self._x_cond_given = x_cond
        try:
            return super().__call__(model, x, timesteps, **options)
        finally:
            self._x_cond_given, self._table = None, None

    def schedule_of(self, timesteps, x, model) -> torch.Tensor:
        p = model.patch_size
        n = (x.shape[-2] // p) * (x.shape[-1] // p)
        if isinstance(timesteps, int):
            timesteps = outer_schedule(timesteps)[:, None].expand(-1, n)
        self._table = check_schedule(timesteps, x.shape[0], n)
        return self._table.amin(dim=(0, 2))  # (K+1,) the earliest time of each step

    def start(self, model, x, keep, x_cond):
        first = self._table[:, 0]  # (B or 1, N)
        if not bool((first > 0).any()):
            return x.clone()  # every patch starts from noise: x is the noise (x_cond not needed)
        if self._x_cond_given is None:
            raise ValueError("this schedule starts some patches above t = 0: give x_cond, the clean image they start from")
        x_cond = check_x_cond(self._x_cond_given, x)
        s0 = self._pixels(first, model, x)  # (B or 1, 1, H, W)
        return s0 * x_cond + (1 - s0) * x

    def _pixels(self, times: torch.Tensor, model, x: torch.Tensor) -> torch.Tensor:
        """(B or 1, N) times -> (B or 1, 1, H, W) on x's device and dtype."""
        return time_to_pixels(times.to(x.device, x.dtype), model.patch_size, x.shape[-2], x.shape[-1])

    def run(self, model, x, schedule, y, steps):
        # the table goes to the device once per call, not twice per step
        times = self._table.to(x.device, self.time_dtype(x))  # (B or 1, K+1, N)
        moves = (self._table[:, 1:] - self._table[:, :-1]).to(x.device, x.dtype)  # (B or 1, K, N): float32 dt
        b = x.shape[0]
        for k in steps:
            self.at_step(k)
            t = times[:, k].expand(b, -1).contiguous()  # (B, N)
            v = self.call(model, x, t, y, with_logvar=False).v
            x = x + self._pixels(moves[:, k], model, x) * v
        return x

    def distinct_times(self, timesteps=None, keep: bool = False) -> int | None:
        """The most distinct times in one row ``S[k]`` of the table (the last row is never a call)."""
        if timesteps is None or isinstance(timesteps, int):
            return 1
        s = torch.as_tensor(timesteps).detach().to("cpu", torch.float32)
        rows = s.reshape(-1, *s.shape[-2:])[:, :-1]  # (B, K, N)
        changes = (rows.sort(dim=-1).values.diff(dim=-1) != 0).sum(dim=-1)  # (B, K)
        return int(changes.max()) + 1

    def expected_nfe(self, num_steps: int) -> int:
        return num_steps
