"""LTG timestep sampler: the compiled op vs the PyTorch composite it replaces.

Run: ``pytest benchmarks/bench_ltg.py --benchmark-only --benchmark-group-by=group``.
``op`` is ``pf_kernels.ltg_sample`` (one kernel, Philox); ``torch`` is
``pf.timesteps.make("ltg", backend="torch")`` (randn, sigmoid, clamp, randn, abs, mul, sub,
rand, mul, where: about ten kernels and torch's RNG). Shapes (B, N): (256, 256) is PF-B
training at 256 px (N = 256), (64, 1024) at 512 px, (1024, 256) a large global batch.
Targets: >= 2x on the CPU, >= 5x on a GPU. CUDA cases are skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from pf import timesteps
from pf_kernels import ltg_sample

SHAPES = [(256, 256), (64, 1024), (1024, 256)]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


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

    benchmark.group = f"ltg {device} {batch}x{n}"
    benchmark.extra_info.update(device=device, batch=batch, num_patches=n, impl=impl,
                                threads=torch.get_num_threads())
    out = benchmark(_synced(fn, device))
    assert out.shape == (batch, n)
