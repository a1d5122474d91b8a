"""Frozen image encoders the training objective aligns to (REPA), and this project's own small
classifier network among them (``pf.encoders.classifier``; FID's feature extractor reads it too)."""

from pf.encoders.image import (
    ClassifierEncoder,
    DINOv2Encoder,
    ImageEncoder,
    TimmEncoder,
    build_image_encoder,
    register_image_encoder,
    resample_tokens,
)

__all__ = [
    "ImageEncoder",
    "ClassifierEncoder",
    "DINOv2Encoder",
    "TimmEncoder",
    "build_image_encoder",
    "register_image_encoder",
    "resample_tokens",
]
