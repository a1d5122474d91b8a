"""The general forms of ``norm_modulate``'s family, for other DiT codebases (diffusers' models).

    norm_modulate            h = norm(x) * (1 + scale) + shift
    residual_norm_modulate   x_new = x + gate * y  (or the ungated x + y),  h = norm(x_new) * (1 + scale) + shift
norm is LayerNorm or RMSNorm (``rms``; an RMSNorm may have a shift: LTX-Video's), shift optional,
gate optional (PixArt's cross-attention and Wan's are ungated), and the outputs in a chosen dtype
(Wan keeps a bf16 residual stream while it modulates in fp32: fp32 modulations, bf16 outputs).
The kernels are ``norm_modulate``'s, through its HAS_SHIFT / HAS_GATE constexpr flags. An affine
norm's weight and bias are folded into scale and shift by the dispatcher (``dispatch.norm_modulate``).

Modulations: per token (B, N, D) or per sample (B, 1, D), strided views fine. Registered ops
(absent inputs are ``None``, absent grads empty tensors): ``pf_kernels::norm_modulate``
-> (h, stats), ``pf_kernels::residual_norm_modulate`` -> (x_new, h, stats) (stats: the (B, N, 2)
fp32 row statistics the backward reads, stored on every call: 8 bytes a token) and their
``..._backward`` ops.
"""

from typing import Optional

import torch
from torch import Tensor

from pf_kernels.ops._utils import empty_rows
from pf_kernels.ops import norm_modulate as family
from pf_kernels.ops.norm_modulate import norm_modulate_bwd, norm_modulate_bwd_fake, shift_grad
from pf_kernels.ops.registry import register


def _none_as_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A custom op returns tensors only: an absent grad travels as an empty one."""
    return like.new_empty((0,)) if t is None else t


def _empty_as_none(t: Tensor, given: Optional[Tensor]) -> Optional[Tensor]:
    return None if given is None else t


#################################################################################
#                          norm_modulate: h = norm(x) * ...                      #
#################################################################################


def norm_modulate_op(x: Tensor, shift: Optional[Tensor], scale: Tensor, rms: bool, eps: float,
                      out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x (B, N, D); shift (optional), scale (B, N|1, D). Returns (h (B, N, D) in out_dtype, stats)."""
    _, h, stats = norm_modulate_fwd_family(x, shift, scale, rms, eps, out_dtype)
    return h, stats


def norm_modulate_fwd_family(x, shift, scale, rms, eps, out_dtype, gate=None, y=None):
    """(x_new, h, stats) from the family's forward (x_new is h without y)."""
    return family.norm_modulate_fwd("norm_modulate" if y is None else "residual_norm_modulate", x, scale, None, eps,
                             out_dtype, shift=shift, gate=gate, y=y, store_stats=True, rms=rms)


