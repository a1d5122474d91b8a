"""The normalise-then-modulate kernel family: LayerNorm/RMSNorm rows times ``1 + scale`` (+ shift).

One forward, one backward and one table-grad kernel serve these ops through constexpr flags:
  adaln_modulate           h = LN(x) * (1 + scale) + shift                       (the default)
  ada_rms_norm             h = x * rsqrt(mean(x^2) + eps) * (1 + scale)          IS_RMS_NORM
  gated_residual_modulate  x_new = x + gate * y,  h = LN(x_new) * (1 + scale) + shift   HAS_RESIDUAL
  norm_modulate / residual_norm_modulate (``modulate_options``): the general forms, RMSNorm with
      a shift (HAS_SHIFT with IS_RMS_NORM), the ungated residual x_new = x + y (HAS_RESIDUAL
      without HAS_GATE) and outputs in a chosen dtype.
  sandwich_residual[_norm_modulate] (``rms_sandwich``): Lumina2/Mochi's x_new = x + gate * RMS(y),
      then h = RMS(x_new) * (1 + scale)                                 HAS_RESIDUAL, NORM_Y
      (x_new alone, a block's last update: NO_H in the forward, HAS_H off in the backward).
One read of each input and one write of each output instead of eager PyTorch's chain of passes.
Statistics and ``1 + scale`` are fp32 (in bf16 the sum would round away most of scale's bits).
With HAS_RESIDUAL the norm reads x_new as stored (rounded to its dtype), so h is exactly
``adaln_modulate(x_new)``.

Modulation forms, each of gate / shift / scale on its own (unit stride along D; row strides
passed, never copied): per token (B, N, D), e.g. ``c.chunk(6, -1)`` views with row stride 6D;
per sample (B, 1, D), read through a zero row stride, its grad summed over N; indexed (B, K, D)
tables with ``index`` (B, N) int64 choosing each token's row (HAS_INDEX; one K for all).

Layout: a program takes BLOCK_M whole rows and walks them in NUM_TILES column tiles of BLOCK_D
(``_utils.row_tiles``: PF-XL/2's 1152 as 9 x 128, no lane padded), reading each tile twice,
first for the row statistics, then for the outputs (the second read from cache; one tile stays
in registers). Under autograd the LayerNorm forward also stores each row's mean and rstd,
(B, N, 2) fp32, which the backward reads (without them it computes them first: ``ln_stats``);
the RMSNorm backward recomputes rstd in the pass that reads x anyway.

Backward, with w = 1 + scale, xhat the normalised row and dxhat = grad_h * w:
    d(norm input) = rstd * (dxhat - xhat * c1 - c2),  c1 = mean(dxhat * xhat),  c2 = mean(dxhat)
(RMSNorm: no c2 term; with HAS_RESIDUAL grad_x is added, and dy = g * gate, dgate = g * y; NORM_Y
reads y's row again for dy through its RMSNorm, see ``rms_sandwich``),
dshift = grad_h, dscale = grad_h * xhat. A per-sample modulation's grads are summed per program
in fp32 registers and the host adds the program partials in a fixed order; an indexed one with
K <= MAX_TABLE_K has its table grads summed the same way by the table kernel, to which the
backward kernel then leaves the per-element work (it stores mean, rstd, c1, c2 per row). So every
run gives the same bits: no atomics.
"""

import torch
import triton
import triton.language as tl

from pf_kernels.ops._utils import (
    MAX_TABLE_K,
    count,
    empty_rows,
    index_args,
    last_dim_contiguous,
    mod_row_stride,
    per_sample,
    reduce_programs,
    row_tiles,
    scatter_rows,
    table_sum,
    table_tiles,
    wrap,
)
from pf_kernels.ops.rows import (
    add_row_moments,
    add_table_rows,
    add_tile,
    column_program,
    load_mod,
    load_pair,
    load_tile,
    mod_row_index,
    step_rows,
    store_pair,
    store_table_part,
    store_tile,
    store_tiles,
    sum_or_store,
    tile_mask,
)

#################################################################################
#                                    Kernels                                    #
#################################################################################


