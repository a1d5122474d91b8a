"""Plain-PyTorch references of every op in ``pf_kernels``.

These are the definitions the Triton kernels are measured against, and the path taken on
the CPU (``PF_KERNELS_BACKEND=torch`` or ``auto`` with CPU tensors). They follow
``SPEC.md`` section 8 literally, with statistics and ``1 + scale`` in float32 (or in the
input precision when that is wider, so a float64 model stays float64 end to end).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision is computed in float32; float32 and float64 keep their own precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def adaln_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift``; LN without affine parameters.

    x: (B, N, D); shift, scale: (B, N, D) or (B, 1, D). Returns x's dtype.
    """
    acc = _acc_dtype(x.dtype)
    xn = F.layer_norm(x.to(acc), (x.shape[-1],), eps=eps)  # (B, N, D)
    out = xn * (1.0 + scale.to(acc)) + shift.to(acc)
    return out.to(x.dtype)


def gated_residual_dtype(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """The dtype eager ``x + gate * y`` gives (type promotion: fp16 x with an fp32 gate is fp32)."""
    return torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)


def gated_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``; gate (B, N, D) or (B, 1, D). Returns eager PyTorch's promoted dtype."""
    out = gated_residual_dtype(x, gate, y)
    acc = _acc_dtype(out)
    return (x.to(acc) + gate.to(acc) * y.to(acc)).to(out)


def ada_rms_norm_dtype(x: torch.Tensor, scale: torch.Tensor) -> torch.dtype:
    """The dtype eager ``x * rsqrt(mean(x^2) + eps) * (1 + scale)`` gives: x's, or scale's
    when that is wider (fp16 x with an fp32 scale is fp32), as ``gated_residual_dtype``."""
    return torch.promote_types(x.dtype, scale.dtype)


