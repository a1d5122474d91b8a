"""Drop-in: rebind the ``forward`` of DiT/SiT/PF-style modules to the fused ops.

Recognised by their attributes (no import of the other codebase needed):
  block        ``adaLN_modulation``, ``norm1``, ``norm2``, ``attn``, ``mlp``; forward(x, c);
               ``adaLN_modulation(c)`` split in 6 in DiT's order
               (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp);
  final layer  ``adaLN_modulation``, ``norm_final``, ``linear``; split in 2 (shift, scale).
``c`` may be per sample (B, D), as in DiT/SiT (whose forward does ``chunk(6, dim=1)`` and
``unsqueeze(1)``), or per token (B, N, D) / (B, 1, D) as in Patch Forcing, or a (B, K, D)
table with a third argument ``index`` (B, N) (PF's deduplicated conditioning). The chunks stay
strided views of the modulation output: the kernels read them in place.

Only LayerNorms without affine parameters are fused (that is DiT's design); a module whose
norms carry weights, or whose modulation Linear has an unexpected width, is left alone.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from pf_kernels.dispatch import adaln_modulate, adaln_modulate_indexed, gated_residual, gated_residual_indexed

_PATCHED = "_pf_kernels_original_forward"


def _plain_layernorm(norm: nn.Module) -> bool:
    return (
        isinstance(norm, nn.LayerNorm)
        and norm.weight is None
        and norm.bias is None
        and len(norm.normalized_shape) == 1
    )


def _modulation_width(mod: nn.Module) -> int | None:
    """out_features of the last Linear in ``adaLN_modulation`` (None when there is none)."""
    last = None
    for m in mod.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else last.out_features


def _per_token(mod: torch.Tensor) -> torch.Tensor:
    # (B, k*D) per-sample modulation -> (B, 1, k*D); (B, N, k*D) is left as it is.
    return mod.unsqueeze(1) if mod.dim() == 2 else mod


def _block_forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    # x (B, N, D); c (B, D) per sample or (B, N, D) / (B, 1, D) per token; with index (B, N),
    # c is a (B, K, D) table of distinct conditionings (PF's deduplicated form).
    mod = _per_token(self.adaLN_modulation(c))  # (B, N|1|K, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    if index is not None:
        x = gated_residual_indexed(
            x, gate_msa, self.attn(adaln_modulate_indexed(x, shift_msa, scale_msa, index, self.norm1.eps)), index
        )
        return gated_residual_indexed(
            x, gate_mlp, self.mlp(adaln_modulate_indexed(x, shift_mlp, scale_mlp, index, self.norm2.eps)), index
        )
    x = gated_residual(x, gate_msa, self.attn(adaln_modulate(x, shift_msa, scale_msa, self.norm1.eps)))
    x = gated_residual(x, gate_mlp, self.mlp(adaln_modulate(x, shift_mlp, scale_mlp, self.norm2.eps)))
    return x


def _final_forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    mod = _per_token(self.adaLN_modulation(c))  # (B, N|1|K, 2D)
    shift, scale = mod.chunk(2, dim=-1)
    if index is not None:
        return self.linear(adaln_modulate_indexed(x, shift, scale, index, self.norm_final.eps))
    return self.linear(adaln_modulate(x, shift, scale, self.norm_final.eps))


def _is_block(m: nn.Module) -> bool:
    if not all(hasattr(m, a) for a in ("adaLN_modulation", "norm1", "norm2", "attn", "mlp")):
        return False
    if not (_plain_layernorm(m.norm1) and _plain_layernorm(m.norm2)):
        return False
    return _modulation_width(m.adaLN_modulation) == 6 * m.norm1.normalized_shape[0]


def _is_final(m: nn.Module) -> bool:
    if not all(hasattr(m, a) for a in ("adaLN_modulation", "norm_final", "linear")):
        return False
    if not _plain_layernorm(m.norm_final):
        return False
    return _modulation_width(m.adaLN_modulation) == 2 * m.norm_final.normalized_shape[0]


def patch_dit(model: nn.Module) -> int:
    """Rebind the forward of every DiT-style block and final layer in ``model`` (``model``
    itself included) to the fused ops. Returns how many modules this call patched; modules
    already patched are skipped, so calling it twice is harmless. ``unpatch_dit`` undoes it.
    """
    patched = 0
    for module in model.modules():
        if hasattr(module, _PATCHED):
            continue
        if _is_block(module):
            new_forward = _block_forward
        elif _is_final(module):
            new_forward = _final_forward
        else:
            continue
        # The instance attribute shadows the class's forward: only this module changes.
        setattr(module, _PATCHED, module.__dict__.get("forward"))
        module.forward = types.MethodType(new_forward, module)
        patched += 1
    return patched


def unpatch_dit(model: nn.Module) -> int:
    """Restore the forwards that ``patch_dit`` replaced. Returns how many were restored."""
    restored = 0
    for module in model.modules():
        if not hasattr(module, _PATCHED):
            continue
        original = getattr(module, _PATCHED)
        delattr(module, _PATCHED)
        if original is None:
            del module.forward
        else:
            module.forward = original
        restored += 1
    return restored
