"""A folder of images with one sub-folder per class: ``root/<class name>/<image>``.

Classes are the sorted sub-folder names (label = index). Every file is checked with
Pillow when the dataset is built; unreadable files are skipped and counted in a warning.
Images are converted to RGB (3 channels) or L (1 channel), resized so the shorter side is
``image_size``, center-cropped and scaled to [-1, 1].
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pf.data.base import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()  # checks the file without decoding every pixel
        with Image.open(path) as img:  # verify() leaves the image unusable; decode once for truncation
            img.load()
        return True
    except Exception:
        return False


class ImageFolder(Dataset):
    def __init__(self, root: str | Path | None, image_size: int, channels: int = 3):
        if root is None or str(root) in ("", "???"):
            raise DataError("data=folder needs data.path=<folder with one sub-folder of images per class>")
        self.root = Path(root).expanduser()
        self.source = f"image folder {self.root}"
        if not self.root.is_dir():
            raise DataError(f"data.path {self.root} is not a directory")
        if channels not in (1, 3):
            raise DataError(f"data.channels must be 1 (grey) or 3 (RGB) for images, got {channels}")
        self.image_size, self.channels = int(image_size), int(channels)

        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise DataError(f"{self.root} has no sub-folders: put the images of each class in its own sub-folder "
                            f"({self.root}/<class name>/*.png)")
        self.num_classes = len(self.classes)
        self.paths: list[Path] = []
        self.labels: list[int] = []
        bad: list[Path] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            for path in files:
                if _readable(path):
                    self.paths.append(path)
                    self.labels.append(label)
                else:
                    bad.append(path)
        if bad:
            warnings.warn(f"{self.source}: skipped {len(bad)} unreadable image file(s), e.g. {bad[0]}", stacklevel=2)
        if not self.paths:
            raise DataError(f"{self.source} holds no readable images (suffixes {sorted(IMAGE_SUFFIXES)}) "
                            f"in its {self.num_classes} class folder(s)")
        empty = [name for i, name in enumerate(self.classes) if i not in set(self.labels)]
        if empty:
            warnings.warn(f"{self.source}: {len(empty)} class folder(s) hold no readable image: {empty[:5]}", stacklevel=2)
        self.skipped = len(bad)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return load_image(self.paths[i], self.image_size, self.channels), self.labels[i]


def image_to_tensor(img, image_size: int, channels: int) -> torch.Tensor:
    """A Pillow image as ``(channels, image_size, image_size)`` float32 in [-1, 1]: converted to
    RGB or L, the shorter side resized to ``image_size`` (bicubic), center-cropped."""
    img = img.convert("RGB" if channels == 3 else "L")
    w, h = img.size
    scale = image_size / min(w, h)  # shorter side -> image_size, then center crop
    img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                     Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0  # (C, S, S) in [-1, 1]
    return x.contiguous()


def load_image(path: str | Path, image_size: int, channels: int) -> torch.Tensor:
    """The image file at ``path`` through :func:`image_to_tensor`."""
    with Image.open(path) as img:
        return image_to_tensor(img, image_size, channels)
