"""Frozen pretrained encoders the training objective aligns to (REPA; text encoders for T2I next)."""

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
