"""Sharded, memory-mapped autoencoder latents (written by ``python -m pf.data.encode``).

A latent set is a folder::

    manifest.json                 what made it and what it holds (see ``Manifest``)
    shard_00000.mean.npy          (n, 2, C, h, w) posterior means; [:, 0] the image, [:, 1] its mirror
    shard_00000.std.npy           (n, 2, C, h, w) posterior standard deviations (when kept)
    shard_00000.labels.npy        (n,) int64 class ids
    shard_00000.pixels.npy        (n, 3, S, S) uint8 cropped images (when encoded with pixels=true)
    shard_00000.json              the shard's own record (count, unreadable images skipped)

:class:`LatentShards` maps the ``.npy`` files (``np.load(mmap_mode="r")``): opening a set
reads only the headers, every DDP rank maps the same files, and an item reads one latent.
Item ``i`` of epoch ``e`` takes the mirror or not from a hash of ``(seed, e, i)`` (the
published training flips at random; a resumed run sees the same flips), and with
``sample_posterior`` draws ``mean + std * eps`` with ``eps`` from the same hash, else the mean.
Latents are multiplied by the manifest's scale factor (0.18215 for SD-VAE). With
``pixels=True`` an item also carries the image the latent was made from, in [-1, 1] and
mirrored with it (REPA's encoder reads the pixels, the DiT the latent).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pf.data.base import DataError

MANIFEST = "manifest.json"
FORMAT = "pf-latents"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} has no {MANIFEST}: make a latent set with `python -m pf.data.encode images=... "
                        f"out={root} vae=...` (an unfinished encode writes the manifest last; run it again to finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a pf latent-set manifest (format {manifest.get('format')!r})")
    return manifest


def _confined_name(name, root: Path) -> str:
    """A shard name from a manifest: a plain file name inside the set's folder (an absolute
    name or one with ``..`` or a separator would read another folder's shards)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or Path(name).is_absolute():
        raise DataError(f"{root / MANIFEST}: shard name {name!r} is not a file name inside {root} (a manifest names "
                        f"only its own folder's shards)")
    return name


def is_latent_set(path) -> bool:
    return path is not None and (Path(str(path)).expanduser() / MANIFEST).is_file()


def _mix(*values: int) -> int:
    """splitmix64 of the values: a cheap, well-spread hash for per-item randomness."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z


class LatentShards(Dataset):
    """A latent set from ``python -m pf.data.encode``, memory-mapped; yields ``(latent (C, h, w), label)``,
    and ``(latent, label, pixels (3, S, S))`` with ``pixels=True``."""

    def __init__(self, root: str | Path, *, flip: bool = True, sample_posterior: bool = False,
                 scale_factor: float | None = None, seed: int = 0, pixels: bool = False):
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)
        self.source = f"latent set {self.root}"
        self.flip, self.sample_posterior, self.seed, self.epoch = bool(flip), bool(sample_posterior), int(seed), 0
        self.scale = float(self.manifest["scale_factor"] if scale_factor is None else scale_factor)
        if pixels and not self.manifest.get("pixels"):
            raise DataError(f"{self.source} holds no pixels, which trainer.repa needs (its encoder reads the images "
                            f"behind the latents): encode it again with `python -m pf.data.encode ... pixels=true`")
        self.means, self.stds, self.pixels, labels, counts = [], [], [], [], []
        for shard in self.manifest["shards"]:
            if shard["count"] == 0:
                continue
            base = self.root / _confined_name(shard.get("name"), self.root)
            mean = self._map(base.with_name(base.name + ".mean.npy"))
            self.means.append(mean)
            if sample_posterior:
                self.stds.append(self._map(base.with_name(base.name + ".std.npy")))
            if pixels:
                px = base.with_name(base.name + ".pixels.npy")
                if not px.is_file():
                    raise DataError(f"{self.source}: missing {px.name} (encode with pixels=true)")
                self.pixels.append(np.load(px, mmap_mode="r"))
            labels.append(np.load(base.with_name(base.name + ".labels.npy")))  # small: read into memory
            counts.append(mean.shape[0])
            if labels[-1].shape != (mean.shape[0],):
                raise DataError(f"{base}: {mean.shape[0]} latents but {labels[-1].shape[0]} labels")
        if not counts:
            raise DataError(f"{self.source} holds no latents")
        shapes = {tuple(m.shape[2:]) for m in self.means}
        if len(shapes) > 1:  # shards of two encodes (e.g. two image sizes) under one manifest
            raise DataError(f"{self.source}: its shards hold latents of different shapes {sorted(shapes)}: encode "
                            f"the set again into an empty folder")
        self.offsets = np.cumsum([0] + counts)
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        c, h, w = self.means[0].shape[2:]
        if h != w:
            raise DataError(f"{self.source}: latents must be square, got {h}x{w}")
        self.channels, self.image_size = int(c), int(h)
        self.num_classes = int(self.manifest.get("num_classes") or int(self.labels.max()) + 1)
        self.class_names = self.manifest.get("class_names")

    def _map(self, path: Path) -> np.ndarray:
        if not path.is_file():
            what = "std" if path.name.endswith(".std.npy") else "mean"
            extra = (" (the set was encoded without the posterior std: set data.sample_posterior=false)"
                     if what == "std" else "")
            raise DataError(f"{self.source}: missing {path.name}{extra}")
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 5 or arr.shape[1] != 2:
            raise DataError(f"{path}: expected (n, 2, C, h, w) latents (image, mirror), got {arr.shape}")
        return arr

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} latents")
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[s])
        h = _mix(self.seed, self.epoch, i)
        side = int(h & 1) if self.flip else 0
        z = torch.from_numpy(np.array(self.means[s][j, side], dtype=np.float32))  # (C, h, w): reads one latent
        if self.sample_posterior:
            std = torch.from_numpy(np.array(self.stds[s][j, side], dtype=np.float32))
            g = torch.Generator().manual_seed(h >> 1)
            z = z + std * torch.randn(z.shape, generator=g)
        if not self.pixels:
            return z * self.scale, int(self.labels[i])
        px = torch.from_numpy(np.array(self.pixels[s][j], dtype=np.float32)) / 127.5 - 1.0  # (3, S, S)
        return z * self.scale, int(self.labels[i]), (px.flip(-1) if side else px)  # mirrored with its latent
