"""Fused residual update and the next modulation: one pass for the seam between two sub-blocks.

    x_new = x + gate * y                              the residual stream after a sub-block
    h     = LN(x_new) * (1 + scale) + shift           the next sub-block's input (LN without affine)
    returns (x_new, h)

``gated_residual`` then ``adaln_modulate`` read x_new back after writing it; here it is formed
in registers, stored once and normalised at once (reads x, gate, y, shift, scale; writes x_new,
h). Custom ops are opaque to inductor, so two separate ops also lose the fusion that compiled
plain PyTorch finds on its own; this op puts it back. LN reads x_new as stored (rounded to its
dtype), so h is exactly ``adaln_modulate(x_new)``; statistics and ``1 + scale`` are fp32.

Modulation forms, each of gate / shift / scale on its own (as in ``adaln_modulate``): per
token (B, N, D) (strided ``chunk(6, -1)`` views: unit stride along D, row strides passed), per
sample (B, 1, D) (row stride 0; its grad summed over N), or indexed (B, K, D) tables with
``index`` (B, N) int64 (``HAS_INDEX``; all three tables then, one K).

Backward: both outputs take grads (x_new's flows on as the residual stream). With w = 1 + scale
and g = dL/dx_new in total,
    g      = grad_x + rstd * (w * grad_h - mean(w * grad_h) - xhat * mean(w * grad_h * xhat))
    dx = g,  dy = g * gate,  dgate = g * y,  dshift = grad_h,  dscale = grad_h * xhat.
An indexed backward with K <= MAX_TABLE_K sums the table grads in the kernel, per program in
fp32 and then over programs in order: the same bits on every run (no atomics).

Rows are walked in column tiles as in ``adaln_modulate`` (pass 1 stores x_new and merges its
statistics tile by tile, pass 2 reads x_new back for h); under autograd the forward stores the
mean and rstd of x_new for the backward (``gated_residual_modulate_with_stats``).

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
    ln_stats,
    load_mod,
    merge_moments,
    needs_grad,
    reduce_programs,
    store_tiles,
    table_block_d,
)
from pf_kernels.reference import gated_residual_dtype

#################################################################################
#                                 Forward kernel                                #
#################################################################################


@triton.jit
def _gated_residual_modulate_fwd_kernel(
    X, stride_xb, stride_xn,  # (B, N, D) residual stream in
    GATE, stride_gb, stride_gn,  # (B, N, D) | (B, 1, D) with stride_gn = 0 | (B, K, D) table
    Y, stride_yb, stride_yn,  # (B, N, D) the sub-block's output
    SHIFT, stride_hb, stride_hn,  # same forms as GATE
    SCALE, stride_sb, stride_sn,  # same forms as GATE
    INDEX, stride_ib, stride_in,  # (B, N) int64 table rows (read only when HAS_INDEX)
    XN, H, stride_ob, stride_on,  # (B, N, D) each, contiguous: x_new and h
    STATS,  # (B, N, 2) fp32 mean, rstd of x_new per token (written only when STORE_STATS)
    N, D, eps,
    HAS_INDEX: tl.constexpr,
    STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_TILES: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_M), B): token blocks on axis 0, BLOCK_M whole rows per program in
    # NUM_TILES column tiles. Pass 1 forms and stores x_new and its statistics; pass 2 reads
    # x_new back (from cache) for h. One tile: x_new stays in registers.
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    row_ok = rows < N
    if HAS_INDEX:
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=0)
    else:
        mrows = rows  # the per-sample forms read row 0 everywhere through their zero stride
    x_rows = X + b * stride_xb + rows * stride_xn
    y_rows = Y + b * stride_yb + rows * stride_yn
    gate_rows = GATE + b * stride_gb + mrows * stride_gn
    out_rows = b * stride_ob + rows * stride_on  # offsets into XN and H

    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in tl.static_range(NUM_TILES):
        cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]  # (BLOCK_M, BLOCK_D)
        x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        y = tl.load(y_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        gate = tl.load(gate_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        # x_new = x + gate * y, stored in its dtype; LN reads that stored value back.
        xn = (x.to(tl.float32) + gate.to(tl.float32) * y.to(tl.float32)).to(XN.dtype.element_ty)
        tl.store(XN + out_rows[:, None] + cols[None, :], xn, mask=mask)
        # mean and M2 of x_new tile by tile (see merge_moments; padded columns zeroed)
        xf = tl.where(mask, xn.to(tl.float32), 0.0)
        mean, m2 = merge_moments(mean, m2, xf, mask, t * BLOCK_D, D, BLOCK_D, NUM_TILES)
    rstd = 1.0 / tl.sqrt(m2 / D + eps)  # (BLOCK_M,)
    if NUM_TILES > 1:
        tl.debug_barrier()  # x_new, stored by all the program's threads, is read back below

    shift_rows = SHIFT + b * stride_hb + mrows * stride_hn
    scale_rows = SCALE + b * stride_sb + mrows * stride_sn
    for t in tl.static_range(NUM_TILES):
        cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        if NUM_TILES > 1:
            xf = tl.load(XN + out_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        scale = tl.load(scale_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        # h = xhat * (1 + scale) + shift, xhat = (x_new - mean) * rstd, 1 + scale in fp32.
        h = ((xf - mean[:, None]) * rstd[:, None]) * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
        tl.store(H + out_rows[:, None] + cols[None, :], h.to(H.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(STATS + (b * N + rows) * 2, mean, mask=row_ok)
        tl.store(STATS + (b * N + rows) * 2 + 1, rstd, mask=row_ok)


#################################################################################
#                                Backward kernels                               #
#################################################################################


@triton.jit
def _gated_residual_modulate_bwd_kernel(
    DH, stride_dhb, stride_dhn,  # (B, N, D) grad of h
    DXN, stride_dnb, stride_dnn,  # (B, N, D) grad of x_new (the stream further on)
    XN, stride_xb, stride_xn,  # (B, N, D) x_new, saved by the forward
    GATE, stride_gb, stride_gn,  # as in the forward
    Y, stride_yb, stride_yn,  # (B, N, D)
    SCALE, stride_sb, stride_sn,  # as in the forward
    INDEX, stride_ib, stride_in,  # (B, N) int64 (HAS_INDEX only)
    DX, DY, stride_db, stride_dn,  # (B, N, D) each, contiguous (not written when TABLE)
    DGATE, stride_dgb, stride_dgn,  # (B, N, D) per token, or (B, P, D) fp32 partials (REDUCE_GATE)
    DSCALE, stride_dsb, stride_dsn,  # (B, N, D) per token, or (B, P, D) fp32 partials (REDUCE_SCALE)
    DSHIFT, stride_dfb, stride_dfn,  # (B, P, D) fp32 partials (REDUCE_SHIFT only; else dshift = grad_h)
    STATS,  # (B, N, 2) fp32 mean, rstd of x_new (the forward's, or ln_stats')
    TSTATS,  # (B, N, 4) fp32 mean, rstd, c1, c2 per token (TABLE only: the table kernel does the rest)
    N, D, ROWS_PER_PROG,
    HAS_INDEX: tl.constexpr,
    REDUCE_GATE: tl.constexpr,
    REDUCE_SHIFT: tl.constexpr,
    REDUCE_SCALE: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_TILES: tl.constexpr,
    TILES_P2: tl.constexpr,  # NUM_TILES padded to a power of two (accumulator rows)
):
    # Grid (P, B): program p walks tokens [p * ROWS_PER_PROG, (p + 1) * ROWS_PER_PROG) of sample
    # b, BLOCK_M whole rows per step, each in NUM_TILES column tiles; a per-sample modulation's
    # grads are summed over them in fp32 registers (one accumulator row per column tile) and
    # written once per program (the host adds the P partials in order).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_dgate = tl.zeros((TILES_P2, BLOCK_D), dtype=tl.float32)
    acc_dshift = tl.zeros((TILES_P2, BLOCK_D), dtype=tl.float32)
    acc_dscale = tl.zeros((TILES_P2, BLOCK_D), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
        row_ok = rows < N
        if HAS_INDEX:
            mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=0)
        else:
            mrows = rows
        gh_rows = DH + b * stride_dhb + rows * stride_dhn
        xn_rows = XN + b * stride_xb + rows * stride_xn
        scale_rows = SCALE + b * stride_sb + mrows * stride_sn
        mean = tl.load(STATS + (b * N + rows) * 2, mask=row_ok, other=0.0)
        rstd = tl.load(STATS + (b * N + rows) * 2 + 1, mask=row_ok, other=0.0)
        # Through h = xhat * w + shift, w = 1 + scale: dxhat = grad_h * w, and through LN
        # d(x_new) = rstd * (dxhat - c2 - xhat * c1), c1 = mean(dxhat * xhat), c2 = mean(dxhat):
        # the row sums first (pass 1), then the grads tile by tile (pass 2, tiles read again).
        c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in tl.static_range(NUM_TILES):
            cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            gh = tl.load(gh_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            xf = tl.load(xn_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            scale = load_mod(SCALE + b * stride_sb, scale_rows, cols, mask, D, REDUCE_SCALE)
            xhat = tl.where(mask, (xf - mean[:, None]) * rstd[:, None], 0.0)
            wdy = gh * (1.0 + scale.to(tl.float32))
            c1 += tl.sum(xhat * wdy, axis=1)
            c2 += tl.sum(wdy, axis=1)
        c1 = c1 / D
        c2 = c2 / D
        if TABLE:
            stats = TSTATS + (b * N + rows) * 4
            tl.store(stats, mean, mask=row_ok)
            tl.store(stats + 1, rstd, mask=row_ok)
            tl.store(stats + 2, c1, mask=row_ok)
            tl.store(stats + 3, c2, mask=row_ok)
        else:
            gx_rows = DXN + b * stride_dnb + rows * stride_dnn
            y_rows = Y + b * stride_yb + rows * stride_yn
            gate_rows = GATE + b * stride_gb + mrows * stride_gn
            out_rows = b * stride_db + rows * stride_dn  # offsets into DX and DY
            for t in tl.static_range(NUM_TILES):
                cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
                mask = row_ok[:, None] & (cols < D)[None, :]
                gh = tl.load(gh_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                xf = tl.load(xn_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                scale = load_mod(SCALE + b * stride_sb, scale_rows, cols, mask, D, REDUCE_SCALE)
                xhat = tl.where(mask, (xf - mean[:, None]) * rstd[:, None], 0.0)
                wdy = gh * (1.0 + scale.to(tl.float32))
                gx = tl.load(gx_rows[:, None] + cols[None, :], mask=mask, other=0.0)
                # g: the stream's whole grad, the LN path's plus the one that flows on.
                g = gx.to(tl.float32) + (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                tl.store(DX + out_rows[:, None] + cols[None, :], g.to(DX.dtype.element_ty), mask=mask)
                y = tl.load(y_rows[:, None] + cols[None, :], mask=mask, other=0.0)
                gate = load_mod(GATE + b * stride_gb, gate_rows, cols, mask, D, REDUCE_GATE)
                # dy = g * gate; dgate = g * y; dscale = grad_h * xhat; dshift = grad_h.
                tl.store(DY + out_rows[:, None] + cols[None, :], (g * gate.to(tl.float32)).to(DY.dtype.element_ty),
                         mask=mask)
                dgate = tl.where(mask, g * y.to(tl.float32), 0.0)
                dscale = gh * xhat
                if REDUCE_GATE:
                    acc_dgate = add_tile(acc_dgate, tl.sum(dgate, axis=0), t, TILES_P2)
                else:
                    tl.store(DGATE + b * stride_dgb + rows[:, None] * stride_dgn + cols[None, :],
                             dgate.to(DGATE.dtype.element_ty), mask=mask)
                if REDUCE_SCALE:
                    acc_dscale = add_tile(acc_dscale, tl.sum(dscale, axis=0), t, TILES_P2)
                else:
                    tl.store(DSCALE + b * stride_dsb + rows[:, None] * stride_dsn + cols[None, :],
                             dscale.to(DSCALE.dtype.element_ty), mask=mask)
                if REDUCE_SHIFT:
                    acc_dshift = add_tile(acc_dshift, tl.sum(gh, axis=0), t, TILES_P2)
    if REDUCE_GATE:
        store_tiles(DGATE + b * stride_dgb + pid * stride_dgn, acc_dgate, D, BLOCK_D, TILES_P2)
    if REDUCE_SCALE:
        store_tiles(DSCALE + b * stride_dsb + pid * stride_dsn, acc_dscale, D, BLOCK_D, TILES_P2)
    if REDUCE_SHIFT:
        store_tiles(DSHIFT + b * stride_dfb + pid * stride_dfn, acc_dshift, D, BLOCK_D, TILES_P2)


@triton.jit
def _gated_residual_modulate_table_kernel(
    DH, stride_dhb, stride_dhn,  # (B, N, D) grad of h
    DXN, stride_dnb, stride_dnn,  # (B, N, D) grad of x_new
    XN, stride_xb, stride_xn,  # (B, N, D) x_new
    GATE, stride_gb, stride_gn,  # (B, K, D) table
    Y, stride_yb, stride_yn,  # (B, N, D)
    SCALE, stride_sb, stride_sn,  # (B, K, D) table
    INDEX, stride_ib, stride_in,  # (B, N) int64 rows of the tables
    STATS,  # (B, N, 4) fp32 mean, rstd, c1, c2 (from the kernel above)
    DX, DY, stride_db, stride_dn,  # (B, N, D) each, contiguous
    DGATE, DSHIFT, DSCALE, stride_pb, stride_pp, stride_pk,  # (B, P, TABLE_K, D) fp32 partials each
    N, D, ROWS_PER_PROG,
    TABLE_K: tl.constexpr,  # the tables' rows, padded to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (P, B, D tiles): with the row statistics known, each element's grads are local:
    # dx and dy are written, and the table grads dgate[k] = sum_{n: index = k} g_n * y_n,
    # dshift[k] = sum grad_h_n, dscale[k] = sum grad_h_n * xhat_n are summed in fp32
    # registers per program (the same order on every run); the host adds the P partials.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ks = tl.arange(0, TABLE_K)
    acc_gate = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    acc_shift = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    acc_scale = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=-1)  # -1: no table row
        trows = tl.maximum(mrows, 0)[:, None]
        stats = STATS + (b * N + rows) * 4
        mean = tl.load(stats, mask=row_ok, other=0.0)
        rstd = tl.load(stats + 1, mask=row_ok, other=0.0)
        c1 = tl.load(stats + 2, mask=row_ok, other=0.0)
        c2 = tl.load(stats + 3, mask=row_ok, other=0.0)
        gh = tl.load(DH + b * stride_dhb + rows[:, None] * stride_dhn + cols[None, :], mask=mask, other=0.0)
        gh = gh.to(tl.float32)
        xf = tl.load(XN + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
        xhat = tl.where(mask, (xf.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        scale = tl.load(SCALE + b * stride_sb + trows * stride_sn + cols[None, :], mask=mask, other=0.0)
        gx = tl.load(DXN + b * stride_dnb + rows[:, None] * stride_dnn + cols[None, :], mask=mask, other=0.0)
        # g = grad_x + rstd * (grad_h * w - c2 - xhat * c1), as in the kernel above.
        wdy = gh * (1.0 + scale.to(tl.float32))
        g = gx.to(tl.float32) + (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        offs = b * stride_db + rows[:, None] * stride_dn + cols[None, :]
        tl.store(DX + offs, g.to(DX.dtype.element_ty), mask=mask)
        gate = tl.load(GATE + b * stride_gb + trows * stride_gn + cols[None, :], mask=mask, other=0.0)
        tl.store(DY + offs, (g * gate.to(tl.float32)).to(DY.dtype.element_ty), mask=mask)
        y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yn + cols[None, :], mask=mask, other=0.0)
        acc_gate = add_table_rows(acc_gate, tl.where(mask, g * y.to(tl.float32), 0.0), mrows, TABLE_K)
        acc_shift = add_table_rows(acc_shift, gh, mrows, TABLE_K)
        acc_scale = add_table_rows(acc_scale, gh * xhat, mrows, TABLE_K)
    offs = b * stride_pb + pid * stride_pp + ks[:, None] * stride_pk + cols[None, :]
    tl.store(DGATE + offs, acc_gate, mask=col_ok[None, :])
    tl.store(DSHIFT + offs, acc_shift, mask=col_ok[None, :])
    tl.store(DSCALE + offs, acc_scale, mask=col_ok[None, :])


#################################################################################
#                                Host launchers                                 #
#################################################################################


def _fwd(x, gate, y, shift, scale, index, eps: float, store_stats: bool):
    x, gate, y = last_dim_contiguous(x), last_dim_contiguous(gate), last_dim_contiguous(y)
    shift, scale = last_dim_contiguous(shift), last_dim_contiguous(scale)
    bsz, n, d = x.shape
    dtype = gated_residual_dtype(x, gate, y)
    x_new, h = empty_rows((bsz, n, d), dtype, x.device), empty_rows((bsz, n, d), dtype, x.device)
    stats = torch.empty((bsz, n, 2), dtype=torch.float32, device=x.device) if store_stats else None
    if x_new.numel() == 0:
        return x_new, h, stats
    indexed = index is not None
    block_m, block_d, n_tiles, num_warps = row_tiles(n, d, x_new.element_size())
    idx, sib, sin = _index_args(index, x)
    count("gated_residual_modulate_fwd")
    if store_stats:
        count("gated_residual_modulate_fwd_stats")
    wrap(_gated_residual_modulate_fwd_kernel)[(triton.cdiv(n, block_m), bsz)](
        x, x.stride(0), x.stride(1),
        gate, gate.stride(0), _mod_row_stride(gate, indexed),
        y, y.stride(0), y.stride(1),
        shift, shift.stride(0), _mod_row_stride(shift, indexed),
        scale, scale.stride(0), _mod_row_stride(scale, indexed),
        idx, sib, sin,
        x_new, h, x_new.stride(0), x_new.stride(1),
        x_new if stats is None else stats,
        n, d, eps,
        HAS_INDEX=indexed, STORE_STATS=store_stats,
        BLOCK_M=block_m, BLOCK_D=block_d, NUM_TILES=n_tiles, num_warps=num_warps,
    )  # fmt: skip
    return x_new, h, stats


def gated_residual_modulate_fwd(x, gate, y, shift, scale, index, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, N, D); gate, shift, scale (B, N|1, D), or (B, K, D) tables with index (B, N).
    Returns (x_new, h), both (B, N, D) in the dtype eager ``x + gate * y`` has."""
    return _fwd(x, gate, y, shift, scale, index, eps, False)[:2]


