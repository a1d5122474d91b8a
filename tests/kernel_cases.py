"""Shared parametrisation of the kernel tests: which devices and dtypes run where."""

import pytest
import torch

from pf_kernels.dispatch import interpreter_active

# CPU cases need the Triton interpreter (tests/conftest.py turns it on without a GPU).
needs_interp = pytest.mark.skipif(not interpreter_active(), reason="Triton interpreter not active (TRITON_INTERPRET)")

_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def device_dtype_cases(cpu=(torch.float32, torch.float16), cuda=(torch.float32, torch.float16, torch.bfloat16)):
    """``pytest.param(device, dtype)`` for each case: CPU ones through the interpreter,
    CUDA ones marked ``gpu`` (skipped without a device). No bf16 in the interpreter."""
    return [pytest.param("cpu", dt, marks=needs_interp, id=f"cpu-{_IDS[dt]}") for dt in cpu] + [
        pytest.param("cuda", dt, marks=pytest.mark.gpu, id=f"cuda-{_IDS[dt]}") for dt in cuda
    ]
