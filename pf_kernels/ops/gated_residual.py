"""Fused gated residual ``out = x + gate * y`` (AdaLN-Zero's residual update): kernels, launchers, ops.

Gate forms, as in ``adaln_modulate``: per token (B, N, D) (strided ``chunk`` views welcome),
per sample (B, 1, D) read through a zero row stride with its grad reduced over N, or an
indexed (B, K, D) table with ``index`` (B, N) (``HAS_INDEX``). Arithmetic in fp32.

File layout: forward kernel, backward kernels, host launchers, op registration.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pf_kernels.ops._utils import (
    MAX_TABLE_K,
    TILE_ELEMS,
    count,
    elementwise_per_thread,
    elementwise_tiles,
    empty_rows,
    index_args,
    last_dim_contiguous,
    mod_row_stride,
    per_sample,
    reduce_programs,
    scatter_rows,
    table_sum,
    table_tiles,
    wrap,
)
from pf_kernels.ops.registry import register
from pf_kernels.ops.rows import (
    add_table_rows,
    column_program,
    load_mod,
    load_tile,
    mod_row_index,
    step_rows,
    store_table_part,
    store_tile,
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
    mrows = mod_row_index(INDEX, stride_ib, stride_in, b, rows, row_ok, HAS_INDEX)
    x = load_tile(X + b * stride_xb + rows * stride_xn, cols, mask)
    y = load_tile(Y + b * stride_yb + rows * stride_yn, cols, mask)
    out = x + load_tile(GATE + b * stride_gb + mrows * stride_gn, cols, mask) * y  # out = x + gate * y
    store_tile(OUT + b * stride_ob + rows * stride_on, cols, out, mask, OUT)


#################################################################################
#                                Backward kernels                               #
#################################################################################


@triton.jit
def _gated_residual_bwd_kernel(
    DOUT, stride_db, stride_dn,  # (B, N, D) incoming gradient (dx is this tensor itself)
    GATE, stride_gb, stride_gn,  # as in the forward
    Y, stride_yb, stride_yn,  # (B, N, D)
    INDEX, stride_ib, stride_in,  # (B, N) int64
    DY, stride_dyb, stride_dyn,  # (B, N, D)
    DGATE, stride_dgb, stride_dgn,  # (B, N, D) per token, or (B, P, D) fp32 partials (REDUCE_GATE)
    stride_pb, stride_pp, stride_pk,  # TABLE: DGATE is (B, P, TABLE_K, D) fp32 partials
    N, D, ROWS_PER_PROG,
    HAS_INDEX: tl.constexpr,
    REDUCE_GATE: tl.constexpr,
    TABLE: tl.constexpr,
    TABLE_K: tl.constexpr,  # TABLE: the table's rows, padded to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (P, B, column tiles); program p covers ROWS_PER_PROG tokens of sample b in one
    # column tile, BLOCK_M rows a step: dy = g * gate, and dgate = g * y stored per token, or
    # summed over the tokens in fp32 registers and written once per program, for a per-sample
    # gate (REDUCE_GATE) or per table row (TABLE: dgate[k] = sum_{n: index = k} g_n * y_n,
    # without atomics); the host adds the P partials in order.
    pid, b, cols, col_ok = column_program(D, BLOCK_D)
    acc_dgate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_table = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows, row_ok, mask = step_rows(m0, N, col_ok, BLOCK_M)
        if TABLE:
            mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=-1)  # -1: no table row
            gate_rows = GATE + b * stride_gb + tl.maximum(mrows, 0) * stride_gn
        else:
            mrows = mod_row_index(INDEX, stride_ib, stride_in, b, rows, row_ok, HAS_INDEX)
            gate_rows = GATE + b * stride_gb + mrows * stride_gn
        g = load_tile(DOUT + b * stride_db + rows * stride_dn, cols, mask)
        y = load_tile(Y + b * stride_yb + rows * stride_yn, cols, mask)
        gate = load_mod(GATE + b * stride_gb, gate_rows, cols, mask, D, REDUCE_GATE)
        store_tile(DY + b * stride_dyb + rows * stride_dyn, cols, g * gate, mask, DY)  # dy = g * gate
        dgate = g * y
        if TABLE:
            acc_table = add_table_rows(acc_table, dgate, mrows, TABLE_K)
        elif REDUCE_GATE:
            acc_dgate += tl.sum(dgate, axis=0)
        else:
            store_tile(DGATE + b * stride_dgb + rows * stride_dgn, cols, dgate, mask, DGATE)
    if TABLE:
        store_table_part(DGATE, acc_table, b, pid, stride_pb, stride_pp, stride_pk, cols, col_ok, TABLE_K)
    if REDUCE_GATE:
        tl.store(DGATE + b * stride_dgb + pid * stride_dgn + cols, acc_dgate, mask=col_ok)


#################################################################################
#                                Host launchers                                 #
#################################################################################


def gated_residual_fwd(x, gate, y, index, dtype=None) -> torch.Tensor:
    """x, y (B, N, D); gate (B, N|1, D) or (B, K, D) with index (B, N). Returns (B, N, D) in
    ``dtype``, by default eager's type promotion (computed in fp32 either way: Wan's
    ``(x.float() + y * gate).type_as(x)`` is ``dtype=x.dtype``)."""
    x, gate, y = last_dim_contiguous(x), last_dim_contiguous(gate), last_dim_contiguous(y)
    bsz, n, d = x.shape
    out = empty_rows((bsz, n, d), dtype or gated_residual_dtype(x, gate, y), x.device)
    if out.numel() == 0:
        return out
    indexed = index is not None
    block_m, block_d, n_tiles, num_warps = elementwise_tiles(n, d)
    count("gated_residual_fwd")
    wrap(_gated_residual_fwd_kernel)[(triton.cdiv(n, block_m), bsz, n_tiles)](
        x, x.stride(0), x.stride(1),
        gate, gate.stride(0), mod_row_stride(gate, indexed),
        y, y.stride(0), y.stride(1),
        *index_args(index, x),
        out, out.stride(0), out.stride(1),
        n, d,
        HAS_INDEX=indexed, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return out


def gated_residual_bwd(grad: Tensor, gate: Tensor, y: Tensor, index: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Returns (dy, dgate): dgate (B, 1, D) reduced for a per-sample gate, per token otherwise,
    and for an indexed gate its (B, K, D) table grads (summed in the kernel, deterministic,
    for K <= MAX_TABLE_K; by a scatter of the per-token grads above). dx is ``grad`` itself."""
    grad, gate, y = last_dim_contiguous(grad), last_dim_contiguous(gate), last_dim_contiguous(y)
    bsz, n, d = y.shape
    indexed = index is not None
    k_rows = int(gate.shape[1]) if indexed else 0
    table_k = triton.next_power_of_2(k_rows) if indexed and k_rows <= MAX_TABLE_K else 0
    reduce_gate = per_sample(gate, n, indexed)
    dy = empty_rows((bsz, n, d), y.dtype, y.device)
    block_m, block_d, d_tiles, num_warps = elementwise_tiles(n, d)
    if reduce_gate:
        # Half the elements per thread: the fp32 accumulator row stays live across the loop.
        block_m = max(1, min(block_m, TILE_ELEMS // 2 // block_d))
        num_warps = min(16, max(1, block_m * block_d // (16 * elementwise_per_thread(d))))
        n_prog, rows_per_prog = reduce_programs(n, bsz * d_tiles, block_m, y.device, num_warps)
        dgate_buf = torch.empty((bsz, n_prog, d), dtype=torch.float32, device=y.device)
    elif table_k:
        block_m, block_d, d_tiles = table_tiles(n, d, 2)
        num_warps = 4
        n_prog, rows_per_prog = reduce_programs(n, bsz * d_tiles, block_m, y.device)
        dgate_buf = torch.empty((bsz, n_prog, table_k, d), dtype=torch.float32, device=y.device)
    else:
        n_prog, rows_per_prog = triton.cdiv(max(n, 1), block_m), block_m
        dgate_buf = empty_rows((bsz, n, d), torch.float32 if indexed else gate.dtype, y.device)
    if dy.numel() > 0:
        count("gated_residual_bwd")
        wrap(_gated_residual_bwd_kernel)[(n_prog, bsz, d_tiles)](
            grad, grad.stride(0), grad.stride(1),
            gate, gate.stride(0), mod_row_stride(gate, indexed),
            y, y.stride(0), y.stride(1),
            *index_args(index, y),
            dy, dy.stride(0), dy.stride(1),
            dgate_buf, dgate_buf.stride(0), dgate_buf.stride(1), *(dgate_buf.stride()[:3] if table_k else (0, 0, 0)),
            n, d, rows_per_prog,
            HAS_INDEX=indexed, REDUCE_GATE=reduce_gate, TABLE=bool(table_k), TABLE_K=max(table_k, 1),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    elif reduce_gate or table_k:
        dgate_buf.zero_()
    if reduce_gate:
        return dy, dgate_buf.sum(1, keepdim=True).to(gate.dtype)
    if table_k:
        return dy, table_sum(dgate_buf, k_rows, gate.dtype)
    if indexed:  # a wide table: per-token grads scattered into it (atomics on a GPU)
        return dy, scatter_rows(dgate_buf, index, k_rows, gate.dtype)
    return dy, dgate_buf


def _bwd_fake(grad, gate, y, index):
    bsz, n, d = y.shape
    dy = empty_rows((bsz, n, d), y.dtype, y.device)
    if index is not None:
        return dy, empty_rows(gate.shape, gate.dtype, y.device)  # the table's grads
    return dy, empty_rows((bsz, 1 if gate.shape[1] == 1 else n, d), gate.dtype, y.device)


#################################################################################
#                                 Registration                                  #
#################################################################################


def _plain(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return gated_residual_fwd(x, gate, y, None)


def _indexed(x: Tensor, gate: Tensor, y: Tensor, index: Tensor) -> Tensor:
    return gated_residual_fwd(x, gate, y, index)


def _backward(grads, gate, y, index, x_dtype):
    """(dx, dgate, dy): dx is the incoming grad (in x's dtype); x itself is not saved."""
    dy, dgate = torch.ops.pf_kernels.gated_residual_backward(grads[0], gate, y, index)
    return grads[0].to(x_dtype), dgate, dy


def _out_fake(x, gate, y, *args):
    return empty_rows(x.shape, gated_residual_dtype(x, gate, y), x.device)


register("gated_residual", _plain, _out_fake, backward=_backward,
         save=lambda x, gate, y, out: (gate, y, None, x.dtype))
register("gated_residual_indexed", _indexed, _out_fake, backward=_backward,
         save=lambda x, gate, y, index, out: (gate, y, index, x.dtype))
register("gated_residual_backward", gated_residual_bwd, _bwd_fake)


def _to(x: Tensor, gate: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    return gated_residual_fwd(x, gate, y, None, dtype)


# The plain form with its output in a chosen dtype (the same backward: grads in the inputs' dtypes).
register("gated_residual_to", _to, lambda x, gate, y, dtype: empty_rows(x.shape, dtype, x.device),
         backward=_backward, save=lambda x, gate, y, dtype, out: (gate, y, None, x.dtype))


def gated_residual_triton(x, gate, y, index, dtype=None) -> torch.Tensor:
    """The op for the dispatcher: the plain or the indexed form (or the plain one in ``dtype``)."""
    if dtype is not None:
        return torch.ops.pf_kernels.gated_residual_to(x, gate, y, dtype)
    if index is None:
        return torch.ops.pf_kernels.gated_residual(x, gate, y)
    return torch.ops.pf_kernels.gated_residual_indexed(x, gate, y, index)
