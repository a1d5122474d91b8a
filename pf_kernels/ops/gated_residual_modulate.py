"""The forms of ``gated_residual_modulate``: a residual update fused with the next modulation.

    x_new = x + gate * y                              the residual stream after a sub-block
    h     = LN(x_new) * (1 + scale) + shift           the next sub-block's input
    returns (x_new, h)

``gated_residual`` then ``adaln_modulate`` read x_new back after writing it; here it is formed
in registers, stored once and normalised at once. Custom ops are opaque to inductor, so two
separate ops also lose the fusion that compiled plain PyTorch finds on its own; this op puts it
back. The kernels are the HAS_RESIDUAL member of ``norm_modulate``'s family; both outputs take
grads (x_new's flows on as the residual stream). Registered ops: ``pf_kernels::
gated_residual_modulate``, ``..._indexed`` (gate, shift and scale (B, K, D) tables with index
(B, N)), ``..._with_stats`` (also the (B, N, 2) statistics of x_new, taken when grads are
needed) and ``..._backward``.
"""

from typing import Optional

import torch
from torch import Tensor

from pf_kernels.ops._utils import empty_rows, needs_grad, per_sample
from pf_kernels.ops.norm_modulate import norm_modulate_bwd, norm_modulate_bwd_fake, norm_modulate_fwd, shift_grad
from pf_kernels.ops.registry import register
from pf_kernels.reference import gated_residual_dtype


def gated_residual_modulate_fwd(x, gate, y, shift, scale, index, eps: float) -> tuple[Tensor, Tensor]:
    """x, y (B, N, D); gate, shift, scale (B, N|1, D), or (B, K, D) tables with index (B, N).
    Returns (x_new, h), both (B, N, D) in the dtype eager ``x + gate * y`` has."""
    dtype = gated_residual_dtype(x, gate, y)
    return norm_modulate_fwd("gated_residual_modulate", x, scale, index, eps, dtype, shift=shift, gate=gate, y=y)[:2]


def gated_residual_modulate_fwd_stats(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor,
                                      index: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The forward for autograd: (x_new, h, stats), stats (B, N, 2) fp32 the mean and rstd of
    each token's x_new, which the backward then reads instead of recomputing them."""
    return norm_modulate_fwd("gated_residual_modulate", x, scale, index, eps, gated_residual_dtype(x, gate, y),
                             shift=shift, gate=gate, y=y, store_stats=True)


def gated_residual_modulate_bwd(grad_h: Tensor, grad_x: Tensor, x_new: Tensor, gate: Tensor, y: Tensor, shift: Tensor,
                                scale: Tensor, index: Optional[Tensor], eps: float, stats: Optional[Tensor] = None
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dgate, dy, dshift, dscale); dx in x_new's dtype. Per-sample (B, 1, D)
    modulations get their grads reduced over N; a per-token dshift is an empty tensor (it
    equals ``grad_h``); indexed, the (B, K, D) grads of the three tables."""
    # A per-sample backward keeps up to three fp32 accumulator tiles live besides six input
    # tiles: 16-bit data moves in 8-byte vectors per thread there (twice the threads), else
    # it would spill.
    reducing = any(per_sample(t, x_new.shape[1], index is not None) for t in (gate, shift, scale))
    vec_bytes = 8 if reducing and x_new.element_size() < 4 else 16
    return norm_modulate_bwd("gated_residual_modulate", grad_h, x_new, scale, index, eps, stats, shift=shift,
                             gate=gate, y=y, grad_x=grad_x, vec_bytes=vec_bytes)


def _bwd_fake(grad_h, grad_x, x_new, gate, y, shift, scale, index, eps, stats=None):
    return norm_modulate_bwd_fake(x_new, scale, index, shift=shift, gate=gate, y=y)


def _backward(grads, x_new, gate, y, shift, scale, index, eps, x_dtype, stats=None):
    """(dx, dgate, dy, dshift, dscale) through ``gated_residual_modulate_backward``, dx in x's dtype."""
    grad_x, grad_h = grads[:2]
    dx, dgate, dy, dshift, dscale = torch.ops.pf_kernels.gated_residual_modulate_backward(
        grad_h, grad_x, x_new, gate, y, shift, scale, index, eps, stats)
    return dx.to(x_dtype), dgate, dy, shift_grad(dshift, grad_h, shift, index), dscale


def _plain(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return gated_residual_modulate_fwd(x, gate, y, shift, scale, None, eps)


def _indexed(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, index: Tensor,
             eps: float) -> tuple[Tensor, Tensor]:
    return gated_residual_modulate_fwd(x, gate, y, shift, scale, index, eps)


def _out_fake(x, gate, y, *args):
    dtype = gated_residual_dtype(x, gate, y)
    return empty_rows(x.shape, dtype, x.device), empty_rows(x.shape, dtype, x.device)


# The plain forms' autograd recomputes the statistics (a caller that differentiates through
# torch.ops.pf_kernels.gated_residual_modulate itself); the entry below takes _with_stats for
# grads. Saved: x_new (an output) instead of x, since the backward needs x_new's statistics
# and the next op reads x_new anyway (saving it keeps nothing extra alive).
register("gated_residual_modulate", _plain, _out_fake, backward=_backward,
         save=lambda x, gate, y, shift, scale, eps, out: (out[0], gate, y, shift, scale, None, eps, x.dtype))
register("gated_residual_modulate_indexed", _indexed, _out_fake, backward=_backward,
         save=lambda x, gate, y, shift, scale, index, eps, out: (out[0], gate, y, shift, scale, index, eps, x.dtype))
register("gated_residual_modulate_with_stats", gated_residual_modulate_fwd_stats,
         lambda x, gate, y, *args: (*_out_fake(x, gate, y), empty_rows((*x.shape[:2], 2), torch.float32, x.device)),
         backward=_backward, non_differentiable=(2,),
         save=lambda x, gate, y, shift, scale, index, eps, out: (out[0], gate, y, shift, scale, index, eps, x.dtype,
                                                                 out[2]))
register("gated_residual_modulate_backward", gated_residual_modulate_bwd, _bwd_fake)


def gated_residual_modulate_triton(x, gate, y, shift, scale, index, eps: float) -> tuple[Tensor, Tensor]:
    """The op for the dispatcher: with grads the _with_stats form (the backward reads them)."""
    if needs_grad(x, gate, y, shift, scale):
        return torch.ops.pf_kernels.gated_residual_modulate_with_stats(x, gate, y, shift, scale, index, eps)[:2]
    if index is None:
        return torch.ops.pf_kernels.gated_residual_modulate(x, gate, y, shift, scale, eps)
    return torch.ops.pf_kernels.gated_residual_modulate_indexed(x, gate, y, shift, scale, index, eps)
