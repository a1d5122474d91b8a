"""LTG timestep sampler from the compiled extension (SPEC.md sections 4 and 8).

``ltg_sample(B, N, seed=s, offset=o)`` draws SPEC's LTG matrix in one kernel, from
Philox4x32-10 keyed by ``seed`` with counter ``offset + b*N + i`` (``csrc/ltg.h`` has the
exact layout). The same arguments give the same bits on the CPU and on CUDA, and no global
RNG state is read or advanced: a training loop keeps ``seed`` and advances ``offset`` by
``B*N`` after each call to get fresh, non-overlapping samples.

The extension is ``pf_kernels._C``, built by ``pip install --no-build-isolation -e .``
(``setup.py``). When it is missing or does not load (installed without building, or built
against another PyTorch), the first call JIT-builds it with
``torch.utils.cpp_extension.load`` into PyTorch's extension cache (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``); later processes reuse that build.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import shutil
import threading
from pathlib import Path

import torch

__all__ = ["ltg_sample", "load_extension"]

# Compiler flags; keep in sync with setup.py. No FMA contraction on the host, and none on
# the device either (ltg.h uses __f*_rn intrinsics; --fmad=false is belt and braces), so
# the CPU and CUDA results are bit-identical. No errno / FP traps: lets GCC vectorise the
# branch-free row loop without changing any value.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
CUDA_ARCH_LIST = "8.0;9.0+PTX"  # sm_80 (A100), sm_90 (H100), and PTX that newer GPUs JIT-compile

_SOURCES = ["bindings.cpp", "ltg_cpu.cpp"]
_CUDA_SOURCES = ["ltg_cuda.cu"]
# Output dtypes: float32/float64 are computed natively; half precisions are drawn in float32
# and rounded.
_NATIVE_DTYPES = (torch.float32, torch.float64)
_CAST_DTYPES = (torch.float16, torch.bfloat16)
_DEVICE_TYPES = ("cpu", "cuda", "meta")

_ext = None  # the loaded extension module
_with_cuda = False  # whether it has the CUDA kernel
_load_lock = threading.Lock()


# ------------------------------------------------------------------------------- loading
def _csrc_dir() -> Path:
    """The C++ sources: shipped as pf_kernels/csrc in a wheel, ../csrc in a checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "ltg.h").is_file():
            return cand
    raise RuntimeError(
        f"pf_kernels: the compiled LTG extension is not built and its C++ sources were not "
        f"found (looked in {here / 'csrc'} and {here.parent / 'csrc'}); reinstall with "
        f"`pip install --no-build-isolation -e .`"
    )


def _jit_wants_cuda() -> bool:
    flag = os.environ.get("PF_BUILD_CUDA")
    if flag in ("0", "1"):
        return flag == "1"
    from torch.utils.cpp_extension import CUDA_HOME  # JIT build only: importing it looks for (and warns about) CUDA

    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def _jit_build():
    """Build the extension with torch.utils.cpp_extension.load (cached between runs)."""
    from torch.utils import cpp_extension  # JIT build only: importing it looks for (and warns about) CUDA

    src = _csrc_dir()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"pf_kernels: the compiled LTG extension is not built, and no C++ compiler "
            f"({compiler!r}) was found to build it now. Install g++ (or set CXX), or install "
            f"the package with `pip install --no-build-isolation -e .` where a compiler exists."
        )
    with_cuda = _jit_wants_cuda()
    sources = [str(src / s) for s in _SOURCES]
    cflags = list(CXX_FLAGS)
    cuda_flags = list(NVCC_FLAGS)
    if with_cuda:
        sources += [str(src / s) for s in _CUDA_SOURCES]
        cflags.append("-DPF_WITH_CUDA")
        cuda_flags.append("-DPF_WITH_CUDA")
    try:
        with _build_arch_list(with_cuda):
            return cpp_extension.load(
                name="pf_kernels_C",
                sources=sources,
                extra_cflags=cflags,
                extra_cuda_cflags=cuda_flags if with_cuda else None,
                with_cuda=with_cuda,
                verbose=os.environ.get("PF_VERBOSE_BUILD", "0") == "1",
            )
    except Exception as err:  # compiler errors arrive as RuntimeError/CalledProcessError
        raise RuntimeError(
            f"pf_kernels: JIT build of the LTG extension from {src} failed "
            f"(set PF_VERBOSE_BUILD=1 to see the compiler output): {err}"
        ) from err


