"""From sampler output to pictures: the first stage (an SD-VAE for latent models), uint8
conversion, grids and PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

LATENT_SCALE = 0.18215  # SD-VAE latents are stored multiplied by this (SPEC.md section 2)


class DecoderError(ValueError):
    """The model's output cannot be turned into pictures with what was given."""


class Decoder:
    """Turns a model's samples (B, C, H, W) into images in [-1, 1] (B, 3 or 1, H', W').

    Pixel models (1 or 3 channels) pass through. Latent models need ``vae``: a local
    diffusers ``AutoencoderKL`` folder (``from_pretrained``) or single file
    (``from_single_file``); the latents are divided by ``scale`` before decoding.
    """

    def __init__(self, in_channels: int, vae: str | os.PathLike | None = None, *, device="cpu",
                 scale: float = LATENT_SCALE, chunk: int = 16):
        self.in_channels, self.scale, self.chunk, self.vae = in_channels, float(scale), int(chunk), None
        if vae is None:
            if in_channels not in (1, 3):
                raise DecoderError(
                    f"this is a latent model (in_channels={in_channels}): pass vae=PATH, a local diffusers "
                    "AutoencoderKL folder or .safetensors/.ckpt file (e.g. the sd-vae-ft-ema weights), to decode "
                    "its samples into pictures"
                )
            return
        if in_channels in (1, 3):
            raise DecoderError(f"vae={vae} was given, but the model works in pixel space (in_channels={in_channels})")
        self.vae = load_vae(vae, device)

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return z.float().clamp(-1, 1)
        dtype = next(self.vae.parameters()).dtype
        out = [self.vae.decode(part.to(dtype) / self.scale).sample.float() for part in z.split(self.chunk)]
        return torch.cat(out).clamp(-1, 1)  # (B, 3, 8H, 8W)


def load_vae(path: str | os.PathLike, device="cpu"):
    """A diffusers ``AutoencoderKL`` from a local folder or single file (never downloads)."""
    path = Path(path)
    if not path.exists():
        raise DecoderError(f"vae not found: {path} (a local diffusers AutoencoderKL folder or file)")
    try:
        from diffusers import AutoencoderKL  # type: ignore
    except ImportError as err:
        raise DecoderError(
            f"decoding latents with vae={path} needs the 'diffusers' package, which is not installed: "
            "pip install diffusers"
        ) from err
    try:
        if path.is_dir():
            vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        else:
            vae = AutoencoderKL.from_single_file(str(path), local_files_only=True)
    except Exception as err:
        raise DecoderError(f"could not load a diffusers AutoencoderKL from {path}: {err}") from err
    return vae.to(device).eval()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1], C in (1, 3) -> (B, H, W, 3) uint8 (grey repeated to RGB)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DecoderError(f"expected (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # NHWC


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) picture, raster order."""
    b, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(b))
    nrow = math.ceil(b / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    return grid


def upscale(images: np.ndarray, min_size: int = 128) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor so tiny samples stay visible."""
    factor = max(1, min_size // max(images.shape[-3], 1))
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2) if factor > 1 else images


def save_png(picture: np.ndarray, path: str | os.PathLike) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path


def labelled_panels(panels: list[tuple[str, torch.Tensor]], path: str | os.PathLike, *, nrow: int = 10,
                    min_size: int = 48, per_row: int = 4) -> Path:
    """Panels of images side by side, each under its caption, ``per_row`` panels a row.

    ``panels``: (caption, uint8 (M, C, H, W)) pairs, C in (1, 3); each image is upscaled
    (nearest) to at least ``min_size`` pixels and a panel is ``torchvision.utils.make_grid``
    with ``nrow`` images a row. Captions may hold a newline.
    """
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid as tv_grid

    tiles = []
    for caption, images in panels:
        x = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)
        factor = max(1, -(-min_size // x.shape[-1]))
        x = x.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
        grid = tv_grid(x, nrow=nrow, padding=2, pad_value=255)  # (3, H', W') uint8
        lines = caption.count("\n") + 1
        head = 6 + 12 * lines
        tile = Image.new("RGB", (grid.shape[2], grid.shape[1] + head), "white")
        tile.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (0, head))
        ImageDraw.Draw(tile).multiline_text((4, 3), caption, fill="black", spacing=2)
        tiles.append(tile)
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles)
    rows = -(-len(tiles) // per_row)
    canvas = Image.new("RGB", (min(per_row, len(tiles)) * (w + 8) + 8, rows * (h + 8) + 8), "white")
    for i, tile in enumerate(tiles):
        r, q = divmod(i, per_row)
        canvas.paste(tile, (8 + q * (w + 8), 8 + r * (h + 8)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
