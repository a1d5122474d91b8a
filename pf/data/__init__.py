"""Where training data enters: the embedded digits, image folders and precomputed latents.

Every dataset yields ``(x, y)`` with ``x`` a float32 ``(C, H, W)`` tensor (images in
[-1, 1], latents already multiplied by their scale factor) and ``y`` an int class id, and
carries ``num_classes``, ``channels`` and ``image_size``. ``build_dataset(cfg)`` picks one
from the ``data`` config group and checks it against the model before training starts.
"""

from __future__ import annotations

from pf.data.base import DataError, TensorImages, check_against_model, split_validation
from pf.data.digits import load_digits_dataset
from pf.data.folder import ImageFolder
from pf.data.latents import load_latents
from pf.data.loader import ShardedBatches


def build_dataset(data_cfg) -> TensorImages | ImageFolder:
    """The dataset named by ``data_cfg.name`` (``digits``, ``folder`` or ``latents``)."""
    name = data_cfg.name
    if name == "digits":
        return load_digits_dataset(image_size=data_cfg.image_size)
    if name == "folder":
        return ImageFolder(data_cfg.path, image_size=data_cfg.image_size, channels=data_cfg.channels)
    if name == "latents":
        return load_latents(data_cfg.path, labels_path=data_cfg.labels_path, scale_factor=data_cfg.scale_factor,
                            num_classes=data_cfg.num_classes)
    raise DataError(f"unknown dataset {name!r}; choose data=digits, data=folder or data=latents")


__all__ = [
    "DataError",
    "TensorImages",
    "ImageFolder",
    "ShardedBatches",
    "build_dataset",
    "check_against_model",
    "load_digits_dataset",
    "load_latents",
    "split_validation",
]
