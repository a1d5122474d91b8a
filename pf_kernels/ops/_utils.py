"""Host-side helpers the Triton ops share: interpreter flag, launch counter, block sizes, row forms.

``INTERPRETED`` is decided once, when the kernels are decorated: ``@triton.jit`` reads
``TRITON_INTERPRET`` at decoration time (``triton.knobs.runtime.interpret``), so the variable
must be set before ``pf_kernels`` is imported. Setting it later has no effect on our kernels.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import torch

import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# True when ``@triton.jit`` returns interpreter functions (CPU tensors can then be launched).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


# Triton 3.6's interpreter turns a loop bound into an int with int(<1-element array>), which
# NumPy 2.4 made an error: every kernel with a run-time loop (the backward reductions) then
# fails. Triton 3.7 squeezes the array first. Only the CPU interpreter is affected.
if INTERPRETED and _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
    warnings.warn(
        f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run kernels with "
        f"run-time loops under NumPy {np.__version__}: install 'numpy<2.4' or Triton >= 3.7",
        RuntimeWarning,
        stacklevel=2,
    )

# Kernel name -> number of launches from the host launchers. Tests read it to prove the
# Triton path ran; it counts eager launches (a compiled graph launches without the host code).
LAUNCHES: collections.Counter = collections.Counter()

# Elements per program tile. Large enough that a tile saturates a SM's load units on a GPU,
# small enough for the registers of the backward (about five fp32 values per element).
TILE_ELEMS = 4096


def wrap(kernel):
    """``torch.library.wrap_triton(kernel)`` (a launch ``torch.compile`` can trace).

    Triton before 3.7 turns ``@triton.jit`` into an ``InterpretedFunction`` under
    ``TRITON_INTERPRET=1``, which ``wrap_triton`` refuses; it is launched directly (eager, as
    every interpreter launch is: compile cannot run interpreted kernels on fake tensors).
    """
    if isinstance(kernel, (JITFunction, Autotuner)):
        return torch.library.wrap_triton(kernel)
    return kernel


def count(name: str) -> None:
    LAUNCHES[name] += 1


# Column tiles. Triton's blocks are powers of two, so a row held as one block is padded to
# next_pow2(D): D = 1152 (PF-XL/2) to 2048 lanes, 44% of them empty; D = 768 (PF-B/2) to 1024.
# The row kernels walk a row in NUM_TILES tiles of BLOCK_D columns instead: the whole row in one
# block when that leaves at most MAX_PAD of the lanes empty, else the widest power-of-two tile
# whose multiple of D does (1152 = 9 x 128, 768 = 3 x 256: no lane empty). A kernel that needs
# row statistics then reads a tile twice (statistics, then outputs), the second time from L1/L2.
# Read at each launch: MAX_PAD = 1 gives every row one power-of-two block (benchmarks/
# bench_ops.py's ``fused-wholerow``, to compare the two layouts on a GPU).
MAX_PAD = 1 / 16
MIN_TILE_D = 16  # narrowest tile: one 16-byte vector of 16-bit data per thread still fits a row
MAX_TILE_D = 2048  # widest tile: wider rows are walked in tiles even when a power of two
# Elements of one (BLOCK_M, BLOCK_D) tile of a row kernel: one 16-byte vector per thread and
# tensor (8 two-byte elements at 4 warps, 4 fp32 at 8 warps).
PASS_ELEMS = 1024


def padding(d, block_d) -> float:
    """Fraction of the lanes of ``cdiv(D, BLOCK_D)`` tiles of ``BLOCK_D`` that hold no column."""
    d, block_d = max(int(d), 1), int(block_d)
    return 1.0 - d / (triton.cdiv(d, block_d) * block_d)


def col_tiles(d) -> tuple[int, int]:
    """(BLOCK_D, NUM_TILES) covering D: the widest power-of-two tile (up to MAX_TILE_D, down
    to MIN_TILE_D) whose tiles leave at most MAX_PAD of their lanes empty. Plain ints: D is a
    model constant, and both are constexprs."""
    d = max(int(d), 1)
    block_d = min(triton.next_power_of_2(d), MAX_TILE_D)
    while block_d > MIN_TILE_D and padding(d, block_d) > MAX_PAD:
        block_d //= 2
    return block_d, triton.cdiv(d, block_d)


def row_tiles(n_rows, d, elem_size: int = 2, vec_bytes: int = 16) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_D, NUM_TILES, num_warps) of a kernel that takes BLOCK_M whole rows per
    program (or per step) and walks them in column tiles: BLOCK_M * BLOCK_D = PASS_ELEMS (fewer
    rows only when there are fewer), one ``vec_bytes`` vector per thread of each tensor and
    tile (16 bytes: 8 two-byte or 4 fp32 elements; num_warps = tile / (32 * that), 1 to 8;
    half that for rows not 16-byte aligned, and fewer rows where 8 warps would not do).

    PF-XL/2 bf16: 8 rows x 9 tiles of 128 at 4 warps (fp32: 8 warps); PF-B/2: 4 rows x 3 tiles
    of 256 at 4 warps.
    Under ``torch.compile`` with dynamic shapes ``n_rows`` may be symbolic: the block sizes
    are compile-time constants, so only a small row count is specialised (``int``), and D (a
    model constant) always is.
    """
    block_d, n_tiles = col_tiles(d)
    block_m = max(1, PASS_ELEMS // block_d)
    if n_rows < block_m:
        block_m = triton.next_power_of_2(max(int(n_rows), 1))
    vec = max(1, vec_bytes // int(elem_size))
    if int(d) % vec:  # rows not 16-byte aligned: element-wise accesses, each with its own address
        vec = max(1, vec // 2)
    block_m = max(1, min(block_m, 8 * 32 * vec // block_d))  # at most 8 warps of vec elements each
    num_warps = min(8, max(1, block_m * block_d // (32 * vec)))
    return block_m, block_d, n_tiles, num_warps


def elementwise_tiles(n_rows, d) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_D, NUM_TILES, num_warps) of an elementwise kernel (no row statistics)
    whose grid has a column-tile axis: tiles of ``col_tiles(D)``, as many rows as fill
    TILE_ELEMS (16 elements per thread at 8 warps; 8 at 16 warps for unaligned rows)."""
    block_d, n_tiles = col_tiles(d)
    block_m = max(1, TILE_ELEMS // block_d)
    if n_rows < block_m:
        block_m = triton.next_power_of_2(max(int(n_rows), 1))
    num_warps = min(16, max(1, (block_m * block_d) // (32 * elementwise_per_thread(d))))
    return block_m, block_d, n_tiles, num_warps


def elementwise_per_thread(d) -> int:
    """Elements per thread of an elementwise tile: 16, or 8 when rows are not 16-byte aligned
    (element-wise accesses, each with its own 64-bit address)."""
    return 16 if int(d) % 8 == 0 else 8


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any row strides but need unit stride along D (chunk views already have it).

    A gradient that arrives expanded (stride 0 everywhere, from ``.sum().backward()``) is
    the common case this copies.
    """
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def empty_rows(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Contiguous output: the fake impls build the same, so compiled strides match eager."""
    return torch.empty(shape, dtype=dtype, device=device)


def mod_row_stride(t: torch.Tensor, indexed: bool) -> int:
    """A modulation's row stride for the kernels: a per-sample (B, 1, D) one is read at row 0
    by every token (stride 0); a table (indexed) keeps its real stride even with K = 1."""
    return t.stride(1) if indexed or t.shape[1] != 1 else 0


def index_args(index, like: torch.Tensor):
    """(pointer, stride_b, stride_n) of ``index`` (B, N); without one, any pointer (never read)."""
    if index is None:
        return like, 0, 0
    return index, index.stride(0), index.stride(1)


def per_sample(t: torch.Tensor, n: int, indexed: bool) -> bool:
    """A (B, 1, D) modulation read by N > 1 tokens: its grad is a sum (constexpr: a plain bool)."""
    return bool(not indexed and t.shape[1] == 1 and n != 1)


def needs_grad(*tensors) -> bool:
    """Whether autograd will ask for this op's backward: then the forward stores the row
    statistics for it (the ``*_with_stats`` ops)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


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


MAX_TABLE_K = 8  # indexed tables with up to this many rows have their grads summed by a kernel
TABLE_BLOCK_D = 128  # widest column tile there (K fp32 accumulator rows per table in registers)


def table_tiles(n, d, elems_per_row: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, D tiles) of a table-grad kernel: ``col_tiles``' tile (no lanes wasted
    at the PF widths) at most TABLE_BLOCK_D wide, and TILE_ELEMS / elems_per_row elements a
    step. Plain ints: D is a model constant."""
    block_d = min(col_tiles(d)[0], TABLE_BLOCK_D)
    block_m = max(1, min(TILE_ELEMS // block_d // elems_per_row, triton.next_power_of_2(max(int(n), 1))))
    return block_m, block_d, triton.cdiv(d, block_d)


def table_sum(parts: torch.Tensor, k_rows: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K, D) table grad from (B, P, TABLE_K, D) fp32 program partials: the P added in order
    (deterministic). Rows sliced before the sum, so the result is contiguous as the fake impls
    say (a slice after it would keep the padded row stride TABLE_K * D)."""
    return parts[:, :, :k_rows].sum(1).to(dtype)


def scatter_rows(rows: torch.Tensor, index: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum per-token grads (B, N, D) into a (B, K, D) table by index (B, N), in fp32 (a table
    wider than MAX_TABLE_K: atomics on a GPU)."""
    bsz, n, d = rows.shape
    table = torch.zeros((bsz, k, d), dtype=torch.float32, device=rows.device)
    table.scatter_add_(1, index[:, :, None].expand(bsz, n, d), rows.to(torch.float32))
    return table.to(dtype)
