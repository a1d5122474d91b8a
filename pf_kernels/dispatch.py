"""Public entry points: check arguments, then route to the Triton kernels or the torch reference.

Backend (``PF_KERNELS_BACKEND`` at import, or ``set_backend`` later):
  ``auto``    Triton for CUDA tensors, the torch reference for everything else (default);
  ``triton``  always Triton; CPU tensors then need the Triton interpreter, i.e.
              ``TRITON_INTERPRET=1`` set before ``pf_kernels`` is imported (tests do this);
  ``torch``   always the reference in ``pf_kernels.reference``.
float64 inputs always take the reference (the kernels compute in fp32).

The routing reads only a module global and tensor devices/dtypes, so ``torch.compile``
traces it without graph breaks (and guards on the backend value).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from pf_kernels.reference import (
    ada_rms_norm_indexed_ref,
    ada_rms_norm_ref,
    adaln_modulate_indexed_ref,
    adaln_modulate_ref,
    gated_residual_indexed_ref,
    gated_residual_modulate_indexed_ref,
    gated_residual_modulate_ref,
    gated_residual_ref,
    norm_modulate_dtype,
    norm_modulate_ref,
    patch_euler_ref,
    residual_norm_modulate_ref,
    residual_ref,
    sandwich_residual_norm_modulate_ref,
    sandwich_residual_ref,
    timestep_embedding_ref,
)

try:  # Triton may be missing (CPU-only installs); the reference path then serves everything.
    from pf_kernels.ops import _utils as _triton_utils
    from pf_kernels.ops.ada_rms_norm import ada_rms_norm_triton
    from pf_kernels.ops.adaln_modulate import adaln_modulate_triton
    from pf_kernels.ops.gated_residual import gated_residual_triton
    from pf_kernels.ops.gated_residual_modulate import gated_residual_modulate_triton
    from pf_kernels.ops.modulate_options import norm_modulate_triton, residual_norm_modulate_triton
    from pf_kernels.ops.patch_euler import patch_euler_triton
    from pf_kernels.ops.rms_sandwich import sandwich_residual_norm_modulate_triton, sandwich_residual_triton
    from pf_kernels.ops.timestep_embedding import timestep_embedding_triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    _triton_utils = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def _validated(name: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"pf_kernels backend must be one of {BACKENDS}, got {name!r} (PF_KERNELS_BACKEND or set_backend)")
    return name


_backend: str = _validated(os.environ.get("PF_KERNELS_BACKEND", "auto") or "auto")


def set_backend(name: str) -> None:
    """Choose ``"auto"``, ``"triton"`` or ``"torch"`` for every later call."""
    global _backend
    _backend = _validated(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """``set_backend(name)`` for a ``with`` block, the previous backend restored after it."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreter_active() -> bool:
    """True when our kernels were built by the Triton interpreter (they run on CPU tensors)."""
    return HAS_TRITON and _triton_utils.INTERPRETED


def _use_triton(*tensors: torch.Tensor | None) -> bool:
    ts = [t for t in tensors if t is not None]
    if _backend == "torch" or any(t.dtype == torch.float64 for t in ts):
        return False
    on_cuda = all(t.is_cuda for t in ts)
    if _backend == "auto":
        return HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError("pf_kernels backend 'triton' was requested but triton is not importable")
    if not on_cuda and not _triton_utils.INTERPRETED:
        raise RuntimeError(
            "pf_kernels backend 'triton' got CPU tensors, but the Triton kernels were compiled "
            "for a GPU. Set TRITON_INTERPRET=1 before importing pf_kernels to run them in the "
            "Triton interpreter, or use set_backend('auto') / PF_KERNELS_BACKEND=auto."
        )
    return True


# The row ops launch a (programs per sample, B, ...) grid: CUDA takes at most 65535 on that axis.
MAX_GRID_BATCH = 65535
GRID_LIMITED = ("cuda",)  # device types with that limit (the interpreter has none)


