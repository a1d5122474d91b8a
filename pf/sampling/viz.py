"""A picture of adaptive sampling at work: over the model calls of one sample, the current
image, the predicted difficulty map and the per-patch times (easy regions run ahead).

``StepRecorder`` stands in for the model (samplers only call ``model(x, t, y, ...)`` and
read ``patch_size``, ``num_classes``, ``predict_uncertainty``), records sample ``index`` of
every call, and returns what the model returns. The strip has one column per recorded call
(at most ``max_cols``, evenly spread, the last always included) and three labelled rows.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from pf.autoencoder import to_uint8
from pf.sampling.grid import rgb_nhwc, text_strip, tile_grid, upscale


class StepRecorder:
    def __init__(self, model, batch: int, index: int = 0):
        self.model, self.batch, self.index = model, int(batch), int(index)
        self.frames: list[dict] = []  # per call: x (C, H, W), t (N,), logvar (1, H, W) or None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_uncertainty: bool = False):
        has_head = bool(getattr(self.model, "predict_uncertainty", False))
        out = self.model(x, t, y, return_uncertainty=has_head)
        v, lv = out if has_head else (out, None)
        # With guidance the batch is [unconditional; conditional]: show the conditional row.
        row = self.index + (self.batch if x.shape[0] == 2 * self.batch else 0)
        tt = t[row] if t.dim() == 2 else t[row].expand(self.model.grid_size**2)
        self.frames.append({
            "x": x[row].detach().float().cpu(),
            "t": tt.detach().float().cpu(),
            "logvar": None if lv is None else lv[row].detach().float().cpu(),
        })
        if return_uncertainty:
            return v, lv
        return v


def _grey(values: torch.Tensor, lo: float, hi: float) -> np.ndarray:
    """(1, H, W) -> (H, W, 3) uint8, values in [lo, hi] mapped to black..white."""
    scaled = ((values - lo) / max(hi - lo, 1e-12)).clamp(0, 1) * 2 - 1
    return rgb_nhwc(to_uint8(scaled[None]))[0]


def _heat(values: torch.Tensor) -> np.ndarray:
    """(1, H, W) -> (H, W, 3): per-frame min..max on a dark-blue -> yellow ramp."""
    v = values[0]
    a = ((v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)).numpy()  # (H, W) in [0, 1]
    low, high = np.array([20, 30, 110], dtype=np.float64), np.array([250, 230, 40], dtype=np.float64)
    return (low + a[..., None] * (high - low)).round().astype(np.uint8)


def viz_strip(frames: list[dict], decode, patch_size: int, max_cols: int = 10, caption: str | None = None) -> np.ndarray:
    """Rows: image (decoded), difficulty (exp(logvar), per-frame scaled), patch times (0 black,
    1 white), one column per recorded call (its mean time below it). Returns (H, W, 3) uint8."""
    if not frames:
        raise ValueError("no model calls were recorded")
    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_cols, len(frames))).round().astype(int))
    chosen = [frames[i] for i in picks]
    images = rgb_nhwc(to_uint8(decode(torch.stack([f["x"] for f in chosen]))))  # (K, H', W', 3)
    size = images.shape[1]
    rows = [upscale(images)]
    if chosen[0]["logvar"] is not None:
        heat = np.stack([_heat(torch.exp(f["logvar"])) for f in chosen])  # (K, H, W, 3)
        rows.append(upscale(_resize(heat, size)))
    gh = int(round(chosen[0]["t"].numel() ** 0.5))
    times = np.stack([_grey(f["t"].reshape(1, gh, gh), 0.0, 1.0) for f in chosen])  # (K, gh, gw, 3)
    rows.append(upscale(_resize(times, size)))
    tiles = np.concatenate(rows)  # (rows*K, S, S, 3), row-major: all images, then maps, then times
    grid = tile_grid(tiles, ncol=len(chosen))
    names = ["image", "difficulty", "patch t"] if len(rows) == 3 else ["image", "patch t"]
    times_row = tile_grid(np.full((len(chosen), 1, rows[0].shape[1], 3), 255, np.uint8), ncol=len(chosen), min_size=1,
                          labels=[f"t={float(f['t'].float().mean()):.2f}" for f in chosen])
    grid = np.concatenate([grid, times_row[1:]])
    strip = _label_rows(grid, names, rows[0].shape[1])
    if caption:
        strip = np.concatenate([text_strip(strip.shape[1], [caption]), strip])
    return strip


LABEL_WIDTH = 72


def _label_rows(grid: np.ndarray, names: list[str], tile: int, pad: int = 2) -> np.ndarray:
    """A white margin on the left with each row's name."""
    margin = Image.new("RGB", (LABEL_WIDTH, grid.shape[0]), "white")
    draw = ImageDraw.Draw(margin)
    for i, name in enumerate(names):
        draw.text((4, pad + i * (tile + pad) + tile // 2 - 5), name, fill=(0, 0, 0))
    return np.concatenate([np.asarray(margin), grid], axis=1)


def _resize(pictures: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour (K, h, w, 3) -> (K, size, size, 3)."""
    h = pictures.shape[1]
    idx = (np.arange(size) * h // size).clip(0, h - 1)
    return pictures[:, idx][:, :, idx]