@triton.jit
def _norm_modulate_fwd_kernel(
    X, stride_xb, stride_xn,  # (B, N, D) the norm's input; with HAS_RESIDUAL the stream x
    GATE, stride_gb, stride_gn,  # HAS_GATE: (B, N, D) | (B, 1, D) with stride_gn = 0 | (B, K, D) table
    Y, stride_yb, stride_yn,  # HAS_RESIDUAL: (B, N, D) the sub-block's output
    SHIFT, stride_hb, stride_hn,  # HAS_SHIFT: same forms as GATE
    SCALE, stride_sb, stride_sn,  # same forms as GATE
    INDEX, stride_ib, stride_in,  # (B, N) int64 table rows (HAS_INDEX only)
    XN, H, stride_ob, stride_on,  # (B, N, D) each, contiguous: x_new (HAS_RESIDUAL only) and h
    STATS,  # (B, N, 2) fp32 mean, rstd per token (STORE_STATS only: the backward's)
    N, D, eps, eps_y,
    IS_RMS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    STORE_STATS: tl.constexpr,
    HAS_SHIFT: tl.constexpr,  # + shift (LayerNorm always; RMSNorm with shift, LTX's)
    HAS_GATE: tl.constexpr,  # HAS_RESIDUAL: x + gate * y, else the ungated x + y
    NO_H: tl.constexpr,  # no h: the LayerNorm statistics alone (``ln_stats``), or with HAS_RESIDUAL x_new alone
    NORM_Y: tl.constexpr,  # HAS_RESIDUAL: y RMS-normalised first (eps_y), the sandwich x + gate * RMS(y)
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_TILES: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_M), B): token blocks on axis 0, which has no 65535 limit. Pass 1
    # forms (and stores) x_new and the row statistics; pass 2 reads the rows again for h.
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    row_ok = rows < N
    mrows = mod_row_index(INDEX, stride_ib, stride_in, b, rows, row_ok, HAS_INDEX)
    x_rows = X + b * stride_xb + rows * stride_xn
    y_rows = Y + b * stride_yb + rows * stride_yn
    out_rows = b * stride_ob + rows * stride_on  # offsets into XN and H
    if NORM_Y:  # pass 0: y's rstd_y = 1 / sqrt(mean(y^2) + eps_y), before x_new can be formed
        y_m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in tl.static_range(NUM_TILES):
            cols, mask = tile_mask(row_ok, t, D, BLOCK_D)
            yf = load_tile(y_rows, cols, mask)
            y_m2 += tl.sum(yf * yf, axis=1)
        rstd_y = 1.0 / tl.sqrt(y_m2 / D + eps_y)  # (BLOCK_M,)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in tl.static_range(NUM_TILES):
        cols, mask = tile_mask(row_ok, t, D, BLOCK_D)
        xf = load_tile(x_rows, cols, mask)
        if HAS_RESIDUAL:  # x_new = x + gate * y (or x + y), stored in its dtype; the norm reads that value
            yf = load_tile(y_rows, cols, mask)
            if NORM_Y:
                yf = yf * rstd_y[:, None]
            if HAS_GATE:
                yf = load_tile(GATE + b * stride_gb + mrows * stride_gn, cols, mask) * yf
            xn = (xf + yf).to(XN.dtype.element_ty)
            tl.store(XN + out_rows[:, None] + cols[None, :], xn, mask=mask)
            xf = xn.to(tl.float32)
        mean, m2 = add_row_moments(mean, m2, xf, mask, t, D, BLOCK_D, NUM_TILES, IS_RMS_NORM)
    rstd = 1.0 / tl.sqrt(m2 / D + eps)  # (BLOCK_M,)
    if HAS_RESIDUAL and NUM_TILES > 1:
        tl.debug_barrier()  # x_new, stored by all the program's threads, is read back below

    if not NO_H:
        for t in tl.static_range(NUM_TILES):
            cols, mask = tile_mask(row_ok, t, D, BLOCK_D)
            if NUM_TILES > 1:  # one tile: the row is still in registers
                xf = load_tile(XN + out_rows if HAS_RESIDUAL else x_rows, cols, mask)
            # h = xhat * (1 + scale) + shift, xhat = (x - mean) * rstd (RMSNorm: mean 0; shift if HAS_SHIFT)
            h = (xf - mean[:, None]) * rstd[:, None] * (1.0 + load_tile(SCALE + b * stride_sb + mrows * stride_sn,
                                                                        cols, mask))
            if HAS_SHIFT:
                h += load_tile(SHIFT + b * stride_hb + mrows * stride_hn, cols, mask)
            store_tile(H + out_rows, cols, h, mask, H)
    if STORE_STATS:
        store_pair(STATS, (b * N + rows) * 2, row_ok, mean, rstd)


@triton.jit
def norm_input_grad(wdy, xhat, c1, c2, rstd, IS_RMS_NORM: tl.constexpr):
    """The grad through the norm (BLOCK_M, BLOCK_D): rstd * (dxhat - (xhat * c1 + c2)), where
    wdy = dxhat; RMSNorm has no c2 term (its row mean is not subtracted)."""
    if IS_RMS_NORM:
        dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
    else:
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    return dx