def _rows_use_triton(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """``_use_triton`` for the row ops of x (B, N, D): a batch over ``MAX_GRID_BATCH`` takes the
    torch path under ``auto`` and is refused with a clear error under ``triton``."""
    if not _use_triton(x, *others):
        return False
    if x.shape[0] <= MAX_GRID_BATCH or x.device.type not in GRID_LIMITED:
        return True
    if _backend == "auto":
        return False
    raise ValueError(f"pf_kernels backend 'triton': batch B={x.shape[0]} is over {MAX_GRID_BATCH}, the most the "
                     f"row kernels' CUDA grid takes; split the batch or use set_backend('auto')")


#################################################################################
#                               Argument checks                                 #
#################################################################################


def _same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Every tensor argument on one device (a kernel launched for one would read the others'
    memory as its own)."""
    named = {k: t for k, t in tensors.items() if t is not None}
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in named.items())
        raise ValueError(f"{op}: the tensors must be on one device, got {where}")


def _launch_on(x: torch.Tensor):
    """Run the kernel launch with x's device current: Triton launches on the current device
    and stream, so a model on cuda:1 while cuda:0 is current would otherwise run on cuda:0.
    (Compiled graphs set the device themselves.)"""
    if x.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _check_rows(op: str, x: torch.Tensor, **mods: torch.Tensor) -> None:
    """x (B, N, D); each modulation (B, N, D) or (B, 1, D)."""
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D), got shape {tuple(x.shape)}")
    b, n, d = x.shape
    for name, t in mods.items():
        if t.dim() != 3 or t.shape[0] != b or t.shape[2] != d or t.shape[1] not in (1, n):
            raise ValueError(
                f"{op}: {name} must be ({b}, {n}, {d}) or ({b}, 1, {d}) to match x, got {tuple(t.shape)}"
            )


def _check_indexed(op: str, x: torch.Tensor, index: torch.Tensor, **tables: torch.Tensor) -> None:
    """x (B, N, D); tables (B, K, D); index (B, N) integer."""
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, N, D), got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if index.shape != (b, n) or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: index must be an int64 or int32 tensor of shape ({b}, {n}), got {index.dtype} {tuple(index.shape)}")
    ks = {t.shape[1] if t.dim() == 3 else -1 for t in tables.values()}
    for name, t in tables.items():
        if t.dim() != 3 or t.shape[0] != b or t.shape[2] != d:
            raise ValueError(f"{op}: {name} must be a ({b}, K, {d}) table, got {tuple(t.shape)}")
    if len(ks) != 1:
        raise ValueError(f"{op}: the tables must have the same K, got {sorted(ks)}")
    # The kernels do not bound-check index (that would cost a device sync per call). On the
    # CPU the check is cheap and an out-of-range row would read outside the table.
    if index.device.type == "cpu" and index.numel() and not torch.compiler.is_compiling():
        k = ks.pop()
        if int(index.min()) < 0 or int(index.max()) >= k:
            raise ValueError(f"{op}: index values must lie in [0, {k}), got [{int(index.min())}, {int(index.max())}]")


def _check_data(op: str, eps: float | None = None, eps_name: str = "eps", **tensors: torch.Tensor | None) -> None:
    """Floating-point data and, for a norm, a finite ``eps >= 0``: checked here on the host, as a
    kernel would compute with an integer tensor's bits or a negative eps (a NaN row) silently."""
    _check_floating(op, **{k: t for k, t in tensors.items() if t is not None})
    if eps is not None:
        try:
            ok = not isinstance(eps, (bool, str)) and 0 <= float(eps) < math.inf  # False for NaN
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{op}: {eps_name} must be a finite number >= 0, got {eps!r}")


def _check_floating(op: str, **tensors: torch.Tensor) -> None:
    """Floating-point data (an integer x would be normalised in its own dtype by eager code,
    and read as floats by a kernel)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


#################################################################################
#                                 Public ops                                    #
#################################################################################


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift``; x (B, N, D), shift/scale (B, N, D) or (B, 1, D)."""
    _check_rows("adaln_modulate", x, shift=shift, scale=scale)
    _same_device("adaln_modulate", x=x, shift=shift, scale=scale)
    _check_data("adaln_modulate", eps, x=x, shift=shift, scale=scale)
    if _rows_use_triton(x, shift, scale):
        with _launch_on(x):
            return adaln_modulate_triton(x, shift, scale, None, float(eps))
    return adaln_modulate_ref(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``; x, y (B, N, D), gate (B, N, D) or (B, 1, D)."""
    _check_rows("gated_residual", x, gate=gate, y=y)
    if y.shape != x.shape:
        raise ValueError(f"gated_residual: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    _same_device("gated_residual", x=x, gate=gate, y=y)
    _check_data("gated_residual", x=x, gate=gate, y=y)
    if _rows_use_triton(x, gate, y):
        with _launch_on(x):
            return gated_residual_triton(x, gate, y, None)
    return gated_residual_ref(x, gate, y)


def adaln_modulate_indexed(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LN(x[b, n]) * (1 + scale[b, index[b, n]]) + shift[b, index[b, n]]``.

    shift, scale: (B, K, D) tables (strided ``chunk`` views fine); index (B, N) in [0, K)
    (checked on the CPU only; on a GPU an index out of range is undefined behaviour).
    Differentiable: the table grads are the per-token grads summed by index.
    """
    _same_device("adaln_modulate_indexed", x=x, shift=shift, scale=scale, index=index)
    _check_indexed("adaln_modulate_indexed", x, index, shift=shift, scale=scale)
    _check_data("adaln_modulate_indexed", eps, x=x, shift=shift, scale=scale)
    index = index.to(torch.int64)
    if _rows_use_triton(x, shift, scale, index):
        with _launch_on(x):
            return adaln_modulate_triton(x, shift, scale, index, float(eps))
    return adaln_modulate_indexed_ref(x, shift, scale, index, eps)


def gated_residual_indexed(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, n] + gate[b, index[b, n]] * y[b, n]``; gate a (B, K, D) table, index (B, N)."""
    _same_device("gated_residual_indexed", x=x, gate=gate, y=y, index=index)
    _check_indexed("gated_residual_indexed", x, index, gate=gate)
    _check_data("gated_residual_indexed", x=x, gate=gate, y=y)
    if y.shape != x.shape:
        raise ValueError(f"gated_residual_indexed: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    index = index.to(torch.int64)
    if _rows_use_triton(x, gate, y, index):
        with _launch_on(x):
            return gated_residual_triton(x, gate, y, index)
    return gated_residual_indexed_ref(x, gate, y, index)


def gated_residual_modulate(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_new = x + gate * y``, ``h = LN(x_new) * (1 + scale) + shift``; returns (x_new, h).

    One pass for ``gated_residual`` then ``adaln_modulate`` (a sub-block's residual update and
    the next sub-block's input). x, y (B, N, D); gate, shift, scale each (B, N, D) or (B, 1, D)
    (strided ``chunk`` views fine). Differentiable in all five, through both outputs.
    """
    _check_rows("gated_residual_modulate", x, gate=gate, shift=shift, scale=scale)
    if y.shape != x.shape:
        raise ValueError(f"gated_residual_modulate: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    _same_device("gated_residual_modulate", x=x, gate=gate, y=y, shift=shift, scale=scale)
    _check_data("gated_residual_modulate", eps, x=x, gate=gate, y=y, shift=shift, scale=scale)
    if _rows_use_triton(x, gate, y, shift, scale):
        with _launch_on(x):
            return gated_residual_modulate_triton(x, gate, y, shift, scale, None, float(eps))
    return gated_residual_modulate_ref(x, gate, y, shift, scale, eps)


def gated_residual_modulate_indexed(
    x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
    index: torch.Tensor, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_residual_modulate`` with (B, K, D) gate/shift/scale tables read through index (B, N)."""
    _same_device("gated_residual_modulate_indexed", x=x, gate=gate, y=y, shift=shift, scale=scale, index=index)
    _check_indexed("gated_residual_modulate_indexed", x, index, gate=gate, shift=shift, scale=scale)
    _check_data("gated_residual_modulate_indexed", eps, x=x, gate=gate, y=y, shift=shift, scale=scale)
    if y.shape != x.shape:
        raise ValueError(
            f"gated_residual_modulate_indexed: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    index = index.to(torch.int64)
    if _rows_use_triton(x, gate, y, shift, scale, index):
        with _launch_on(x):
            return gated_residual_modulate_triton(x, gate, y, shift, scale, index, float(eps))
    return gated_residual_modulate_indexed_ref(x, gate, y, shift, scale, index, eps)


def ada_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(mean(x^2, -1) + eps) * (1 + scale)``; x (B, N, D), scale (B, N, D) or (B, 1, D).

    Out in x's dtype, or scale's when that is wider (eager type promotion).
    """
    _check_rows("ada_rms_norm", x, scale=scale)
    _check_data("ada_rms_norm", eps, x=x, scale=scale)
    _same_device("ada_rms_norm", x=x, scale=scale)
    if _rows_use_triton(x, scale):
        with _launch_on(x):
            return ada_rms_norm_triton(x, scale, None, float(eps))
    return ada_rms_norm_ref(x, scale, eps)


def ada_rms_norm_indexed(
    x: torch.Tensor, scale_table: torch.Tensor, index: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``ada_rms_norm(x, scale)`` with ``scale[b, n] = scale_table[b, index[b, n]]``.

    scale_table: (B, K, D) (strided ``chunk`` views fine); index (B, N) in [0, K) (checked on
    the CPU only, as ``adaln_modulate_indexed``). The table's grad is the per-token grads
    summed by index (deterministic for K <= 8).
    """
    _same_device("ada_rms_norm_indexed", x=x, scale_table=scale_table, index=index)
    _check_indexed("ada_rms_norm_indexed", x, index, scale_table=scale_table)
    _check_data("ada_rms_norm_indexed", eps, x=x, scale_table=scale_table)
    index = index.to(torch.int64)
    if _rows_use_triton(x, scale_table, index):
        with _launch_on(x):
            return ada_rms_norm_triton(x, scale_table, index, float(eps))
    return ada_rms_norm_indexed_ref(x, scale_table, index, eps)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000) -> torch.Tensor:
    """t any shape -> t.shape + (dim,) fp32 (float64 for float64 t): ``[cos(t f), sin(t f)]``."""
    if _use_triton(t):
        with _launch_on(t):
            return timestep_embedding_triton(t, int(dim), float(max_period))
    return timestep_embedding_ref(t, dim, max_period)


def patch_euler(
    x: torch.Tensor,
    v: torch.Tensor,
    dt: torch.Tensor,
    patch_size: int,
    *,
    v_other: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + dt_patch * (mask ? v : v_other)``; x, v, v_other (B, C, H, W); dt, mask (B, N).

    ``out=x`` updates x in place. The Triton kernel is forward only: a call that needs grads
    takes the (differentiable) torch reference.
    """
    if x.dim() != 4:
        raise ValueError(f"patch_euler: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    p = int(patch_size)
    if p <= 0 or h % p or w % p:
        raise ValueError(f"patch_euler: H, W = {h}, {w} must be divisible by patch_size {patch_size}")
    n = (h // p) * (w // p)
    for name, t in (("v", v), ("v_other", v_other), ("out", out)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"patch_euler: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    for name, t in (("dt", dt), ("mask", mask)):
        if t is not None and t.shape != (b, n):
            raise ValueError(f"patch_euler: {name} must have shape ({b}, {n}) (one per patch), got {tuple(t.shape)}")
    _same_device("patch_euler", x=x, v=v, dt=dt, v_other=v_other, mask=mask, out=out)
    _check_data("patch_euler", x=x, v=v, dt=dt, v_other=v_other, out=out)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, v, dt, v_other)
    )
    if not needs_grad and _use_triton(x, v, dt, v_other, mask, out):
        with _launch_on(x):
            return patch_euler_triton(x, v, dt, p, v_other=v_other, mask=mask, out=out)
    return patch_euler_ref(x, v, dt, p, v_other=v_other, mask=mask, out=out)


#################################################################################
#        General forms: optional shift/gate, affine norms, RMS + shift, dtype     #
#################################################################################


def _check_vector(op: str, d: int, **vectors: torch.Tensor | None) -> None:
    for name, t in vectors.items():
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"{op}: {name} must be a ({d},) tensor (the norm's affine parameter), "
                             f"got {tuple(t.shape)}")


def _fold_affine(x, weight, bias, shift, scale):
    """(shift', scale') with ``norm(x) * (1 + scale') + shift' == (norm(x) * weight + bias) * (1 + scale)
    + shift``: scale' = weight * (1 + scale) - 1, shift' = bias * (1 + scale) + shift, in fp32.

    The kernels then read one modulation pair whatever the norm's affine parameters. For a
    per-sample modulation (B, 1, D) this costs O(B * D), nothing beside the (B, N, D) rows; the
    grads of weight and bias flow through these few torch ops. Without a scale, scale' is
    ``weight - 1`` broadcast to (B, 1, D) (stride 0, no copy). A half-precision scale or shift
    is read in fp32 here, as the kernels would."""
    bsz, d = x.shape[0], x.shape[-1]
    if weight is None and bias is None:
        if scale is None:  # a plain norm (+ shift): scale' = 0
            scale = x.new_zeros((1, 1, d), dtype=torch.float32).expand(bsz, 1, d)
        return shift, scale
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    one_plus = None if scale is None else 1.0 + scale.to(acc)  # (B, N|1, D)
    w = None if weight is None else weight.to(acc)
    if w is None:
        new_scale = scale if scale is not None else x.new_zeros((1, 1, d), dtype=acc).expand(bsz, 1, d)
    elif one_plus is None:
        new_scale = (w - 1.0).expand(bsz, 1, d)
    else:
        new_scale = w * one_plus - 1.0
    if bias is not None:
        b = bias.to(acc)
        b = b.expand(bsz, 1, d) if one_plus is None else b * one_plus
        shift = b if shift is None else b + shift.to(acc)
    return shift, new_scale


def _check_general(op, x, **mods):
    _check_rows(op, x, **{k: t for k, t in mods.items() if t is not None})
    _check_floating(op, x=x, **{k: t for k, t in mods.items() if t is not None})


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, *,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, rms: bool = False, eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(norm(x) * weight + bias) * (1 + scale) + shift`` in one pass over x.

    norm: LayerNorm, or RMSNorm ``x * rsqrt(mean(x^2) + eps)`` with ``rms`` (a shift is allowed:
    LTX-Video's). x (B, N, D); shift, scale (B, N, D) or (B, 1, D) (strided views fine), each
    optional; weight, bias (D,) an affine norm's parameters, optional. Out in ``out_dtype``, by
    default the promoted dtype of x and the tensors given (eager's); statistics in fp32.
    """
    _check_general("norm_modulate", x, shift=shift, scale=scale)
    _check_data("norm_modulate", eps, weight=weight, bias=bias)
    _check_vector("norm_modulate", x.shape[-1], weight=weight, bias=bias)
    _same_device("norm_modulate", x=x, shift=shift, scale=scale, weight=weight, bias=bias)
    out = out_dtype or norm_modulate_dtype(x, shift, scale, weight, bias)
    if _rows_use_triton(x, shift, scale, weight, bias) and out != torch.float64:
        fshift, fscale = _fold_affine(x, weight, bias, shift, scale)
        with _launch_on(x):
            return norm_modulate_triton(x, fshift, fscale, bool(rms), float(eps), out)
    return norm_modulate_ref(x, shift, scale, weight=weight, bias=bias, rms=rms, eps=eps, out_dtype=out)


def residual(x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, *,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x + gate * y``, or ``x + y`` without gate, computed in fp32 and returned in ``out_dtype``
    (default: eager's promoted dtype). With a gate this is ``gated_residual``'s kernel writing
    ``out_dtype`` directly; without one a single torch add (already one pass)."""
    _check_data("residual", x=x, gate=gate, y=y)
    if gate is None:
        if y.shape != x.shape:
            raise ValueError(f"residual: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
        if out_dtype is None or out_dtype == torch.promote_types(x.dtype, y.dtype):
            return x + y
        return residual_ref(x, None, y, out_dtype)
    if out_dtype is None:
        return gated_residual(x, gate, y)
    _check_rows("residual", x, gate=gate, y=y)
    if y.shape != x.shape:
        raise ValueError(f"residual: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    _same_device("residual", x=x, gate=gate, y=y)
    if _rows_use_triton(x, gate, y) and out_dtype != torch.float64:
        with _launch_on(x):
            return gated_residual_triton(x, gate, y, None, out_dtype)
    return residual_ref(x, gate, y, out_dtype)


def residual_norm_modulate(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None, *, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    rms: bool = False, eps: float = 1e-6, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_new = x + gate * y`` (``x + y`` without gate), then ``h = norm_modulate(x_new, ...)``
    in one pass; returns (x_new, h). Both in ``out_dtype`` when given (Wan's bf16 stream with fp32
    modulations), else x_new in eager's promoted dtype and h in x_new's. The norm reads x_new as
    stored (rounded to its dtype), as the unfused code does.
    """
    _check_general("residual_norm_modulate", x, gate=gate, y=y, shift=shift, scale=scale)
    _check_data("residual_norm_modulate", eps, weight=weight, bias=bias)
    if y.shape != x.shape:
        raise ValueError(f"residual_norm_modulate: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    _check_vector("residual_norm_modulate", x.shape[-1], weight=weight, bias=bias)
    _same_device("residual_norm_modulate", x=x, gate=gate, y=y, shift=shift, scale=scale, weight=weight, bias=bias)
    if out_dtype is None:
        out_dtype = norm_modulate_dtype(x, gate, y)  # eager's dtype of x + gate * y (x + y)
    if _rows_use_triton(x, gate, y, shift, scale, weight, bias) and out_dtype != torch.float64:
        fshift, fscale = _fold_affine(x, weight, bias, shift, scale)
        with _launch_on(x):
            return residual_norm_modulate_triton(x, gate, y, fshift, fscale, bool(rms), float(eps), out_dtype)
    return residual_norm_modulate_ref(x, gate, y, shift, scale, weight=weight, bias=bias, rms=rms, eps=eps,
                                      out_dtype=out_dtype)



#################################################################################
#      The RMSNorm sandwich (Lumina2, Mochi): x + tanh(g) * RMS_w(y), next norm   #
#################################################################################


def _sandwich_gate(x, gate, y_weight, tanh_gate: bool):
    """The gate the kernels read, ``tanh(gate) * y_weight`` in fp32 (either factor optional; None
    for neither): (B, 1, D) for a per-sample gate, O(B * D); y's norm weight folded in, so the
    kernel normalises y alone. Its grads flow back through these few torch ops."""
    if gate is not None:
        gate = gate.float()
        gate = torch.tanh(gate) if tanh_gate else gate
    if y_weight is None:
        return gate
    w = y_weight.float()
    return w.expand(x.shape[0], 1, -1) if gate is None else gate * w  # (B, 1, D), stride 0 without a gate


def _check_sandwich(op, x, gate, y, y_weight, y_eps, **norm):
    _check_general(op, x, gate=gate, y=y, **{k: norm[k] for k in ("scale",) if k in norm})
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    _check_data(op, y_eps, "y_eps", y_weight=y_weight)
    if "eps" in norm:
        _check_data(op, norm["eps"], weight=norm["weight"])
    _check_vector(op, x.shape[-1], y_weight=y_weight, weight=norm.get("weight"))
    _same_device(op, x=x, gate=gate, y=y, y_weight=y_weight, scale=norm.get("scale"), weight=norm.get("weight"))


def sandwich_residual(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, *, y_weight: torch.Tensor | None = None,
    y_eps: float = 1e-6, tanh_gate: bool = True, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x + tanh(gate) * RMS_w(y)`` in one pass over the rows: the sub-block output y RMS-normalised
    (``y * rsqrt(mean(y^2) + y_eps) * y_weight``, weight optional) before its gated residual update
    (Lumina2's and Mochi's blocks; ``tanh_gate`` False: the gate as is; gate None: ``x + RMS_w(y)``).
    x, y (B, N, D); gate (B, N, D) or (B, 1, D). Computed in fp32; out in ``out_dtype``, by
    default the promoted dtype of x, gate, y and y_weight."""
    _check_sandwich("sandwich_residual", x, gate, y, y_weight, y_eps)
    out = out_dtype or norm_modulate_dtype(x, gate, y, y_weight)
    if _rows_use_triton(x, gate, y, y_weight) and out != torch.float64:
        with _launch_on(x):
            return sandwich_residual_triton(x, _sandwich_gate(x, gate, y_weight, tanh_gate), y, float(y_eps), out)
    return sandwich_residual_ref(x, gate, y, y_weight=y_weight, y_eps=y_eps, tanh_gate=tanh_gate, out_dtype=out)


def sandwich_residual_norm_modulate(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor, scale: torch.Tensor | None = None, *,
    y_weight: torch.Tensor | None = None, weight: torch.Tensor | None = None, y_eps: float = 1e-6,
    eps: float = 1e-6, tanh_gate: bool = True, out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_new = sandwich_residual(x, gate, y, ...)`` and the next sub-block's input
    ``h = RMS_weight(x_new) * (1 + scale)`` in one pass; returns (x_new, h). scale (B, N, D) or
    (B, 1, D) and weight (D,) optional. Both in ``out_dtype``, by default x_new's as
    ``sandwich_residual`` and h in x_new's (the norm reads x_new as stored, as eager code does)."""
    _check_sandwich("sandwich_residual_norm_modulate", x, gate, y, y_weight, y_eps, scale=scale, weight=weight,
                    eps=eps)
    out = out_dtype or norm_modulate_dtype(x, gate, y, y_weight)
    if _rows_use_triton(x, gate, y, y_weight, scale, weight) and out != torch.float64:
        _, fscale = _fold_affine(x, weight, None, None, scale)
        with _launch_on(x):
            return sandwich_residual_norm_modulate_triton(x, _sandwich_gate(x, gate, y_weight, tanh_gate), y, fscale,
                                                          float(y_eps), float(eps), out)
    return sandwich_residual_norm_modulate_ref(x, gate, y, scale, y_weight=y_weight, weight=weight, y_eps=y_eps,
                                               eps=eps, tanh_gate=tanh_gate, out_dtype=out)