def norm_modulate_bwd_op(grad_h: Tensor, x: Tensor, shift: Optional[Tensor], scale: Tensor, rms: bool, eps: float,
                         stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dshift, dscale); dshift empty when there is no shift or it is per token (= grad_h)."""
    dx, _, _, dshift, dscale = norm_modulate_bwd("norm_modulate", grad_h, x, scale, None, eps, stats, shift=shift,
                                                 rms=rms)
    return dx, _none_as_empty(dshift, x), dscale


def _nm_bwd_fake(grad_h, x, shift, scale, rms, eps, stats):
    dx, _, _, dshift, dscale = norm_modulate_bwd_fake(x, scale, None, shift=shift)
    return dx, _none_as_empty(dshift, x), dscale


def _nm_backward(grads, x, shift, scale, rms, eps, x_dtype, stats):
    dx, dshift, dscale = torch.ops.pf_kernels.norm_modulate_backward(grads[0], x, shift, scale, rms, eps, stats)
    # no shift: None (shift_grad passes it through)
    return dx.to(x_dtype), shift_grad(_empty_as_none(dshift, shift), grads[0], shift, None), dscale


def _nm_fake(x, shift, scale, rms, eps, out_dtype):
    return empty_rows(x.shape, out_dtype, x.device), empty_rows((*x.shape[:2], 2), torch.float32, x.device)


register("norm_modulate", norm_modulate_op, _nm_fake, backward=_nm_backward, non_differentiable=(1,),
         save=lambda x, shift, scale, rms, eps, out_dtype, out: (x, shift, scale, rms, eps, x.dtype, out[1]))
register("norm_modulate_backward", norm_modulate_bwd_op, _nm_bwd_fake)


#################################################################################
#              residual_norm_modulate: x_new = x + [gate *] y, then h            #
#################################################################################


def residual_norm_modulate_fwd(x: Tensor, gate: Optional[Tensor], y: Tensor, shift: Optional[Tensor], scale: Tensor,
                               rms: bool, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """x, y (B, N, D); gate, shift optional; (x_new, h) both in out_dtype, and the stats of x_new."""
    return norm_modulate_fwd_family(x, shift, scale, rms, eps, out_dtype, gate=gate, y=y)


def residual_norm_modulate_bwd(grad_h: Tensor, grad_x: Tensor, x_new: Tensor, gate: Optional[Tensor], y: Tensor,
                               shift: Optional[Tensor], scale: Tensor, rms: bool, eps: float,
                               stats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dgate, dy, dshift, dscale); dx in x_new's dtype, absent grads empty."""
    dx, dgate, dy, dshift, dscale = norm_modulate_bwd("residual_norm_modulate", grad_h, x_new, scale, None, eps, stats,
                                                      shift=shift, gate=gate, y=y, grad_x=grad_x, rms=rms)
    return dx, _none_as_empty(dgate, x_new), dy, _none_as_empty(dshift, x_new), dscale


def _rnm_bwd_fake(grad_h, grad_x, x_new, gate, y, shift, scale, rms, eps, stats):
    dx, dgate, dy, dshift, dscale = norm_modulate_bwd_fake(x_new, scale, None, shift=shift, gate=gate, y=y)
    return dx, _none_as_empty(dgate, x_new), dy, _none_as_empty(dshift, x_new), dscale


def _rnm_backward(grads, x_new, gate, y, shift, scale, rms, eps, x_dtype, stats):
    grad_x, grad_h = grads[:2]
    dx, dgate, dy, dshift, dscale = torch.ops.pf_kernels.residual_norm_modulate_backward(
        grad_h, grad_x, x_new, gate, y, shift, scale, rms, eps, stats)
    dshift = shift_grad(_empty_as_none(dshift, shift), grad_h, shift, None)  # None without shift
    return dx.to(x_dtype), _empty_as_none(dgate, gate), dy, dshift, dscale


def _rnm_fake(x, gate, y, shift, scale, rms, eps, out_dtype):
    return (empty_rows(x.shape, out_dtype, x.device), empty_rows(x.shape, out_dtype, x.device),
            empty_rows((*x.shape[:2], 2), torch.float32, x.device))


# Saved: x_new (an output) instead of x, as gated_residual_modulate does.
register("residual_norm_modulate", residual_norm_modulate_fwd, _rnm_fake, backward=_rnm_backward,
         non_differentiable=(2,),
         save=lambda x, gate, y, shift, scale, rms, eps, out_dtype, out: (out[0], gate, y, shift, scale, rms, eps,
                                                                          x.dtype, out[2]))
register("residual_norm_modulate_backward", residual_norm_modulate_bwd, _rnm_bwd_fake)


def norm_modulate_triton(x, shift, scale, rms: bool, eps: float, out_dtype) -> Tensor:
    return torch.ops.pf_kernels.norm_modulate(x, shift, scale, rms, eps, out_dtype)[0]


def residual_norm_modulate_triton(x, gate, y, shift, scale, rms: bool, eps: float, out_dtype) -> tuple[Tensor, Tensor]:
    x_new, h, _ = torch.ops.pf_kernels.residual_norm_modulate(x, gate, y, shift, scale, rms, eps, out_dtype)
    return x_new, h
