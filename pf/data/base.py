"""What every dataset shares: an in-memory tensor dataset, the checks against the model,
and the held-out validation split."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset


class DataError(ValueError):
    """The data cannot be used for training (missing, empty, unreadable or not matching the model)."""


class TensorImages(Dataset):
    """Images (or latents) already in memory: ``images`` (M, C, H, W) float32, ``labels`` (M,) int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, source: str):
        if images.dim() != 4:
            raise DataError(f"{source}: expected data of shape (M, C, H, W), got {tuple(images.shape)}")
        if images.shape[-1] != images.shape[-2]:
            raise DataError(f"{source}: images must be square, got {images.shape[-2]}x{images.shape[-1]}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{source}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images.float().contiguous()
        self.labels = labels.long().contiguous()
        self.num_classes = int(num_classes)
        self.channels = images.shape[1]
        self.image_size = images.shape[-1]
        self.source = source

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def dataset_labels(dataset) -> torch.Tensor:
    """All labels of a dataset (or of a Subset of one) without loading any image."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.as_tensor(dataset.labels, dtype=torch.long)


def _knows_labels(dataset) -> bool:
    return _knows_labels(dataset.dataset) if isinstance(dataset, Subset) else hasattr(dataset, "labels")


def check_against_model(dataset, *, num_classes: int, channels: int, image_size: int) -> None:
    """Stop before training when the data and the model disagree."""
    src = getattr(dataset, "source", "the dataset")
    if len(dataset) == 0:
        raise DataError(f"{src} holds no training examples")
    if dataset.num_classes != num_classes:
        raise DataError(
            f"{src} has {dataset.num_classes} classes but the model is built for num_classes={num_classes}; "
            f"set model.num_classes={dataset.num_classes} (or data.num_classes) to match the data"
        )
    labels = dataset_labels(dataset) if _knows_labels(dataset) else None  # data=custom may not: the model checks
    lo, hi = (int(labels.min()), int(labels.max())) if labels is not None else (0, 0)
    if lo < 0 or hi >= num_classes:
        raise DataError(f"{src}: labels lie in [{lo}, {hi}], outside [0, {num_classes - 1}] for num_classes={num_classes}")
    if dataset.channels != channels:
        raise DataError(f"{src} has {dataset.channels} channels but the model expects in_channels={channels}")
    if dataset.image_size != image_size:
        raise DataError(f"{src} holds {dataset.image_size}x{dataset.image_size} inputs but the model expects "
                        f"input_size={image_size}")


def split_validation(dataset, val_size: int, seed: int):
    """Hold out ``val_size`` examples (a fixed random choice) for validation: ``(train, val)``."""
    n = len(dataset)
    val_size = min(int(val_size), n // 10)  # never take more than a tenth of the data
    if val_size <= 0:
        return dataset, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(perm[val_size:])), Subset(dataset, sorted(perm[:val_size]))