def gated_residual_modulate_fwd_stats(x, gate, y, shift, scale, index, eps: float):
    """The forward for autograd: (x_new, h, stats), stats (B, N, 2) fp32 the mean and rstd of
    each token's x_new, which the backward then reads instead of recomputing them."""
    return _fwd(x, gate, y, shift, scale, index, eps, True)


MAX_TABLE_K = 8  # indexed tables with up to this many rows have their grads summed by a kernel


def _per_sample(t: torch.Tensor, n: int, indexed: bool) -> bool:
    # A (B, 1, D) modulation read by N > 1 tokens: its grad is a sum (constexpr: a plain bool).
    return bool(not indexed and t.shape[1] == 1 and n != 1)


def gated_residual_modulate_bwd(grad_h, grad_x, x_new, gate, y, shift, scale, index, eps: float, stats=None):
    """Returns (dx, dgate, dy, dshift, dscale); dx in x_new's dtype.

    Per-sample (B, 1, D) modulations get their grads reduced over N (in their dtypes). A
    per-token dshift is an empty tensor: it equals ``grad_h`` (the caller uses that itself).
    Indexed: the (B, K, D) grads of the three tables, summed in the table kernel without
    atomics for K <= MAX_TABLE_K, by a scatter of per-token grads above. ``stats``: the
    forward's (B, N, 2) mean and rstd of x_new, or None to compute them first (``ln_stats``).
    """
    grad_h, grad_x, x_new = last_dim_contiguous(grad_h), last_dim_contiguous(grad_x), last_dim_contiguous(x_new)
    gate, y, scale = last_dim_contiguous(gate), last_dim_contiguous(y), last_dim_contiguous(scale)
    bsz, n, d = x_new.shape
    dev = x_new.device
    indexed = index is not None
    k_rows = int(gate.shape[1]) if indexed else 0
    table = bool(indexed and k_rows <= MAX_TABLE_K)
    reduce_gate, reduce_shift, reduce_scale = (_per_sample(t, n, indexed) for t in (gate, shift, scale))
    dx = empty_rows((bsz, n, d), x_new.dtype, dev)
    dy = empty_rows((bsz, n, d), y.dtype, dev)
    reducing = reduce_gate or reduce_shift or reduce_scale
    # A per-sample backward keeps up to three fp32 accumulator tiles live besides six input
    # tiles: 16-bit data moves in 8-byte vectors per thread there (twice the threads), else
    # it would spill.
    vec_bytes = 8 if reducing and x_new.element_size() < 4 else 16
    block_m, block_d, n_tiles, num_warps = row_tiles(n, d, x_new.element_size(), vec_bytes)
    if reducing:
        n_prog, rows_per_prog = reduce_programs(n, bsz, block_m, dev, num_warps)
    else:
        n_prog, rows_per_prog = triton.cdiv(max(n, 1), block_m), block_m

    def per_token_grad(t, reduce):
        if reduce:
            return torch.empty((bsz, n_prog, d), dtype=torch.float32, device=dev)  # program partials
        if table:
            return dx  # not written: the table kernel sums it
        return empty_rows((bsz, n, d), torch.float32 if indexed else t.dtype, dev)

    dgate_buf, dscale_buf = per_token_grad(gate, reduce_gate), per_token_grad(scale, reduce_scale)
    dshift_buf = torch.empty((bsz, n_prog, d), dtype=torch.float32, device=dev) if reduce_shift else dx
    from_forward = stats is not None
    stats = stats.contiguous() if from_forward else ln_stats(x_new, eps)
    table_stats = torch.empty((bsz, n, 4), dtype=torch.float32, device=dev) if table else dx
    if dx.numel() > 0:
        idx, sib, sin = _index_args(index, x_new)
        count("gated_residual_modulate_bwd")
        if from_forward:
            count("gated_residual_modulate_bwd_stats")
        wrap(_gated_residual_modulate_bwd_kernel)[(n_prog, bsz)](
            grad_h, grad_h.stride(0), grad_h.stride(1),
            grad_x, grad_x.stride(0), grad_x.stride(1),
            x_new, x_new.stride(0), x_new.stride(1),
            gate, gate.stride(0), _mod_row_stride(gate, indexed),
            y, y.stride(0), y.stride(1),
            scale, scale.stride(0), _mod_row_stride(scale, indexed),
            idx, sib, sin,
            dx, dy, dx.stride(0), dx.stride(1),
            dgate_buf, dgate_buf.stride(0), dgate_buf.stride(1),
            dscale_buf, dscale_buf.stride(0), dscale_buf.stride(1),
            dshift_buf, dshift_buf.stride(0), dshift_buf.stride(1),
            stats, table_stats,
            n, d, rows_per_prog,
            HAS_INDEX=indexed, REDUCE_GATE=reduce_gate, REDUCE_SHIFT=reduce_shift,
            REDUCE_SCALE=reduce_scale, TABLE=table, BLOCK_M=block_m, BLOCK_D=block_d, NUM_TILES=n_tiles,
            TILES_P2=triton.next_power_of_2(n_tiles), num_warps=num_warps,
        )  # fmt: skip
    else:
        for buf, reduce in ((dgate_buf, reduce_gate), (dscale_buf, reduce_scale), (dshift_buf, reduce_shift)):
            if reduce:
                buf.zero_()  # a sum over no tokens
    if table:
        dgate, dshift, dscale = _table_grads(grad_h, grad_x, x_new, gate, y, shift, scale, index, table_stats, dx, dy,
                                             k_rows)
        return dx, dgate, dy, dshift, dscale
    if indexed:  # a wide table: the per-token grads scattered into it (atomics on a GPU)
        dgate = _scatter_rows(dgate_buf, index, k_rows, gate.dtype)
        dshift = _scatter_rows(grad_h, index, k_rows, shift.dtype)
        return dx, dgate, dy, dshift, _scatter_rows(dscale_buf, index, k_rows, scale.dtype)
    # The one reduction of the per-program partials.
    dgate = dgate_buf.sum(1, keepdim=True).to(gate.dtype) if reduce_gate else dgate_buf
    dscale = dscale_buf.sum(1, keepdim=True).to(scale.dtype) if reduce_scale else dscale_buf
    if reduce_shift:
        dshift = dshift_buf.sum(1, keepdim=True).to(shift.dtype)
    else:
        dshift = x_new.new_empty((0,), dtype=shift.dtype)
    return dx, dgate, dy, dshift, dscale


