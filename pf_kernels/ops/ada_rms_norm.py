"""Fused adaptive RMS norm: ``out = x * rsqrt(mean(x^2) + eps) * (1 + scale)`` (AdaRMSNorm).

The normalisation of the text-to-image model's blocks (SPEC.md section 11): scale only, per
token. One read of x and scale and one write of out, instead of the square, mean, rsqrt and
two multiplies of the eager expression. The statistic and ``1 + scale`` are fp32; out has
eager PyTorch's promoted dtype (x's, or scale's when that is wider), as ``gated_residual``.

Scale forms, as in ``adaln_modulate`` (unit stride along D; row strides passed, never copied):
  per token   (B, N, D), e.g. a ``chunk(k, -1)`` view with row stride kD;
  per sample  (B, 1, D): the row stride is passed as 0, and the backward reduces over N;
  indexed     a (B, K, D) table plus ``index`` (B, N) int64 choosing each token's row
              (``HAS_INDEX``; deduplicated conditioning). Its grad is summed per table row
              by a second kernel without atomics for K <= MAX_TABLE_K.

File layout: forward kernel, backward kernels, host launchers, op registration + autograd.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pf_kernels.ops._utils import (
    HAS_TRITON_OP,
    TILE_ELEMS,
    count,
    empty_rows,
    last_dim_contiguous,
    row_tiles,
    wrap,
)
from pf_kernels.ops.adaln_modulate import (
    _index_args,
    _mod_row_stride,
    _scatter_rows,
    add_table_rows,
    add_tile,
    load_mod,
    reduce_programs,
    store_tiles,
    table_block_d,
)
from pf_kernels.reference import ada_rms_norm_dtype

#################################################################################
#                                 Forward kernel                                #
#################################################################################


@triton.jit
def _ada_rms_norm_fwd_kernel(
    X, stride_xb, stride_xn,  # (B, N, D)
    SCALE, stride_sb, stride_sn,  # (B, N, D) | (B, 1, D) with stride_sn = 0 | (B, K, D) table
    INDEX, stride_ib, stride_in,  # (B, N) int64 table rows (read only when HAS_INDEX)
    OUT, stride_ob, stride_on,  # (B, N, D)
    N, D, eps,
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_TILES: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_M), B): token blocks on axis 0, which has no 65535 limit. A row is
    # read in NUM_TILES tiles of BLOCK_D columns twice: sum of squares, then the output.
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    row_ok = rows < N
    x_rows = X + b * stride_xb + rows * stride_xn
    # rstd = 1 / sqrt(sum(x^2) / D + eps): the padded columns load as zeros and add nothing.
    ssq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in tl.static_range(NUM_TILES):
        cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ssq += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(ssq / D + eps)  # (BLOCK_M,)

    if HAS_INDEX:
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=0)
    else:
        mrows = rows  # the per-sample form reads row 0 everywhere through its zero stride
    scale_rows = SCALE + b * stride_sb + mrows * stride_sn
    out_rows = OUT + b * stride_ob + rows * stride_on
    for t in tl.static_range(NUM_TILES):
        cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        # out = x * rstd * (1 + scale), 1 + scale in fp32 (in bf16 it would round away scale's bits).
        out = x * rstd[:, None] * (1.0 + scale.to(tl.float32))
        tl.store(out_rows[:, None] + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


#################################################################################
#                                Backward kernels                               #
#################################################################################


@triton.jit
def _ada_rms_norm_bwd_kernel(
    DOUT, stride_gb, stride_gn,  # (B, N, D) incoming gradient
    X, stride_xb, stride_xn,  # (B, N, D)
    SCALE, stride_sb, stride_sn,  # (B, N, D) | (B, 1, D) stride_sn = 0 | (B, K, D) table
    INDEX, stride_ib, stride_in,  # (B, N) int64 (HAS_INDEX only)
    DX, stride_dxb, stride_dxn,  # (B, N, D)
    DSCALE, stride_dsb, stride_dsn,  # (B, N, D) per token, or (B, P, D) fp32 partials (REDUCE_SCALE)
    RSTD,  # (B, N) fp32 rstd per token (TABLE only: the table grad is summed by the kernel below)
    N, D, eps, ROWS_PER_PROG,
    HAS_INDEX: tl.constexpr,
    REDUCE_SCALE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_TILES: tl.constexpr,
    TILES_P2: tl.constexpr,  # NUM_TILES padded to a power of two (accumulator rows)
):
    # Grid (P, B): program p walks tokens [p * ROWS_PER_PROG, (p + 1) * ROWS_PER_PROG) of
    # sample b, BLOCK_M whole rows per step, each in NUM_TILES column tiles. A per-sample
    # scale's grad is summed over those tokens in fp32 registers (one accumulator row per
    # column tile) and written once per program; the host adds the P partials in order.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_dscale = tl.zeros((TILES_P2, BLOCK_D), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
        row_ok = rows < N
        g_rows = DOUT + b * stride_gb + rows * stride_gn
        x_rows = X + b * stride_xb + rows * stride_xn
        if HAS_INDEX:
            mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=0)
        else:
            mrows = rows
        scale_rows = SCALE + b * stride_sb + mrows * stride_sn
        # Through out = xhat * w with w = 1 + scale: dxhat = g * w; through xhat = x * rstd with
        # rstd = (mean(x^2) + eps)^(-1/2): dx = rstd * (dxhat - xhat * c1), c1 = mean(dxhat * xhat)
        # = rstd * mean(x * dxhat). Pass 1 sums x^2 and x * dxhat (rstd recomputed rather than
        # stored: this pass reads x anyway); pass 2 reads the tiles again for dx.
        ssq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sxw = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in tl.static_range(NUM_TILES):
            cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            g = tl.load(g_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            scale = load_mod(SCALE + b * stride_sb, scale_rows, cols, mask, D, REDUCE_SCALE)
            ssq += tl.sum(x * x, axis=1)
            sxw += tl.sum(x * (g * (1.0 + scale.to(tl.float32))), axis=1)
        rstd = 1.0 / tl.sqrt(ssq / D + eps)  # (BLOCK_M,)
        c1 = rstd * sxw / D
        if TABLE:
            tl.store(RSTD + b * N + rows, rstd, mask=row_ok)
        for t in tl.static_range(NUM_TILES):
            cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            g = tl.load(g_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            scale = load_mod(SCALE + b * stride_sb, scale_rows, cols, mask, D, REDUCE_SCALE)
            xhat = x * rstd[:, None]  # zero in padded rows and columns
            wdy = g * (1.0 + scale.to(tl.float32))
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
            tl.store(DX + b * stride_dxb + rows[:, None] * stride_dxn + cols[None, :], dx.to(DX.dtype.element_ty),
                     mask=mask)
            # dscale = g * xhat (masked rows and columns contribute zeros).
            if REDUCE_SCALE:
                acc_dscale = add_tile(acc_dscale, tl.sum(g * xhat, axis=0), t, TILES_P2)
            elif not TABLE:  # the table kernel sums dscale from the row rstd
                tl.store(DSCALE + b * stride_dsb + rows[:, None] * stride_dsn + cols[None, :],
                         (g * xhat).to(DSCALE.dtype.element_ty), mask=mask)
    if REDUCE_SCALE:
        store_tiles(DSCALE + b * stride_dsb + pid * stride_dsn, acc_dscale, D, BLOCK_D, TILES_P2)


@triton.jit
def _ada_rms_norm_table_grads_kernel(
    DOUT, stride_gb, stride_gn,  # (B, N, D)
    X, stride_xb, stride_xn,  # (B, N, D)
    RSTD,  # (B, N) fp32 (written by the backward kernel)
    INDEX, stride_ib, stride_in,  # (B, N) int64 rows of the table
    DSCALE, stride_pb, stride_pp, stride_pk,  # (B, P, TABLE_K, D) fp32 partials
    N, D, ROWS_PER_PROG,
    TABLE_K: tl.constexpr,  # the table's rows, padded to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (P, B, D tiles): the table grad dscale[k] = sum_{n: index = k} g_n * x_n * rstd_n,
    # summed in fp32 registers per program (the same order on every run: no atomics); the
    # host adds the P partials.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ks = tl.arange(0, TABLE_K)
    acc = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        g = tl.load(DOUT + b * stride_gb + rows[:, None] * stride_gn + cols[None, :], mask=mask, other=0.0)
        x = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + b * N + rows, mask=row_ok, other=0.0)
        dscale = g.to(tl.float32) * x.to(tl.float32) * rstd[:, None]  # zero where masked
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=-1)  # -1: no row
        acc = add_table_rows(acc, dscale, mrows, TABLE_K)
    offs = b * stride_pb + pid * stride_pp + ks[:, None] * stride_pk + cols[None, :]
    tl.store(DSCALE + offs, acc, mask=col_ok[None, :])


#################################################################################
#                                Host launchers                                 #
#################################################################################


def ada_rms_norm_fwd(x, scale, index, eps: float) -> torch.Tensor:
    """x (B, N, D); scale (B, N|1, D) or (B, K, D) with index (B, N). Returns (B, N, D)."""
    x, scale = last_dim_contiguous(x), last_dim_contiguous(scale)
    bsz, n, d = x.shape
    out = empty_rows((bsz, n, d), ada_rms_norm_dtype(x, scale), x.device)  # eager's type promotion
    if out.numel() == 0:
        return out
    indexed = index is not None
    block_m, block_d, n_tiles, num_warps = row_tiles(n, d, x.element_size())
    idx, sib, sin = _index_args(index, x)
    count("ada_rms_norm_fwd")
    wrap(_ada_rms_norm_fwd_kernel)[(triton.cdiv(n, block_m), bsz)](
        x, x.stride(0), x.stride(1),
        scale, scale.stride(0), _mod_row_stride(scale, indexed),
        idx, sib, sin,
        out, out.stride(0), out.stride(1),
        n, d, eps,
        HAS_INDEX=indexed, BLOCK_M=block_m, BLOCK_D=block_d, NUM_TILES=n_tiles, num_warps=num_warps,
    )  # fmt: skip
    return out


MAX_TABLE_K = 8  # an indexed scale with up to this many rows has its grad summed by a kernel


def ada_rms_norm_bwd(grad, x, scale, index, eps: float):
    """Returns (dx, dscale): dx (B, N, D) in x's dtype; dscale in scale's dtype, (B, 1, D)
    reduced for a per-sample scale, per token otherwise, and for an indexed scale the (B, K, D)
    table grad (summed by a second kernel without atomics for K <= MAX_TABLE_K, by a scatter
    of the per-token grads above)."""
    grad, x, scale = last_dim_contiguous(grad), last_dim_contiguous(x), last_dim_contiguous(scale)
    bsz, n, d = x.shape
    indexed = index is not None
    reduce_scale = bool(not indexed and scale.shape[1] == 1 and n != 1)  # constexpr: a plain bool
    k_rows = int(scale.shape[1]) if indexed else 0
    table = bool(indexed and k_rows <= MAX_TABLE_K)
    dx = empty_rows((bsz, n, d), x.dtype, x.device)
    block_m, block_d, n_tiles, num_warps = row_tiles(n, d, x.element_size())
    if reduce_scale:
        n_prog, rows_per_prog = reduce_programs(n, bsz, block_m, x.device, num_warps)
        dscale_buf = torch.empty((bsz, n_prog, d), dtype=torch.float32, device=x.device)
    else:
        n_prog, rows_per_prog = triton.cdiv(max(n, 1), block_m), block_m
        if table:
            dscale_buf = dx  # not written: the table kernel sums dscale from the row rstd
        else:
            dscale_buf = empty_rows((bsz, n, d), torch.float32 if indexed else scale.dtype, x.device)
    rstd = torch.empty((bsz, n), dtype=torch.float32, device=x.device) if table else dx
    if dx.numel() > 0:
        idx, sib, sin = _index_args(index, x)
        count("ada_rms_norm_bwd")
        wrap(_ada_rms_norm_bwd_kernel)[(n_prog, bsz)](
            grad, grad.stride(0), grad.stride(1),
            x, x.stride(0), x.stride(1),
            scale, scale.stride(0), _mod_row_stride(scale, indexed),
            idx, sib, sin,
            dx, dx.stride(0), dx.stride(1),
            dscale_buf, dscale_buf.stride(0), dscale_buf.stride(1),
            rstd,
            n, d, eps, rows_per_prog,
            HAS_INDEX=indexed, REDUCE_SCALE=reduce_scale, TABLE=table,
            BLOCK_M=block_m, BLOCK_D=block_d, NUM_TILES=n_tiles, TILES_P2=triton.next_power_of_2(n_tiles),
            num_warps=num_warps,
        )  # fmt: skip
    elif reduce_scale:
        dscale_buf.zero_()
    if table:
        return dx, _table_grad(grad, x, rstd, index, k_rows, scale.dtype)
    if indexed:  # a wide table: the per-token grads scattered into it (atomics on a GPU)
        return dx, _scatter_rows(dscale_buf, index, k_rows, scale.dtype)
    if reduce_scale:  # the one reduction of the per-program partials
        return dx, dscale_buf.sum(1, keepdim=True).to(scale.dtype)
    return dx, dscale_buf


def _table_grad(grad, x, rstd, index, k_rows: int, dtype) -> torch.Tensor:
    """dscale (B, K, D) of an indexed scale, summed per program in the kernel and then over
    programs here: deterministic (no atomics)."""
    bsz, n, d = x.shape
    table_k = triton.next_power_of_2(k_rows)
    block_d = table_block_d(d)  # constexprs: plain ints (D is a model constant)
    block_m = max(1, min(TILE_ELEMS // block_d // 2, triton.next_power_of_2(max(int(n), 1))))
    d_tiles = triton.cdiv(d, block_d)
    n_prog, rows_per_prog = reduce_programs(n, bsz * d_tiles, block_m, x.device)
    parts = torch.zeros((bsz, n_prog, table_k, d), dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        count("ada_rms_norm_table_grads")
        wrap(_ada_rms_norm_table_grads_kernel)[(n_prog, bsz, d_tiles)](
            grad, grad.stride(0), grad.stride(1),
            x, x.stride(0), x.stride(1),
            rstd,
            index, index.stride(0), index.stride(1),
            parts, parts.stride(0), parts.stride(1), parts.stride(2),
            n, d, rows_per_prog,
            TABLE_K=table_k, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    # (B, K, D): the P partials added in order. Rows sliced before the sum, so the result is
    # contiguous as the fake impl says (a slice after it would keep the padded row stride).
    return parts[:, :, :k_rows].sum(1).to(dtype)


def _bwd_fake(grad, x, scale, index, eps):
    bsz, n, d = x.shape
    dx = empty_rows((bsz, n, d), x.dtype, x.device)
    if index is not None:
        return dx, empty_rows(scale.shape, scale.dtype, x.device)  # the table's grad
    return dx, empty_rows((bsz, 1 if scale.shape[1] == 1 else n, d), scale.dtype, x.device)


#################################################################################
#                        Registration: triton_op + autograd                     #
#################################################################################


class AdaRmsNormFunction(torch.autograd.Function):
    """The route without ``torch.library.triton_op`` (torch < 2.6): eager autograd only."""

    @staticmethod
    def forward(ctx, x, scale, index, eps):
        ctx.save_for_backward(x, scale, index)
        ctx.eps = eps
        return ada_rms_norm_fwd(x, scale, index, eps)

    @staticmethod
    def backward(ctx, grad):
        x, scale, index = ctx.saved_tensors
        dx, dscale = ada_rms_norm_bwd(grad, x, scale, index, ctx.eps)
        return dx, dscale, None, None


if HAS_TRITON_OP:

    @torch.library.triton_op("pf_kernels::ada_rms_norm", mutates_args=())
    def _ada_rms_norm_op(x: Tensor, scale: Tensor, eps: float) -> Tensor:
        return ada_rms_norm_fwd(x, scale, None, eps)

    @torch.library.triton_op("pf_kernels::ada_rms_norm_indexed", mutates_args=())
    def _ada_rms_norm_indexed_op(x: Tensor, scale_table: Tensor, index: Tensor, eps: float) -> Tensor:
        return ada_rms_norm_fwd(x, scale_table, index, eps)

    @torch.library.triton_op("pf_kernels::ada_rms_norm_backward", mutates_args=())
    def _ada_rms_norm_backward_op(
        grad: Tensor, x: Tensor, scale: Tensor, index: Optional[Tensor], eps: float
    ) -> tuple[Tensor, Tensor]:
        return ada_rms_norm_bwd(grad, x, scale, index, eps)

    # Explicit fake impls (see adaln_modulate: the interpreter kernels cannot run on fakes).
    def _fwd_fake(x, scale, eps):
        return empty_rows(x.shape, ada_rms_norm_dtype(x, scale), x.device)

    def _fwd_indexed_fake(x, scale_table, index, eps):
        return empty_rows(x.shape, ada_rms_norm_dtype(x, scale_table), x.device)

    _ada_rms_norm_op.register_fake(_fwd_fake)
    _ada_rms_norm_indexed_op.register_fake(_fwd_indexed_fake)
    _ada_rms_norm_backward_op.register_fake(_bwd_fake)

    def _setup_context(ctx, inputs, output):
        x, scale, eps = inputs
        ctx.save_for_backward(x, scale)
        ctx.eps = eps

    def _backward(ctx, grad):
        x, scale = ctx.saved_tensors
        dx, dscale = torch.ops.pf_kernels.ada_rms_norm_backward(grad, x, scale, None, ctx.eps)
        return dx, dscale, None

    def _setup_context_indexed(ctx, inputs, output):
        x, scale_table, index, eps = inputs
        ctx.save_for_backward(x, scale_table, index)
        ctx.eps = eps

    def _backward_indexed(ctx, grad):
        x, scale_table, index = ctx.saved_tensors
        dx, dtable = torch.ops.pf_kernels.ada_rms_norm_backward(grad, x, scale_table, index, ctx.eps)
        return dx, dtable, None, None

    _ada_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
    _ada_rms_norm_indexed_op.register_autograd(_backward_indexed, setup_context=_setup_context_indexed)


def ada_rms_norm_triton(x, scale, eps: float = 1e-6) -> torch.Tensor:
    if HAS_TRITON_OP:
        return torch.ops.pf_kernels.ada_rms_norm(x, scale, eps)
    return AdaRmsNormFunction.apply(x, scale, None, eps)


def ada_rms_norm_indexed_triton(x, scale_table, index, eps: float = 1e-6) -> torch.Tensor:
    if HAS_TRITON_OP:
        return torch.ops.pf_kernels.ada_rms_norm_indexed(x, scale_table, index, eps)
    return AdaRmsNormFunction.apply(x, scale_table, index, eps)
