"""Precomputed latents with labels (ImageNet-style latent training, SD-VAE convention).

``data.path`` is a ``.npz`` holding the latents (key ``latents``, ``x`` or ``arr_0``) and
the labels (``labels`` or ``y``), or a ``.npy`` of latents with ``data.labels_path`` a
``.npy`` of labels. Latents are ``(M, C, H, W)``; they are multiplied by
``data.scale_factor`` (0.18215 for raw SD-VAE latents; 1.0 when the file is already scaled).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from pf.data.base import DataError, TensorImages

LATENT_KEYS = ("latents", "x", "arr_0")
LABEL_KEYS = ("labels", "y", "arr_1")


def _load_array(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(f"cannot read {what} file {path}: {err}") from err


def _pick(npz, keys, what: str, path: Path) -> np.ndarray:
    for key in keys:
        if key in npz.files:
            return npz[key]
    raise DataError(f"{path} has no {what} array: looked for keys {list(keys)}, found {npz.files}")


def load_latents(path, labels_path=None, scale_factor: float | None = 0.18215, num_classes: int | None = None) -> TensorImages:
    if path is None or str(path) in ("", "???"):
        raise DataError("data=latents needs data.path=<latent set folder from python -m pf.data.encode> (or a "
                        "file.npz, or a .npy plus data.labels_path=<labels.npy>)")
    if scale_factor is None:
        scale_factor = 0.18215  # the SD-VAE convention for a file of raw latents
    path = Path(path).expanduser()
    arr = _load_array(path, "latents")
    if isinstance(arr, np.lib.npyio.NpzFile):
        with arr:
            latents = _pick(arr, LATENT_KEYS, "latent", path)
            labels = _pick(arr, LABEL_KEYS, "label", path) if labels_path is None else None
    else:
        latents, labels = arr, None
    if labels is None:
        if labels_path is None:
            raise DataError(f"{path} holds no labels: use a .npz with 'latents' and 'labels', or set data.labels_path")
        labels = _load_array(Path(labels_path).expanduser(), "labels")
    if latents.ndim != 4 or latents.shape[0] == 0:
        raise DataError(f"{path}: expected latents of shape (M, C, H, W) with M > 0, got {latents.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise DataError(f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}")
    if labels.shape[0] != latents.shape[0]:
        raise DataError(f"{path}: {latents.shape[0]} latents but {labels.shape[0]} labels")
    x = torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)) * float(scale_factor)
    if not torch.isfinite(x).all():
        raise DataError(f"{path}: the latents contain NaN or infinite values")
    std = float(x[:1024].std())
    if not 0.25 < std < 4.0:
        warnings.warn(f"{path}: latents have std {std:.3g} after scaling by {scale_factor}; expected about 1 "
                      f"(set data.scale_factor=1.0 if the file is already scaled, 0.18215 for raw SD-VAE latents)",
                      stacklevel=2)
    y = torch.from_numpy(labels.astype(np.int64))
    n_classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
    return TensorImages(x, y, num_classes=n_classes, source=f"latents {path}")