@triton.jit
def stream_grad(gh_rows, x_rows, DXN_rows, SCALE_SAMPLE, scale_rows, cols, mask, D, mean, rstd, c1, c2,
                IS_RMS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_H: tl.constexpr,
                REDUCE_SCALE: tl.constexpr):
    """(g, gh, xhat) of a tile (BLOCK_M, BLOCK_D): g the grad of the norm's input (HAS_H) plus,
    with HAS_RESIDUAL, the grad of x_new that flows on along the stream; gh the grad of h and
    xhat the normalised rows (both g itself without HAS_H: unused then)."""
    if HAS_H:
        gh = load_tile(gh_rows, cols, mask)
        xhat = tl.where(mask, (load_tile(x_rows, cols, mask) - mean[:, None]) * rstd[:, None], 0.0)
        wdy = gh * (1.0 + load_mod(SCALE_SAMPLE, scale_rows, cols, mask, D, REDUCE_SCALE))
        g = norm_input_grad(wdy, xhat, c1, c2, rstd, IS_RMS_NORM)
        if HAS_RESIDUAL:
            g += load_tile(DXN_rows, cols, mask)
    else:
        g = load_tile(DXN_rows, cols, mask)
        gh = g
        xhat = g
    return g, gh, xhat


@triton.jit
def _norm_modulate_bwd_kernel(
    DH, stride_dhb, stride_dhn,  # (B, N, D) grad of h (HAS_H only)
    DXN, stride_dnb, stride_dnn,  # HAS_RESIDUAL: (B, N, D) grad of x_new (the stream further on)
    X, stride_xb, stride_xn,  # (B, N, D) the norm's input (x, or x_new saved by the forward; HAS_H only)
    GATE, stride_gb, stride_gn,  # HAS_RESIDUAL: as in the forward
    Y, stride_yb, stride_yn,  # HAS_RESIDUAL: (B, N, D)
    SCALE, stride_sb, stride_sn,  # as in the forward (HAS_H only)
    INDEX, stride_ib, stride_in,  # (B, N) int64 (HAS_INDEX only)
    DX, DY, stride_db, stride_dn,  # (B, N, D) each, contiguous (DY: HAS_RESIDUAL; neither when TABLE; DX: HAS_H)
    DGATE, stride_dgb, stride_dgn,  # (B, N, D) per token, or (B, P, D) fp32 partials (REDUCE_GATE)
    DSHIFT, stride_dfb, stride_dfn,  # (B, P, D) fp32 partials (REDUCE_SHIFT only; else dshift = grad_h)
    DSCALE, stride_dsb, stride_dsn,  # (B, N, D) per token, or (B, P, D) fp32 partials (REDUCE_SCALE)
    STATS,  # (B, N, 2) fp32 mean, rstd (LayerNorm: the forward's, or ln_stats')
    TSTATS,  # (B, N, 4) fp32 mean, rstd, c1, c2 per token (TABLE only: the table kernel does the rest)
    N, D, eps, eps_y, ROWS_PER_PROG,
    IS_RMS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    REDUCE_GATE: tl.constexpr,
    REDUCE_SHIFT: tl.constexpr,
    REDUCE_SCALE: tl.constexpr,
    TABLE: tl.constexpr,
    HAS_GATE: tl.constexpr,  # HAS_RESIDUAL: dy = g * gate and dgate = g * y, else dy = g
    HAS_H: tl.constexpr,  # False: the forward's NO_H with HAS_RESIDUAL (x_new alone; dx = grad_x, the host's)
    NORM_Y: tl.constexpr,  # the forward's sandwich x + gate * RMS(y) (not with TABLE)
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_TILES: tl.constexpr,
    TILES_P2: tl.constexpr,  # NUM_TILES padded to a power of two (accumulator rows)
):
    # Grid (P, B): program p walks tokens [p * ROWS_PER_PROG, (p + 1) * ROWS_PER_PROG) of sample
    # b, BLOCK_M whole rows per step, each in NUM_TILES column tiles: pass 1 the row sums c1, c2
    # (RMSNorm: also rstd), pass 2 the grads tile by tile (the tiles read again). NORM_Y adds
    # y's sum of squares to pass 1 and a pass between the two for cy = mean(dyhat * yhat), with
    # dyhat = g * gate the grad of yhat = y * rstd_y: then dy = rstd_y * (dyhat - yhat * cy).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_dgate = tl.zeros((TILES_P2, BLOCK_D), dtype=tl.float32)
    acc_dshift = tl.zeros((TILES_P2, BLOCK_D), dtype=tl.float32)
    acc_dscale = tl.zeros((TILES_P2, BLOCK_D), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
        row_ok = rows < N
        mrows = mod_row_index(INDEX, stride_ib, stride_in, b, rows, row_ok, HAS_INDEX)
        gh_rows = DH + b * stride_dhb + rows * stride_dhn
        x_rows = X + b * stride_xb + rows * stride_xn
        y_rows = Y + b * stride_yb + rows * stride_yn
        gx_rows = DXN + b * stride_dnb + rows * stride_dnn
        gate_rows = GATE + b * stride_gb + mrows * stride_gn
        scale_rows = SCALE + b * stride_sb + mrows * stride_sn
        if IS_RMS_NORM or not HAS_H:
            mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
            rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
        else:
            mean, rstd = load_pair(STATS, (b * N + rows) * 2, row_ok)
        # LayerNorm: s1 = sum(dxhat * xhat), s2 = sum(dxhat). RMSNorm: s1 = sum(x * dxhat) and
        # s2 = sum(x^2), rstd from s2 and c1 = rstd * s1 / D (xhat = x * rstd). NORM_Y: sy = sum(y^2).
        s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sy = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in tl.static_range(NUM_TILES):
            cols, mask = tile_mask(row_ok, t, D, BLOCK_D)
            if HAS_H:
                xf = load_tile(x_rows, cols, mask)
                wdy = load_tile(gh_rows, cols, mask) * (1.0 + load_mod(SCALE + b * stride_sb, scale_rows, cols, mask,
                                                                       D, REDUCE_SCALE))
                if IS_RMS_NORM:
                    s1 += tl.sum(xf * wdy, axis=1)
                    s2 += tl.sum(xf * xf, axis=1)
                else:
                    s1 += tl.sum(tl.where(mask, (xf - mean[:, None]) * rstd[:, None], 0.0) * wdy, axis=1)
                    s2 += tl.sum(wdy, axis=1)
            if NORM_Y:
                yf = load_tile(y_rows, cols, mask)
                sy += tl.sum(yf * yf, axis=1)
        if IS_RMS_NORM and HAS_H:
            rstd = 1.0 / tl.sqrt(s2 / D + eps)  # (BLOCK_M,)
            s1 = rstd * s1
        c1 = s1 / D
        c2 = s2 / D
        if NORM_Y:  # cy = mean(dyhat * yhat) = rstd_y * sum(dyhat * y) / D, from the stream's grad g
            rstd_y = 1.0 / tl.sqrt(sy / D + eps_y)  # (BLOCK_M,)
            sgy = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for t in tl.static_range(NUM_TILES):
                cols, mask = tile_mask(row_ok, t, D, BLOCK_D)
                g, _, _ = stream_grad(gh_rows, x_rows, gx_rows, SCALE + b * stride_sb, scale_rows, cols, mask, D,
                                      mean, rstd, c1, c2, IS_RMS_NORM, HAS_RESIDUAL, HAS_H, REDUCE_SCALE)
                if HAS_GATE:
                    g = g * load_mod(GATE + b * stride_gb, gate_rows, cols, mask, D, REDUCE_GATE)
                sgy += tl.sum(g * load_tile(y_rows, cols, mask), axis=1)
            cy = rstd_y * sgy / D
        if TABLE:
            store_pair(TSTATS, (b * N + rows) * 4, row_ok, mean, rstd)
            store_pair(TSTATS, (b * N + rows) * 4 + 2, row_ok, c1, c2)
        else:
            out_rows = b * stride_db + rows * stride_dn  # offsets into DX and DY
            for t in tl.static_range(NUM_TILES):
                cols, mask = tile_mask(row_ok, t, D, BLOCK_D)
                # g: the stream's whole grad, the norm's plus (HAS_RESIDUAL) the one that flows on
                g, gh, xhat = stream_grad(gh_rows, x_rows, gx_rows, SCALE + b * stride_sb, scale_rows, cols, mask, D,
                                          mean, rstd, c1, c2, IS_RMS_NORM, HAS_RESIDUAL, HAS_H, REDUCE_SCALE)
                if HAS_RESIDUAL:
                    yv = load_tile(y_rows, cols, mask)  # the gated term: y, or yhat = y * rstd_y (NORM_Y)
                    if NORM_Y:
                        yv = yv * rstd_y[:, None]
                    dyv = g  # the grad of the gated term
                    if HAS_GATE:
                        dyv = g * load_mod(GATE + b * stride_gb, gate_rows, cols, mask, D, REDUCE_GATE)
                        acc_dgate = sum_or_store(acc_dgate, tl.where(mask, g * yv, 0.0), t, TILES_P2, REDUCE_GATE,
                                                 DGATE + b * stride_dgb + rows * stride_dgn, cols, mask, DGATE)
                    if NORM_Y:
                        dyv = norm_input_grad(dyv, yv, cy, cy, rstd_y, True)
                    store_tile(DY + out_rows, cols, dyv, mask, DY)
                if HAS_H:
                    store_tile(DX + out_rows, cols, g, mask, DX)
                    acc_dscale = sum_or_store(acc_dscale, gh * xhat, t, TILES_P2, REDUCE_SCALE,
                                              DSCALE + b * stride_dsb + rows * stride_dsn, cols, mask, DSCALE)
                    if REDUCE_SHIFT:
                        acc_dshift = add_tile(acc_dshift, tl.sum(gh, axis=0), t, TILES_P2)
    if REDUCE_GATE:
        store_tiles(DGATE + b * stride_dgb + pid * stride_dgn, acc_dgate, D, BLOCK_D, TILES_P2)
    if REDUCE_SHIFT:
        store_tiles(DSHIFT + b * stride_dfb + pid * stride_dfn, acc_dshift, D, BLOCK_D, TILES_P2)
    if REDUCE_SCALE:
        store_tiles(DSCALE + b * stride_dsb + pid * stride_dsn, acc_dscale, D, BLOCK_D, TILES_P2)


@triton.jit
def _norm_modulate_table_kernel(
    DH, stride_dhb, stride_dhn,  # (B, N, D) grad of h
    DXN, stride_dnb, stride_dnn,  # HAS_RESIDUAL: (B, N, D) grad of x_new
    X, stride_xb, stride_xn,  # (B, N, D) the norm's input
    GATE, stride_gb, stride_gn,  # HAS_RESIDUAL: (B, K, D) table
    Y, stride_yb, stride_yn,  # HAS_RESIDUAL: (B, N, D)
    SCALE, stride_sb, stride_sn,  # (B, K, D) table
    INDEX, stride_ib, stride_in,  # (B, N) int64 rows of the tables
    TSTATS,  # (B, N, 4) fp32 mean, rstd, c1, c2 (from the backward kernel)
    DX, DY, stride_db, stride_dn,  # (B, N, D) each, contiguous (DY: HAS_RESIDUAL)
    DSCALE, DSHIFT, DGATE, stride_pb, stride_pp, stride_pk,  # (B, P, TABLE_K, D) fp32 partials each
    N, D, ROWS_PER_PROG,
    IS_RMS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    HAS_GATE: tl.constexpr,
    TABLE_K: tl.constexpr,  # the tables' rows, padded to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (P, B, D tiles): with the row statistics known each element's grads are local: dx
    # (and dy) are written, and the table grads dscale[k] = sum_{n: index = k} grad_h_n * xhat_n,
    # dshift[k] = sum grad_h_n, dgate[k] = sum g_n * y_n are summed in fp32 registers per program
    # (the same order on every run); the host adds the P partials.
    pid, b, cols, col_ok = column_program(D, BLOCK_D)
    acc_scale = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    acc_shift = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    acc_gate = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows, row_ok, mask = step_rows(m0, N, col_ok, BLOCK_M)
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=-1)  # -1: no table row
        trows = tl.maximum(mrows, 0)
        mean, rstd = load_pair(TSTATS, (b * N + rows) * 4, row_ok)
        c1, c2 = load_pair(TSTATS, (b * N + rows) * 4 + 2, row_ok)
        gh = load_tile(DH + b * stride_dhb + rows * stride_dhn, cols, mask)
        xf = load_tile(X + b * stride_xb + rows * stride_xn, cols, mask)
        xhat = tl.where(mask, (xf - mean[:, None]) * rstd[:, None], 0.0)
        wdy = gh * (1.0 + load_tile(SCALE + b * stride_sb + trows * stride_sn, cols, mask))
        g = norm_input_grad(wdy, xhat, c1, c2, rstd, IS_RMS_NORM)
        out_rows = b * stride_db + rows * stride_dn
        if HAS_RESIDUAL:  # g: the stream's whole grad, the norm's plus the one that flows on
            g += load_tile(DXN + b * stride_dnb + rows * stride_dnn, cols, mask)
            if HAS_GATE:
                store_tile(DY + out_rows, cols, g * load_tile(GATE + b * stride_gb + trows * stride_gn, cols, mask),
                           mask, DY)
                dgate = tl.where(mask, g * load_tile(Y + b * stride_yb + rows * stride_yn, cols, mask), 0.0)
                acc_gate = add_table_rows(acc_gate, dgate, mrows, TABLE_K)
            else:
                store_tile(DY + out_rows, cols, g, mask, DY)
        store_tile(DX + out_rows, cols, g, mask, DX)
        if HAS_SHIFT:
            acc_shift = add_table_rows(acc_shift, gh, mrows, TABLE_K)
        # dscale = grad_h * xhat (RMSNorm: (grad_h * x) * rstd, the rounding its table grad always had)
        acc_scale = add_table_rows(acc_scale, gh * xf * rstd[:, None] if IS_RMS_NORM else gh * xhat, mrows, TABLE_K)
    store_table_part(DSCALE, acc_scale, b, pid, stride_pb, stride_pp, stride_pk, cols, col_ok, TABLE_K)
    if HAS_SHIFT:
        store_table_part(DSHIFT, acc_shift, b, pid, stride_pb, stride_pp, stride_pk, cols, col_ok, TABLE_K)
    if HAS_GATE:
        store_table_part(DGATE, acc_gate, b, pid, stride_pb, stride_pp, stride_pk, cols, col_ok, TABLE_K)


#################################################################################
#                                Host launchers                                 #
#################################################################################


def _rows_arg(t, indexed: bool):
    """(tensor, stride_b, row stride) of a modulation as the kernels take it."""
    return t, t.stride(0), mod_row_stride(t, indexed)


def norm_modulate_fwd(op: str, x, scale, index, eps: float, dtype, *, shift=None, gate=None, y=None,
                      store_stats=False, stats_only=False, rms=None, y_eps=None, no_h=False):
    """Returns (x_new, h, stats). x (B, N, D); scale, shift and gate (with y: HAS_RESIDUAL; no gate:
    the ungated x + y), each (B, N|1, D), or (B, K, D) tables with index (B, N). ``rms``: RMSNorm
    instead of LayerNorm (default: when there is no shift; an RMSNorm may have one). h (and
    x_new, else h itself) (B, N, D) in ``dtype``; stats (B, N, 2) fp32 mean and rstd of each row
    when ``store_stats`` (else None). ``y_eps``: y RMS-normalised first (the sandwich
    x + gate * RMS(y); not indexed). ``no_h`` (with y): x_new alone, h is x_new, scale unused.
    ``op`` names the launches in ``LAUNCHES``."""
    is_rms = shift is None if rms is None else bool(rms)
    residual, indexed, has_shift, has_gate = y is not None, index is not None, shift is not None, gate is not None
    norm_y = y_eps is not None
    x = last_dim_contiguous(x)
    scale = x if scale is None else last_dim_contiguous(scale)  # absent only with no_h: not read
    shift, gate, y = (x if t is None else last_dim_contiguous(t) for t in (shift, gate, y))
    bsz, n, d = x.shape
    skip_h = stats_only or no_h
    h = x if stats_only else empty_rows((bsz, n, d), dtype, x.device)  # ln_stats writes no h
    x_new = h if no_h or not residual else empty_rows((bsz, n, d), dtype, x.device)
    stats = torch.empty((bsz, n, 2), dtype=torch.float32, device=x.device) if store_stats else None
    if h.numel() == 0:
        return x_new, h, stats
    block_m, block_d, n_tiles, num_warps = row_tiles(n, d, (x_new if residual else x).element_size())
    count(op if stats_only else f"{op}_fwd")
    if store_stats and not stats_only:
        count(f"{op}_fwd_stats")
    wrap(_norm_modulate_fwd_kernel)[(triton.cdiv(n, block_m), bsz)](
        x, x.stride(0), x.stride(1),
        *_rows_arg(gate, indexed), y, y.stride(0), y.stride(1),
        *_rows_arg(shift, indexed), *_rows_arg(scale, indexed),
        *index_args(index, x),
        x_new, h, h.stride(0), h.stride(1),
        h if stats is None else stats,
        n, d, eps, 0.0 if y_eps is None else y_eps,
        IS_RMS_NORM=is_rms, HAS_RESIDUAL=residual, HAS_INDEX=indexed, STORE_STATS=store_stats,
        NO_H=skip_h, NORM_Y=norm_y, HAS_SHIFT=has_shift, HAS_GATE=has_gate, BLOCK_M=block_m, BLOCK_D=block_d,
        NUM_TILES=n_tiles, num_warps=num_warps,
    )  # fmt: skip
    return x_new, h, stats


def ln_stats(x, eps: float) -> torch.Tensor:
    """(B, N, 2) fp32 mean and rstd of each row of x (B, N, D): what the LayerNorm forward
    stores under autograd, computed on its own for a backward called without it."""
    return norm_modulate_fwd("ln_stats", x, x, None, eps, x.dtype, shift=x, store_stats=True, stats_only=True)[2]


def norm_modulate_bwd(op: str, grad_h, x, scale, index, eps: float, stats=None, *, shift=None, gate=None, y=None,
                      grad_x=None, vec_bytes: int = 16, rms=None, y_eps=None, no_h=False):
    """Returns (dx, dgate, dy, dshift, dscale) of ``norm_modulate_fwd``'s op (None for the inputs
    it does not have); x is the norm's input (x_new with a gate). dx in x's dtype.

    Per-sample (B, 1, D) modulations get their grads reduced over N (in their dtypes). A
    per-token dshift is an empty tensor: it equals ``grad_h`` (the caller uses that itself).
    Indexed: the (B, K, D) grads of the tables, summed in the table kernel without atomics for
    K <= MAX_TABLE_K, by a scatter of per-token grads above. ``stats``: the LayerNorm forward's
    (B, N, 2) mean and rstd, or None to compute them first (``ln_stats``). ``vec_bytes``: bytes
    a thread moves per tensor and tile (``row_tiles``). ``rms``, y without gate, ``y_eps`` and
    ``no_h``: as in ``norm_modulate_fwd`` (no_h: grad_h, x and scale None; dx is grad_x itself).
    """
    is_rms = shift is None if rms is None else bool(rms)
    residual, indexed, has_gate = y is not None, index is not None, gate is not None
    if y_eps is not None and indexed:
        raise ValueError(f"{op}: the RMS-normalised y (y_eps) has no indexed form")
    mods = (gate, shift, None if no_h else scale)  # None where the op has none
    if no_h:  # x_new alone: nothing of a norm to read (placeholders, never read)
        grad_h = x = scale = grad_x
    grad_h, x, scale = last_dim_contiguous(grad_h), last_dim_contiguous(x), last_dim_contiguous(scale)
    bsz, n, d = x.shape
    dev = x.device
    k_rows = int(scale.shape[1]) if indexed else 0
    table = bool(indexed and k_rows <= MAX_TABLE_K)
    reduce = [t is not None and per_sample(t, n, indexed) for t in mods]
    dx = x if no_h else empty_rows((bsz, n, d), x.dtype, dev)  # no_h: grad_x itself
    dy = empty_rows((bsz, n, d), y.dtype, dev) if residual else dx
    block_m, block_d, n_tiles, num_warps = row_tiles(n, d, x.element_size(), vec_bytes)
    if any(reduce):
        n_prog, rows_per_prog = reduce_programs(n, bsz, block_m, dev, num_warps)
    else:
        n_prog, rows_per_prog = triton.cdiv(max(n, 1), block_m), block_m

    def grad_buf(t, reduce, per_token):
        if reduce:
            return torch.empty((bsz, n_prog, d), dtype=torch.float32, device=dev)  # program partials
        if t is None or table or not per_token:
            return dx  # not written (a table's grads are summed by the table kernel)
        return empty_rows((bsz, n, d), torch.float32 if indexed else t.dtype, dev)

    bufs = [grad_buf(t, r, per_token) for t, r, per_token in zip(mods, reduce, (True, False, True))]
    from_forward = stats is not None
    if not is_rms and not no_h:
        stats = stats.contiguous() if from_forward else ln_stats(x, eps)
    table_stats = torch.empty((bsz, n, 4), dtype=torch.float32, device=dev) if table else dx
    gate_arg, y_arg, gx_arg = (x if t is None else last_dim_contiguous(t) for t in (gate, y, grad_x))
    if dx.numel() > 0:
        count(f"{op}_bwd")
        if from_forward:
            count(f"{op}_bwd_stats")
        wrap(_norm_modulate_bwd_kernel)[(n_prog, bsz)](
            grad_h, grad_h.stride(0), grad_h.stride(1),
            gx_arg, gx_arg.stride(0), gx_arg.stride(1),
            x, x.stride(0), x.stride(1),
            *_rows_arg(gate_arg, indexed), y_arg, y_arg.stride(0), y_arg.stride(1), *_rows_arg(scale, indexed),
            *index_args(index, x),
            dx, dy, dx.stride(0), dx.stride(1),
            *(v for buf in bufs for v in (buf, buf.stride(0), buf.stride(1))),
            dx if stats is None else stats, table_stats,
            n, d, eps, 0.0 if y_eps is None else y_eps, rows_per_prog,
            IS_RMS_NORM=is_rms, HAS_RESIDUAL=residual, HAS_INDEX=indexed, REDUCE_GATE=reduce[0],
            REDUCE_SHIFT=reduce[1], REDUCE_SCALE=reduce[2], TABLE=table, HAS_GATE=has_gate, HAS_H=not no_h,
            NORM_Y=y_eps is not None, BLOCK_M=block_m, BLOCK_D=block_d,
            NUM_TILES=n_tiles, TILES_P2=triton.next_power_of_2(n_tiles), num_warps=num_warps,
        )  # fmt: skip
    else:
        for buf, r in zip(bufs, reduce):
            if r:
                buf.zero_()  # a sum over no tokens
    if table:  # parts (tables, B, P, TABLE_K, D): scale's, shift's, gate's
        parts, slots = _table_grads(op, grad_h, gx_arg, x, gate_arg, y_arg, scale, index, table_stats, dx, dy,
                                    k_rows, is_rms, residual, shift is not None, has_gate)
        grads = [None if t is None else table_sum(parts[slots[i]], k_rows, t.dtype) for i, t in enumerate(mods)]
    elif indexed:  # a wide table: the per-token grads scattered into it (atomics on a GPU)
        grads = [None if t is None else scatter_rows(buf, index, k_rows, t.dtype)
                 for t, buf in zip(mods, (bufs[0], grad_h, bufs[2]))]
    else:  # the one reduction of the per-program partials
        grads = [None if t is None else buf.sum(1, keepdim=True).to(t.dtype) if r else buf
                 for t, buf, r in zip(mods, bufs, reduce)]
        if shift is not None and not reduce[1]:
            grads[1] = x.new_empty((0,), dtype=shift.dtype)  # per token: grad_h itself
    dgate, dshift, dscale = grads
    return dx, dgate, dy if residual else None, dshift, dscale


def _table_grads(op, grad_h, grad_x, x, gate, y, scale, index, table_stats, dx, dy, k_rows: int, is_rms, residual,
                 has_shift, has_gate):
    """Writes dx (and dy); returns (parts, slots): the tables' grads as (tables, B, P, TABLE_K, D)
    fp32 program partials (scale's, then shift's, then gate's, those the op has), for
    ``table_sum``, and the slot in parts of gate's, shift's and scale's (0 where absent)."""
    bsz, n, d = x.shape
    table_k = triton.next_power_of_2(k_rows)
    n_tables = 1 + has_shift + has_gate
    slots = (1 + has_shift if has_gate else 0, 1 if has_shift else 0, 0)  # gate, shift, scale
    block_m, block_d, d_tiles = table_tiles(n, d, 4 if residual else 2)
    n_prog, rows_per_prog = reduce_programs(n, bsz * d_tiles, block_m, x.device)
    # No zero fill: the kernel writes every element (all TABLE_K rows of every program).
    parts = torch.empty((n_tables, bsz, n_prog, table_k, d), dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        count(f"{op}_table_grads")
        wrap(_norm_modulate_table_kernel)[(n_prog, bsz, d_tiles)](
            grad_h, grad_h.stride(0), grad_h.stride(1),
            grad_x, grad_x.stride(0), grad_x.stride(1),
            x, x.stride(0), x.stride(1),
            gate, gate.stride(0), gate.stride(1), y, y.stride(0), y.stride(1), scale, scale.stride(0), scale.stride(1),
            index, index.stride(0), index.stride(1),
            table_stats,
            dx, dy, dx.stride(0), dx.stride(1),
            parts[slots[2]], parts[slots[1]], parts[slots[0]], parts.stride(1), parts.stride(2), parts.stride(3),
            n, d, rows_per_prog,
            IS_RMS_NORM=is_rms, HAS_RESIDUAL=residual, HAS_SHIFT=has_shift, HAS_GATE=has_gate, TABLE_K=table_k,
            BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
    else:
        parts.zero_()  # sums over no tokens
    return parts, slots


def norm_modulate_bwd_fake(x, scale, index, *, shift=None, gate=None, y=None):
    """Empty (dx, dgate, dy, dshift, dscale) shaped as ``norm_modulate_bwd`` returns them."""
    bsz, n, d = x.shape

    def grad(t, per_token=True):
        if t is None:
            return None
        if index is not None:  # the table's grad
            return empty_rows(t.shape, t.dtype, x.device)
        if per_sample(t, n, False) or per_token:
            return empty_rows((bsz, 1 if t.shape[1] == 1 else n, d), t.dtype, x.device)
        return x.new_empty((0,), dtype=t.dtype)  # a per-token dshift: grad_h itself

    dy = None if y is None else empty_rows((bsz, n, d), y.dtype, x.device)
    return empty_rows((bsz, n, d), x.dtype, x.device), grad(gate), dy, grad(shift, False), grad(scale)


def shift_grad(dshift, grad_h, shift, index):
    """The grad of shift from the backward's: a per-token one (returned empty) is grad_h itself."""
    if shift is not None and index is None and dshift.numel() == 0 and shift.numel() > 0:
        dshift = grad_h.to(shift.dtype)
        if dshift.shape != shift.shape:  # N == 1 or empty: the same numbers in shift's shape
            dshift = dshift.reshape(shift.shape)
    return dshift
