"""Fused ops for per-token-conditioned DiTs (Patch Forcing).

Public API (SPEC.md section 8): ``adaln_modulate``, ``gated_residual``,
``timestep_embedding``, ``patch_euler``, ``ltg_sample``.
"""

from pf_kernels.reference import (
    adaln_modulate_ref as adaln_modulate,
    gated_residual_ref as gated_residual,
    patch_euler_ref as patch_euler,
    timestep_embedding_ref as timestep_embedding,
)

__all__ = ["adaln_modulate", "gated_residual", "timestep_embedding", "patch_euler"]
