"""Inpainting and outpainting with any model: a picture, a mask of what to generate, and a
sampler (SPEC.md section 12; the rules are written in docs/per_patch_schedules.md).

    import pf.inpaint
    from pf.inpaint import box_mask
    out = pf.inpaint(model, image, box_mask(16, [8, 0, 16, 16]), "look_ahead", steps=25)  # = pf.inpaint.inpaint
    out.images          # (B, C, H, W) in [-1, 1]: kept pixels exactly the input's

A Patch Forcing model keeps the known patches clean (t = 1, ``x_cond`` = the picture) as
context while the others are generated (``euler_pf``, or ``dual_loop`` / ``look_ahead``,
which order the generated patches by predicted uncertainty). A global-time model (the SiT
baseline) inpaints by replacement: the known region re-noised to the current time before
each step (``euler``). The mask is taken to the patch grid: a patch is kept only if every
pixel of it is kept (in latent space: every pixel its latents decode to), so the generated
region covers the mask. In latent space the picture is encoded with the run's autoencoder
and, after decoding, the kept patches' pixels are put back from the input (the decoder mixes
neighbouring latents), so they are the input's exactly there too.

Masks and pictures from files (PNG: white = generate), boxes and outpainting strips are
built here too, for ``pf.sample inpaint=...`` and ``pf.experiments.inpaint``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pf.autoencoder import from_uint8
from pf.flow import time_to_pixels
from pf.pipeline import check_compatible, make_sampler, unwrap
from pf.samplers import Sampler

#################################################################################
#                                     Masks                                     #
#################################################################################


def as_mask(mask, batch: int, height: int, width: int) -> torch.Tensor:
    """A generate-mask (H, W), (1 or B, H, W) or (1 or B, 1, H, W), bool or 0/1 -> (B, 1, H, W) bool."""
    m = torch.as_tensor(mask)
    if m.dim() == 2:
        m = m[None]
    if m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != (height, width) or m.shape[0] not in (1, batch):
        raise ValueError(f"the mask must cover the {height}x{width} picture ((H, W) or (B, 1, H, W), "
                         f"True = generate); got shape {tuple(m.shape)}")
    return m.bool().expand(batch, 1, height, width)


def kept_patches(mask: torch.Tensor, block: int) -> torch.Tensor:
    """(B, 1, H, W) bool generate-mask -> (B, N) bool kept patches, ``block`` pixels a patch
    side: a patch is kept only if none of its pixels is to be generated."""
    h, w = mask.shape[-2:]
    if h % block or w % block:
        raise ValueError(f"the picture ({h}x{w}) must be a whole number of {block}-pixel patches")
    generate = F.max_pool2d(mask.float(), block)  # (B, 1, gh, gw): 1 where any pixel is generated
    return (generate == 0).flatten(1)


def box_mask(size: int, box) -> torch.Tensor:
    """(1, 1, size, size) bool: True inside ``box = [x0, y0, x1, y1]`` (pixels, x1/y1 exclusive)."""
    try:
        x0, y0, x1, y1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"mask_box must be [x0, y0, x1, y1] in pixels, got {box!r}") from None
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ValueError(f"mask_box {[x0, y0, x1, y1]} must satisfy 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}")
    m = torch.zeros(1, 1, size, size, dtype=torch.bool)
    m[..., y0:y1, x0:x1] = True
    return m


SIDES = ("left", "right", "top", "bottom")


def outpaint(image: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``spec = "side:width"`` (e.g. ``left:8``): the picture (B, C, H, W) moved away from that
    side by ``width`` pixels on the same canvas (what moves past the far edge is dropped), and
    the (B, 1, H, W) mask of the new strip to generate."""
    side, _, amount = str(spec).partition(":")
    if side not in SIDES or not amount.isdigit():
        raise ValueError(f"outpaint must be side:pixels with side one of {', '.join(SIDES)} (e.g. left:8), got {spec!r}")
    b, _, h, w = image.shape
    n = int(amount)
    if not 0 < n < (w if side in ("left", "right") else h):
        raise ValueError(f"outpaint={spec}: the strip must be 1 to {(w if side in ('left', 'right') else h) - 1} pixels")
    dims = {"left": (n, -1), "right": (-n, -1), "top": (n, -2), "bottom": (-n, -2)}[side]
    moved = torch.roll(image, *dims)
    mask = torch.zeros(b, 1, h, w, dtype=torch.bool)
    strip = {"left": (..., slice(0, n)), "right": (..., slice(w - n, w)),
             "top": (..., slice(0, n), slice(None)), "bottom": (..., slice(h - n, h), slice(None))}[side]
    mask[strip] = True
    return torch.where(mask, torch.zeros_like(moved), moved), mask


#################################################################################
#                                     Files                                     #
#################################################################################


