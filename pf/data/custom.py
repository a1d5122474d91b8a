"""``data=custom data.target=package.module:factory``: bring your own dataset.

``factory(**data.params)`` returns a ``torch.utils.data.Dataset`` whose items are dicts
``{"image": (C, H, W) float tensor in [-1, 1], "label": int class id}`` (square images; latents
are welcome too, already scaled). Its first item is checked before anything trains, with one
line naming what is wrong. The class count is ``data.num_classes``, else the dataset's own
``num_classes`` attribute; a ``labels`` attribute (all class ids) lets the trainer check every
label's range up front, otherwise each batch's labels are checked by the model as it trains.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import torch
from torch.utils.data import Dataset

from pf.data.base import DataError

RANGE_SLACK = 1e-3  # images in [-1, 1]: rounding of a /127.5 - 1 conversion passes


def load_factory(target: str):
    """``"package.module:factory"`` -> the callable."""
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise DataError(f"data.target={target!r}: expected 'package.module:factory'")
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(f"data.target={target}: cannot import {module_name} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DataError(f"data.target={target}: {module_name} has no callable {attr!r}")
    return factory


def _image_of(item, target: str) -> torch.Tensor:
    if not isinstance(item, dict) or "image" not in item or "label" not in item:
        keys = sorted(item) if isinstance(item, dict) else type(item).__name__
        raise DataError(f"data.target={target}: items must be dicts with 'image' and 'label', the first is {keys}")
    image = item["image"]
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not torch.is_tensor(image) or not image.is_floating_point():
        kind = f"a {image.dtype} tensor" if torch.is_tensor(image) else type(image).__name__
        raise DataError(f"data.target={target}: 'image' must be a float tensor (C, H, W) in [-1, 1], got {kind}")
    return image


class CustomData(Dataset):
    """The factory's dataset as ``(image, label)`` pairs with the trainer's attributes."""

    def __init__(self, target: str, params: dict | None = None, num_classes: int | None = None):
        self.source = f"data.target={target}"
        try:
            self.dataset = load_factory(target)(**(params or {}))
        except DataError:
            raise
        except Exception as err:  # the user's factory failed: say so in one line
            raise DataError(f"{self.source}: the factory raised {type(err).__name__}: {err}") from None
        if not isinstance(self.dataset, Dataset) or not hasattr(self.dataset, "__len__"):
            raise DataError(f"{self.source}: the factory must return a map-style torch.utils.data.Dataset, got "
                            f"{type(self.dataset).__name__}")
        if len(self.dataset) == 0:
            raise DataError(f"{self.source}: the dataset is empty")
        num_classes = num_classes if num_classes is not None else getattr(self.dataset, "num_classes", None)
        if num_classes is None:
            raise DataError(f"{self.source}: set data.num_classes (the dataset has no num_classes attribute)")
        self.num_classes = int(num_classes)
        first = self.dataset[0]
        image = _image_of(first, target)
        if image.dim() != 3 or image.shape[-1] != image.shape[-2] or image.numel() == 0:
            raise DataError(f"{self.source}: 'image' must be a non-empty square (C, H, W) tensor, the first is "
                            f"{tuple(image.shape)}")
        lo, hi = float(image.min()), float(image.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
            raise DataError(f"{self.source}: images must lie in [-1, 1], the first holds values in [{lo:g}, {hi:g}]"
                            + (" (scale 0..1 images by x * 2 - 1)" if lo >= 0 and hi <= 1 + RANGE_SLACK else
                               " (scale 0..255 images by x / 127.5 - 1)" if hi > 1.5 else ""))
        label = first["label"]
        if isinstance(label, torch.Tensor) and label.numel() == 1:
            label = label.item()
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < self.num_classes:
            raise DataError(f"{self.source}: 'label' must be an int class id in [0, {self.num_classes - 1}], the "
                            f"first is {label!r}")
        self.channels, self.image_size = int(image.shape[0]), int(image.shape[-1])
        if hasattr(self.dataset, "labels"):
            self.labels = torch.as_tensor(self.dataset.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return torch.as_tensor(item["image"]).float(), int(item["label"])
