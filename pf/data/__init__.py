"""Where training data enters: the embedded digits, MNIST-format sets (Fashion-MNIST), image
folders and precomputed latents; for text-to-image, captioned data (``pf.data.captions``).

Every dataset yields ``(x, y)`` with ``x`` a float32 ``(C, H, W)`` tensor (images in
[-1, 1], latents already multiplied by their scale factor) and ``y`` an int class id (a latent
set asked for pixels adds the image behind the latent), and
carries ``num_classes``, ``channels`` and ``image_size``. ``build_dataset(cfg)`` picks one
from the ``data`` config group and checks it against the model before training starts.
"""

from __future__ import annotations

from pf.data.base import DataError, TensorImages, check_against_model, split_validation
from pf.data.captions import (
    CaptionedClasses,
    CaptionFolder,
    CaptionShards,
    build_caption_dataset,
    check_caption_data,
    demo_prompts,
    load_captioned,
)
from pf.data.custom import CustomData
from pf.data.digits import load_digits_dataset
from pf.data.folder import ImageFolder
from pf.data.latent_shards import LatentShards, is_latent_set
from pf.data.latents import load_latents
from pf.data.mnist_format import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_mnist_format
from pf.data.loader import ShardedBatches, StreamBatches


def build_dataset(data_cfg, seed: int = 0, pixels: bool = False) -> TensorImages | ImageFolder | LatentShards:
    """The dataset named by ``data_cfg.name`` (``digits``, ``fashion_mnist``, ``mnist_format``,
    ``folder`` or ``latents``); ``data_cfg.split`` (``train`` | ``test``) picks the split of the
    sets that have one. ``data=latents`` reads a latent set folder (``pf.data.encode``)
    memory-mapped, or a single ``.npz`` / ``.npy`` into memory; ``seed`` keys its random flips.
    ``pixels=True``: latent items also carry their images (REPA); pixel data are their own."""
    name = data_cfg.name
    split = data_cfg.get("split", "train") or "train"
    if split != "train" and name not in ("fashion_mnist", "mnist_format"):
        raise DataError(f"data={name} has no {split!r} split (only data=fashion_mnist and data=mnist_format do)")
    if name == "digits":
        return load_digits_dataset(image_size=data_cfg.image_size)
    if name == "fashion_mnist":
        return load_mnist_format(data_cfg.get("path") or FASHION_MNIST_DIR, split, data_cfg.image_size,
                                 name="Fashion-MNIST", class_names=FASHION_MNIST_CLASSES)
    if name == "mnist_format":
        return load_mnist_format(data_cfg.get("path"), split, data_cfg.image_size, num_classes=data_cfg.num_classes)
    if name == "folder":
        return ImageFolder(data_cfg.path, image_size=data_cfg.image_size, channels=data_cfg.channels)
    if name == "latents" and is_latent_set(data_cfg.path):
        return LatentShards(data_cfg.path, flip=bool(data_cfg.get("flip", True)),
                            sample_posterior=bool(data_cfg.get("sample_posterior", False)),
                            scale_factor=data_cfg.scale_factor, seed=seed, pixels=pixels)
    if name == "latents" and pixels:
        raise DataError("a single file of latents carries no pixels, which trainer.repa needs: make a latent set "
                        "with `python -m pf.data.encode images=... out=... vae=... pixels=true`")
    if name == "custom":
        return CustomData(data_cfg.get("target"), dict(data_cfg.get("params") or {}), data_cfg.num_classes)
    if name == "latents":
        return load_latents(data_cfg.path, labels_path=data_cfg.labels_path, scale_factor=data_cfg.scale_factor,
                            num_classes=data_cfg.num_classes)
    raise DataError(f"unknown dataset {name!r}; choose data=digits, fashion_mnist, mnist_format, folder, latents or custom")


__all__ = [
    "CaptionFolder",
    "CustomData",
    "CaptionShards",
    "CaptionedClasses",
    "build_caption_dataset",
    "check_caption_data",
    "demo_prompts",
    "load_captioned",
    "DataError",
    "TensorImages",
    "ImageFolder",
    "LatentShards",
    "ShardedBatches",
    "StreamBatches",
    "build_dataset",
    "check_against_model",
    "load_digits_dataset",
    "load_latents",
    "load_mnist_format",
    "split_validation",
]
