"""Model presets by name, and the one place that picks a network class for them.

    build_model("PF-B/2")                   PatchForcingDiT, B size, patch 2
    build_model("SiT-B/2", per_token=False) GlobalTimeDiT (the SiT baseline)
    build_model("PF-B/2", repa={...})       the REPA variant (projector on the hidden tokens)
    build_t2i("PFT2I-1.2B")                 PatchForcingT2I

Apart from the network files so that a network (``dit.py``) never imports its own
subclasses (``repa.py``): the presets sit above both.
"""

from __future__ import annotations

import torch.nn as nn

from pf.models.dit import GlobalTimeDiT, PatchForcingDiT
from pf.models.repa import REPAGlobalTimeDiT, REPAPatchForcingDiT
from pf.models.t2i import PatchForcingT2I

# (hidden_size, depth, num_heads) per size; patch size 2, MLP ratio 4 throughout.
PRESET_SIZES = {
    "XL/2": (1152, 28, 16),
    "L/2": (1024, 24, 16),
    "B/2": (768, 12, 12),
    "S/2": (384, 12, 6),
    # Small enough to train on a 2-core CPU in minutes (the embedded digits default).
    "Tiny/2": (128, 4, 4),
}

# (hidden_size, depth, head_dim, text_head_dim, cond_width); patch 2, SwiGLU x3, 2 text layers.
T2I_PRESET_SIZES = {
    "1.2B": (1536, 28, 96, 128, 384),   # the paper's model (~1.24B parameters with a 384-wide text encoder)
    "B": (768, 12, 64, 128, 384),
    "S": (384, 12, 64, 64, 384),
    "Tiny": (128, 4, 32, 32, 128),       # trains on a 2-core CPU in minutes (the t2i_demo experiment)
}


def build_model(name: str, per_token: bool = True, repa: dict | None = None, **kwargs) -> PatchForcingDiT:
    """Build a preset by name (``PF-B/2``, ``B/2``, ``SiT-B/2``); ``per_token=False`` gives the
    baseline; ``repa={"z_dim", "encoder_depth", "projector_dim"}`` adds the REPA projector."""
    key = name.split("-", 1)[1] if "-" in name else name
    if key not in PRESET_SIZES:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESET_SIZES)}")
    d, depth, heads = PRESET_SIZES[key]
    if repa is not None:
        cls, kwargs = (REPAPatchForcingDiT if per_token else REPAGlobalTimeDiT), {**kwargs, **repa}
    else:
        cls = PatchForcingDiT if per_token else GlobalTimeDiT
    return cls(hidden_size=d, depth=depth, num_heads=heads, patch_size=int(key.split("/")[1]), **kwargs)


def build_t2i(name: str, **kwargs) -> PatchForcingT2I:
    """A T2I preset by name (``PFT2I-1.2B``, ``1.2B``, ``PFT2I-Tiny``); kwargs override."""
    key = name.split("-", 1)[1] if name.startswith("PFT2I-") else name
    if key not in T2I_PRESET_SIZES:
        raise ValueError(f"unknown T2I preset {name!r}; choose one of {sorted(T2I_PRESET_SIZES)}")
    d, depth, hd, thd, w = T2I_PRESET_SIZES[key]
    params = {"hidden_size": d, "depth": depth, "head_dim": hd, "text_head_dim": thd, "cond_width": w, **kwargs}
    return PatchForcingT2I(**params)


def _preset(build, name: str):
    def preset(**kwargs):
        return build(name, **kwargs)

    return preset


PF_models = {f"PF-{key}": _preset(build_model, key) for key in PRESET_SIZES}
PF_T2I_models = {f"PFT2I-{key}": _preset(build_t2i, key) for key in T2I_PRESET_SIZES}


def num_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = ["PRESET_SIZES", "T2I_PRESET_SIZES", "build_model", "build_t2i", "PF_models", "PF_T2I_models", "num_params"]
