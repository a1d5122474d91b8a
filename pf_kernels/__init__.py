"""Fused ops for per-token-conditioned DiTs (Patch Forcing).

Public API (SPEC.md section 8): ``adaln_modulate``, ``gated_residual``,
``timestep_embedding``, ``patch_euler``, ``ltg_sample``; ``ada_rms_norm`` (the AdaRMSNorm of
section 11); the indexed forms ``adaln_modulate_indexed`` / ``gated_residual_indexed`` /
``ada_rms_norm_indexed`` (deduplicated conditioning); ``gated_residual_modulate`` (and its
``_indexed`` form): a residual update fused with the next LayerNorm + modulation; the general
forms ``norm_modulate`` / ``residual`` / ``residual_norm_modulate`` (affine LayerNorm or RMSNorm,
optional shift and gate, output dtype: diffusers' blocks) and the RMSNorm sandwich
``sandwich_residual`` / ``sandwich_residual_norm_modulate`` (Lumina2, Mochi); ``patch_diffusers(transformer)``;
``set_backend`` / ``get_backend`` / ``use_backend`` (``PF_KERNELS_BACKEND=auto|triton|torch``) and
``patch_dit(model)``, the drop-in for DiT/SiT-style models.
"""

from pf_kernels.dispatch import (
    ada_rms_norm,
    ada_rms_norm_indexed,
    adaln_modulate,
    adaln_modulate_indexed,
    gated_residual,
    gated_residual_indexed,
    gated_residual_modulate,
    gated_residual_modulate_indexed,
    get_backend,
    norm_modulate,
    patch_euler,
    residual,
    residual_norm_modulate,
    sandwich_residual,
    sandwich_residual_norm_modulate,
    set_backend,
    timestep_embedding,
    use_backend,
)
from pf_kernels.patch import patch_dit
from pf_kernels.diffusers_patch import patch_diffusers, unpatch_diffusers
from pf_kernels.ltg import ltg_sample

__all__ = [
    "ada_rms_norm",
    "ada_rms_norm_indexed",
    "adaln_modulate",
    "adaln_modulate_indexed",
    "gated_residual",
    "gated_residual_indexed",
    "gated_residual_modulate",
    "gated_residual_modulate_indexed",
    "norm_modulate",
    "residual",
    "residual_norm_modulate",
    "sandwich_residual",
    "sandwich_residual_norm_modulate",
    "timestep_embedding",
    "patch_euler",
    "set_backend",
    "get_backend",
    "use_backend",
    "patch_dit",
    "patch_diffusers",
    "unpatch_diffusers",
    "ltg_sample",
]
