"""The RMSNorm sandwich (Lumina2's and Mochi's blocks): a sub-block's output RMS-normalised
before its gated residual update, then the next RMSNorm and modulation, in one pass.

    sandwich_residual                 x_new = x + gate * RMS(y)
    sandwich_residual_norm_modulate   x_new = x + gate * RMS(y),  h = RMS(x_new) * (1 + scale)
with RMS(v) = v * rsqrt(mean(v^2) + eps) over D in fp32 (eps_y for y's norm, eps for x_new's).
The kernels are ``norm_modulate``'s (its NORM_Y flag adds y's statistics to the residual pass;
NO_H / HAS_H off: x_new alone, a block's last update). The blocks' ``tanh`` of the gate and
their norms' weights, RMS_w(v) = RMS(v) * w, are folded into gate and scale by the dispatcher
(``dispatch.sandwich_residual``): O(B * D) for a per-sample gate, nothing beside the rows.

Backward, with g the stream's grad (the next norm's, see ``norm_modulate``, plus x_new's own),
yhat = RMS(y) and rstd_y its row factor:
    dgate = g * yhat,  dy = rstd_y * (g * gate - yhat * cy),  cy = mean(g * gate * yhat)
(cy needs the whole row of g: one more pass over the row's tiles). Gates and scales per token
(B, N, D) or per sample (B, 1, D) (grads summed over N in a fixed order), strided views fine.
Registered ops: ``pf_kernels::sandwich_residual`` -> x_new, ``pf_kernels::sandwich_residual_norm_modulate``
-> (x_new, h), and their ``..._backward`` ops (absent gates travel as None, their grads as empty
tensors).
"""

from typing import Optional

import torch
from torch import Tensor

from pf_kernels.ops._utils import empty_rows, per_sample
from pf_kernels.ops.norm_modulate import norm_modulate_bwd, norm_modulate_fwd
from pf_kernels.ops.registry import register


def _none_as_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A custom op returns tensors only: an absent grad travels as an empty one."""
    return like.new_empty((0,)) if t is None else t


def _grad_or_none(t: Tensor, given: Optional[Tensor]) -> Optional[Tensor]:
    return None if given is None else t


def _mod_grad_fake(t: Optional[Tensor], x: Tensor) -> Tensor:
    """An empty grad of a (B, N|1, D) modulation (empty (0,) when there is none)."""
    return x.new_empty((0,)) if t is None else empty_rows(t.shape, t.dtype, x.device)


#################################################################################
#                x_new = x + gate * RMS(y),  h = RMS(x_new) * (1 + s)            #
#################################################################################


def sandwich_norm_modulate_fwd(x: Tensor, gate: Optional[Tensor], y: Tensor, scale: Tensor, y_eps: float, eps: float,
                               out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x, y (B, N, D); gate (optional), scale (B, N|1, D). Returns (x_new, h), both (B, N, D) in out_dtype."""
    x_new, h, _ = norm_modulate_fwd("sandwich_residual_norm_modulate", x, scale, None, eps, out_dtype, gate=gate,
                                    y=y, rms=True, y_eps=y_eps)
    return x_new, h


def sandwich_norm_modulate_bwd(grad_h: Tensor, grad_x: Tensor, x_new: Tensor, gate: Optional[Tensor], y: Tensor,
                               scale: Tensor, y_eps: float, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dgate, dy, dscale); dx in x_new's dtype, dgate empty without a gate."""
    # As gated_residual_modulate's: with per-sample grads summed in fp32 accumulator tiles, 16-bit
    # data moves in 8-byte vectors per thread (else XL/2's 1152 wide rows spill registers on sm_90)
    reducing = any(t is not None and per_sample(t, x_new.shape[1], False) for t in (gate, scale))
    vec_bytes = 8 if reducing and x_new.element_size() < 4 else 16
    dx, dgate, dy, _, dscale = norm_modulate_bwd("sandwich_residual_norm_modulate", grad_h, x_new, scale, None, eps,
                                                 gate=gate, y=y, grad_x=grad_x, rms=True, y_eps=y_eps,
                                                 vec_bytes=vec_bytes)
    return dx, _none_as_empty(dgate, x_new), dy, dscale


