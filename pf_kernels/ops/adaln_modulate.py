"""Fused AdaLN modulation: ``out = LN(x) * (1 + scale) + shift`` (LN without affine).

One read of x, shift and scale and one write of out, instead of the four passes of
``F.layer_norm`` then multiply then add. Statistics and ``1 + scale`` are fp32.

Modulation forms (all with unit stride along D; row strides are passed, never copied):
  per token   shift, scale (B, N, D), e.g. ``c.chunk(6, -1)`` views with row stride 6D;
  per sample  (B, 1, D): the row stride is passed as 0, and the backward reduces over N;
  indexed     (B, K, D) tables plus ``index`` (B, N) int64 choosing each token's row
              (``HAS_INDEX``; deduplicated conditioning, issue 6).

Layout: a program takes BLOCK_M whole rows and walks them in NUM_TILES column tiles of
BLOCK_D (``_utils.row_tiles``: PF-XL/2's 1152 as 9 x 128, no lane padded), reading each tile
twice, first for row sums, then for the outputs (the second read from cache). Under autograd
the forward also stores each row's mean and rstd, (B, N, 2) fp32 (``adaln_modulate_with_stats``),
and the backward reads them (called without them, it computes them first: ``ln_stats``). The per-sample backward sums
dshift/dscale over its rows per column tile in fp32 registers, per program, and the host adds
the program partials in a fixed order: deterministic, no atomics.

File layout: shared row helpers, forward (and statistics) kernels, backward kernels, host
launchers, op registration + autograd.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pf_kernels.ops._utils import (
    HAS_TRITON_OP,
    TILE_ELEMS,
    col_tiles,
    count,
    empty_rows,
    last_dim_contiguous,
    row_tiles,
    wrap,
)

#################################################################################
#                          Row statistics (shared helpers)                      #
#################################################################################


@triton.jit
def merge_moments(mean, m2, x, mask, c0, D, BLOCK_D: tl.constexpr, NUM_TILES: tl.constexpr):
    """Running LN statistics of rows (BLOCK_M,) after one more tile x (BLOCK_M, BLOCK_D), fp32,
    zero where not ``mask``, whose first column is c0. One tile: mean = sum(x) / D and
    M2 = sum((x - mean)^2). Several: the tile's mean and centred sum of squares merged into the
    running ones (Chan et al.), so a large mean costs no precision:
        delta = mean_t - mean,  mean += delta * n_t / n,  M2 += M2_t + delta^2 * n_a * n_t / n
    with n_a = c0 columns so far, n_t in the tile, n = n_a + n_t. var = M2 / D at the end."""
    if NUM_TILES == 1:
        new_mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - new_mean[:, None], 0.0)
        new_m2 = tl.sum(xc * xc, axis=1)
    else:
        n_t = tl.minimum(D - c0, BLOCK_D).to(tl.float32)  # every tile holds >= 1 column
        mean_t = tl.sum(x, axis=1) / n_t
        xc = tl.where(mask, x - mean_t[:, None], 0.0)
        frac = n_t / (n_t + c0)
        delta = mean_t - mean
        new_mean = mean + delta * frac
        new_m2 = m2 + tl.sum(xc * xc, axis=1) + delta * delta * (c0 * frac)
    return new_mean, new_m2


@triton.jit
def ln_row_stats(x_rows, row_ok, D, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NUM_TILES: tl.constexpr):
    """mean and rstd (BLOCK_M,) fp32 of the rows at ``x_rows`` (BLOCK_M,) pointers, D columns
    each, read tile by tile (``merge_moments``); rstd = 1 / sqrt(M2 / D + eps)."""
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in tl.static_range(NUM_TILES):
        cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean, m2 = merge_moments(mean, m2, x, mask, t * BLOCK_D, D, BLOCK_D, NUM_TILES)
    return mean, 1.0 / tl.sqrt(m2 / D + eps)


@triton.jit
def add_tile(acc, part, t: tl.constexpr, TILES_P2: tl.constexpr):
    """acc (TILES_P2, BLOCK_D) with row t += part (BLOCK_D,): the column sums of tile t of a
    per-sample modulation's grad, kept in registers across the row steps of a program (one
    accumulator row per column tile; a static loop cannot index separate variables)."""
    return acc + tl.where((tl.arange(0, TILES_P2) == t)[:, None], part[None, :], 0.0)


@triton.jit
def load_mod(SAMPLE, mod_rows, cols, mask, D, PER_SAMPLE: tl.constexpr):
    """A modulation tile: (BLOCK_M, BLOCK_D) from the rows at ``mod_rows``, or, for a per-sample
    (B, 1, D) one (PER_SAMPLE), its single row at ``SAMPLE`` read once as (1, BLOCK_D)."""
    if PER_SAMPLE:
        mod = tl.load(SAMPLE + cols, mask=cols < D, other=0.0)[None, :]
    else:
        mod = tl.load(mod_rows[:, None] + cols[None, :], mask=mask, other=0.0)
    return mod


@triton.jit
def store_tiles(PTR, acc, D, BLOCK_D: tl.constexpr, TILES_P2: tl.constexpr):
    """PTR[t * BLOCK_D + c] = acc[t, c] for the columns < D (a program's partial row)."""
    cols = tl.arange(0, TILES_P2)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    tl.store(PTR + cols, acc, mask=cols < D)


#################################################################################
#                    Forward kernel (and the statistics alone)                  #
#################################################################################


@triton.jit
def _adaln_modulate_fwd_kernel(
    X, stride_xb, stride_xn,  # (B, N, D)
    SHIFT, stride_hb, stride_hn,  # (B, N, D) | (B, 1, D) with stride_hn = 0 | (B, K, D) table
    SCALE, stride_sb, stride_sn,  # same form as SHIFT
    INDEX, stride_ib, stride_in,  # (B, N) int64 table rows (read only when HAS_INDEX)
    OUT, stride_ob, stride_on,  # (B, N, D)
    STATS,  # (B, N, 2) fp32 mean, rstd per token (written only when STORE_STATS: the backward's)
    N, D, eps,
    HAS_INDEX: tl.constexpr,
    STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_TILES: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_M), B): token blocks on axis 0, which has no 65535 limit. A row is
    # read in NUM_TILES tiles of BLOCK_D columns twice: statistics, then the output (the
    # second read comes from cache; with one tile the compiler keeps the first).
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
    row_ok = rows < N
    x_rows = X + b * stride_xb + rows * stride_xn
    mean, rstd = ln_row_stats(x_rows, row_ok, D, eps, BLOCK_M, BLOCK_D, NUM_TILES)

    if HAS_INDEX:
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=0)
    else:
        mrows = rows  # the per-sample form reads row 0 everywhere through its zero stride
    shift_rows = SHIFT + b * stride_hb + mrows * stride_hn
    scale_rows = SCALE + b * stride_sb + mrows * stride_sn
    out_rows = OUT + b * stride_ob + rows * stride_on
    for t in tl.static_range(NUM_TILES):
        cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]  # (BLOCK_M, BLOCK_D)
        x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        scale = tl.load(scale_rows[:, None] + cols[None, :], mask=mask, other=0.0)
        # out = xhat * (1 + scale) + shift, xhat = (x - mean) * rstd, with 1 + scale formed in
        # fp32 (scale is small, so in bf16 the sum would round away most of its bits).
        xhat = (x - mean[:, None]) * rstd[:, None]
        out = xhat * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
        tl.store(out_rows[:, None] + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(STATS + (b * N + rows) * 2, mean, mask=row_ok)
        tl.store(STATS + (b * N + rows) * 2 + 1, rstd, mask=row_ok)


@triton.jit
def _ln_stats_kernel(
    X, stride_xb, stride_xn,  # (B, N, D)
    STATS,  # (B, N, 2) fp32 mean, rstd per token
    N, D, eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_TILES: tl.constexpr,
):
    # Grid (cdiv(N, BLOCK_M), B): the LN statistics alone, for a backward called without the
    # forward's (the backward kernels always read them; one read of x here).
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < N
    mean, rstd = ln_row_stats(X + b * stride_xb + rows * stride_xn, row_ok, D, eps, BLOCK_M, BLOCK_D, NUM_TILES)
    tl.store(STATS + (b * N + rows) * 2, mean, mask=row_ok)
    tl.store(STATS + (b * N + rows) * 2 + 1, rstd, mask=row_ok)


#################################################################################
#                                Backward kernels                               #
#################################################################################


@triton.jit
def _adaln_modulate_bwd_kernel(
    DOUT, stride_gb, stride_gn,  # (B, N, D) incoming gradient
    X, stride_xb, stride_xn,  # (B, N, D)
    SCALE, stride_sb, stride_sn,  # (B, N, D) | (B, 1, D) stride_sn = 0 | (B, K, D) table
    INDEX, stride_ib, stride_in,  # (B, N) int64 (HAS_INDEX only)
    DX, stride_dxb, stride_dxn,  # (B, N, D)
    DSCALE, stride_dsb, stride_dsn,  # (B, N, D) per token, or (B, P, D) fp32 partials (REDUCE_SCALE)
    DSHIFT, stride_dhb, stride_dhn,  # (B, P, D) fp32 partials (REDUCE_SHIFT only; else dshift = dout)
    STATS,  # (B, N, 2) fp32 mean, rstd per token (the forward's, or _ln_stats_kernel's)
    N, D, ROWS_PER_PROG,
    HAS_INDEX: tl.constexpr,
    REDUCE_SCALE: tl.constexpr,
    REDUCE_SHIFT: tl.constexpr,
    TABLE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_TILES: tl.constexpr,
    TILES_P2: tl.constexpr,  # NUM_TILES padded to a power of two (accumulator rows)
):
    # Grid (P, B): program p walks tokens [p * ROWS_PER_PROG, (p + 1) * ROWS_PER_PROG) of
    # sample b, BLOCK_M whole rows per step, each row in NUM_TILES column tiles. A per-sample
    # modulation's grads are summed over those tokens in fp32 registers, one accumulator row
    # per column tile, and written once per program; the host adds the P partials in order.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_dscale = tl.zeros((TILES_P2, BLOCK_D), dtype=tl.float32)
    acc_dshift = tl.zeros((TILES_P2, BLOCK_D), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BLOCK_M,)
        row_ok = rows < N
        g_rows = DOUT + b * stride_gb + rows * stride_gn
        x_rows = X + b * stride_xb + rows * stride_xn
        mean = tl.load(STATS + (b * N + rows) * 2, mask=row_ok, other=0.0)
        rstd = tl.load(STATS + (b * N + rows) * 2 + 1, mask=row_ok, other=0.0)
        if HAS_INDEX:
            mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=0)
        else:
            mrows = rows
        scale_rows = SCALE + b * stride_sb + mrows * stride_sn
        # Through out = xhat * w + shift with w = 1 + scale: dxhat = g * w, and through LN
        # dx = rstd * (dxhat - c2 - xhat * c1), c1 = mean(dxhat * xhat), c2 = mean(dxhat):
        # the row sums first (pass 1), then dx tile by tile (pass 2, the tiles read again).
        c1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in tl.static_range(NUM_TILES):
            cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            g = tl.load(g_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            scale = load_mod(SCALE + b * stride_sb, scale_rows, cols, mask, D, REDUCE_SCALE)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = g * (1.0 + scale.to(tl.float32))
            c1 += tl.sum(xhat * wdy, axis=1)
            c2 += tl.sum(wdy, axis=1)
        c1 = c1 / D
        c2 = c2 / D
        for t in tl.static_range(NUM_TILES):
            cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < D)[None, :]
            g = tl.load(g_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            scale = load_mod(SCALE + b * stride_sb, scale_rows, cols, mask, D, REDUCE_SCALE)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = g * (1.0 + scale.to(tl.float32))
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + b * stride_dxb + rows[:, None] * stride_dxn + cols[None, :], dx.to(DX.dtype.element_ty),
                     mask=mask)
            # dscale = g * xhat, dshift = g (masked rows and columns contribute zeros).
            if REDUCE_SCALE:
                acc_dscale = add_tile(acc_dscale, tl.sum(g * xhat, axis=0), t, TILES_P2)
            elif not TABLE:  # the table kernel sums dscale from the row statistics
                tl.store(DSCALE + b * stride_dsb + rows[:, None] * stride_dsn + cols[None, :],
                         (g * xhat).to(DSCALE.dtype.element_ty), mask=mask)
            if REDUCE_SHIFT:
                acc_dshift = add_tile(acc_dshift, tl.sum(g, axis=0), t, TILES_P2)
    if REDUCE_SCALE:
        store_tiles(DSCALE + b * stride_dsb + pid * stride_dsn, acc_dscale, D, BLOCK_D, TILES_P2)
    if REDUCE_SHIFT:
        store_tiles(DSHIFT + b * stride_dhb + pid * stride_dhn, acc_dshift, D, BLOCK_D, TILES_P2)


