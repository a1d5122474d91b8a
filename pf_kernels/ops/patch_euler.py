"""Masked per-patch Euler step: ``out = x + dt_patch * (mask ? v : v_other)``.

x, v, v_other (B, C, H, W); dt, mask (B, N) per patch of a ``p x p`` grid in raster order,
broadcast over the patch's pixels and all channels. A masked-out pixel with no ``v_other``
keeps its value. The samplers of SPEC.md section 6 (dual loop, look-ahead) do this every
step; fused it is one pass, and with a mask the velocity of the side not taken is not read.
Forward only (the samplers run without grad; the dispatcher sends grad-requiring calls to
the torch reference). ``out`` may be ``x`` itself: each element is read, then written, by
the same program, so the in-place update is safe.

File layout: the kernel, the host launcher, op registration.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pf_kernels.ops._utils import HAS_TRITON_OP, count, wrap

BLOCK = 1024  # elements per program of the flattened (B, C, H, W) tensor


@triton.jit
def _patch_euler_kernel(
    X,  # (B, C, H, W) contiguous (read from OUT when IN_PLACE)
    V,  # (B, C, H, W) contiguous
    V_OTHER,  # (B, C, H, W) contiguous (HAS_OTHER only)
    OUT,  # (B, C, H, W) contiguous
    DT, stride_tb, stride_tn,  # (B, N) per-patch step
    MASK, stride_mb, stride_mn,  # (B, N) uint8 view of the bool mask (HAS_MASK only)
    TOTAL, C, H, W, GRID_W, P,
    IN_PLACE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_OTHER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) flat element
    ok = offs < TOTAL
    # flat = ((b * C + c) * H + h) * W + w; the patch is n = (h // P) * GRID_W + (w // P).
    w = offs % W
    h = (offs // W) % H
    b = offs // (W * H * C)
    n = (h // P) * GRID_W + (w // P)
    dt = tl.load(DT + b * stride_tb + n * stride_tn, mask=ok, other=0.0).to(tl.float32)
    if IN_PLACE:
        x = tl.load(OUT + offs, mask=ok, other=0.0)
    else:
        x = tl.load(X + offs, mask=ok, other=0.0)
    if HAS_MASK:
        take_v = tl.load(MASK + b * stride_mb + n * stride_mn, mask=ok, other=0) != 0
        # Read only the velocity each pixel takes: the other side's bytes never move.
        vel = tl.load(V + offs, mask=ok & take_v, other=0.0).to(tl.float32)
        if HAS_OTHER:
            vel += tl.load(V_OTHER + offs, mask=ok & (~take_v), other=0.0).to(tl.float32)
    else:
        vel = tl.load(V + offs, mask=ok, other=0.0).to(tl.float32)
    out = x.to(tl.float32) + dt * vel
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=ok)


def patch_euler_launch(out, x, v, dt, patch_size: int, v_other, mask) -> None:
    """Writes the step into ``out`` (contiguous, x's shape); ``x`` None means out holds x."""
    bsz, c, h, w = out.shape
    total = out.numel()
    if total == 0:
        return
    v = v.contiguous()
    x_arg = out if x is None else x.contiguous()
    other = v if v_other is None else v_other.contiguous()
    mask_arg = dt if mask is None else mask.view(torch.uint8)  # bool -> bytes, no copy
    count("patch_euler")
    wrap(_patch_euler_kernel)[(triton.cdiv(total, BLOCK),)](
        x_arg, v, other, out,
        dt, dt.stride(0), dt.stride(1),
        mask_arg, mask_arg.stride(0), mask_arg.stride(1),
        total, c, h, w, w // patch_size, patch_size,
        IN_PLACE=x is None, HAS_MASK=mask is not None, HAS_OTHER=mask is not None and v_other is not None,
        BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip


if HAS_TRITON_OP:

    # One mutating op: ``out`` is written, and ``x = None`` is the in-place form (out holds x),
    # so no two arguments alias (custom ops do not allow that).
    @torch.library.triton_op("pf_kernels::patch_euler_", mutates_args={"out"})
    def _patch_euler_op(
        out: Tensor,
        x: Optional[Tensor],
        v: Tensor,
        dt: Tensor,
        patch_size: int,
        v_other: Optional[Tensor],
        mask: Optional[Tensor],
    ) -> None:
        patch_euler_launch(out, x, v, dt, patch_size, v_other, mask)

    def _fake(out, x, v, dt, patch_size, v_other, mask):
        return None

    _patch_euler_op.register_fake(_fake)


def patch_euler_triton(x, v, dt, patch_size: int, *, v_other=None, mask=None, out=None) -> torch.Tensor:
    """Host entry: allocates or checks ``out`` and launches; returns the updated tensor."""
    target = out
    if target is None or not target.is_contiguous() or target.dtype != x.dtype:
        target = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        x_arg = x
    else:
        x_arg = None if target is x else x
    if HAS_TRITON_OP:
        torch.ops.pf_kernels.patch_euler_(target, x_arg, v, dt, patch_size, v_other, mask)
    else:
        patch_euler_launch(target, x_arg, v, dt, patch_size, v_other, mask)
    if out is not None and target is not out:
        out.copy_(target)  # a strided or differently typed ``out``: one extra copy
        return out
    return target
