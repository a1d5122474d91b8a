"""Patch Forcing with representation alignment (REPA; SPEC.md section 9).

A projector MLP reads the tokens after block ``encoder_depth`` and predicts a frozen image
encoder's patch features of the clean image; ``pf.training.objective.Alignment`` turns that
into the loss. The projector is a training-time head: ``v`` and ``logvar`` are exactly those
of the same weights without it, and sampling never computes it.

    tokens after blocks[encoder_depth - 1]  (B, N, D)
      -> Linear(D, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, z_dim)   ``projector.{0,2,4}``
      -> z  (B, N, z_dim)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pf.models.dit import GlobalTimeDiT, PatchForcingDiT


class REPAPatchForcingDiT(PatchForcingDiT):
    """``PatchForcingDiT`` plus the REPA projector (the published ``REPAPatchForcingDiT``).

    ``forward(x, t, y, return_uncertainty=False, return_repa=False)`` returns ``v``, then
    ``logvar`` when ``return_uncertainty``, then ``z`` (B, N, z_dim) when ``return_repa``.
    """

    def __init__(self, *args, z_dim: int = 768, encoder_depth: int = 8, projector_dim: int = 2048, **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= int(encoder_depth) <= self.depth:
            raise ValueError(f"encoder_depth must lie in [1, depth={self.depth}] (the block whose output is "
                             f"aligned, 1-based), got {encoder_depth}")
        if int(z_dim) < 1 or int(projector_dim) < 1:
            raise ValueError(f"z_dim and projector_dim must be positive, got {z_dim} and {projector_dim}")
        self.z_dim, self.encoder_depth, self.projector_dim = int(z_dim), int(encoder_depth), int(projector_dim)
        d, p = self.hidden_size, self.projector_dim
        self.projector = nn.Sequential(nn.Linear(d, p), nn.SiLU(), nn.Linear(p, p), nn.SiLU(), nn.Linear(p, self.z_dim))
        for layer in self.projector:
            if isinstance(layer, nn.Linear):  # as every Linear of SPEC section 2
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def config(self) -> dict:
        return {**super().config(), "z_dim": self.z_dim, "encoder_depth": self.encoder_depth,
                "projector_dim": self.projector_dim}

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_uncertainty: bool = False,
                return_repa: bool = False):
        out, hidden = self._trunk(x, t, y, tap_after=self.encoder_depth if return_repa else 0)
        heads = self._heads(out, return_uncertainty)
        if not return_repa:
            return heads
        z = self.projector(hidden)  # (B, N, z_dim)
        return (*heads, z) if isinstance(heads, tuple) else (heads, z)


class REPAGlobalTimeDiT(REPAPatchForcingDiT, GlobalTimeDiT):
    """The SiT baseline with the REPA projector (SiT + REPA, as in the REPA paper)."""


__all__ = ["REPAPatchForcingDiT", "REPAGlobalTimeDiT"]
