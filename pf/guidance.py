"""Classifier-free guidance on both heads (SPEC.md section 5).

With ``cfg_scale = s != 1`` the batch runs as ``[null condition; condition]`` in one model
call; ``v = v_u + s*(v_c - v_u)`` and ``logvar = lv_u + s*(lv_c - lv_u)``; ``v_c`` is kept
for the look-ahead sampler. With ``s = 1`` one plain pass and ``v_c = v``. The condition is
class ids (null: the class ``num_classes``) or a text condition (null: the empty prompt's
encoding, ``uc_cond``); :mod:`pf.conditioning` puts the two halves side by side.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pf import conditioning


class Guided(NamedTuple):
    v: torch.Tensor  # (B, C, H, W) guided velocity
    logvar: torch.Tensor | None  # (B, 1, H, W) guided log-variance (None if not asked)
    v_cond: torch.Tensor  # (B, C, H, W) conditional velocity


def guided_call(model, x: torch.Tensor, t: torch.Tensor, y, cfg_scale: float = 1.0,
                uc_cond=None, with_logvar: bool = True) -> Guided:
    """One model evaluation (one NFE) with guidance on the velocity and the difficulty map."""
    if cfg_scale == 1.0:
        out = model(x, t, y, return_uncertainty=with_logvar)
        v, lv = out if with_logvar else (out, None)
        return Guided(v, lv, v)
    y2 = conditioning.cat([conditioning.null(model, y, uc_cond), y])
    out = model(torch.cat([x, x]), torch.cat([t, t]), y2, return_uncertainty=with_logvar)
    v2, lv2 = out if with_logvar else (out, None)
    v_u, v_c = v2.chunk(2)
    v = v_u + cfg_scale * (v_c - v_u)
    lv = None
    if with_logvar:
        lv_u, lv_c = lv2.chunk(2)
        lv = lv_u + cfg_scale * (lv_c - lv_u)
    return Guided(v, lv, v_c)
