"""What every sampler shares: the outer schedule, guided calls with an NFE count, the
difficulty map, the call signature of SPEC.md section 8, and kept patches (``keep``,
``x_cond``: inpainting, docs/per_patch_schedules.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from pf.flow import patch_mean, time_to_pixels
from pf.guidance import Guided, guided_call


def outer_schedule(timesteps: int | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``s_k = linspace(0, 1, K+1)`` in float32 (on the host: branching on it needs no sync).

    ``timesteps`` is the number of outer steps K, or the times themselves (increasing).
    """
    if isinstance(timesteps, bool):  # True is an int to Python, not a step count
        raise ValueError(f"timesteps must be a number of steps or a sequence of times, got {timesteps!r}")
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


def certain_patches(logvar: torch.Tensor, patch_size: int, p_frac: float,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """Patches whose mean predicted variance is below the per-sample ``p_frac`` quantile.

    logvar (B, 1, H, W) -> (B, N) bool. The quantile is taken over pixel values (each patch
    counted p*p times), with linear interpolation in float64; the compare is strict.
    ``keep`` (B, N) bool: kept patches (inpainting) take no part in the quantile and are
    never certain: the rule orders the generated patches only.
    """
    u = patch_mean(torch.exp(logvar), patch_size).double()  # (B, N)
    return below_pixel_quantile(u, patch_size * patch_size, p_frac, keep)


def below_pixel_quantile(scores: torch.Tensor, area: int, p_frac: float,
                         keep: torch.Tensor | None = None) -> torch.Tensor:
    """``scores < q`` per sample, ``q`` the ``p_frac`` quantile of the scores repeated ``area`` times.

    scores (B, N) -> (B, N) bool. Computed on the device with no host sync (CUDA-graph safe):
    as every patch value fills ``area`` consecutive places of the sorted pixels, pixel rank j
    is patch rank j // area, and the interpolation positions depend only on shapes. Same
    value as ``torch.quantile`` (same ``lerp``); a row holding NaN is not special-cased.
    With ``keep`` (B, N) bool the quantile is over the other patches of each sample
    (:func:`below_masked_quantile`) and kept patches are never below it.
    """
    if keep is not None:
        return below_masked_quantile(scores, area, p_frac, keep)
    sorted_u = scores.sort(dim=1).values  # (B, N)
    pos = p_frac * (scores.shape[1] * area - 1)  # quantile position among the N*area pixels (host float)
    lo, hi = math.floor(pos), math.ceil(pos)
    below = sorted_u[:, lo // area : lo // area + 1]  # (B, 1) pixel value at rank lo
    above = sorted_u[:, hi // area : hi // area + 1]  # (B, 1) pixel value at rank hi
    threshold = torch.lerp(below, above, pos - lo)  # (B, 1)
    return scores < threshold


def below_masked_quantile(scores: torch.Tensor, area: int, p_frac: float, keep: torch.Tensor) -> torch.Tensor:
    """:func:`below_pixel_quantile` over the patches not in ``keep`` (B, N) bool, per sample.

    The count of free patches differs between samples, so the interpolation positions are
    (B, 1) device tensors here (float64, as the host positions); still no host sync. A sample
    with every patch kept has none below."""
    n = scores.shape[1]
    sorted_u = scores.masked_fill(keep, math.inf).sort(dim=1).values  # (B, N): kept patches last
    free = (~keep).sum(dim=1, keepdim=True)  # (B, 1) generated patches
    pos = p_frac * (free * area - 1).to(torch.float64)  # (B, 1) quantile position among their pixels
    lo, hi = pos.floor(), pos.ceil()
    below = sorted_u.gather(1, (lo.long() // area).clamp(0, n - 1))  # (B, 1)
    above = sorted_u.gather(1, (hi.long() // area).clamp(0, n - 1))  # (B, 1)
    threshold = torch.lerp(below, above, (pos - lo).to(sorted_u.dtype))  # (B, 1)
    return (scores < threshold) & ~keep


def check_keep(keep, x_cond, x: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``keep`` as (B, N) bool on x's device and ``x_cond`` as x's dtype, or one line naming
    what is wrong (inpainting: kept patches start at ``x_cond`` and stay there)."""
    n = (x.shape[-2] // patch_size) * (x.shape[-1] // patch_size)
    if not torch.is_tensor(keep) or keep.dtype != torch.bool or tuple(keep.shape) != (x.shape[0], n):
        raise ValueError(f"keep must be a (B, N) = ({x.shape[0]}, {n}) bool tensor of kept patches, got "
                         f"{getattr(keep, 'dtype', type(keep))} {tuple(getattr(keep, 'shape', ()))}")
    if x_cond is None:
        raise ValueError("keep needs x_cond: the clean image (or latents) the kept patches hold")
    return keep.to(x.device), check_x_cond(x_cond, x)


def check_x_cond(x_cond, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(x_cond) or x_cond.shape != x.shape:
        raise ValueError(f"x_cond must be a clean image of x's shape {tuple(x.shape)}, got "
                         f"{tuple(getattr(x_cond, 'shape', ())) or type(x_cond).__name__}")
    return x_cond.to(device=x.device, dtype=x.dtype)


def check_cfg_scale(cfg_scale) -> float:
    """The guidance scale as a finite float (NaN or inf would saturate every pixel)."""
    try:
        value = float(cfg_scale) if not isinstance(cfg_scale, (bool, str)) else math.nan
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    return value


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

    def __call__(self, logvar: torch.Tensor, patch_size: int, p_frac: float,
                 keep: torch.Tensor | None = None) -> torch.Tensor:
        if self.rule == "uncertainty":
            return certain_patches(logvar, patch_size, p_frac, keep)
        u = patch_mean(torch.exp(logvar), patch_size).double()  # (B, N)
        if self.rule == "random":
            u = torch.rand(u.shape, generator=self._generator, device=u.device, dtype=u.dtype)
        else:
            u = -u
        return below_pixel_quantile(u, patch_size * patch_size, p_frac, keep)


def check_fraction(p: float) -> float:
    """The fraction of certain patches of the adaptive samplers, in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p (the fraction of certain patches) must lie in (0, 1), got {p}")
    return float(p)


class Sampler:
    """Base class. Subclasses implement ``run(model, x, schedule, y)``; calls go through ``call``."""

    name = "sampler"
    needs_uncertainty = False
    global_time = False  # True: one time per sample, t (B,), for global-time models (the SiT baseline)
    # The most distinct patch times a sample has in one model call (None: not per patch).
    # ``model.sync_free(distinct_times=...)`` takes it for graph capture and compile.
    max_distinct_times: int | None = None
    # Whether ``keep``/``x_cond`` (kept patches, inpainting) are implemented by this sampler.
    supports_keep = False

    def __init__(self):
        self.nfe = 0  # model calls in the last run
        self.guided_nfe = 0  # of which guided (a doubled batch)
        self._cfg_scale = 1.0
        self._step_scale = 1.0
        self._guided_steps: list[bool] = []
        self._uc_cond = None
        self._keep: torch.Tensor | None = None  # (B, N) bool kept patches of this call (inpainting)
        self._x_cond: torch.Tensor | None = None  # (B, C, H, W) their clean values
        self._keep_px: torch.Tensor | None = None  # (B, 1, H, W) bool: the kept patches' pixels

    def __call__(self, model, x: torch.Tensor, timesteps, *, y: torch.Tensor | None = None,
                 cfg_scale: float = 1.0, uc_cond=None, guidance_interval=None,
                 progress: bool = False, keep: torch.Tensor | None = None,
                 x_cond: torch.Tensor | None = None) -> torch.Tensor:
        """``keep`` (B, N) bool and ``x_cond`` (like x): kept patches start at ``x_cond`` at
        t = 1 and never move; the others are generated (docs/per_patch_schedules.md)."""
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor of noise, got {getattr(x, 'shape', type(x))}")
        cfg_scale = check_cfg_scale(cfg_scale)  # once per call, a float from here on
        if y is None and getattr(model, "cond_kind", "class") == "text":
            raise ValueError("a text-to-image model needs y: the prompts' encoding (a pf.conditioning.TextCond)")
        if y is None:
            if cfg_scale != 1.0:
                raise ValueError("classifier-free guidance (cfg_scale != 1) needs class labels y")
            y = torch.full((x.shape[0],), model.num_classes, dtype=torch.long, device=x.device)
        if self.needs_uncertainty and not getattr(model, "predict_uncertainty", False):
            raise ValueError(f"{type(self).__name__} needs a model with a difficulty head (predict_uncertainty=True)")
        schedule = self.schedule_of(timesteps, x, model)
        x = self.start(model, x, keep, x_cond)
        self.nfe, self.guided_nfe, self._cfg_scale, self._uc_cond = 0, 0, cfg_scale, uc_cond
        self._guided_steps = guided_steps(schedule, cfg_scale, guidance_interval)
        steps = range(len(schedule) - 1)
        if progress:
            steps = tqdm(steps, desc=type(self).__name__, leave=False)
        try:
            with torch.no_grad():
                return self.run(model, x, schedule, y, steps)
        finally:
            self._keep, self._x_cond, self._keep_px = None, None, None

    def schedule_of(self, timesteps, x: torch.Tensor, model) -> torch.Tensor:
        """The host float32 times ``s_k`` (K+1,) the outer steps and the guidance interval use."""
        return outer_schedule(timesteps)

    def start(self, model, x: torch.Tensor, keep, x_cond) -> torch.Tensor:
        """The starting state (a copy of the noise): kept patches set to ``x_cond`` (their
        interpolant at t = 1, SPEC section 12)."""
        if keep is None:
            if x_cond is not None:
                raise ValueError(f"x_cond is the clean image of kept patches: {type(self).__name__} needs keep with it")
            return x.clone()
        if not self.supports_keep:
            raise ValueError(f"{type(self).__name__} cannot hold patches fixed (inpainting): use euler_pf, dual_loop, "
                             "look_ahead, or euler for a global-time model")
        self._keep, self._x_cond = check_keep(keep, x_cond, x, model.patch_size)
        self._keep_px = time_to_pixels(self._keep, model.patch_size, x.shape[-2], x.shape[-1])  # (B, 1, H, W)
        return torch.where(self._keep_px, self._x_cond, x)

    def distinct_times(self, timesteps=None, keep: bool = False) -> int | None:
        """The most distinct patch times of a sample in one model call of a run with these
        ``timesteps`` (kept patches add their t = 1): what ``model.sync_free`` needs."""
        if self.max_distinct_times is None:
            return None
        return self.max_distinct_times + (1 if keep else 0)

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
        """Every patch at ``value`` (kept patches at 1): (B, N)."""
        p = model.patch_size
        n = (x.shape[-2] // p) * (x.shape[-1] // p)
        t = torch.full((x.shape[0], n), value, dtype=self.time_dtype(x), device=x.device)
        return t if self._keep is None else t.masked_fill(self._keep, 1.0)

    def euler_step(self, x: torch.Tensor, v: torch.Tensor, dt: float) -> torch.Tensor:
        """``x + dt * v``; kept patches stay exactly as they are."""
        moved = x + dt * v
        return moved if self._keep is None else torch.where(self._keep_px, x, moved)

    def patch_steps(self, t: torch.Tensor, x: torch.Tensor, value: float) -> torch.Tensor:
        """Every patch moves by ``value`` (kept patches by 0): (B, N) in x's dtype."""
        dt = torch.full(t.shape, value, dtype=x.dtype, device=x.device)
        return dt if self._keep is None else dt.masked_fill(self._keep, 0.0)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_") and k != "nfe")
        return f"{type(self).__name__}({params})"