def _snm_bwd_fake(grad_h, grad_x, x_new, gate, y, scale, y_eps, eps):
    return (empty_rows(x_new.shape, x_new.dtype, x_new.device), _mod_grad_fake(gate, x_new),
            empty_rows(y.shape, y.dtype, y.device), _mod_grad_fake(scale, x_new))


def _snm_backward(grads, x_new, gate, y, scale, y_eps, eps, x_dtype):
    grad_x, grad_h = grads
    dx, dgate, dy, dscale = torch.ops.pf_kernels.sandwich_residual_norm_modulate_backward(
        grad_h, grad_x, x_new, gate, y, scale, y_eps, eps)
    return dx.to(x_dtype), _grad_or_none(dgate, gate), dy, dscale


def _snm_fake(x, gate, y, scale, y_eps, eps, out_dtype):
    return empty_rows(x.shape, out_dtype, x.device), empty_rows(x.shape, out_dtype, x.device)


# Saved: x_new (an output) instead of x, as residual_norm_modulate does.
register("sandwich_residual_norm_modulate", sandwich_norm_modulate_fwd, _snm_fake, backward=_snm_backward,
         save=lambda x, gate, y, scale, y_eps, eps, out_dtype, out: (out[0], gate, y, scale, y_eps, eps, x.dtype))
register("sandwich_residual_norm_modulate_backward", sandwich_norm_modulate_bwd, _snm_bwd_fake)


#################################################################################
#                    x_new = x + gate * RMS(y): a block's last update            #
#################################################################################


def sandwich_residual_fwd(x: Tensor, gate: Optional[Tensor], y: Tensor, y_eps: float,
                          out_dtype: torch.dtype) -> Tensor:
    """x, y (B, N, D); gate (optional) (B, N|1, D). Returns x_new (B, N, D) in out_dtype."""
    # eps 1: x_new's own norm statistics are formed by the pass but not used (no h)
    return norm_modulate_fwd("sandwich_residual", x, None, None, 1.0, out_dtype, gate=gate, y=y, rms=True,
                             y_eps=y_eps, no_h=True)[0]


def sandwich_residual_bwd(grad_x: Tensor, gate: Optional[Tensor], y: Tensor, y_eps: float) -> tuple[Tensor, Tensor]:
    """(dgate, dy); dgate empty without a gate (dx is grad_x itself)."""
    _, dgate, dy, _, _ = norm_modulate_bwd("sandwich_residual", None, None, None, None, 0.0, gate=gate, y=y,
                                           grad_x=grad_x, rms=True, y_eps=y_eps, no_h=True)
    return _none_as_empty(dgate, y), dy


def _sr_bwd_fake(grad_x, gate, y, y_eps):
    return _mod_grad_fake(gate, y), empty_rows(y.shape, y.dtype, y.device)


def _sr_backward(grads, gate, y, y_eps, x_dtype):
    dgate, dy = torch.ops.pf_kernels.sandwich_residual_backward(grads[0], gate, y, y_eps)
    return grads[0].to(x_dtype), _grad_or_none(dgate, gate), dy


register("sandwich_residual", sandwich_residual_fwd,
         lambda x, gate, y, y_eps, out_dtype: empty_rows(x.shape, out_dtype, x.device), backward=_sr_backward,
         save=lambda x, gate, y, y_eps, out_dtype, out: (gate, y, y_eps, x.dtype))
register("sandwich_residual_backward", sandwich_residual_bwd, _sr_bwd_fake)


def sandwich_residual_triton(x, gate, y, y_eps: float, out_dtype) -> Tensor:
    return torch.ops.pf_kernels.sandwich_residual(x, gate, y, y_eps, out_dtype)


def sandwich_residual_norm_modulate_triton(x, gate, y, scale, y_eps: float, eps: float,
                                           out_dtype) -> tuple[Tensor, Tensor]:
    return torch.ops.pf_kernels.sandwich_residual_norm_modulate(x, gate, y, scale, y_eps, eps, out_dtype)