@contextlib.contextmanager
def _build_arch_list(with_cuda: bool):
    """``TORCH_CUDA_ARCH_LIST`` for this build only (when the user has not set one): the
    user's process environment is left as it was."""
    if not with_cuda or "TORCH_CUDA_ARCH_LIST" in os.environ:
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCH_LIST
    try:
        yield
    finally:
        os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def _register_fake() -> None:
    # Shapes and dtypes for FakeTensor / torch.compile / the meta device.
    @torch.library.register_fake("pf_kernels::ltg_sample")
    def _ltg_sample_fake(batch, num_patches, loc, scale, std, seed, offset, dtype, device):
        return torch.empty((batch, num_patches), dtype=dtype, device=device)


def _set_loaded(module) -> None:
    global _ext, _with_cuda
    _register_fake()
    _with_cuda = bool(getattr(module, "with_cuda", False))
    _ext = module


def load_extension():
    """The extension module (``pf_kernels._C``, or the JIT build); loads it on first use."""
    if _ext is not None:
        return _ext
    with _load_lock:
        if _ext is None:
            _set_loaded(_jit_build())
    return _ext


def _try_prebuilt() -> None:
    try:
        from pf_kernels import _C  # built by setup.py
    except (ImportError, OSError):  # not built, or built against another torch
        return
    _set_loaded(_C)


_try_prebuilt()


# ------------------------------------------------------------------------------ checking
def _size(name: str, value) -> int:
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool):
        raise TypeError(f"ltg_sample: {name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"ltg_sample: {name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"ltg_sample: {name} must be >= 0, got {value}")
    return value


def _finite(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"ltg_sample: {name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"ltg_sample: {name} must be finite, got {value}")
    return value


def _uint64_as_int64(name: str, value, *, allow_negative: bool) -> int:
    """A Python int in [0, 2^64) (or [-2^63, 2^64) for seeds) as the int64 the op takes."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"ltg_sample: {name} must be an int, got {type(value).__name__}") from None
    low = -(1 << 63) if allow_negative else 0
    if not low <= value < (1 << 64):
        raise ValueError(f"ltg_sample: {name} must be in [{low}, 2**64), got {value}")
    value &= (1 << 64) - 1  # as uint64
    return value - (1 << 64) if value >= (1 << 63) else value


# ---------------------------------------------------------------------------------- op
def ltg_sample(
    batch: int,
    num_patches: int,
    *,
    loc: float = 0.7,
    scale: float = 1.0,
    std: float = 0.6,
    seed: int,
    offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """LTG patch times ``(batch, num_patches)`` in [0, 1] (SPEC.md section 4).

    Per row ``tbar = sigmoid(loc + scale*n0)``, ``sd = min(tbar/2, std)``; per patch
    ``t_i = tbar - |n_i|*sd``, negatives replaced by ``u_i * tbar``.

    Deterministic in ``(seed, offset)`` and identical on CPU and CUDA. A call uses the
    Philox counters ``[offset, offset + batch*num_patches)``: advance ``offset`` by
    ``batch*num_patches`` per call for fresh samples. ``seed`` is taken modulo 2^64;
    ``offset`` must be in [0, 2^64). ``device`` defaults to the CPU;
    ``dtype`` is float32 or float64 (computed natively) or float16/bfloat16 (rounded from
    float32).
    """
    batch = _size("batch", batch)
    num_patches = _size("num_patches", num_patches)
    loc = _finite("loc", loc)
    scale = _finite("scale", scale)
    std = _finite("std", std)
    if std <= 0:
        raise ValueError(f"ltg_sample: std must be > 0, got {std}")
    seed = _uint64_as_int64("seed", seed, allow_negative=True)
    offset = _uint64_as_int64("offset", offset, allow_negative=False)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"ltg_sample: dtype must be a torch.dtype, got {dtype!r}")
    if dtype not in _NATIVE_DTYPES + _CAST_DTYPES:
        raise TypeError(
            f"ltg_sample: unsupported dtype {dtype}; use float32, float64, float16 or bfloat16"
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"ltg_sample: unsupported device {device}; use cpu or cuda")
    if _ext is None:
        load_extension()
    if device.type == "cuda" and not _with_cuda:
        raise RuntimeError(
            "ltg_sample: the LTG extension was built without CUDA; rebuild it with a CUDA "
            "toolkit (PF_BUILD_CUDA=1 pip install --no-build-isolation -e .)"
        )
    compute = dtype if dtype in _NATIVE_DTYPES else torch.float32
    out = torch.ops.pf_kernels.ltg_sample(batch, num_patches, loc, scale, std, seed, offset, compute, device)
    return out if compute == dtype else out.to(dtype)