@triton.jit
def add_table_rows(acc, values, mrows, TABLE_K: tl.constexpr):
    """acc (TABLE_K, BLOCK_D) += for every k the column sums of values (BLOCK_M, BLOCK_D) over
    the rows whose table row ``mrows`` is k (the indexed backward's sums, without atomics)."""
    ks = tl.arange(0, TABLE_K)
    for k in tl.static_range(TABLE_K):
        part = tl.sum(tl.where((mrows == k)[:, None], values, 0.0), axis=0)  # (BLOCK_D,)
        acc += tl.where(ks[:, None] == k, part[None, :], 0.0)
    return acc


@triton.jit
def _adaln_table_grads_kernel(
    DOUT, stride_gb, stride_gn,  # (B, N, D)
    X, stride_xb, stride_xn,  # (B, N, D)
    STATS,  # (B, N, 2) fp32 mean, rstd (written by the backward kernel)
    INDEX, stride_ib, stride_in,  # (B, N) int64 rows of the tables
    DSHIFT, DSCALE, stride_pb, stride_pp, stride_pk,  # (B, P, TABLE_K, D) fp32 partials each
    N, D, ROWS_PER_PROG,
    TABLE_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid (P, B, D tiles): the table grads dshift[k] = sum_{n: index = k} g_n and
    # dscale[k] = sum g_n * xhat_n, summed in fp32 registers per program (the same order on
    # every run: no atomics); the host adds the P partials.
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ks = tl.arange(0, TABLE_K)
    acc_shift = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    acc_scale = tl.zeros((TABLE_K, BLOCK_D), dtype=tl.float32)
    row_start = pid * ROWS_PER_PROG
    for m0 in range(row_start, row_start + ROWS_PER_PROG, BLOCK_M):
        rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        g = tl.load(DOUT + b * stride_gb + rows[:, None] * stride_gn + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        x = tl.load(X + b * stride_xb + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
        mean = tl.load(STATS + (b * N + rows) * 2, mask=row_ok, other=0.0)
        rstd = tl.load(STATS + (b * N + rows) * 2 + 1, mask=row_ok, other=0.0)
        xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
        dscale = tl.where(mask, g * xhat, 0.0)
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=-1)
        acc_shift = add_table_rows(acc_shift, g, mrows, TABLE_K)
        acc_scale = add_table_rows(acc_scale, dscale, mrows, TABLE_K)
    offs = b * stride_pb + pid * stride_pp + ks[:, None] * stride_pk + cols[None, :]
    tl.store(DSHIFT + offs, acc_shift, mask=col_ok[None, :])
    tl.store(DSCALE + offs, acc_scale, mask=col_ok[None, :])


#################################################################################
#                                Host launchers                                 #
#################################################################################


def _mod_row_stride(t: torch.Tensor, indexed: bool) -> int:
    # A per-sample (B, 1, D) modulation is read at row 0 by every token: stride 0. A table
    # (indexed) keeps its real stride even with K = 1.
    return t.stride(1) if indexed or t.shape[1] != 1 else 0


def _index_args(index, like: torch.Tensor):
    if index is None:
        return like, 0, 0  # any pointer; never read (HAS_INDEX False)
    return index, index.stride(0), index.stride(1)


def reduce_programs(n_rows: int, batch: int, block_m: int, device: torch.device, num_warps: int = 8) -> tuple[int, int]:
    """(P, rows per program) for a backward that sums over tokens: enough programs to fill the
    GPU (about 32 warps per SM), the rest of the parallelism taken as a longer loop per program."""
    if device.type == "cuda":
        target = max(1, 32 // num_warps) * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2  # the interpreter: few programs are fastest; still more than one partial
    # Plain ints: under torch.compile with dynamic shapes this sizes a buffer and a grid, so
    # it is specialised on N and B (a per-sample modulation is rare there anyway).
    n_rows, batch = max(int(n_rows), 1), int(batch)
    n_blocks = triton.cdiv(n_rows, block_m)
    p = min(n_blocks, max(1, triton.cdiv(target, batch)))
    rows_per_prog = triton.cdiv(n_blocks, p) * block_m
    return triton.cdiv(n_rows, rows_per_prog), rows_per_prog


def _fwd(x, shift, scale, index, eps: float, stats) -> torch.Tensor:
    x, shift, scale = last_dim_contiguous(x), last_dim_contiguous(shift), last_dim_contiguous(scale)
    bsz, n, d = x.shape
    out = empty_rows((bsz, n, d), x.dtype, x.device)
    if out.numel() == 0:
        return out
    indexed = index is not None
    block_m, block_d, n_tiles, num_warps = row_tiles(n, d, x.element_size())
    idx, sib, sin = _index_args(index, x)
    grid = (triton.cdiv(n, block_m), bsz)
    count("adaln_modulate_fwd")
    if stats is not None:
        count("adaln_modulate_fwd_stats")
    wrap(_adaln_modulate_fwd_kernel)[grid](
        x, x.stride(0), x.stride(1),
        shift, shift.stride(0), _mod_row_stride(shift, indexed),
        scale, scale.stride(0), _mod_row_stride(scale, indexed),
        idx, sib, sin,
        out, out.stride(0), out.stride(1),
        out if stats is None else stats,
        n, d, eps,
        HAS_INDEX=indexed, STORE_STATS=stats is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, NUM_TILES=n_tiles, num_warps=num_warps,
    )  # fmt: skip
    return out


def adaln_modulate_fwd(x, shift, scale, index, eps: float) -> torch.Tensor:
    """x (B, N, D); shift, scale (B, N|1, D) or (B, K, D) with index (B, N). Returns (B, N, D)."""
    return _fwd(x, shift, scale, index, eps, None)


def adaln_modulate_fwd_stats(x, shift, scale, index, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward for autograd: also each token's LN mean and rstd, (B, N, 2) fp32, which the
    backward then reads instead of recomputing them (8 bytes a token against 2 * D read)."""
    stats = torch.empty((*x.shape[:2], 2), dtype=torch.float32, device=x.device)
    return _fwd(x, shift, scale, index, eps, stats), stats


def ln_stats(x, eps: float) -> torch.Tensor:
    """(B, N, 2) fp32 mean and rstd of each row of x (B, N, D): what the forward stores under
    autograd, computed on its own for a backward called without it."""
    x = last_dim_contiguous(x)
    bsz, n, d = x.shape
    stats = torch.empty((bsz, n, 2), dtype=torch.float32, device=x.device)
    if stats.numel() > 0:
        block_m, block_d, n_tiles, num_warps = row_tiles(n, d, x.element_size())
        count("ln_stats")
        wrap(_ln_stats_kernel)[(triton.cdiv(n, block_m), bsz)](
            x, x.stride(0), x.stride(1), stats, n, d, eps,
            BLOCK_M=block_m, BLOCK_D=block_d, NUM_TILES=n_tiles, num_warps=num_warps,
        )  # fmt: skip
    return stats


def adaln_modulate_bwd(grad, x, shift, scale, index, eps: float, stats=None):
    """Returns (dx, dshift, dscale).

    dx (B, N, D). Per-sample shift/scale (B, 1, D): reduced grads (B, 1, D) in their dtypes.
    Per-token: dscale (B, N, D); dshift is an empty tensor because it equals ``grad`` (the
    caller uses grad itself: no kernel writes a copy). Indexed: the (B, K, D) grads of both
    tables (summed by a second kernel without atomics for K <= MAX_TABLE_K, by a scatter of
    the per-token grads above). ``stats``: the forward's (B, N, 2) mean and rstd, or None to
    compute them first (``ln_stats``).
    """
    grad, x = last_dim_contiguous(grad), last_dim_contiguous(x)
    scale = last_dim_contiguous(scale)
    bsz, n, d = x.shape
    indexed = index is not None
    reduce_scale = bool(not indexed and scale.shape[1] == 1 and n != 1)  # constexpr: a plain bool
    reduce_shift = bool(not indexed and shift.shape[1] == 1 and n != 1)
    dx = empty_rows((bsz, n, d), x.dtype, x.device)
    # A per-sample fp32 backward takes two 16-byte vectors per thread and tensor (4 warps):
    # with one (8 warps) ptxas keeps it at 128 registers and spills.
    vec_bytes = 32 if (reduce_scale or reduce_shift) and x.element_size() == 4 else 16
    block_m, block_d, n_tiles, num_warps = row_tiles(n, d, x.element_size(), vec_bytes)
    if reduce_scale or reduce_shift:
        n_prog, rows_per_prog = reduce_programs(n, bsz, block_m, x.device, num_warps)
    else:
        n_prog, rows_per_prog = triton.cdiv(max(n, 1), block_m), block_m
    k_rows = int(shift.shape[1]) if indexed else 0
    table = bool(indexed and k_rows <= MAX_TABLE_K)
    from_forward = stats is not None
    stats = stats.contiguous() if from_forward else ln_stats(x, eps)
    if reduce_scale:
        dscale_buf = torch.empty((bsz, n_prog, d), dtype=torch.float32, device=x.device)
    elif table:
        dscale_buf = dx  # not written: the table kernel sums dscale from the row statistics
    else:
        dscale_buf = empty_rows((bsz, n, d), torch.float32 if indexed else scale.dtype, x.device)
    dshift_buf = torch.empty((bsz, n_prog, d), dtype=torch.float32, device=x.device) if reduce_shift else dx
    if dx.numel() > 0:
        idx, sib, sin = _index_args(index, x)
        count("adaln_modulate_bwd")
        if from_forward:
            count("adaln_modulate_bwd_stats")
        wrap(_adaln_modulate_bwd_kernel)[(n_prog, bsz)](
            grad, grad.stride(0), grad.stride(1),
            x, x.stride(0), x.stride(1),
            scale, scale.stride(0), _mod_row_stride(scale, indexed),
            idx, sib, sin,
            dx, dx.stride(0), dx.stride(1),
            dscale_buf, dscale_buf.stride(0), dscale_buf.stride(1),
            dshift_buf, dshift_buf.stride(0), dshift_buf.stride(1),
            stats,
            n, d, rows_per_prog,
            HAS_INDEX=indexed, REDUCE_SCALE=reduce_scale, REDUCE_SHIFT=reduce_shift,
            TABLE=table, BLOCK_M=block_m, BLOCK_D=block_d, NUM_TILES=n_tiles,
            TILES_P2=triton.next_power_of_2(n_tiles), num_warps=num_warps,
        )  # fmt: skip
    elif reduce_scale or reduce_shift:
        dscale_buf.zero_()
        if reduce_shift:
            dshift_buf.zero_()
    if indexed:
        if table:
            return (dx, *_table_grads(grad, x, stats, index, k_rows, shift.dtype, scale.dtype))
        # a wide table: the per-token grads scattered into it (atomics on a GPU)
        return dx, _scatter_rows(grad, index, k_rows, shift.dtype), _scatter_rows(dscale_buf, index, k_rows, scale.dtype)
    # The one reduction of the per-program partials.
    dscale = dscale_buf.sum(1, keepdim=True).to(scale.dtype) if reduce_scale else dscale_buf
    if reduce_shift:
        dshift = dshift_buf.sum(1, keepdim=True).to(shift.dtype)
    else:
        dshift = x.new_empty((0,), dtype=shift.dtype)
    return dx, dshift, dscale


MAX_TABLE_K = 8  # indexed tables with up to this many rows have their grads summed by a kernel
TABLE_BLOCK_D = 128  # widest column tile there (2 x K fp32 accumulator rows in registers)


def table_block_d(d) -> int:
    """Column tile of the table kernels: ``col_tiles``' (no lanes wasted at the PF widths), at
    most TABLE_BLOCK_D wide."""
    return min(col_tiles(d)[0], TABLE_BLOCK_D)


def _table_grads(grad, x, stats, index, k_rows: int, shift_dtype, scale_dtype):
    """(dshift, dscale) (B, K, D) of an indexed modulation, summed per program in the kernel
    and then over programs here: deterministic (no atomics)."""
    bsz, n, d = x.shape
    table_k = triton.next_power_of_2(k_rows)
    block_d = table_block_d(d)  # constexprs: plain ints (D is a model constant)
    block_m = max(1, min(TILE_ELEMS // block_d // 2, triton.next_power_of_2(max(int(n), 1))))
    d_tiles = triton.cdiv(d, block_d)
    n_prog, rows_per_prog = reduce_programs(n, bsz * d_tiles, block_m, x.device)
    parts = torch.zeros((2, bsz, n_prog, table_k, d), dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        count("adaln_modulate_table_grads")
        wrap(_adaln_table_grads_kernel)[(n_prog, bsz, d_tiles)](
            grad, grad.stride(0), grad.stride(1),
            x, x.stride(0), x.stride(1),
            stats,
            index, index.stride(0), index.stride(1),
            parts[0], parts[1], parts.stride(1), parts.stride(2), parts.stride(3),
            n, d, rows_per_prog,
            TABLE_K=table_k, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    # (B, K, D) each: the P partials added in order (two separate tensors: outputs must not
    # alias). Rows sliced before the sum, so each is contiguous as the fake impl says (a slice
    # after it would keep the padded row stride TABLE_K * D).
    return parts[0, :, :, :k_rows].sum(1).to(shift_dtype), parts[1, :, :, :k_rows].sum(1).to(scale_dtype)


def _bwd_fake(grad, x, shift, scale, index, eps, stats=None):
    bsz, n, d = x.shape
    dx = empty_rows((bsz, n, d), x.dtype, x.device)
    if index is not None:  # the tables' grads
        return dx, empty_rows(shift.shape, shift.dtype, x.device), empty_rows(scale.shape, scale.dtype, x.device)
    dscale_rows = 1 if scale.shape[1] == 1 else n
    dshift = empty_rows((bsz, 1, d), shift.dtype, x.device) if shift.shape[1] == 1 and n != 1 else x.new_empty((0,), dtype=shift.dtype)
    return dx, dshift, empty_rows((bsz, dscale_rows, d), scale.dtype, x.device)


def _scatter_rows(rows: torch.Tensor, index: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum per-token grads (B, N, D) into a (B, K, D) table by index (B, N), in fp32."""
    bsz, n, d = rows.shape
    table = torch.zeros((bsz, k, d), dtype=torch.float32, device=rows.device)
    table.scatter_add_(1, index[:, :, None].expand(bsz, n, d), rows.to(torch.float32))
    return table.to(dtype)


def _finish_grads(grad, dx, dshift, dscale, shift, scale, index):
    """Per-token dshift is the incoming gradient itself; indexed grads are the tables' already."""
    if index is not None:
        return dx, dshift, dscale
    if dshift.numel() == 0 and shift.numel() > 0:
        dshift = grad.to(shift.dtype)
        if dshift.shape != shift.shape:  # N == 1 or empty: same numbers, shift's shape
            dshift = dshift.reshape(shift.shape)
    return dx, dshift, dscale


#################################################################################
#                        Registration: triton_op + autograd                     #
#################################################################################


class AdalnModulateFunction(torch.autograd.Function):
    """The route without ``torch.library.triton_op`` (torch < 2.6): eager autograd only."""

    @staticmethod
    def forward(ctx, x, shift, scale, index, eps):
        out, stats = adaln_modulate_fwd_stats(x, shift, scale, index, eps)
        ctx.save_for_backward(x, shift, scale, index, stats)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, shift, scale, index, stats = ctx.saved_tensors
        dx, dshift, dscale = adaln_modulate_bwd(grad, x, shift, scale, index, ctx.eps, stats)
        return (*_finish_grads(grad, dx, dshift, dscale, shift, scale, index), None, None)


def needs_grad(*tensors) -> bool:
    """Whether autograd will ask for this op's backward: then the forward stores the row
    statistics for it (the ``*_with_stats`` ops)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


if HAS_TRITON_OP:

    @torch.library.triton_op("pf_kernels::adaln_modulate", mutates_args=())
    def _adaln_modulate_op(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
        return adaln_modulate_fwd(x, shift, scale, None, eps)

    @torch.library.triton_op("pf_kernels::adaln_modulate_indexed", mutates_args=())
    def _adaln_modulate_indexed_op(x: Tensor, shift: Tensor, scale: Tensor, index: Tensor, eps: float) -> Tensor:
        return adaln_modulate_fwd(x, shift, scale, index, eps)

    @torch.library.triton_op("pf_kernels::adaln_modulate_with_stats", mutates_args=())
    def _adaln_modulate_with_stats_op(
        x: Tensor, shift: Tensor, scale: Tensor, index: Optional[Tensor], eps: float
    ) -> tuple[Tensor, Tensor]:
        return adaln_modulate_fwd_stats(x, shift, scale, index, eps)

    @torch.library.triton_op("pf_kernels::adaln_modulate_backward", mutates_args=())
    def _adaln_modulate_backward_op(
        grad: Tensor, x: Tensor, shift: Tensor, scale: Tensor, index: Optional[Tensor], eps: float,
        stats: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return adaln_modulate_bwd(grad, x, shift, scale, index, eps, stats)

    # Explicit fake impls (triton_op's default runs the launcher on fake tensors, which works
    # for compiled kernels but not for interpreter kernels, and hides the output strides).
    def _fwd_fake(x, shift, scale, eps):
        return empty_rows(x.shape, x.dtype, x.device)

    def _fwd_indexed_fake(x, shift, scale, index, eps):
        return empty_rows(x.shape, x.dtype, x.device)

    def _fwd_stats_fake(x, shift, scale, index, eps):
        return empty_rows(x.shape, x.dtype, x.device), empty_rows((*x.shape[:2], 2), torch.float32, x.device)

    _adaln_modulate_op.register_fake(_fwd_fake)
    _adaln_modulate_indexed_op.register_fake(_fwd_indexed_fake)
    _adaln_modulate_with_stats_op.register_fake(_fwd_stats_fake)
    _adaln_modulate_backward_op.register_fake(_bwd_fake)

    # The plain ops' autograd recomputes the statistics (a caller that differentiates through
    # torch.ops.pf_kernels.adaln_modulate itself); the public functions take the _with_stats
    # op when grads are needed.
    def _setup_context(ctx, inputs, output):
        x, shift, scale, eps = inputs
        ctx.save_for_backward(x, shift, scale)
        ctx.eps = eps

    def _backward(ctx, grad):
        x, shift, scale = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.pf_kernels.adaln_modulate_backward(grad, x, shift, scale, None, ctx.eps)
        return (*_finish_grads(grad, dx, dshift, dscale, shift, scale, None), None)

    def _setup_context_indexed(ctx, inputs, output):
        x, shift, scale, index, eps = inputs
        ctx.save_for_backward(x, shift, scale, index)
        ctx.eps = eps

    def _backward_indexed(ctx, grad):
        x, shift, scale, index = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.pf_kernels.adaln_modulate_backward(grad, x, shift, scale, index, ctx.eps)
        return (*_finish_grads(grad, dx, dshift, dscale, shift, scale, index), None, None)

    def _setup_context_stats(ctx, inputs, output):
        x, shift, scale, index, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, shift, scale, index, output[1])
        ctx.eps = eps

    def _backward_stats(ctx, grad, _grad_stats):
        x, shift, scale, index, stats = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.pf_kernels.adaln_modulate_backward(grad, x, shift, scale, index, ctx.eps,
                                                                          stats)
        return (*_finish_grads(grad, dx, dshift, dscale, shift, scale, index), None, None)

    _adaln_modulate_op.register_autograd(_backward, setup_context=_setup_context)
    _adaln_modulate_indexed_op.register_autograd(_backward_indexed, setup_context=_setup_context_indexed)
    _adaln_modulate_with_stats_op.register_autograd(_backward_stats, setup_context=_setup_context_stats)


def adaln_modulate_triton(x, shift, scale, eps: float = 1e-6) -> torch.Tensor:
    if not HAS_TRITON_OP:
        return AdalnModulateFunction.apply(x, shift, scale, None, eps)
    if needs_grad(x, shift, scale):
        return torch.ops.pf_kernels.adaln_modulate_with_stats(x, shift, scale, None, eps)[0]
    return torch.ops.pf_kernels.adaln_modulate(x, shift, scale, eps)


def adaln_modulate_indexed_triton(x, shift, scale, index, eps: float = 1e-6) -> torch.Tensor:
    if not HAS_TRITON_OP:
        return AdalnModulateFunction.apply(x, shift, scale, index, eps)
    if needs_grad(x, shift, scale):
        return torch.ops.pf_kernels.adaln_modulate_with_stats(x, shift, scale, index, eps)[0]
    return torch.ops.pf_kernels.adaln_modulate_indexed(x, shift, scale, index, eps)
