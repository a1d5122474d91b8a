"""Sinusoidal timestep features for per-patch times (SPEC.md section 2).

``emb[..., k] = cos(t * f_k)``, ``emb[..., half + k] = sin(t * f_k)`` for ``k < half = dim // 2``,
``f_k = exp(-ln(max_period) * k / half)``; an odd ``dim`` ends with a zero column. The
frequency table is computed once per (dim, max_period, device) in torch, with the reference's
own function, and read by the kernels: no ``exp`` on the GPU (its fast approximation and a
division were a few ulp off, up to ~3e-4 in the features at DiT-style times t ~ 1000). With per-patch
times this is a (B, N, 256) fp32 tensor written once from the (B, N) times, instead of
the ``arange``/``exp``/outer-product/``cat`` chain. Differentiable in ``t`` (cheap: the
backward recomputes the angles), ``dt = sum_k f_k * (g_sin_k * cos - g_cos_k * sin)``.

File layout: forward kernel, backward kernel, host launchers, op registration.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from pf_kernels.ops._utils import count, empty_rows, wrap
from pf_kernels.ops.registry import register
from pf_kernels.reference import timestep_frequencies

#################################################################################
#                                 Forward kernel                                #
#################################################################################


@triton.jit
def _timestep_embedding_fwd_kernel(
    T,  # (M,) times, any real dtype, flattened from t's shape
    FREQS,  # (HALF,) fp32 frequency table (pf_kernels.reference.timestep_frequencies)
    OUT,  # (M, DIM) fp32, contiguous
    M, HALF, DIM,
    ODD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    k = tl.arange(0, BLOCK_H)  # (BLOCK_H,) frequency index, HALF padded to a power of two
    row_ok = rows < M
    mask = row_ok[:, None] & (k < HALF)[None, :]
    t = tl.load(T + rows, mask=row_ok, other=0.0).to(tl.float32)
    freqs = tl.load(FREQS + k, mask=k < HALF, other=0.0)  # (BLOCK_H,)
    args = t[:, None] * freqs[None, :]  # (BLOCK_M, BLOCK_H)
    base = OUT + rows[:, None] * DIM + k[None, :]
    tl.store(base, tl.cos(args), mask=mask)
    tl.store(base + HALF, tl.sin(args), mask=mask)
    if ODD:
        tl.store(OUT + rows * DIM + (DIM - 1), tl.zeros((BLOCK_M,), dtype=tl.float32), mask=row_ok)


#################################################################################
#                                Backward kernel                                #
#################################################################################


@triton.jit
def _timestep_embedding_bwd_kernel(
    DOUT, stride_gm,  # (M, DIM) incoming gradient, unit stride along DIM
    T,  # (M,)
    FREQS,  # (HALF,) fp32
    DT,  # (M,) in t's dtype
    M, HALF,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k = tl.arange(0, BLOCK_H)
    row_ok = rows < M
    mask = row_ok[:, None] & (k < HALF)[None, :]
    t = tl.load(T + rows, mask=row_ok, other=0.0).to(tl.float32)
    freqs = tl.load(FREQS + k, mask=k < HALF, other=0.0)
    args = t[:, None] * freqs[None, :]
    base = DOUT + rows[:, None] * stride_gm + k[None, :]
    g_cos = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    g_sin = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    # d cos(t f)/dt = -f sin(t f); d sin(t f)/dt = f cos(t f); the odd zero column has no grad.
    dt = tl.sum(freqs[None, :] * (g_sin * tl.cos(args) - g_cos * tl.sin(args)), axis=1)  # (BLOCK_M,)
    tl.store(DT + rows, dt.to(DT.dtype.element_ty), mask=row_ok)


#################################################################################
#                                Host launchers                                 #
#################################################################################


def _blocks(m, half: int) -> tuple[int, int, int]:
    # Constexpr block sizes; m (the number of times) may be symbolic under torch.compile.
    block_h = triton.next_power_of_2(max(int(half), 1))
    block_m = max(1, 4096 // block_h)
    if m < block_m:
        block_m = triton.next_power_of_2(max(int(m), 1))
    return block_m, block_h, 4


_FREQS: dict = {}


def _freqs(half: int, max_period: float, t: torch.Tensor) -> torch.Tensor:
    """The fp32 frequency table on t's device, made once (bit-equal to the reference's). While
    tracing (fake tensors) it is made fresh, so no traced tensor lands in the cache."""
    if is_fake(t):
        return timestep_frequencies(int(half), float(max_period), torch.float32, t.device)
    key = (int(half), float(max_period), str(t.device))
    if key not in _FREQS:
        _FREQS[key] = timestep_frequencies(int(half), float(max_period), torch.float32, t.device)
    return _FREQS[key]


def timestep_embedding_fwd(t: Tensor, dim: int, max_period: float) -> Tensor:
    """t any shape -> t.shape + (dim,), fp32."""
    out = empty_rows((*t.shape, dim), torch.float32, t.device)
    m, half = t.numel(), dim // 2
    if m == 0 or dim == 0:
        return out
    flat = t.reshape(-1).contiguous()  # (M,)
    block_m, block_h, num_warps = _blocks(m, half)
    count("timestep_embedding_fwd")
    wrap(_timestep_embedding_fwd_kernel)[(triton.cdiv(m, block_m),)](
        flat, _freqs(half, max_period, t), out, m, half, dim,
        ODD=dim % 2 == 1, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip
    return out


def timestep_embedding_bwd(grad: Tensor, t: Tensor, dim: int, max_period: float) -> Tensor:
    """grad t.shape + (dim,) -> dt of t's shape and dtype."""
    dt = empty_rows(t.shape, t.dtype, t.device)
    m, half = t.numel(), dim // 2
    if m == 0 or half == 0:
        return dt.zero_()
    g = grad.reshape(m, dim)
    if g.stride(-1) != 1:
        g = g.contiguous()
    flat = t.reshape(-1).contiguous()
    block_m, block_h, num_warps = _blocks(m, half)
    count("timestep_embedding_bwd")
    wrap(_timestep_embedding_bwd_kernel)[(triton.cdiv(m, block_m),)](
        g, g.stride(0), flat, _freqs(half, max_period, t), dt, m, half,
        BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
    )  # fmt: skip
    return dt


#################################################################################
#                                 Registration                                  #
#################################################################################


register("timestep_embedding", timestep_embedding_fwd,
         lambda t, dim, max_period: empty_rows((*t.shape, dim), torch.float32, t.device),
         save=lambda t, dim, max_period, out: (t, dim, max_period),
         backward=lambda grads, t, dim, max_period: (
             torch.ops.pf_kernels.timestep_embedding_backward(grads[0], t, dim, max_period),))
register("timestep_embedding_backward", timestep_embedding_bwd,
         lambda grad, t, dim, max_period: empty_rows(t.shape, t.dtype, t.device))


def timestep_embedding_triton(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    return torch.ops.pf_kernels.timestep_embedding(t, dim, float(max_period))
