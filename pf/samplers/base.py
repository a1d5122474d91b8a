"""What every sampler shares: the outer schedule, guided calls with an NFE count, the
difficulty map, and the call signature of SPEC.md section 8."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from pf.flow import patch_mean
from pf.guidance import Guided, guided_call


def outer_schedule(timesteps: int | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``s_k = linspace(0, 1, K+1)`` in float32 (on the host: branching on it needs no sync).

    ``timesteps`` is the number of outer steps K, or the times themselves (increasing).
    """
    if isinstance(timesteps, int):
        if timesteps < 1:
            raise ValueError(f"need at least one sampling step, got {timesteps}")
        return torch.linspace(0.0, 1.0, timesteps + 1, dtype=torch.float32)
    s = torch.as_tensor(timesteps, dtype=torch.float32).cpu()
    if s.dim() != 1 or s.numel() < 2 or not bool((s[1:] > s[:-1]).all()):
        raise ValueError("timesteps must be an int or an increasing 1-D sequence of at least two times")
    if not bool(((s >= 0) & (s <= 1)).all()):  # also false for NaN
        raise ValueError(f"timesteps must be finite times in [0, 1] (0 = noise, 1 = data), got {s.tolist()}")
    return s


def certain_patches(logvar: torch.Tensor, patch_size: int, p_frac: float) -> torch.Tensor:
    """Patches whose mean predicted variance is below the per-sample ``p_frac`` quantile.

    logvar (B, 1, H, W) -> (B, N) bool. The quantile is taken over pixel values (each patch
    counted p*p times), with linear interpolation in float64; the compare is strict.
    """
    u = patch_mean(torch.exp(logvar), patch_size).double()  # (B, N)
    return below_pixel_quantile(u, patch_size * patch_size, p_frac)


