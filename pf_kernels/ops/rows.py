"""Triton helpers the row kernels share: tile loads, row statistics, modulation reads, grad sums.

A row kernel takes BLOCK_M rows of D columns per step and walks them in NUM_TILES column tiles
of BLOCK_D (``_utils.row_tiles``). ``rows`` are (BLOCK_M,) int64 token indices, ``*_rows``
(BLOCK_M,) pointers to the first column of each row, ``cols`` (BLOCK_D,) column indices and
``mask`` (BLOCK_M, BLOCK_D) the elements that exist.
"""

import triton
import triton.language as tl


@triton.jit
def tile_mask(row_ok, t, D, BLOCK_D: tl.constexpr):
    """(cols, mask) of column tile t: cols (BLOCK_D,), mask (BLOCK_M, BLOCK_D)."""
    cols = t * BLOCK_D + tl.arange(0, BLOCK_D)
    return cols, row_ok[:, None] & (cols < D)[None, :]


@triton.jit
def load_tile(row_ptrs, cols, mask):
    """The (BLOCK_M, BLOCK_D) tile at ``row_ptrs`` (BLOCK_M,) + cols, zeros where masked, fp32."""
    return tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(row_ptrs, cols, value, mask, PTR):
    """Stores ``value`` (BLOCK_M, BLOCK_D) at ``row_ptrs`` + cols in PTR's element type."""
    tl.store(row_ptrs[:, None] + cols[None, :], value.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def column_program(D, BLOCK_D: tl.constexpr):
    """(pid, b, cols, col_ok) of a program on a (P, B, column tiles) grid: its share p of the
    rows, its sample b, and its column tile (BLOCK_D,) with the columns that exist."""
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    return tl.program_id(0), tl.program_id(1).to(tl.int64), cols, cols < D


@triton.jit
def step_rows(m0, N, col_ok, BLOCK_M: tl.constexpr):
    """(rows, row_ok, mask) of a column program's row step from m0: rows (BLOCK_M,) int64."""
    rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < N
    return rows, row_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def mod_row_index(INDEX, stride_ib, stride_in, b, rows, row_ok, HAS_INDEX: tl.constexpr):
    """The modulation row each token reads: index[b, rows] for a (B, K, D) table (HAS_INDEX),
    else the token itself (a per-sample (B, 1, D) one reads row 0 through its zero stride)."""
    if HAS_INDEX:
        mrows = tl.load(INDEX + b * stride_ib + rows * stride_in, mask=row_ok, other=0)
    else:
        mrows = rows
    return mrows


@triton.jit
def load_mod(SAMPLE, mod_rows, cols, mask, D, PER_SAMPLE: tl.constexpr):
    """A modulation tile: (BLOCK_M, BLOCK_D) from the rows at ``mod_rows``, or, for a per-sample
    (B, 1, D) one (PER_SAMPLE), its single row at ``SAMPLE`` read once as (1, BLOCK_D)."""
    if PER_SAMPLE:
        mod = tl.load(SAMPLE + cols, mask=cols < D, other=0.0)[None, :]
    else:
        mod = tl.load(mod_rows[:, None] + cols[None, :], mask=mask, other=0.0)
    return mod.to(tl.float32)


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
def add_row_moments(mean, m2, x, mask, t, D, BLOCK_D: tl.constexpr, NUM_TILES: tl.constexpr,
                    IS_RMS_NORM: tl.constexpr):
    """The norm's running row statistics after tile t of x: RMSNorm sums x^2 into m2 (mean stays
    0); LayerNorm merges mean and M2 (``merge_moments``). Either way rstd = 1 / sqrt(m2 / D + eps)."""
    if IS_RMS_NORM:
        m2 += tl.sum(x * x, axis=1)  # padded columns load as zeros and add nothing
    else:
        mean, m2 = merge_moments(mean, m2, x, mask, t * BLOCK_D, D, BLOCK_D, NUM_TILES)
    return mean, m2


@triton.jit
def store_pair(PTR, offs, row_ok, a, b):
    """PTR[offs] = a, PTR[offs + 1] = b for rows (BLOCK_M,): per-row statistics (mean, rstd...)."""
    tl.store(PTR + offs, a, mask=row_ok)
    tl.store(PTR + offs + 1, b, mask=row_ok)


@triton.jit
def load_pair(PTR, offs, row_ok):
    """(PTR[offs], PTR[offs + 1]) for rows (BLOCK_M,), zeros where not ``row_ok``."""
    return tl.load(PTR + offs, mask=row_ok, other=0.0), tl.load(PTR + offs + 1, mask=row_ok, other=0.0)


@triton.jit
def add_tile(acc, part, t: tl.constexpr, TILES_P2: tl.constexpr):
    """acc (TILES_P2, BLOCK_D) with row t += part (BLOCK_D,): the column sums of tile t of a
    per-sample modulation's grad, kept in registers across the row steps of a program (one
    accumulator row per column tile; a static loop cannot index separate variables)."""
    return acc + tl.where((tl.arange(0, TILES_P2) == t)[:, None], part[None, :], 0.0)


@triton.jit
def sum_or_store(acc, grad, t: tl.constexpr, TILES_P2: tl.constexpr, REDUCE: tl.constexpr, row_ptrs, cols, mask,
                 PTR):
    """A modulation's grad tile (BLOCK_M, BLOCK_D), zero where masked: summed over the rows
    into acc (per sample, REDUCE) or stored per token at ``row_ptrs``; returns acc."""
    if REDUCE:
        acc = add_tile(acc, tl.sum(grad, axis=0), t, TILES_P2)
    else:
        store_tile(row_ptrs, cols, grad, mask, PTR)
    return acc


@triton.jit
def store_tiles(PTR, acc, D, BLOCK_D: tl.constexpr, TILES_P2: tl.constexpr):
    """PTR[t * BLOCK_D + c] = acc[t, c] for the columns < D (a program's partial row)."""
    cols = tl.arange(0, TILES_P2)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    tl.store(PTR + cols, acc, mask=cols < D)


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
def store_table_part(PTR, acc, b, pid, stride_pb, stride_pp, stride_pk, cols, col_ok, TABLE_K: tl.constexpr):
    """PTR[b, pid, k, cols] = acc (TABLE_K, BLOCK_D): a program's partial table grad."""
    ks = tl.arange(0, TABLE_K)
    tl.store(PTR + b * stride_pb + pid * stride_pp + ks[:, None] * stride_pk + cols[None, :], acc,
             mask=col_ok[None, :])
