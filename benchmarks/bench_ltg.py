"""LTG timestep sampler: the compiled op vs the PyTorch composite it replaces.

Run: ``pytest benchmarks/bench_ltg.py --benchmark-only --benchmark-group-by=group``.
``op`` is ``pf_kernels.ltg_sample`` (one kernel, Philox); ``torch`` is
``pf.timesteps.make("ltg", backend="torch")`` (randn, sigmoid, clamp, randn, abs, mul, sub,
rand, mul, where: about ten kernels and torch's RNG). Shapes (B, N): (256, 256) is PF-B
training at 256 px (N = 256), (64, 1024) at 512 px, (1024, 256) a large global batch.
Targets: >= 2x on the CPU, >= 5x on a GPU. CUDA cases are skipped without a GPU.
``PF_BENCH_SCOPE=quick`` on a GPU machine runs the CUDA cases only.
On CUDA the kernel takes microseconds, so wall clock around a synchronised call measures the
launch and the sync: ``extra_info["ms"]`` (what the table shows) is the GPU time of one call
replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``), ``ms_host`` CUDA events
around each call with its launch costs (``do_bench``).
CPU cases run with one thread and with torch's default thread count: on a shared, loaded
machine the multi-threaded PyTorch composite stalls in spinning OpenMP waits (run with
OMP_WAIT_POLICY=PASSIVE, as pf.train does), and the one-thread numbers are the fair
comparison.
"""

from __future__ import annotations

import pytest
import torch

from conftest import QUICK, graph_ms, time_ms
from pf import timesteps
from pf_kernels import ltg_sample

CUDA = torch.cuda.is_available()
SHAPES = [(256, 256), (64, 1024), (1024, 256)]
DEVICES = [
    "cpu-1thread",
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
]
if QUICK and CUDA:
    DEVICES = DEVICES[2:]


def _synced(fn, device):
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("impl", ["op", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("device", DEVICES)
def test_ltg_sample(benchmark, device, shape, impl):
    batch, n = shape
    threads = torch.get_num_threads()
    if device == "cpu-1thread":
        device = "cpu"
        torch.set_num_threads(1)
    if impl == "op":
        state = {"offset": 0}

        def fn():
            out = ltg_sample(batch, n, seed=0, offset=state["offset"], device=device)
            state["offset"] += batch * n  # fresh samples each call, as in training
            return out

    else:
        sampler = timesteps.make("ltg", backend="torch")
        gen = torch.Generator(device).manual_seed(0)

        def fn():
            return sampler(batch, n, device=device, generator=gen)

    benchmark.group = f"ltg {device} threads={torch.get_num_threads()} {batch}x{n}"
    benchmark.extra_info.update(device=device, batch=batch, num_patches=n, impl=impl,
                                threads=torch.get_num_threads())
    try:
        out = benchmark(_synced(fn, device))
        if device == "cuda":
            benchmark.extra_info.update(ms=round(graph_ms(fn), 5), ms_host=round(time_ms(fn, device="cuda"), 5))
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (batch, n)
