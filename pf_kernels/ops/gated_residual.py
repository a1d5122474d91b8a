"""Fused gated residual: ``out = x + gate * y`` (AdaLN-Zero's residual update).

Gate forms, as in ``adaln_modulate``: per token (B, N, D) (strided ``chunk`` views welcome),
per sample (B, 1, D) read through a zero row stride with its grad reduced over N, or an
indexed (B, K, D) table with ``index`` (B, N) (``HAS_INDEX``). Arithmetic in fp32.

File layout: forward kernel, backward kernel, host launchers, op registration + autograd.
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
    elementwise_per_thread,
    elementwise_tiles,
    empty_rows,
    last_dim_contiguous,
    wrap,
)
from pf_kernels.ops.adaln_modulate import (
    _index_args,
    _mod_row_stride,
    _scatter_rows,
    add_table_rows,
    load_mod,
    reduce_programs,
    table_block_d,
)
from pf_kernels.reference import gated_residual_dtype

#################################################################################
#                                 Forward kernel                                #
#################################################################################


@triton.jit
def _gated_residual_fwd_kernel(
    X, stride_xb, stride_xn,  # (B, N, D) residual stream
    GATE, stride_gb, stride_gn,  # (B, N, D) | (B, 1, D) with stride_gn = 0 | (B, K, D) table
    Y, stride_yb, stride_yn,  # (B, N, D) branch output
    INDEX, stride_ib, stride_in,  # (B, N) int64 table rows (HAS_INDEX only)
    OUT, stride_ob, stride_on,  # (B, N, D)
    N, D,
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_M), B, column tiles): a (BLOCK_M, BLOCK_D) tile per program; D in
    # tiles of ``col_tiles(D)`` (no lanes wasted at the PF widths), no row statistics needed.
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < D)[None, :]
    if HAS_INDEX:
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=0)
    else:
        mrows = rows
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
    y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yn + cols[None, :], mask=mask, other=0.0)
    gate = tl.load(GATE + b * stride_gb + mrows[:, None] * stride_gn + cols[None, :], mask=mask, other=0.0)
    # out = x + gate * y
    out = x.to(tl.float32) + gate.to(tl.float32) * y.to(tl.float32)
    tl.store(OUT + b * stride_ob + rows[:, None] * stride_on + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


#################################################################################
#                                Backward kernel                                #
#################################################################################


@triton.jit
def _gated_residual_bwd_kernel(
    DOUT, stride_db, stride_dn,  # (B, N, D) incoming gradient (dx is this tensor itself)
    GATE, stride_gb, stride_gn,  # as in the forward
    Y, stride_yb, stride_yn,  # (B, N, D)
    INDEX, stride_ib, stride_in,  # (B, N) int64 (HAS_INDEX only)
    DY, stride_dyb, stride_dyn,  # (B, N, D)
    DGATE, stride_dgb, stride_dgn,  # (B, N, D) per token, or (B, P, D) fp32 partials (REDUCE_GATE)
    N, D, ROWS_PER_PROG,
    HAS_INDEX: tl.constexpr,
    REDUCE_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (P, B, column tiles); program p covers ROWS_PER_PROG tokens of sample b in one
    # column tile, BLOCK_M rows a step; a per-sample gate's grad is summed over them in fp32
    # registers and written once per program (the host adds the P partials in order).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc_dgate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_INDEX:
            mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=0)
        else:
            mrows = rows
        g = tl.load(DOUT + b * stride_db + rows[:, None] * stride_dn + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yn + cols[None, :], mask=mask, other=0.0)
        gate = load_mod(GATE + b * stride_gb, GATE + b * stride_gb + mrows * stride_gn, cols, mask, D, REDUCE_GATE)
        # dy = g * gate; dgate = g * y
        dy = g * gate.to(tl.float32)
        tl.store(DY + b * stride_dyb + rows[:, None] * stride_dyn + cols[None, :], dy.to(DY.dtype.element_ty), mask=mask)
        dgate = g * y.to(tl.float32)
        if REDUCE_GATE:
            acc_dgate += tl.sum(dgate, axis=0)
        else:
            tl.store(
                DGATE + b * stride_dgb + rows[:, None] * stride_dgn + cols[None, :],
                dgate.to(DGATE.dtype.element_ty),
                mask=mask,
            )
    if REDUCE_GATE:
        tl.store(DGATE + b * stride_dgb + pid * stride_dgn + cols, acc_dgate, mask=col_ok)


@triton.jit
def _gated_residual_table_bwd_kernel(
    DOUT, stride_db, stride_dn,  # (B, N, D) incoming gradient
    GATE, stride_gb, stride_gn,  # (B, K, D) table
    Y, stride_yb, stride_yn,  # (B, N, D)
    INDEX, stride_ib, stride_in,  # (B, N) int64
    DY, stride_dyb, stride_dyn,  # (B, N, D)
    DGATE, stride_pb, stride_pp, stride_pk,  # (B, P, TABLE_K, D) fp32 partials
    N, D, ROWS_PER_PROG,
    TABLE_K: tl.constexpr,  # the table's rows, padded to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (P, B, D tiles): dy as in the kernel above, and the table's grads
    # dgate[k] = sum_{n: index = k} g_n * y_n summed in fp32 registers per program (the same
    # sums in the same order on every run: no atomics); the host adds the P partials.
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
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=-1)
        g = tl.load(DOUT + b * stride_db + rows[:, None] * stride_dn + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yn + cols[None, :], mask=mask, other=0.0)
        gate = tl.load(GATE + b * stride_gb + tl.maximum(mrows, 0)[:, None] * stride_gn + cols[None, :], mask=mask,
                       other=0.0)
        tl.store(DY + b * stride_dyb + rows[:, None] * stride_dyn + cols[None, :],
                 (g * gate.to(tl.float32)).to(DY.dtype.element_ty), mask=mask)
        dgate = g * y.to(tl.float32)
        acc = add_table_rows(acc, dgate, mrows, TABLE_K)
    tl.store(DGATE + b * stride_pb + pid * stride_pp + ks[:, None] * stride_pk + cols[None, :], acc,
             mask=col_ok[None, :])


#################################################################################
#                                Host launchers                                 #
#################################################################################


def gated_residual_fwd(x, gate, y, index) -> torch.Tensor:
    """x, y (B, N, D); gate (B, N|1, D) or (B, K, D) with index (B, N). Returns (B, N, D)."""
    x, gate, y = last_dim_contiguous(x), last_dim_contiguous(gate), last_dim_contiguous(y)
    bsz, n, d = x.shape
    out = empty_rows((bsz, n, d), gated_residual_dtype(x, gate, y), x.device)  # eager's type promotion
    if out.numel() == 0:
        return out
    indexed = index is not None
    block_m, block_d, n_tiles, num_warps = elementwise_tiles(n, d)
    idx, sib, sin = _index_args(index, x)
    count("gated_residual_fwd")
    wrap(_gated_residual_fwd_kernel)[(triton.cdiv(n, block_m), bsz, n_tiles)](
        x, x.stride(0), x.stride(1),
        gate, gate.stride(0), _mod_row_stride(gate, indexed),
        y, y.stride(0), y.stride(1),
        idx, sib, sin,
        out, out.stride(0), out.stride(1),
        n, d,
        HAS_INDEX=indexed, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


MAX_TABLE_K = 8  # an indexed gate with up to this many rows has its grads summed in the kernel


def gated_residual_bwd(grad, gate, y, index):
    """Returns (dy, dgate): dgate (B, 1, D) reduced for a per-sample gate, per token otherwise,
    and for an indexed gate its (B, K, D) table grads (summed in the kernel, deterministic,
    for K <= MAX_TABLE_K; by a scatter of the per-token grads above). dx is ``grad`` itself."""
    grad, gate, y = last_dim_contiguous(grad), last_dim_contiguous(gate), last_dim_contiguous(y)
    bsz, n, d = y.shape
    indexed = index is not None
    k_rows = int(gate.shape[1]) if indexed else 0
    table_k = triton.next_power_of_2(k_rows) if indexed and k_rows <= MAX_TABLE_K else 0
    reduce_gate = bool(not indexed and gate.shape[1] == 1 and n != 1)  # constexpr: a plain bool
    dy = empty_rows((bsz, n, d), y.dtype, y.device)
    block_m, block_d, d_tiles, num_warps = elementwise_tiles(n, d)
    if reduce_gate:
        # Half the elements per thread: the fp32 accumulator row stays live across the loop.
        block_m = max(1, min(block_m, TILE_ELEMS // 2 // block_d))
        num_warps = min(16, max(1, block_m * block_d // (16 * elementwise_per_thread(d))))
        n_prog, rows_per_prog = reduce_programs(n, bsz * d_tiles, block_m, y.device, num_warps)
        dgate_buf = torch.empty((bsz, n_prog, d), dtype=torch.float32, device=y.device)
    elif table_k:
        block_d = table_block_d(d)
        block_m = max(1, min(TILE_ELEMS // 2 // block_d, triton.next_power_of_2(max(int(n), 1))))
        num_warps = 4
        d_tiles = triton.cdiv(d, block_d)
        n_prog, rows_per_prog = reduce_programs(n, bsz * d_tiles, block_m, y.device)
        dgate_buf = torch.empty((bsz, n_prog, table_k, d), dtype=torch.float32, device=y.device)
    else:
        n_prog, rows_per_prog = triton.cdiv(max(n, 1), block_m), block_m
        dgate_buf = empty_rows((bsz, n, d), torch.float32 if indexed else gate.dtype, y.device)
    if dy.numel() > 0 and table_k:
        count("gated_residual_bwd")
        wrap(_gated_residual_table_bwd_kernel)[(n_prog, bsz, d_tiles)](
            grad, grad.stride(0), grad.stride(1),
            gate, gate.stride(0), gate.stride(1),
            y, y.stride(0), y.stride(1),
            index, index.stride(0), index.stride(1),
            dy, dy.stride(0), dy.stride(1),
            dgate_buf, dgate_buf.stride(0), dgate_buf.stride(1), dgate_buf.stride(2),
            n, d, rows_per_prog,
            TABLE_K=table_k, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    elif dy.numel() > 0:
        idx, sib, sin = _index_args(index, y)
        count("gated_residual_bwd")
        wrap(_gated_residual_bwd_kernel)[(n_prog, bsz, d_tiles)](
            grad, grad.stride(0), grad.stride(1),
            gate, gate.stride(0), _mod_row_stride(gate, indexed),
            y, y.stride(0), y.stride(1),
            idx, sib, sin,
            dy, dy.stride(0), dy.stride(1),
            dgate_buf, dgate_buf.stride(0), dgate_buf.stride(1),
            n, d, rows_per_prog,
            HAS_INDEX=indexed, REDUCE_GATE=reduce_gate, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    elif reduce_gate or table_k:
        dgate_buf.zero_()
    if reduce_gate:
        return dy, dgate_buf.sum(1, keepdim=True).to(gate.dtype)
    if table_k:
        # (B, K, D): the P partials added in order; rows sliced before the sum, so the grad is
        # contiguous as the fake impl says (a slice after it keeps the padded stride TABLE_K * D)
        return dy, dgate_buf[:, :, :k_rows].sum(1).to(gate.dtype)
    if indexed:  # a wide table: per-token grads scattered into it (atomics on a GPU)
        return dy, _scatter_rows(dgate_buf, index, k_rows, gate.dtype)
    return dy, dgate_buf


def _bwd_fake(grad, gate, y, index):
    bsz, n, d = y.shape
    dy = empty_rows((bsz, n, d), y.dtype, y.device)
    if index is not None:
        return dy, empty_rows(gate.shape, gate.dtype, y.device)  # the table's grads
    return dy, empty_rows((bsz, 1 if gate.shape[1] == 1 else n, d), gate.dtype, y.device)


def _finish_grads(grad, x_dtype, dy, dgate, gate, index):
    # dx = grad (in x's dtype); dgate is already the gate's (or its table's) grad.
    dx = grad if grad.dtype == x_dtype else grad.to(x_dtype)
    return dx, dgate, dy


#################################################################################
#                        Registration: triton_op + autograd                     #
#################################################################################


class GatedResidualFunction(torch.autograd.Function):
    """The route without ``torch.library.triton_op`` (torch < 2.6): eager autograd only."""

    @staticmethod
    def forward(ctx, x, gate, y, index):
        ctx.save_for_backward(gate, y, index)
        ctx.x_dtype = x.dtype
        return gated_residual_fwd(x, gate, y, index)

    @staticmethod
    def backward(ctx, grad):
        gate, y, index = ctx.saved_tensors
        dy, dgate = gated_residual_bwd(grad, gate, y, index)
        return (*_finish_grads(grad, ctx.x_dtype, dy, dgate, gate, index), None)


if HAS_TRITON_OP:

    @torch.library.triton_op("pf_kernels::gated_residual", mutates_args=())
    def _gated_residual_op(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
        return gated_residual_fwd(x, gate, y, None)

    @torch.library.triton_op("pf_kernels::gated_residual_indexed", mutates_args=())
    def _gated_residual_indexed_op(x: Tensor, gate: Tensor, y: Tensor, index: Tensor) -> Tensor:
        return gated_residual_fwd(x, gate, y, index)

    @torch.library.triton_op("pf_kernels::gated_residual_backward", mutates_args=())
    def _gated_residual_backward_op(
        grad: Tensor, gate: Tensor, y: Tensor, index: Optional[Tensor]
    ) -> tuple[Tensor, Tensor]:
        return gated_residual_bwd(grad, gate, y, index)

    def _fwd_fake(x, gate, y):
        return empty_rows(x.shape, gated_residual_dtype(x, gate, y), x.device)

    def _fwd_indexed_fake(x, gate, y, index):
        return empty_rows(x.shape, gated_residual_dtype(x, gate, y), x.device)

    _gated_residual_op.register_fake(_fwd_fake)
    _gated_residual_indexed_op.register_fake(_fwd_indexed_fake)
    _gated_residual_backward_op.register_fake(_bwd_fake)

    def _setup_context(ctx, inputs, output):
        x, gate, y = inputs[:3]
        index = inputs[3] if len(inputs) > 3 else None
        ctx.save_for_backward(gate, y, index)
        ctx.x_dtype = x.dtype  # x itself is not needed: dx = grad

    def _backward(ctx, grad):
        gate, y, index = ctx.saved_tensors
        dy, dgate = torch.ops.pf_kernels.gated_residual_backward(grad, gate, y, index)
        grads = _finish_grads(grad, ctx.x_dtype, dy, dgate, gate, index)
        return grads if index is None else (*grads, None)

    _gated_residual_op.register_autograd(_backward, setup_context=_setup_context)
    _gated_residual_indexed_op.register_autograd(_backward, setup_context=_setup_context)


def gated_residual_triton(x, gate, y) -> torch.Tensor:
    if HAS_TRITON_OP:
        return torch.ops.pf_kernels.gated_residual(x, gate, y)
    return GatedResidualFunction.apply(x, gate, y, None)


def gated_residual_indexed_triton(x, gate, y, index) -> torch.Tensor:
    if HAS_TRITON_OP:
        return torch.ops.pf_kernels.gated_residual_indexed(x, gate, y, index)
    return GatedResidualFunction.apply(x, gate, y, index)
