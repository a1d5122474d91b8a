"""Fused ops for per-token-conditioned DiTs (Patch Forcing).

Public API (SPEC.md section 8): ``adaln_modulate``, ``gated_residual``,
``timestep_embedding``, ``patch_euler``, ``ltg_sample``; the indexed forms
``adaln_modulate_indexed`` / ``gated_residual_indexed`` (deduplicated conditioning);
``set_backend`` / ``get_backend`` (``PF_KERNELS_BACKEND=auto|triton|torch``) and
``patch_dit(model)``, the drop-in for DiT/SiT-style models.
"""

from pf_kernels.dispatch import (
    adaln_modulate,
    adaln_modulate_indexed,
    gated_residual,
    gated_residual_indexed,
    get_backend,
    patch_euler,
    set_backend,
    timestep_embedding,
)
from pf_kernels.patch import patch_dit
from pf_kernels.ltg import ltg_sample

__all__ = [
    "adaln_modulate",
    "adaln_modulate_indexed",
    "gated_residual",
    "gated_residual_indexed",
    "timestep_embedding",
    "patch_euler",
    "set_backend",
    "get_backend",
    "patch_dit",
    "ltg_sample",
]