def _table_grads(grad_h, grad_x, x_new, gate, y, shift, scale, index, stats, dx, dy, k_rows: int):
    """Writes dx and dy, and returns the (B, K, D) grads (dgate, dshift, dscale) of the tables,
    summed per program in the kernel and then over programs here: deterministic."""
    bsz, n, d = x_new.shape
    table_k = triton.next_power_of_2(k_rows)
    block_d = table_block_d(d)  # constexprs: plain ints (D is a model constant)
    block_m = max(1, min(TILE_ELEMS // block_d // 4, triton.next_power_of_2(max(int(n), 1))))
    d_tiles = triton.cdiv(d, block_d)
    n_prog, rows_per_prog = reduce_programs(n, bsz * d_tiles, block_m, x_new.device)
    parts = torch.zeros((3, bsz, n_prog, table_k, d), dtype=torch.float32, device=x_new.device)
    if x_new.numel() > 0:
        count("gated_residual_modulate_table_grads")
        wrap(_gated_residual_modulate_table_kernel)[(n_prog, bsz, d_tiles)](
            grad_h, grad_h.stride(0), grad_h.stride(1),
            grad_x, grad_x.stride(0), grad_x.stride(1),
            x_new, x_new.stride(0), x_new.stride(1),
            gate, gate.stride(0), gate.stride(1),
            y, y.stride(0), y.stride(1),
            scale, scale.stride(0), scale.stride(1),
            index, index.stride(0), index.stride(1),
            stats,
            dx, dy, dx.stride(0), dx.stride(1),
            parts[0], parts[1], parts[2], parts.stride(1), parts.stride(2), parts.stride(3),
            n, d, rows_per_prog,
            TABLE_K=table_k, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    # (B, K, D) each: the P partials added in order (three sums: outputs must not alias), the
    # rows sliced before the sum so each is contiguous as the fake impl says
    return tuple(parts[i, :, :, :k_rows].sum(1).to(t.dtype) for i, t in enumerate((gate, shift, scale)))


def _bwd_fake(grad_h, grad_x, x_new, gate, y, shift, scale, index, eps, stats=None):
    bsz, n, d = x_new.shape
    dx, dy = empty_rows((bsz, n, d), x_new.dtype, x_new.device), empty_rows((bsz, n, d), y.dtype, x_new.device)
    if index is not None:  # the tables' grads
        return (dx, empty_rows(gate.shape, gate.dtype, x_new.device), dy,
                empty_rows(shift.shape, shift.dtype, x_new.device), empty_rows(scale.shape, scale.dtype, x_new.device))

    def rows(t):
        return 1 if t.shape[1] == 1 else n

    dshift = (empty_rows((bsz, 1, d), shift.dtype, x_new.device) if _per_sample(shift, n, False)
              else x_new.new_empty((0,), dtype=shift.dtype))
    return (dx, empty_rows((bsz, rows(gate), d), gate.dtype, x_new.device), dy, dshift,
            empty_rows((bsz, rows(scale), d), scale.dtype, x_new.device))


def _finish_grads(grad_h, x_dtype, dx, dgate, dy, dshift, dscale, shift, index):
    """dx in x's dtype; a per-token dshift is grad_h itself (no kernel writes a copy)."""
    if dx.dtype != x_dtype:
        dx = dx.to(x_dtype)
    if index is None and dshift.numel() == 0 and shift.numel() > 0:
        dshift = grad_h.to(shift.dtype)
        if dshift.shape != shift.shape:  # N == 1 or empty: the same numbers in shift's shape
            dshift = dshift.reshape(shift.shape)
    return dx, dgate, dy, dshift, dscale


#################################################################################
#                        Registration: triton_op + autograd                     #
#################################################################################


class GatedResidualModulateFunction(torch.autograd.Function):
    """The route without ``torch.library.triton_op`` (torch < 2.6): eager autograd only."""

    @staticmethod
    def forward(ctx, x, gate, y, shift, scale, index, eps):
        x_new, h, stats = gated_residual_modulate_fwd_stats(x, gate, y, shift, scale, index, eps)
        ctx.save_for_backward(x_new, gate, y, shift, scale, index, stats)
        ctx.eps, ctx.x_dtype = eps, x.dtype
        return x_new, h

    @staticmethod
    def backward(ctx, grad_x, grad_h):
        x_new, gate, y, shift, scale, index, stats = ctx.saved_tensors
        grads = gated_residual_modulate_bwd(grad_h, grad_x, x_new, gate, y, shift, scale, index, ctx.eps, stats)
        return (*_finish_grads(grad_h, ctx.x_dtype, *grads, shift, index), None, None)


if HAS_TRITON_OP:

    @torch.library.triton_op("pf_kernels::gated_residual_modulate", mutates_args=())
    def _gated_residual_modulate_op(
        x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        return gated_residual_modulate_fwd(x, gate, y, shift, scale, None, eps)

    @torch.library.triton_op("pf_kernels::gated_residual_modulate_indexed", mutates_args=())
    def _gated_residual_modulate_indexed_op(
        x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, index: Tensor, eps: float
    ) -> tuple[Tensor, Tensor]:
        return gated_residual_modulate_fwd(x, gate, y, shift, scale, index, eps)

    @torch.library.triton_op("pf_kernels::gated_residual_modulate_with_stats", mutates_args=())
    def _gated_residual_modulate_with_stats_op(
        x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, index: Optional[Tensor], eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        return gated_residual_modulate_fwd_stats(x, gate, y, shift, scale, index, eps)

    @torch.library.triton_op("pf_kernels::gated_residual_modulate_backward", mutates_args=())
    def _gated_residual_modulate_backward_op(
        grad_h: Tensor, grad_x: Tensor, x_new: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor,
        index: Optional[Tensor], eps: float, stats: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return gated_residual_modulate_bwd(grad_h, grad_x, x_new, gate, y, shift, scale, index, eps, stats)

    # Explicit fake impls (see adaln_modulate: the default would run the launcher on fakes).
    def _fwd_fake(x, gate, y, shift, scale, eps):
        dtype = gated_residual_dtype(x, gate, y)
        return empty_rows(x.shape, dtype, x.device), empty_rows(x.shape, dtype, x.device)

    def _fwd_indexed_fake(x, gate, y, shift, scale, index, eps):
        return _fwd_fake(x, gate, y, shift, scale, eps)

    def _fwd_stats_fake(x, gate, y, shift, scale, index, eps):
        stats = empty_rows((*x.shape[:2], 2), torch.float32, x.device)
        return (*_fwd_fake(x, gate, y, shift, scale, eps), stats)

    _gated_residual_modulate_op.register_fake(_fwd_fake)
    _gated_residual_modulate_indexed_op.register_fake(_fwd_indexed_fake)
    _gated_residual_modulate_with_stats_op.register_fake(_fwd_stats_fake)
    _gated_residual_modulate_backward_op.register_fake(_bwd_fake)

    # The plain ops' autograd recomputes the statistics (a caller that differentiates through
    # torch.ops.pf_kernels.gated_residual_modulate itself); the public functions take the
    # _with_stats op when grads are needed.
    def _setup_context(ctx, inputs, output):
        x, gate, y, shift, scale = inputs[:5]
        index = inputs[5] if len(inputs) == 7 else None
        # x_new (an output) instead of x: the backward needs x_new's statistics, and x_new
        # is the stream the next op reads anyway, so saving it keeps nothing extra alive.
        ctx.save_for_backward(output[0], gate, y, shift, scale, index)
        ctx.eps, ctx.x_dtype = inputs[-1], x.dtype

    def _backward(ctx, grad_x, grad_h):
        x_new, gate, y, shift, scale, index = ctx.saved_tensors
        grads = torch.ops.pf_kernels.gated_residual_modulate_backward(
            grad_h, grad_x, x_new, gate, y, shift, scale, index, ctx.eps)
        grads = _finish_grads(grad_h, ctx.x_dtype, *grads, shift, index)
        return (*grads, None) if index is None else (*grads, None, None)

    def _setup_context_stats(ctx, inputs, output):
        x, gate, y, shift, scale, index, eps = inputs
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(output[0], gate, y, shift, scale, index, output[2])
        ctx.eps, ctx.x_dtype = eps, x.dtype

    def _backward_stats(ctx, grad_x, grad_h, _grad_stats):
        x_new, gate, y, shift, scale, index, stats = ctx.saved_tensors
        grads = torch.ops.pf_kernels.gated_residual_modulate_backward(
            grad_h, grad_x, x_new, gate, y, shift, scale, index, ctx.eps, stats)
        return (*_finish_grads(grad_h, ctx.x_dtype, *grads, shift, index), None, None)

    _gated_residual_modulate_op.register_autograd(_backward, setup_context=_setup_context)
    _gated_residual_modulate_indexed_op.register_autograd(_backward, setup_context=_setup_context)
    _gated_residual_modulate_with_stats_op.register_autograd(_backward_stats, setup_context=_setup_context_stats)


def gated_residual_modulate_triton(x, gate, y, shift, scale, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    if not HAS_TRITON_OP:
        return GatedResidualModulateFunction.apply(x, gate, y, shift, scale, None, eps)
    if needs_grad(x, gate, y, shift, scale):
        return torch.ops.pf_kernels.gated_residual_modulate_with_stats(x, gate, y, shift, scale, None, eps)[:2]
    return torch.ops.pf_kernels.gated_residual_modulate(x, gate, y, shift, scale, eps)


def gated_residual_modulate_indexed_triton(x, gate, y, shift, scale, index, eps: float = 1e-6):
    if not HAS_TRITON_OP:
        return GatedResidualModulateFunction.apply(x, gate, y, shift, scale, index, eps)
    if needs_grad(x, gate, y, shift, scale):
        return torch.ops.pf_kernels.gated_residual_modulate_with_stats(x, gate, y, shift, scale, index, eps)[:2]
    return torch.ops.pf_kernels.gated_residual_modulate_indexed(x, gate, y, shift, scale, index, eps)
