"""Data sets in the MNIST file format (idx files, gzipped or not): Fashion-MNIST, MNIST, KMNIST, ...

A folder holding the four standard files::

    train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]     (60,000 in MNIST and Fashion-MNIST)
    t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]      (10,000: the held-out test split)

(``train-images.idx3-ubyte`` with a dot, as some copies name them, is found too). An idx file
is a big-endian header ``0, 0, dtype code, ndim``, then ``ndim`` uint32 sizes, then the
values; images are ``(M, H, W)`` uint8, labels ``(M,)`` uint8. Images are resized to
``image_size`` (bilinear with antialiasing; 28 -> 16 gives 64 patches at patch 2) and
scaled to [-1, 1].
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pf.data.base import DataError, TensorImages

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """The array in an idx file (``.gz`` or plain), checked against its own header."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read idx file {path}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says shape {shape} ({expected} bytes of data), the file holds "
                        f"{len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_split_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """(images file, labels file) of ``split`` (``train`` or ``test``) in ``root``."""
    if split not in SPLIT_PREFIX:
        raise DataError(f"data.split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    prefix = SPLIT_PREFIX[split]
    found = []
    for kind, ndim in (("images", 3), ("labels", 1)):
        names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
        candidates = [root / (n + gz) for n in names for gz in (".gz", "")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DataError(
                f"{root}: no {split} {kind} file ({names[0]}[.gz]). Fashion-MNIST: `apt-get install "
                f"dataset-fashion-mnist` (files in {FASHION_MNIST_DIR}), or set data.path=<folder with the four "
                f"MNIST-format files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz>")
        found.append(hit)
    return found[0], found[1]


def load_mnist_format(root: str | Path | None, split: str = "train", image_size: int = 16,
                      name: str = "mnist_format", class_names: tuple[str, ...] | None = None,
                      num_classes: int | None = None) -> TensorImages:
    """One split of an MNIST-format data set as ``(M, 1, S, S)`` images in [-1, 1] with labels.

    ``num_classes``: default ``len(class_names)``, else the largest label + 1 of this split.
    """
    if root is None or str(root) in ("", "???"):
        raise DataError("data=mnist_format needs data.path=<folder with the four MNIST-format idx files>")
    if int(image_size) < 2:
        raise DataError(f"data.image_size must be at least 2, got {image_size}")
    images_file, labels_file = find_split_files(root, split)
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3:
        raise DataError(f"{images_file}: expected images of shape (M, H, W), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_file}: {labels.shape} labels for {images.shape[0]} images in {images_file}")
    x = torch.from_numpy(images.astype(np.float32))[:, None] / 255.0  # (M, 1, H, W) in [0, 1]
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(int(image_size), int(image_size)), mode="bilinear", align_corners=False,
                          antialias=True)
    x = (x * 2 - 1).clamp(-1, 1)
    y = torch.from_numpy(labels.astype(np.int64))
    if num_classes is None:
        num_classes = len(class_names) if class_names else int(y.max()) + 1
    out = TensorImages(x, y, num_classes=num_classes, source=f"{name} {split} split ({Path(root).expanduser()})")
    out.class_names = tuple(class_names) if class_names else tuple(str(c) for c in range(num_classes))
    return out
