"""The straight-path flow with per-patch times, and the training losses (SPEC.md section 3).

``t = 0`` is noise ``x0``, ``t = 1`` is data ``x1``; ``x_t = t*x1 + (1-t)*x0``; the target
velocity is ``u = x1 - x0``. A patch's time applies to all ``p*p*C`` values of the patch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pf_kernels.reference import patch_to_pixels

NLL_WEIGHT = 0.01
LOGVAR_CLAMP = (-30.0, 20.0)
NUM_VAL_SEGMENTS = 8


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


def gaussian_nll(u: torch.Tensor, v: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-element ``0.5*(ln 2pi + lv + (u - sg(v))^2 / exp(lv))``, lv clamped, over channels."""
    lv = logvar.clamp(*LOGVAR_CLAMP)  # (B, 1, H, W), broadcast over C
    return 0.5 * (math.log(2 * math.pi) + lv + (u - v.detach()) ** 2 / torch.exp(lv))


def training_loss(model, x1: torch.Tensor, y: torch.Tensor, t: torch.Tensor, x0: torch.Tensor | None = None,
                  nll_weight: float = NLL_WEIGHT) -> dict[str, torch.Tensor]:
    """MSE of the velocity plus ``nll_weight`` times the difficulty head's NLL.

    Works for global-time models (t of shape (B,), no uncertainty head: MSE only).
    Returns ``{"loss", "mse", "nll"}`` (nll is 0 without an uncertainty head). The training
    loop builds the same sum from ``pf.training.objective`` (where more terms plug in).
    """
    from pf.training.objective import FlowBatch, flow_objective

    if x0 is None:
        x0 = torch.randn_like(x1)
    out = flow_objective(model, nll_weight)(model, FlowBatch(x1, y, t, x0))
    out.setdefault("nll", torch.zeros((), device=x1.device))
    return out


@torch.no_grad()
def validation_loss(model, x1: torch.Tensor, y: torch.Tensor, x0: torch.Tensor,
                    num_segments: int = NUM_VAL_SEGMENTS) -> dict[str, object]:
    """MSE at fixed global times ``t = (k + 0.5)/num_segments`` with the given fixed noise.

    Returns ``{"val_loss": mean over segments, "segments": [per-segment MSE]}`` (SD3 practice).
    """
    b = x1.shape[0]
    n = (x1.shape[-2] // model.patch_size) * (x1.shape[-1] // model.patch_size)
    segments = []
    for k in range(num_segments):
        tk = (k + 0.5) / num_segments
        t = torch.full((b,) if not getattr(model, "per_token", True) else (b, n), tk, device=x1.device)
        xt, u = interpolate(x1, x0, t, model.patch_size)
        v = model(xt, t, y)
        segments.append(((v.float() - u.float()) ** 2).mean().item())
    return {"val_loss": sum(segments) / num_segments, "segments": segments}