def below_pixel_quantile(scores: torch.Tensor, area: int, p_frac: float) -> torch.Tensor:
    """``scores < q`` per sample, ``q`` the ``p_frac`` quantile of the scores repeated ``area`` times.

    scores (B, N) -> (B, N) bool. Computed on the device with no host sync (CUDA-graph safe):
    as every patch value fills ``area`` consecutive places of the sorted pixels, pixel rank j
    is patch rank j // area, and the interpolation positions depend only on shapes. Same
    value as ``torch.quantile`` (same ``lerp``); a row holding NaN is not special-cased.
    """
    sorted_u = scores.sort(dim=1).values  # (B, N)
    pos = p_frac * (scores.shape[1] * area - 1)  # quantile position among the N*area pixels (host float)
    lo, hi = math.floor(pos), math.ceil(pos)
    below = sorted_u[:, lo // area : lo // area + 1]  # (B, 1) pixel value at rank lo
    above = sorted_u[:, hi // area : hi // area + 1]  # (B, 1) pixel value at rank hi
    threshold = torch.lerp(below, above, pos - lo)  # (B, 1)
    return scores < threshold


def guided_steps(schedule: torch.Tensor, cfg_scale: float, interval) -> list[bool]:
    """Which outer steps are guided: all when ``cfg_scale != 1`` and no interval; with
    ``interval = (lo, hi)`` those with ``lo <= s_k <= hi`` (float32 compare on the host
    schedule: no sync, the same decisions inside a CUDA graph)."""
    k_steps = len(schedule) - 1
    if interval is None:
        return [cfg_scale != 1.0] * k_steps
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be a pair (lo, hi), got {interval!r}") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"guidance_interval (lo, hi) needs 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    if cfg_scale == 1.0:
        return [False] * k_steps
    lo32, hi32 = torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)
    return [bool((lo32 <= schedule[k]) & (schedule[k] <= hi32)) for k in range(k_steps)]


SELECTIONS = ("uncertainty", "random", "most_uncertain")


class PatchSelection:
    """Which patches an adaptive sampler treats as certain (moves first).

    ``uncertainty`` (the method, SPEC section 6): the least uncertain ``p_frac``.
    ``random``: as many patches, chosen at random (i.i.d. scores from a generator seeded by
    ``seed`` at the start of every sampler call, so a run is reproducible).
    ``most_uncertain``: the *most* uncertain ones (a control). The ablations keep the count:
    the same pixel-quantile rule is applied to the rule's own scores.
    """

    def __init__(self, rule: str = "uncertainty", seed: int = 0):
        if rule not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {rule!r}")
        self.rule, self.seed = rule, int(seed)
        self._generator = None

    def reset(self, device: torch.device) -> None:
        if self.rule == "random":
            self._generator = torch.Generator(device).manual_seed(self.seed)

    def __call__(self, logvar: torch.Tensor, patch_size: int, p_frac: float) -> torch.Tensor:
        if self.rule == "uncertainty":
            return certain_patches(logvar, patch_size, p_frac)
        u = patch_mean(torch.exp(logvar), patch_size).double()  # (B, N)
        if self.rule == "random":
            u = torch.rand(u.shape, generator=self._generator, device=u.device, dtype=u.dtype)
        else:
            u = -u
        return below_pixel_quantile(u, patch_size * patch_size, p_frac)


def check_fraction(p: float) -> float:
    """The fraction of certain patches of the adaptive samplers, in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p (the fraction of certain patches) must lie in (0, 1), got {p}")
    return float(p)


class Sampler:
    """Base class. Subclasses implement ``run(model, x, schedule, y)``; calls go through ``call``."""

    name = "sampler"
    needs_uncertainty = False
    # The most distinct patch times a sample has in one model call (None: not per patch).
    # ``model.sync_free(distinct_times=...)`` takes it for graph capture and compile.
    max_distinct_times: int | None = None

    def __init__(self):
        self.nfe = 0  # model calls in the last run
        self.guided_nfe = 0  # of which guided (a doubled batch)
        self._cfg_scale = 1.0
        self._step_scale = 1.0
        self._guided_steps: list[bool] = []
        self._uc_cond = None

    def __call__(self, model, x: torch.Tensor, timesteps, *, y: torch.Tensor | None = None,
                 cfg_scale: float = 1.0, uc_cond=None, guidance_interval=None,
                 progress: bool = False) -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor of noise, got {getattr(x, 'shape', type(x))}")
        if y is None and getattr(model, "cond_kind", "class") == "text":
            raise ValueError("a text-to-image model needs y: the prompts' encoding (a pf.conditioning.TextCond)")
        if y is None:
            if cfg_scale != 1.0:
                raise ValueError("classifier-free guidance (cfg_scale != 1) needs class labels y")
            y = torch.full((x.shape[0],), model.num_classes, dtype=torch.long, device=x.device)
        if self.needs_uncertainty and not getattr(model, "predict_uncertainty", False):
            raise ValueError(f"{type(self).__name__} needs a model with a difficulty head (predict_uncertainty=True)")
        schedule = outer_schedule(timesteps)
        self.nfe, self.guided_nfe, self._cfg_scale, self._uc_cond = 0, 0, float(cfg_scale), uc_cond
        self._guided_steps = guided_steps(schedule, float(cfg_scale), guidance_interval)
        steps = range(len(schedule) - 1)
        if progress:
            steps = tqdm(steps, desc=type(self).__name__, leave=False)
        with torch.no_grad():
            return self.run(model, x.clone(), schedule, y, steps)

    def run(self, model, x, schedule, y, steps) -> torch.Tensor:
        raise NotImplementedError

    def at_step(self, k: int) -> None:
        """Start outer step ``k``: its model calls are guided or not (SPEC section 10)."""
        self._step_scale = self._cfg_scale if self._guided_steps[k] else 1.0

    def call(self, model, x: torch.Tensor, t: torch.Tensor, y, with_logvar: bool) -> Guided:
        """One guided model evaluation (one NFE, whatever the guidance doubles)."""
        self.nfe += 1
        self.guided_nfe += self._step_scale != 1.0
        return guided_call(model, x, t, y, self._step_scale, self._uc_cond, with_logvar=with_logvar)

    def expected_nfe(self, num_steps: int) -> int:
        """Model calls for ``num_steps`` outer steps on the default schedule."""
        raise NotImplementedError

    @staticmethod
    def time_dtype(x: torch.Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def patch_times(self, model, x: torch.Tensor, value: float) -> torch.Tensor:
        """Every patch at ``value``: (B, N)."""
        p = model.patch_size
        n = (x.shape[-2] // p) * (x.shape[-1] // p)
        return torch.full((x.shape[0], n), value, dtype=self.time_dtype(x), device=x.device)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_") and k != "nfe")
        return f"{type(self).__name__}({params})"
