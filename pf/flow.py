"""The probability path: the straight line from noise to data with per-patch times (SPEC.md section 1).

``t = 0`` is noise ``x0``, ``t = 1`` is data ``x1``; ``x_t = t*x1 + (1-t)*x0``; the target
velocity is ``u = x1 - x0``. A patch's time applies to all ``p*p*C`` values of the patch.
What is learned on this path (the loss terms) is :mod:`pf.training.objective`; samplers
walk it with :func:`patch_mean` of the difficulty map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pf_kernels.reference import patch_to_pixels


def time_to_pixels(t: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Per-patch (B, N) or per-sample (B,) times -> (B, 1, H, W) (raster order over the grid)."""
    b = t.shape[0]
    if t.dim() == 1:
        return t.reshape(b, 1, 1, 1).expand(b, 1, height, width)
    gh, gw = height // patch_size, width // patch_size
    if t.shape[1] != gh * gw:
        raise ValueError(f"t has {t.shape[1]} patch times, the image has {gh}x{gw} = {gh * gw} patches")
    return patch_to_pixels(t, patch_size, gw)


def patch_mean(values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Average (B, 1, H, W) over each p x p patch -> (B, N) in raster order."""
    pooled = F.avg_pool2d(values, patch_size)  # (B, 1, gh, gw)
    return pooled.flatten(1)


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, patch_size: int):
    """Return ``(x_t, u)``: the noisy input at per-patch times and the velocity target."""
    if x1.shape != x0.shape:
        raise ValueError(f"data {tuple(x1.shape)} and noise {tuple(x0.shape)} differ in shape")
    tp = time_to_pixels(t, patch_size, x1.shape[-2], x1.shape[-1]).to(x1.dtype)  # (B, 1, H, W)
    return tp * x1 + (1 - tp) * x0, x1 - x0
