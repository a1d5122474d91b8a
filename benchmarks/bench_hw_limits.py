"""The hardware limits the other benchmarks are read against, measured in the same run:
device copy bandwidth (GB/s, bytes read + written) and dense matmul throughput (TFLOP/s,
bf16 on a GPU, fp32 on the CPU)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import time_ms

CUDA = torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def matmul_tflops(device: str, n: int | None = None) -> float:
    """Throughput of a large square matmul: n^3 (default 8192) in bf16 on CUDA, fp32 (default
    1024) on the CPU."""
    n, dtype = (n or 8192, torch.bfloat16) if device == "cuda" else (n or 1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device=device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def test_copy_bandwidth(benchmark, device, copy_bandwidth):
    benchmark.group = "hardware limits"
    nbytes = 512 * 2**20 if device == "cuda" else 64 * 2**20
    src = torch.empty(nbytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    benchmark.pedantic(lambda: dst.copy_(src), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(limit="copy", gb_per_s=round(copy_bandwidth, 1), device=device)
    assert copy_bandwidth > 0


def test_matmul_peak(benchmark, device):
    benchmark.group = "hardware limits"
    tflops = matmul_tflops(device)
    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    benchmark.pedantic(lambda: a @ a, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(limit="matmul", tflops=round(tflops, 2), dtype=str(dtype), device=device)
    assert tflops > 0


@pytest.mark.skipif(not CUDA, reason="records the GPU's name")
def test_gpu_name(benchmark):
    benchmark.group = "hardware limits"
    benchmark.extra_info["gpu"] = torch.cuda.get_device_name()
    benchmark.pedantic(torch.cuda.synchronize, rounds=1, iterations=1)
