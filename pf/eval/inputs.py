"""Where the images to compare come from: a folder of PNGs, an ``.npz``, a dataset, or a model.

Everything is turned into one form, ``uint8`` images ``(M, C, H, W)`` with C = 1 or 3, and
handed to torch-fidelity as an :class:`ImageSet` whose items are ``uint8 (3, H, W)`` (grey
images repeated over RGB), the input format its feature extractors expect.

Sources, as written on the command line:

    path/to/folder          every *.png / *.jpg / *.jpeg inside (sorted, not recursive)
    path/to/file.npz        ``arr_0`` uint8 NHWC (the ADM / guided-diffusion convention)
    data:digits             the embedded digits (``data.image_size`` from the eval config)
    data:folder:<path>      an image folder read like the training data
    path/to/checkpoint.pt   draw ``num_samples`` images with a sampler (``pf.pipeline``)

Pictures are converted with ``pf.autoencoder.to_uint8`` / ``from_uint8`` (floats in [-1, 1]).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pf.autoencoder import to_uint8
from pf.data import build_dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class InputError(ValueError):
    """An input cannot be read as a set of images."""


class ImageSet(Dataset):
    """``uint8`` images for torch-fidelity: item ``i`` is a ``(3, H, W)`` uint8 tensor."""

    def __init__(self, images: torch.Tensor, name: str = "images"):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise InputError(f"{name}: expected uint8 images (M, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise InputError(f"{name} holds no images")
        self.images = images.contiguous()
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]  # (C, H, W)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x

    def __repr__(self) -> str:
        return f"ImageSet({self.name!r}, {tuple(self.images.shape)})"


#################################################################################
#                                  File formats                                 #
#################################################################################


def load_npz(path: str | os.PathLike) -> torch.Tensor:
    """``arr_0`` of an ``.npz``: uint8 NHWC (or NHW) -> (M, C, H, W) uint8."""
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise InputError(f"{path}: no 'arr_0' array (found {f.files}); expected uint8 images of shape (M, H, W, C)")
        arr = f["arr_0"]
    if arr.dtype != np.uint8:
        raise InputError(f"{path}: arr_0 must be uint8 in [0, 255], got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise InputError(f"{path}: arr_0 must be (M, H, W, C) with C = 1 or 3, got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def save_npz(path: str | os.PathLike, images: torch.Tensor) -> None:
    """(M, C, H, W) uint8 -> ``arr_0`` NHWC in an ``.npz``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=images.permute(0, 2, 3, 1).numpy())


def _read_image(path: Path):
    """The decoded image, or one line naming the file that is not one (truncated, corrupt)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for a broken file
        raise InputError(f"{path} is not a readable image ({' '.join(str(err).split()) or type(err).__name__}): "
                         f"remove or replace it") from err


def load_folder(path: str | os.PathLike) -> torch.Tensor:
    """Every image in a folder (sorted by name), all of one size -> (M, C, H, W) uint8.

    Grey images stay one channel unless the folder mixes grey and colour (then all RGB).
    """
    files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"{path}: no {'/'.join(IMAGE_EXTENSIONS)} images in this folder")
    pics = [_read_image(p) for p in files]
    mode = "L" if all(p.mode in ("L", "1", "I;16", "I") for p in pics) else "RGB"
    arrays = [np.asarray(p.convert(mode)) for p in pics]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) != 1:
        raise InputError(f"{path}: images of different sizes {sorted(sizes)}; resize them to one size first")
    arr = np.stack(arrays)
    if arr.ndim == 3:
        arr = arr[..., None]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def save_folder(path: str | os.PathLike, images: torch.Tensor) -> None:
    """(M, C, H, W) uint8 -> ``000000.png``, ``000001.png``, ... in ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        arr = x.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path / f"{i:06d}.png")


def load_dataset_images(data_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """A training dataset (``pf.data.build_dataset``) as uint8 images and its labels."""
    dataset = build_dataset(data_cfg)
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return to_uint8(torch.stack(xs)), torch.as_tensor(ys, dtype=torch.long)
