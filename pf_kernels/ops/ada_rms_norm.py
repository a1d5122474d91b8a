"""The forms of ``ada_rms_norm``, ``out = x * rsqrt(mean(x^2) + eps) * (1 + scale)``: launchers and ops.

AdaRMSNorm, the normalisation of the text-to-image model's blocks (SPEC.md section 11); its
kernels are the IS_RMS_NORM member of ``norm_modulate``'s family. out has eager PyTorch's
promoted dtype (x's, or scale's when that is wider). Registered ops: ``pf_kernels::ada_rms_norm``
(scale (B, N|1, D)), ``..._indexed`` (a (B, K, D) table and index (B, N)) and ``..._backward``
(which recomputes rstd: the forward stores no statistics).
"""

from typing import Optional

import torch
from torch import Tensor

from pf_kernels.ops._utils import empty_rows
from pf_kernels.ops.norm_modulate import norm_modulate_bwd, norm_modulate_bwd_fake, norm_modulate_fwd
from pf_kernels.ops.registry import register
from pf_kernels.reference import ada_rms_norm_dtype


def ada_rms_norm_fwd(x, scale, index, eps: float) -> Tensor:
    """x (B, N, D); scale (B, N|1, D) or (B, K, D) with index (B, N). Returns (B, N, D)."""
    return norm_modulate_fwd("ada_rms_norm", x, scale, index, eps, ada_rms_norm_dtype(x, scale))[1]


def ada_rms_norm_bwd(grad: Tensor, x: Tensor, scale: Tensor, index: Optional[Tensor],
                     eps: float) -> tuple[Tensor, Tensor]:
    """Returns (dx, dscale): dx (B, N, D) in x's dtype; dscale in scale's dtype, (B, 1, D)
    reduced for a per-sample scale, per token otherwise, and for an indexed scale the (B, K, D)
    table grad."""
    dx, _, _, _, dscale = norm_modulate_bwd("ada_rms_norm", grad, x, scale, index, eps)
    return dx, dscale


def _plain(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    return ada_rms_norm_fwd(x, scale, None, eps)


def _indexed(x: Tensor, scale_table: Tensor, index: Tensor, eps: float) -> Tensor:
    return ada_rms_norm_fwd(x, scale_table, index, eps)


def _out_fake(x, scale, *args):
    return empty_rows(x.shape, ada_rms_norm_dtype(x, scale), x.device)


def _backward(grads, x, scale, index, eps):
    return torch.ops.pf_kernels.ada_rms_norm_backward(grads[0], x, scale, index, eps)


register("ada_rms_norm", _plain, _out_fake, backward=_backward,
         save=lambda x, scale, eps, out: (x, scale, None, eps))
register("ada_rms_norm_indexed", _indexed, _out_fake, backward=_backward,
         save=lambda x, scale_table, index, eps, out: (x, scale_table, index, eps))
register("ada_rms_norm_backward", ada_rms_norm_bwd,
         lambda grad, x, scale, index, eps: norm_modulate_bwd_fake(x, scale, index)[::4])


def ada_rms_norm_triton(x, scale, index, eps: float) -> Tensor:
    """The op for the dispatcher: the plain or the indexed form."""
    if index is None:
        return torch.ops.pf_kernels.ada_rms_norm(x, scale, eps)
    return torch.ops.pf_kernels.ada_rms_norm_indexed(x, scale, index, eps)
