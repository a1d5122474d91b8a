"""The forms of ``adaln_modulate``, ``out = LN(x) * (1 + scale) + shift``: launchers and ops.

The kernels are the LayerNorm member of ``norm_modulate``'s family. Registered ops:
``pf_kernels::adaln_modulate`` (shift, scale (B, N|1, D)), ``..._indexed`` ((B, K, D) tables
and index (B, N)), ``..._with_stats`` (either form, also returning the (B, N, 2) row statistics
the backward then reads: taken when grads are needed) and ``..._backward``.
"""

from typing import Optional

import torch
from torch import Tensor

from pf_kernels.ops._utils import empty_rows, needs_grad, per_sample
from pf_kernels.ops.norm_modulate import norm_modulate_bwd, norm_modulate_bwd_fake, norm_modulate_fwd, shift_grad
from pf_kernels.ops.registry import register


def adaln_modulate_fwd(x, shift, scale, index, eps: float) -> Tensor:
    """x (B, N, D); shift, scale (B, N|1, D) or (B, K, D) with index (B, N). Returns (B, N, D)."""
    return norm_modulate_fwd("adaln_modulate", x, scale, index, eps, x.dtype, shift=shift)[1]


def adaln_modulate_fwd_stats(x: Tensor, shift: Tensor, scale: Tensor, index: Optional[Tensor],
                             eps: float) -> tuple[Tensor, Tensor]:
    """The forward for autograd: also each token's LN mean and rstd, (B, N, 2) fp32, which the
    backward then reads instead of recomputing them (8 bytes a token against 2 * D read)."""
    _, out, stats = norm_modulate_fwd("adaln_modulate", x, scale, index, eps, x.dtype, shift=shift, store_stats=True)
    return out, stats


def adaln_modulate_bwd(grad: Tensor, x: Tensor, shift: Tensor, scale: Tensor, index: Optional[Tensor], eps: float,
                       stats: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dshift, dscale): dx (B, N, D); per-sample shift/scale (B, 1, D) get reduced
    grads (B, 1, D) in their dtypes; per token, dscale (B, N, D) and dshift an empty tensor (it
    equals ``grad``: no kernel writes a copy); indexed, the (B, K, D) grads of both tables."""
    n = x.shape[1]
    # A per-sample fp32 backward takes two 16-byte vectors per thread and tensor (4 warps):
    # with one (8 warps) ptxas keeps it at 128 registers and spills.
    reducing = any(per_sample(t, n, index is not None) for t in (shift, scale))
    vec_bytes = 32 if reducing and x.element_size() == 4 else 16
    dx, _, _, dshift, dscale = norm_modulate_bwd("adaln_modulate", grad, x, scale, index, eps, stats, shift=shift,
                                                 vec_bytes=vec_bytes)
    return dx, dshift, dscale


def _bwd_fake(grad, x, shift, scale, index, eps, stats=None):
    dx, _, _, dshift, dscale = norm_modulate_bwd_fake(x, scale, index, shift=shift)
    return dx, dshift, dscale


def _backward(grads, x, shift, scale, index, eps, stats=None):
    """(dx, dshift, dscale) through ``adaln_modulate_backward``."""
    dx, dshift, dscale = torch.ops.pf_kernels.adaln_modulate_backward(grads[0], x, shift, scale, index, eps, stats)
    return dx, shift_grad(dshift, grads[0], shift, index), dscale


def _plain(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    return adaln_modulate_fwd(x, shift, scale, None, eps)


def _indexed(x: Tensor, shift: Tensor, scale: Tensor, index: Tensor, eps: float) -> Tensor:
    return adaln_modulate_fwd(x, shift, scale, index, eps)


def _out_fake(x, *args):
    return empty_rows(x.shape, x.dtype, x.device)


# The plain forms' autograd recomputes the statistics (a caller that differentiates through
# torch.ops.pf_kernels.adaln_modulate itself); the entry below takes _with_stats for grads.
register("adaln_modulate", _plain, _out_fake, backward=_backward,
         save=lambda x, shift, scale, eps, out: (x, shift, scale, None, eps))
register("adaln_modulate_indexed", _indexed, _out_fake, backward=_backward,
         save=lambda x, shift, scale, index, eps, out: (x, shift, scale, index, eps))
register("adaln_modulate_with_stats", adaln_modulate_fwd_stats,
         lambda x, *args: (_out_fake(x), empty_rows((*x.shape[:2], 2), torch.float32, x.device)),
         backward=_backward, non_differentiable=(1,),
         save=lambda x, shift, scale, index, eps, out: (x, shift, scale, index, eps, out[1]))
register("adaln_modulate_backward", adaln_modulate_bwd, _bwd_fake)


def adaln_modulate_triton(x, shift, scale, index, eps: float) -> Tensor:
    """The op for the dispatcher: with grads the _with_stats form (the backward reads them)."""
    if needs_grad(x, shift, scale):
        return torch.ops.pf_kernels.adaln_modulate_with_stats(x, shift, scale, index, eps)[0]
    if index is None:
        return torch.ops.pf_kernels.adaln_modulate(x, shift, scale, eps)
    return torch.ops.pf_kernels.adaln_modulate_indexed(x, shift, scale, index, eps)
