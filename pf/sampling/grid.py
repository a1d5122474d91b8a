"""Pictures for people: uint8 images laid out as labelled, captioned grids and saved as PNG
files (the decoding that makes the images is ``pf.autoencoder``'s)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def rgb_nhwc(images: torch.Tensor) -> np.ndarray:
    """uint8 pictures (B, C, H, W), C = 1 or 3 (``pf.autoencoder.to_uint8``) -> (B, H, W, 3)
    uint8, the layout of PNG files and the ADM evaluator's ``.npz`` (grey repeated to RGB)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (B, 1 or 3, H, W) pictures, got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H, W, 3)


MIN_TILE = 64  # pixels across a tile: small samples are upscaled (nearest) to at least this


def upscale(images: np.ndarray, min_size: int = MIN_TILE) -> np.ndarray:
    """(B, H, W, 3) uint8, nearest-neighbour upscaled by an integer factor to at least ``min_size``."""
    factor = max(1, -(-min_size // max(images.shape[-3], 1)))
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2) if factor > 1 else images


def text_strip(width: int, lines: list[str], height: int | None = None) -> np.ndarray:
    """A white strip ``width`` pixels wide with ``lines`` of black text (captions and labels)."""
    height = height or 4 + 12 * len(lines)
    strip = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(strip).multiline_text((3, 2), "\n".join(lines), fill="black", spacing=2)
    return np.asarray(strip)


def label_lines(label: str, width: int, max_lines: int = 4) -> list[str]:
    """A label (a class name or a prompt) wrapped to lines that fit ``width`` pixels in the
    default font, at most ``max_lines``, the last one ending in "..." when the label is longer.
    Words go whole onto a line when they fit; a word wider than a line is split."""
    font = ImageFont.load_default()

    def fits(text: str) -> bool:
        return font.getlength(text) <= width

    lines: list[str] = []
    for word in label.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while not fits(word) and len(word) > 1:  # a word wider than a line: as much as fits, then the rest
            cut = 1
            while fits(word[:cut + 1]):
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    lines = lines or [""]
    if len(lines) > max_lines:
        last = " ".join(lines[max_lines - 1:])
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


def tile_grid(images: np.ndarray, ncol: int | None = None, *, labels: list[str] | None = None,
              caption: str | list[str] | None = None, min_size: int = MIN_TILE, pad: int = 2) -> np.ndarray:
    """The one picture helper: (B, H, W, 3) uint8 -> a readable (H', W', 3) grid.

    Each image is upscaled (nearest) to at least ``min_size`` pixels, ``labels[i]`` (a class
    name or prompt) is written under image ``i``, the tiles are laid out ``ncol`` a row by
    ``torchvision.utils.make_grid``, and ``caption`` (sampler, steps, guidance ...) is a row
    of text on top.
    """
    # torchvision is not among the package's declared dependencies: imported where it is used.
    from torchvision.utils import make_grid as tv_make_grid

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (B, H, W, 3) uint8 images, got {images.dtype} {images.shape}")
    tiles = upscale(images, min_size)
    if labels is not None:
        if len(labels) != len(tiles):
            raise ValueError(f"{len(labels)} labels for {len(tiles)} images")
        w = tiles.shape[2]
        lines = [label_lines(str(lab), w - 6) for lab in labels]  # the text starts 3 pixels in
        height = 2 + 12 * max(len(ls) for ls in lines)  # 14 pixels a one-line label
        tiles = np.stack([np.concatenate([t, text_strip(w, ls, height)]) for t, ls in zip(tiles, lines)])
    ncol = ncol or math.ceil(math.sqrt(len(tiles)))
    grid = tv_make_grid(torch.from_numpy(tiles).permute(0, 3, 1, 2), nrow=ncol, padding=pad, pad_value=255)
    grid = grid.permute(1, 2, 0).numpy()  # (H', W', 3)
    if caption:
        grid = np.concatenate([text_strip(grid.shape[1], [caption] if isinstance(caption, str) else caption), grid])
    return grid


def side_by_side(pictures: list[np.ndarray], gap: int = 12) -> np.ndarray:
    """(H_i, W_i, 3) pictures in one row on white, top-aligned."""
    h = max(p.shape[0] for p in pictures)
    parts = []
    for i, p in enumerate(pictures):
        parts.append(np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255))
        if i < len(pictures) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def stacked(pictures: list[np.ndarray], gap: int = 12) -> np.ndarray:
    """(H_i, W_i, 3) pictures one under the other on white, left-aligned."""
    w = max(p.shape[1] for p in pictures)
    parts = []
    for i, p in enumerate(pictures):
        parts.append(np.pad(p, ((0, 0), (0, w - p.shape[1]), (0, 0)), constant_values=255))
        if i < len(pictures) - 1:
            parts.append(np.full((gap, w, 3), 255, np.uint8))
    return np.concatenate(parts)


def save_png(picture: np.ndarray, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path


def labelled_panels(panels: list[tuple[str, torch.Tensor]], path: str | os.PathLike, *, nrow: int = 10,
                    per_row: int = 4) -> Path:
    """Captioned panels of uint8 (M, C, H, W) images, ``per_row`` panels a row, saved as a PNG."""
    grids = []
    for caption, images in panels:
        grids.append(tile_grid(rgb_nhwc(images), nrow, caption=caption.split("\n"), min_size=48))
    rows = [side_by_side(grids[i:i + per_row]) for i in range(0, len(grids), per_row)]
    return save_png(stacked(rows), path)
