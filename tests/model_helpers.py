"""Small models for the CPU tests."""

from __future__ import annotations

import torch

from pf.models import GlobalTimeDiT, PatchForcingDiT

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def tiny_model(cls=PatchForcingDiT, seed: int = 0, dtype=torch.float64, scale: float = 0.15, **overrides):
    """A tiny model whose trainable weights are all non-zero (DiT's zero init hides errors)."""
    torch.manual_seed(seed)
    model = cls(**{**TINY, **overrides}).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, scale)
    return model


def tiny_global_model(**kw):
    return tiny_model(GlobalTimeDiT, **kw)