def ada_rms_norm_ref(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * (1 + scale)`` (AdaRMSNorm, SPEC.md section 11).

    x: (B, N, D); scale: (B, N, D) or (B, 1, D). Returns eager PyTorch's promoted dtype.
    """
    out = ada_rms_norm_dtype(x, scale)
    acc = _acc_dtype(out)
    xa = x.to(acc)
    rstd = torch.rsqrt(xa.square().mean(-1, keepdim=True) + eps)  # (B, N, 1)
    return (xa * rstd * (1.0 + scale.to(acc))).to(out)


def timestep_frequencies(half: int, max_period: float, dtype: torch.dtype, device) -> torch.Tensor:
    """``f_k = exp(-ln(max_period) * k / half)``, k < half (the kernel reads this very table)."""
    k = torch.arange(half, device=device, dtype=dtype)
    return torch.exp(-math.log(max_period) * k / half)


def timestep_embedding_ref(
    t: torch.Tensor, dim: int = 256, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal features of ``t`` (no x1000): ``[cos(t * f_k), sin(t * f_k)]``.

    ``f_k = exp(-ln(max_period) * k / half)`` for ``k < half = dim // 2``; an odd ``dim``
    gets one trailing zero column. t: any shape -> t.shape + (dim,), float32 (or float64).
    """
    half = dim // 2
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = timestep_frequencies(half, max_period, acc, t.device)  # (half,)
    args = t.to(acc)[..., None] * freqs  # t.shape + (half,)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


def patch_to_pixels(values: torch.Tensor, patch_size: int, grid_w: int) -> torch.Tensor:
    """Broadcast per-patch values (B, N) to pixels (B, 1, gh*p, gw*p), raster order."""
    b, n = values.shape
    grid = values.reshape(b, 1, n // grid_w, grid_w)
    return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def patch_euler_ref(
    x: torch.Tensor,
    v: torch.Tensor,
    dt: torch.Tensor,
    patch_size: int,
    *,
    v_other: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + dt_patch * (mask ? v : v_other)``; x, v, v_other (B, C, H, W); dt, mask (B, N).

    A masked-out patch with no ``v_other`` keeps its value (its velocity counts as zero).
    Computed in float32 (float64 for float64 x), as the kernel does, and returned in x's dtype.
    """
    _, _, h, w = x.shape
    gw = w // patch_size
    acc = _acc_dtype(x.dtype)
    dt_px = patch_to_pixels(dt.to(acc), patch_size, gw)  # (B, 1, H, W)
    vel = v.to(acc)
    if mask is not None:
        m = patch_to_pixels(mask, patch_size, gw)  # (B, 1, H, W) bool
        other = v_other.to(acc) if v_other is not None else torch.zeros_like(vel)
        vel = torch.where(m, vel, other)
    res = (x.to(acc) + dt_px * vel).to(x.dtype)
    if out is not None:
        out.copy_(res)
        return out
    return res


def _gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table (B, K, D), index (B, N) -> (B, N, D) with row index[b, n] of table[b]."""
    return table.gather(1, index[:, :, None].expand(-1, -1, table.shape[-1]))


def adaln_modulate_indexed_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``adaln_modulate`` with (B, K, D) tables of shift/scale and a per-token row index (B, N)."""
    return adaln_modulate_ref(x, _gather_rows(shift, index), _gather_rows(scale, index), eps)


def gated_residual_indexed_ref(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """``gated_residual`` with a (B, K, D) gate table and a per-token row index (B, N)."""
    return gated_residual_ref(x, _gather_rows(gate, index), y)


def gated_residual_modulate_ref(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_new = x + gate * y`` and ``h = LN(x_new) * (1 + scale) + shift``: returns (x_new, h).

    Exactly ``gated_residual`` then ``adaln_modulate`` (x_new in eager's promoted dtype, h in
    x_new's); gate, shift, scale each (B, N, D) or (B, 1, D).
    """
    x_new = gated_residual_ref(x, gate, y)
    return x_new, adaln_modulate_ref(x_new, shift, scale, eps)


def gated_residual_modulate_indexed_ref(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    index: torch.Tensor, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_residual_modulate`` with (B, K, D) gate/shift/scale tables and a row index (B, N)."""
    return gated_residual_modulate_ref(
        x, _gather_rows(gate, index), y, _gather_rows(shift, index), _gather_rows(scale, index), eps)


def ada_rms_norm_indexed_ref(
    x: torch.Tensor, scale_table: torch.Tensor, index: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``ada_rms_norm`` with a (B, K, D) scale table and a per-token row index (B, N)."""
    return ada_rms_norm_ref(x, _gather_rows(scale_table, index), eps)


#################################################################################
#          The general forms (other codebases' blocks: diffusers' models)        #
#################################################################################


def norm_modulate_dtype(x: torch.Tensor, *others: torch.Tensor | None) -> torch.dtype:
    """Eager's dtype of ``norm(x) * (1 + scale) + shift`` (with an affine norm's weight and bias)."""
    out = x.dtype
    for t in others:
        if t is not None:
            out = torch.promote_types(out, t.dtype)
    return out


def norm_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, *,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, rms: bool = False, eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(norm(x) * weight + bias) * (1 + scale) + shift``, each of weight (D,), bias (D,), scale and
    shift ((B, N, D) or (B, 1, D)) optional; norm LayerNorm, or RMSNorm (``rms``) ``x * rsqrt(mean(x^2)
    + eps)``. Computed in fp32 (float64 for float64 x); returned in ``out_dtype``, by default the
    promoted dtype of x and the tensors given."""
    out = out_dtype or norm_modulate_dtype(x, shift, scale, weight, bias)
    acc = _acc_dtype(out if out == torch.float64 else x.dtype)
    xa = x.to(acc)
    if rms:
        h = xa * torch.rsqrt(xa.square().mean(-1, keepdim=True) + eps)  # (B, N, D)
    else:
        h = F.layer_norm(xa, (x.shape[-1],), eps=eps)
    if weight is not None:
        h = h * weight.to(acc)
    if bias is not None:
        h = h + bias.to(acc)
    if scale is not None:
        h = h * (1.0 + scale.to(acc))
    if shift is not None:
        h = h + shift.to(acc)
    return h.to(out)


def residual_ref(x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x + gate * y`` (``x + y`` without gate), computed in fp32 and returned in ``out_dtype``
    (default: eager's promoted dtype)."""
    out = out_dtype or norm_modulate_dtype(x, gate, y)
    acc = _acc_dtype(out)
    ya = y.to(acc) if gate is None else gate.to(acc) * y.to(acc)
    return (x.to(acc) + ya).to(out)


def residual_norm_modulate_ref(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, *, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    rms: bool = False, eps: float = 1e-6, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_new = residual_ref(x, gate, y)`` then ``h = norm_modulate_ref(x_new, ...)``, both in
    ``out_dtype`` (default: x_new in eager's promoted dtype, h in x_new's)."""
    x_new = residual_ref(x, gate, y, out_dtype)
    return x_new, norm_modulate_ref(x_new, shift, scale, weight=weight, bias=bias, rms=rms, eps=eps,
                                    out_dtype=out_dtype or x_new.dtype)


def sandwich_residual_ref(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, *, y_weight: torch.Tensor | None = None,
    y_eps: float = 1e-6, tanh_gate: bool = True, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The RMSNorm sandwich's update ``x + tanh(gate) * RMS_w(y)`` (Lumina2, Mochi): y RMS-normalised
    (eps ``y_eps``, times ``y_weight`` (D,) when given), gated (``tanh_gate`` False: the gate as
    is; no gate: ``x + RMS_w(y)``). Computed in fp32 (float64 for float64), returned in
    ``out_dtype``, by default the promoted dtype of x, gate, y and y_weight."""
    out = out_dtype or norm_modulate_dtype(x, gate, y, y_weight)
    acc = _acc_dtype(out)
    ya = norm_modulate_ref(y, weight=y_weight, rms=True, eps=y_eps, out_dtype=acc)  # (B, N, D)
    if gate is not None:
        ya = (torch.tanh(gate.to(acc)) if tanh_gate else gate.to(acc)) * ya
    return (x.to(acc) + ya).to(out)


def sandwich_residual_norm_modulate_ref(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, scale: torch.Tensor | None = None, *,
    y_weight: torch.Tensor | None = None, weight: torch.Tensor | None = None, y_eps: float = 1e-6,
    eps: float = 1e-6, tanh_gate: bool = True, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_new = sandwich_residual_ref(x, gate, y, ...)``, then the next norm
    ``h = RMS_weight(x_new) * (1 + scale)``; both in ``out_dtype`` (default: x_new's as
    ``sandwich_residual_ref``, h in x_new's)."""
    x_new = sandwich_residual_ref(x, gate, y, y_weight=y_weight, y_eps=y_eps, tanh_gate=tanh_gate, out_dtype=out_dtype)
    return x_new, norm_modulate_ref(x_new, None, scale, weight=weight, rms=True, eps=eps,
                                    out_dtype=out_dtype or x_new.dtype)
