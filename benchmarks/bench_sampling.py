"""Sampling speed: images/s and NFE per sampler, stacking the fast paths one at a time.

Variants (each adds to the one before, except the three baselines):
  ``plain``           per-token conditioning, torch reference ops (dedup off): the baseline;
  ``plain+blockc``    the published code's setup: per-block ``torch.compile`` (CUDA);
  ``dedup+compile``   what a user without ``pf_kernels`` would pick: deduplicated
                      conditioning, torch reference ops (``set_backend("torch")``), and
                      ``torch.compile`` of the whole forward with the static time table, as
                      ``+compile`` has it (CUDA); ``scripts/bench_table.py``'s "x compile";
  ``dedup``           deduplicated conditioning (the default eager path), reference ops;
  ``dedup+fused``     the Triton ops of ``pf_kernels`` (CUDA);
  ``+compile``        ``torch.compile`` of the model's forward, static time table (CUDA);
  ``+graphs``         the whole sampler as one CUDA graph around the compiled model (CUDA).
On CUDA: PF-B/2 and PF-XL/2 (random weights), 256 px latents (4 x 32 x 32), batch 64,
guidance 4.0, ``STEPS`` outer steps (``PF_BENCH_SCOPE=quick``: PF-XL/2, dual loop, the three
baselines, ``dedup+fused`` and ``+graphs``). On the CPU a PF-B/2-wide model on 16 x 16 latents, batch
2, EulerPF only, ``plain`` vs ``dedup``. ``extra_info`` holds images/s, NFE and the speed-up
over ``plain``.

The CPU acceptance check (guided EulerPF, PF-B/2 on 4 x 32 x 32, batch 4, same weights,
default path vs plain, interleaved and repeated on a shared machine):
    PYTHONPATH=. .venv/bin/python benchmarks/bench_sampling.py --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import time

import pytest
import torch

import pf_kernels
from pf import samplers
from pf.models import build_model
from pf.sampling.graphs import GraphedSampler, compile_model
from conftest import QUICK

CUDA = torch.cuda.is_available()
STEPS = 10
CFG = 4.0
CUDA_VARIANTS = ["plain", "plain+blockc", "dedup+compile", "dedup", "dedup+fused", "+compile", "+graphs"]
CUDA_PRESETS = ["PF-B/2", "PF-XL/2"]
CUDA_SAMPLERS = ["euler_pf", "dual_loop", "look_ahead"]
if QUICK:
    CUDA_VARIANTS = ["plain", "dedup+fused", "dedup+compile", "+graphs", "plain+blockc"]
    CUDA_PRESETS, CUDA_SAMPLERS = ["PF-XL/2"], ["dual_loop"]
_PLAIN_IPS: dict = {}


def make_model(preset: str, input_size: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: PF-XL/2 on the host takes seconds
        model = build_model(preset, input_size=input_size, in_channels=4, num_classes=1000).eval()
    with torch.no_grad():  # DiT's zero init makes AdaLN trivial: give every weight a value
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    return model


@contextlib.contextmanager
def setup(model, variant: str, sampler):
    """Model settings of a variant; yields the callable the sampler should use."""
    backend = pf_kernels.get_backend()
    dedup = model.dedup_max_distinct
    fused = variant in ("dedup+fused", "+compile", "+graphs")
    pf_kernels.set_backend("auto" if fused else "torch")
    model.dedup_max_distinct = 0 if variant.startswith("plain") else type(model).dedup_max_distinct
    try:
        if variant == "plain+blockc":
            for block in model.blocks:
                block.compile()
            yield model
        elif variant in ("dedup+compile", "+compile", "+graphs"):  # the first with the torch ops
            compiled = compile_model(model, "default", graphs=variant == "+graphs")
            with model.sync_free(distinct_times=sampler.max_distinct_times):
                yield compiled
        else:
            yield model
    finally:
        pf_kernels.set_backend(backend)
        model.dedup_max_distinct = dedup
        if variant == "plain+blockc":
            for block in model.blocks:
                block._compiled_call_impl = None  # back to eager


def sample_fn(model, runner, variant, sampler, x, y, steps):
    if variant == "+graphs":
        graphed = GraphedSampler(sampler, runner, tuple(x.shape), steps, cfg_scale=CFG, device=x.device)
        return lambda: graphed(x, y), graphed
    return lambda: sampler(runner, x, steps, y=y, cfg_scale=CFG), sampler


def _synced(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


@pytest.mark.skipif(not CUDA, reason="PF-B/2 and PF-XL/2 at batch 64 need CUDA")
@pytest.mark.parametrize("variant", CUDA_VARIANTS)
@pytest.mark.parametrize("name", CUDA_SAMPLERS)
@pytest.mark.parametrize("preset", CUDA_PRESETS)
def test_sampling_cuda(benchmark, preset, name, variant):
    benchmark.group = f"sampling {preset} {name} b64 cfg{CFG}"
    torch.backends.cuda.matmul.allow_tf32 = True
    model = make_model(preset, 32, "cuda")
    batch = 64
    x = torch.randn(batch, 4, 32, 32, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    sampler = samplers.make(name)
    with setup(model, variant, sampler) as runner, torch.autocast("cuda", dtype=torch.bfloat16):
        fn, counter = sample_fn(model, runner, variant, sampler, x, y, STEPS)
        _synced(fn)()  # warm-up: compile, Triton JIT, graph capture
        benchmark.pedantic(_synced(fn), rounds=3, iterations=1, warmup_rounds=0)
    _report(benchmark, (preset, name), variant, batch, counter.nfe, STEPS)


def _report(benchmark, key, variant, batch, nfe, steps):
    ips = batch / benchmark.stats.stats.median
    benchmark.extra_info.update(impl=variant, ms=round(benchmark.stats.stats.median * 1e3, 3))
    if variant == "plain":
        _PLAIN_IPS[key] = ips
    benchmark.extra_info.update(
        images_per_s=round(ips, 3), nfe=nfe, steps=steps, batch=batch, cfg=CFG,
        speedup_vs_plain=round(ips / _PLAIN_IPS[key], 3) if key in _PLAIN_IPS else None,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
    )


@pytest.mark.parametrize("variant", ["plain", "dedup"])
def test_sampling_cpu_small(benchmark, variant):
    """PF-B/2 width on 4 x 16 x 16 latents (64 tokens), batch 2, guided EulerPF, 2 steps."""
    benchmark.group = f"sampling PF-B/2-cpu euler_pf b2 cfg{CFG}"
    model = make_model("PF-B/2", 16, "cpu")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2])
    sampler = samplers.make("euler_pf")
    with setup(model, variant, sampler) as runner:
        fn, counter = sample_fn(model, runner, variant, sampler, x, y, 2)
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    _report(benchmark, ("PF-B/2-cpu", "euler_pf"), variant, 2, counter.nfe, 2)


#################################################################################
#                  CPU acceptance: default path vs plain eager                  #
#################################################################################


def cpu_acceptance(batch: int = 4, steps: int = 2, repeats: int = 5, size: int = 32) -> list[float]:
    """Guided EulerPF, PF-B/2 on 4 x size x size, same weights and noise: default path vs
    plain per-token eager, alternating (plain first, then default) ``repeats`` times."""
    model = make_model("PF-B/2", size, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    sampler = samplers.make("euler_pf")

    def timed(plain: bool):
        model.dedup_max_distinct = 0 if plain else type(model).dedup_max_distinct
        t0 = time.perf_counter()
        out = sampler(model, x, steps, y=y, cfg_scale=CFG)
        return time.perf_counter() - t0, out

    timed(False)  # warm-up
    ratios = []
    print(f"PF-B/2, x {tuple(x.shape)}, guided EulerPF cfg {CFG}, {steps} steps ({sampler.expected_nfe(steps)} NFE), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for r in range(repeats):
        t_plain, out_plain = timed(True)
        t_default, out_default = timed(False)
        rel = ((out_plain - out_default).norm() / out_plain.norm()).item()
        ratios.append(t_plain / t_default)
        print(f"  round {r}: plain {t_plain:.2f}s  default {t_default:.2f}s  speed-up {ratios[-1]:.3f}  "
              f"rel. difference {rel:.1e}", flush=True)
    ratios.sort()
    print(f"median speed-up {ratios[len(ratios) // 2]:.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f})")
    return ratios


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    cpu_acceptance(args.batch, args.steps, args.repeats, args.size)
