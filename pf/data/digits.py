"""The embedded default: scikit-learn's handwritten digits (ships with the package, works offline).

1,797 grey 8x8 digits in 10 classes, pixel values 0..16, upsampled (bilinear) to
``image_size`` and scaled to [-1, 1]. At 16x16 a patch size of 2 gives 64 tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pf.data.base import DataError, TensorImages


def load_digits_dataset(image_size: int = 16) -> TensorImages:
    from sklearn.datasets import load_digits  # here, not at the top: importing scikit-learn takes seconds

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if image_size < 8:
        raise DataError(f"data.image_size must be at least 8 for the digits, got {image_size}")
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images * 2 - 1).clamp(-1, 1)  # (1797, 1, S, S)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return TensorImages(images, labels, num_classes=10, source="sklearn digits")