def load_picture(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """A picture file -> (1, channels, size, size) float in [-1, 1] (grey or RGB as the model
    needs; resized with bicubic filtering when it is another size)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"inpaint={path}: no such picture")
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        array = np.asarray(im, dtype=np.uint8)
    pixels = torch.from_numpy(array.copy())
    pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)  # (C, H, W)
    return from_uint8(pixels[None])


def load_mask(path: str | Path, size: int) -> torch.Tensor:
    """A mask picture (white = generate, black = keep; nearest-neighbour resize) -> (1, 1, size, size) bool."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"mask={path}: no such picture")
    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.NEAREST)
        array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array >= 128)[None, None]


#################################################################################
#                                   Inpainting                                  #
#################################################################################


class Inpainted(NamedTuple):
    images: torch.Tensor  # (B, C', H', W') pictures in [-1, 1]: kept pixels exactly the input's
    samples: torch.Tensor  # (B, C, H, W) the sampler's output (latents or pixels)
    keep: torch.Tensor  # (B, N) bool: the kept patches of the model's grid
    kept_pixels: torch.Tensor  # (B, 1, H', W') bool: their pixels in the picture
    nfe: int  # model calls


class LatentEncoder:
    """Pictures in [-1, 1] -> latents with a diffusers ``AutoencoderKL`` (its posterior's
    mode), multiplied by ``scale``: the inverse of :class:`pf.autoencoder.Decoder`."""

    def __init__(self, vae, scale: float):
        self.vae, self.scale = vae, float(scale)

    @torch.no_grad()
    def __call__(self, pictures: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(pictures.to(dtype)).latent_dist.mode().float() * self.scale


def default_sampler(model) -> str:
    """``euler_pf`` for a Patch Forcing model, ``euler`` (replacement) for a global-time one."""
    return "euler_pf" if getattr(unwrap(model), "per_token", True) else "euler"


@torch.no_grad()
def inpaint(model, image: torch.Tensor, mask, sampler: Sampler | str | None = None, *, steps=50, y=None,
            cfg_scale: float = 1.0, guidance_interval=None, uc_cond=None, seed: int = 0,
            noise: torch.Tensor | None = None, encode=None, decode=None, sampler_params: dict | None = None,
            progress: bool = False) -> Inpainted:
    """Complete ``image`` (B, C', H', W') in [-1, 1] where ``mask`` (True = generate) says.

    ``sampler``: a sampler or its name (default :func:`default_sampler`); ``steps``: its
    outer steps; ``y``: class ids or a text condition (default: the null class, unguided);
    ``noise``: the starting noise (default: drawn from ``seed``); ``encode`` / ``decode``:
    pictures <-> latents for a latent model (None: a pixel model). The model is called as
    ``model(x, t, y)`` (a :class:`pf.sampling.viz.StepRecorder` may stand in)."""
    sampler = make_sampler(sampler or default_sampler(model), sampler_params)
    check_compatible(model, sampler)
    if not torch.is_tensor(image) or image.dim() != 4:
        raise ValueError(f"image must be (B, C, H, W) pictures in [-1, 1], got {getattr(image, 'shape', type(image))}")
    base = unwrap(model)
    device = next(base.parameters()).device
    dtype = next(base.parameters()).dtype
    b, _, hp, wp = image.shape
    gen_px = as_mask(mask, b, hp, wp)  # (B, 1, H', W') True = generate
    x_cond = (encode(image.to(device)) if encode is not None else image.to(device)).to(dtype)  # (B, C, H, W)
    if x_cond.shape[1] != base.in_channels or x_cond.shape[-1] != base.input_size:
        raise ValueError(f"the model works on {base.in_channels}x{base.input_size}x{base.input_size} "
                         f"{'latents' if encode is not None else 'pictures'}; the picture gives "
                         f"{'x'.join(str(s) for s in x_cond.shape[1:])}")
    factor = hp // x_cond.shape[-2]  # pixels per latent (1 for a pixel model)
    keep = kept_patches(gen_px, base.patch_size * factor).to(device)  # (B, N)
    if noise is None:
        noise = torch.randn(x_cond.shape, generator=torch.Generator().manual_seed(int(seed)))
    samples = sampler(model, noise.to(device, dtype), steps, y=y, cfg_scale=cfg_scale,
                      guidance_interval=guidance_interval, uc_cond=uc_cond, progress=progress,
                      keep=keep, x_cond=x_cond)
    kept_px = time_to_pixels(keep, base.patch_size * factor, hp, wp)  # (B, 1, H', W')
    if decode is None:
        pictures = samples.float().clamp(-1, 1)
    else:  # the decoder mixes neighbouring latents: put the kept patches' pixels back
        pictures = torch.where(kept_px, image.to(device).float(), decode(samples).float())
    return Inpainted(pictures, samples, keep, kept_px, sampler.nfe)


__all__ = ["Inpainted", "LatentEncoder", "SIDES", "as_mask", "box_mask", "default_sampler", "inpaint", "kept_patches",
           "load_mask", "load_picture", "outpaint"]


class _CallableModule(types.ModuleType):
    """``pf.inpaint(...)`` is ``pf.inpaint.inpaint(...)``: the module is the package's one verb
    for completing pictures, and its other names (masks, files) stay reachable on it."""

    def __call__(self, *args, **kwargs) -> Inpainted:
        return inpaint(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
