"""One training step (forward, loss, backward, AdamW) of PF-B/2 and PF-XL/2.

Variants: ``eager`` (torch reference ops), ``fused`` (the Triton ops), ``compile-model``
(``torch.compile`` of the whole model with the torch reference ops: what a user without
``pf_kernels`` would pick, and the baseline of ``scripts/bench_table.py``'s "x compile"),
``compile`` (per-block ``torch.compile`` of the eager model, as the published code does) and
``fused+compile`` (per-block). Reported: ms per step (pytest-benchmark), images/s and peak
memory in ``extra_info``. On a CPU a tiny model runs so the path stays exercised; the PF-B/2
and PF-XL/2 cases need CUDA (bf16 autocast, batch 32); ``PF_BENCH_SCOPE=quick`` runs PF-XL/2
only (all variants, in this order: a phase cut short keeps the first comparisons).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import pf_kernels
from pf import timesteps
from pf.training import objective
from pf.models import build_model
from bench_hw_limits import matmul_tflops
from conftest import QUICK

CUDA = torch.cuda.is_available()
VARIANTS = ["eager", "fused", "compile-model", "compile", "fused+compile"]
CUDA_PRESETS = ["PF-XL/2"] if QUICK else ["PF-B/2", "PF-XL/2"]


def _make_step(preset: str, variant: str, batch: int, device: str, ltg_backend: str = "compiled"):
    """One training step as a callable; ``ltg_backend="torch"`` draws the LTG times with
    torch's RNG (gpu_check.sh uses it when the extension build failed: no JIT retry)."""
    with torch.device(device):  # initialised where it runs: PF-XL/2 on the host takes seconds
        model = build_model(preset, input_size=32 if device == "cuda" else 8, in_channels=4,
                            num_classes=1000).train()
    with torch.no_grad():  # non-zero AdaLN so the fused ops see real work
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if variant == "compile-model":  # the whole forward (and so its backward) as one compiled graph
        model = torch.compile(model)
    elif "compile" in variant:
        for blk in model.blocks:
            blk.compile()
    sampler = timesteps.make("ltg", backend=ltg_backend)
    size = 32 if device == "cuda" else 8
    x1 = torch.randn(batch, 4, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    n = (size // 2) ** 2
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        t = sampler(batch, n, device=device)
        with autocast:
            loss = objective.training_loss(model, x1, y, t)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step.params = params
    step.tokens = n  # per image
    return step


def _run(benchmark, preset, variant, batch, device):
    backend = "torch" if variant in ("eager", "compile", "compile-model") else "auto"
    with pf_kernels.use_backend(backend):
        step = _make_step(preset, variant, batch, device)
        for _ in range(3):  # warm-up (and compilation)
            step()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(step, rounds=5 if device == "cuda" else 2, iterations=1)
        mean_s = benchmark.stats.stats.mean
        benchmark.extra_info.update(preset=preset, impl=variant, batch=batch, device=device, ms=round(mean_s * 1e3, 3))
        benchmark.extra_info["images_per_s"] = round(batch / mean_s, 2)
        # Achieved dense throughput: ~6 FLOPs per parameter per token (fwd + bwd), as a
        # fraction of the matmul peak measured in this run.
        tokens = batch * (32 // 2) ** 2 if device == "cuda" else batch * 16
        tflops = 6 * step.params * tokens / mean_s / 1e12
        benchmark.extra_info.update(tflops=round(tflops, 3), frac_of_matmul_peak=round(tflops / matmul_tflops(device), 3))
        if device == "cuda":
            benchmark.extra_info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30


@pytest.mark.skipif(not CUDA, reason="needs CUDA: PF-B/2 / PF-XL/2 bf16 training steps")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("preset", CUDA_PRESETS)
def test_train_step_cuda(benchmark, preset, variant):
    benchmark.group = f"train-step {preset} bf16 b32"
    _run(benchmark, preset, variant, 32, "cuda")


@pytest.mark.parametrize("variant", ["eager", "fused"])
def test_train_step_cpu_tiny(benchmark, variant):
    # On the CPU "fused" dispatches to the torch reference too (auto = Triton on CUDA only):
    # this keeps the benchmark path exercised; the numbers mean nothing for the GPU.
    benchmark.group = "train-step Tiny/2 cpu b8"
    _run(benchmark, "Tiny/2", variant, 8, "cpu")
