"""Masked per-patch Euler step: ``out = x + dt_patch * (mask ? v : v_other)``.

x, v, v_other (B, C, H, W); dt, mask (B, N) per patch of a ``p x p`` grid in raster order,
broadcast over the patch's pixels and all channels. A masked-out pixel with no ``v_other``
keeps its value. The samplers of SPEC.md section 6 (dual loop, look-ahead) do this every
step; fused it is one pass, and with a mask the velocity of the side not taken is not read.
Forward only (the samplers run without grad; the dispatcher sends grad-requiring calls to
the torch reference). ``out`` may be ``x`` itself: each element is read, then written, by
the same program, so the in-place update is safe. x, v and v_other are read through their
strides, so a velocity that is a channel slice of the model's output is not copied.

File layout: the kernel, the host launcher, op registration.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pf_kernels.ops._utils import count, wrap
from pf_kernels.ops.registry import register

TILE_ELEMS = 2048  # elements per program: rows of the (B*C*H, W) view times a column block


@triton.jit
def _patch_euler_kernel(
    X, sxb, sxc, sxh, sxw,  # (B, C, H, W) any strides (unused when IN_PLACE: x is OUT)
    V, svb, svc, svh, svw,  # (B, C, H, W) any strides, e.g. a channel slice of the model output
    V_OTHER, sob, soc, soh, sow,  # (B, C, H, W) any strides (HAS_OTHER only)
    OUT,  # (B, C, H, W) contiguous
    DT, stride_tb, stride_tn,  # (B, N) per-patch step
    MASK, stride_mb, stride_mn,  # (B, N) uint8 view of the bool mask (HAS_MASK only)
    ROWS, C, H, W, GRID_W,
    P: tl.constexpr,
    IN_PLACE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_OTHER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # Grid (cdiv(B*C*H, BLOCK_R), cdiv(W, BLOCK_W)): a tile of image rows r = (b*C + c)*H + h
    # by a block of columns. The b, c, h split is per row (BLOCK_R divisions, not one per
    # element), and P is a compile-time constant, so w // P is a shift: the element loop is
    # plain loads, one multiply-add and a store.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)  # (BLOCK_W,)
    row_ok = rows < ROWS
    h = rows % H
    bc = rows // H
    c = bc % C
    b = (bc // C).to(tl.int64)
    h64, c64 = h.to(tl.int64), c.to(tl.int64)
    ok = row_ok[:, None] & (cols < W)[None, :]  # (BLOCK_R, BLOCK_W)
    n = ((h // P) * GRID_W)[:, None] + (cols // P)[None, :]  # patch of each pixel, raster order
    dt = tl.load(DT + b[:, None] * stride_tb + n * stride_tn, mask=ok, other=0.0).to(tl.float32)
    out_offs = (rows.to(tl.int64) * W)[:, None] + cols[None, :]
    if IN_PLACE:
        x = tl.load(OUT + out_offs, mask=ok, other=0.0)
    else:
        x = tl.load(X + (b * sxb + c64 * sxc + h64 * sxh)[:, None] + cols[None, :] * sxw, mask=ok, other=0.0)
    v_ptrs = V + (b * svb + c64 * svc + h64 * svh)[:, None] + cols[None, :] * svw
    if HAS_MASK:
        take_v = tl.load(MASK + b[:, None] * stride_mb + n * stride_mn, mask=ok, other=0) != 0
        # Read only the velocity each pixel takes: the other side's bytes never move.
        vel = tl.load(v_ptrs, mask=ok & take_v, other=0.0).to(tl.float32)
        if HAS_OTHER:
            o_ptrs = V_OTHER + (b * sob + c64 * soc + h64 * soh)[:, None] + cols[None, :] * sow
            vel += tl.load(o_ptrs, mask=ok & (~take_v), other=0.0).to(tl.float32)
    else:
        vel = tl.load(v_ptrs, mask=ok, other=0.0).to(tl.float32)
    out = x.to(tl.float32) + dt * vel
    tl.store(OUT + out_offs, out.to(OUT.dtype.element_ty), mask=ok)


def _tile(w: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_W): whole rows up to 128 columns, as many rows as fill TILE_ELEMS.
    Set by the width alone (a model constant), so a compiled sampler is not specialised on
    the batch size."""
    block_w = min(triton.next_power_of_2(int(w)), 128)
    return max(1, TILE_ELEMS // block_w), block_w


def patch_euler_launch(out: Tensor, x: Optional[Tensor], v: Tensor, dt: Tensor, patch_size: int,
                       v_other: Optional[Tensor], mask: Optional[Tensor]) -> None:
    """Writes the step into ``out`` (contiguous, x's shape); ``x`` None means out holds x.
    x, v and v_other are read through their strides (no copies)."""
    bsz, c, h, w = out.shape
    if out.numel() == 0:
        return
    rows = bsz * c * h
    x_arg = out if x is None else x
    other = v if v_other is None else v_other
    mask_arg = dt if mask is None else mask.view(torch.uint8)  # bool -> bytes, no copy
    block_r, block_w = _tile(w)
    count("patch_euler")
    wrap(_patch_euler_kernel)[(triton.cdiv(rows, block_r), triton.cdiv(w, block_w))](
        x_arg, *x_arg.stride(),
        v, *v.stride(),
        other, *other.stride(),
        out,
        dt, dt.stride(0), dt.stride(1),
        mask_arg, mask_arg.stride(0), mask_arg.stride(1),
        rows, c, h, w, w // patch_size,
        P=int(patch_size), IN_PLACE=x is None, HAS_MASK=mask is not None,
        HAS_OTHER=mask is not None and v_other is not None,
        BLOCK_R=block_r, BLOCK_W=block_w, num_warps=4,
    )  # fmt: skip


# One mutating op: ``out`` is written, and ``x = None`` is the in-place form (out holds x), so
# no two arguments alias (custom ops do not allow that).
register("patch_euler_", patch_euler_launch, lambda *args: None, mutates_args={"out"})


def patch_euler_triton(x, v, dt, patch_size: int, *, v_other=None, mask=None, out=None) -> torch.Tensor:
    """Host entry: allocates or checks ``out`` and launches; returns the updated tensor."""
    target = out
    if target is None or not target.is_contiguous() or target.dtype != x.dtype:
        target = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        x_arg = x
    else:
        x_arg = None if target is x else x
    torch.ops.pf_kernels.patch_euler_(target, x_arg, v, dt, patch_size, v_other, mask)
    if out is not None and target is not out:
        out.copy_(target)  # a strided or differently typed ``out``: one extra copy
        return out
    return target
