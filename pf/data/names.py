"""Readable class names of a run's training data, from its saved config: the one ``class_names``.

The training pictures and ``pf.sample``'s grids label each picture with these; a data set
without names gives ``class i``.
"""

from __future__ import annotations

from pathlib import Path

from pf.data.latent_shards import is_latent_set, read_manifest
from pf.data.mnist_format import FASHION_MNIST_CLASSES


def class_names(train_config: dict | None, num_classes: int) -> list[str]:
    """Readable class names for a checkpoint's training data (ids where the data has no names)."""
    data = (train_config or {}).get("data", {}) or {}
    if data.get("name") == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if data.get("name") == "digits":
        return [f"digit {i}" for i in range(num_classes)]
    if data.get("name") == "latents" and is_latent_set(data.get("path")):
        names = read_manifest(Path(data["path"]).expanduser()).get("class_names")
        if names and len(names) == num_classes:
            return list(names)
    return [f"class {i}" for i in range(num_classes)]
