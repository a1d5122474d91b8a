"""Sample grids drawn with the EMA model, beside the predicted difficulty map.

The left panel holds the samples; the right panel ``exp(logvar)`` (the difficulty map the
adaptive samplers threshold), predicted by the EMA model on the state the sampler
actually visited when its time first reached ``map_time``, coloured per image from
easy (dark) to hard (bright yellow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pf.models.checkpoint import write_atomically
from pf.sampling.grid import side_by_side, tile_grid

# Anchor colours of an inferno-like map, dark -> bright.
_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


class _MapRecorder:
    """Wraps the model for a sampler: also asks for ``logvar`` and keeps the one predicted
    at the first call whose (mean) time reaches ``map_time`` (the conditional half under CFG)."""

    def __init__(self, model, map_time: float, batch: int):
        self.model, self.map_time, self.batch = model, map_time, batch
        self.logvar = None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x, t, y, return_uncertainty=False):
        want = self.logvar is None and self.model.predict_uncertainty and float(t.float().mean()) >= self.map_time
        if not (want or return_uncertainty):
            return self.model(x, t, y)
        v, logvar = self.model(x, t, y, return_uncertainty=True)
        if want:
            self.logvar = logvar[-self.batch:].float()
        return (v, logvar) if return_uncertainty else v


@torch.no_grad()
def draw_samples(model, sampler, noise: torch.Tensor, labels, steps: int, cfg_scale: float,
                 map_time: float = 0.5, guidance_interval=None, uc_cond=None):
    """``(samples, difficulty)``: (B, C, H, W) and (B, 1, H, W) exp(logvar) or None. ``labels``:
    class ids or a text condition (``uc_cond``: the empty prompt's, for guidance)."""
    recorder = _MapRecorder(model, map_time, noise.shape[0])
    x = sampler(recorder, noise, steps, y=labels, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                uc_cond=uc_cond)
    difficulty = None if recorder.logvar is None else torch.exp(recorder.logvar.clamp(-30, 20))
    return x.float(), difficulty


def images_rgb(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) -> (B, H, W, 3) uint8. 1 or 3 channels are images in [-1, 1]; other
    channel counts (latents) show their first three channels, min-max scaled per image."""
    x = x.detach().float().cpu()
    if x.shape[1] in (1, 3):
        x = (x.clamp(-1, 1) + 1) / 2
    else:
        x = x[:, :3]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def heat_rgb(u: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) nonnegative -> (B, H, W, 3) uint8, normalised per image."""
    u = u.detach().float().cpu()[:, 0]
    lo = u.amin(dim=(1, 2), keepdim=True)
    hi = u.amax(dim=(1, 2), keepdim=True)
    s = ((u - lo) / (hi - lo).clamp_min(1e-12)).numpy() * (len(_HEAT) - 1)  # (B, H, W) in [0, 4]
    i = np.clip(np.floor(s).astype(int), 0, len(_HEAT) - 2)
    f = (s - i)[..., None]
    return (_HEAT[i] * (1 - f) + _HEAT[i + 1] * f).round().astype(np.uint8)


def save_picture(path: Path, samples: torch.Tensor, difficulty: torch.Tensor | None, nrow: int,
                 title: str = "", map_title: str = "", labels: list[str] | None = None) -> None:
    """Write the samples grid, and the difficulty grid beside it when there is one, as a PNG
    (each image upscaled to at least 64 pixels, ``labels`` under the images, titles on top)."""
    panels = [tile_grid(images_rgb(samples), nrow, labels=labels, caption=title)]
    if difficulty is not None:
        panels.append(tile_grid(heat_rgb(difficulty), nrow, labels=labels, caption=map_title))
    write_atomically(path, lambda tmp: Image.fromarray(side_by_side(panels)).save(tmp, format="PNG"))
