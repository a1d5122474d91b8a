"""Shared host-side helpers for the Triton ops: availability flags, launch counter, block sizes.

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

# ``torch.library.triton_op`` / ``wrap_triton`` arrived in torch 2.6; older torch takes the
# plain ``autograd.Function`` route in each op file (eager only, no compile tracing). Each
# op's schema is inferred from its function's annotations: torch 2.11's ``triton_op`` ignores
# a ``schema=`` string and refuses an unannotated function.
HAS_TRITON_OP: bool = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")

# Kernel name -> number of launches from the host launchers. Tests read it to prove the
# Triton path ran; it counts eager launches (a compiled graph launches without the host code).
LAUNCHES: collections.Counter = collections.Counter()

# Elements per program tile. Large enough that a tile saturates a SM's load units on a GPU,
# small enough for the registers of the backward (about five fp32 values per element).
TILE_ELEMS = 4096


def wrap(kernel):
    """``wrap_triton(kernel)`` where available (traceable launch), else the kernel itself.

    Triton before 3.7 turns ``@triton.jit`` into an ``InterpretedFunction`` under
    ``TRITON_INTERPRET=1``, which ``wrap_triton`` refuses; it is launched directly (eager, as
    every interpreter launch is: compile cannot run interpreted kernels on fake tensors).
    """
    if HAS_TRITON_OP and isinstance(kernel, (JITFunction, Autotuner)):
        return torch.library.wrap_triton(kernel)
    return kernel


def count(name: str) -> None:
    LAUNCHES[name] += 1


def row_blocks(n_rows, d) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for a (rows, D) tile: D padded to a power of two and
    masked, as many rows as fit in ``TILE_ELEMS`` (fewer only when there are fewer rows).

    Under ``torch.compile`` with dynamic shapes ``n_rows`` may be symbolic: the block sizes
    are compile-time constants, so only a small row count is specialised (``int``), and D
    (a model constant) always is.
    """
    block_d = triton.next_power_of_2(int(d))
    block_m = max(1, TILE_ELEMS // block_d)
    if n_rows < block_m:
        block_m = triton.next_power_of_2(max(int(n_rows), 1))
    num_warps = min(16, max(4, (block_m * block_d) // 512))
    return block_m, block_d, num_warps


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any row strides but need unit stride along D (chunk views already have it).

    A gradient that arrives expanded (stride 0 everywhere, from ``.sum().backward()``) is
    the common case this copies.
    """
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def empty_rows(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Contiguous output: the fake impls build the same, so compiled strides match eager."""
    return torch.empty(shape, dtype=dtype, device=device)
