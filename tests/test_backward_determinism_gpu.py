"""The atomic-free backward passes give the same bits on every run, on a GPU, at DiT sizes.

The interpreter runs one program at a time, so there repeated runs agree whatever the kernels
do; only a GPU, where programs race, can show an accumulation that depends on their order.
Per-sample modulations (grads summed over tokens) and indexed tables with K <= 8 (summed per
table row) must be deterministic; the interpreter tests check the values.
"""

from __future__ import annotations

import pytest
import torch

import pf_kernels

pytestmark = pytest.mark.gpu

B, N, D, K = 4, 256, 1152, 5  # DiT-XL width; several programs per sample and several column tiles


def _inputs(per_sample: bool, indexed: bool, count: int, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = K if indexed else (1 if per_sample else N)
    x = torch.randn(B, N, D, device="cuda", generator=gen).to(dtype)
    mods = [(0.5 * torch.randn(B, rows, D, device="cuda", generator=gen)).to(dtype) for _ in range(count)]
    index = torch.randint(0, K, (B, N), device="cuda", generator=gen) if indexed else None
    return x, mods, index


def _grads_repeat(fn, leaves, times: int = 5) -> list[list[torch.Tensor]]:
    runs = []
    for _ in range(times):
        ins = [t.clone().requires_grad_() for t in leaves]
        outs = fn(*ins)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator(device="cuda").manual_seed(1)
        torch.autograd.backward(outs, [torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype) for o in outs])
        runs.append([t.grad for t in ins])
    return runs


def _assert_same_bits(runs):
    for later in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], later))


@pytest.mark.parametrize("form", ["per_sample", "indexed"])
def test_adaln_modulate_backward_is_deterministic(form):
    x, (shift, scale), index = _inputs(form == "per_sample", form == "indexed", 2)
    if index is None:
        fn = pf_kernels.adaln_modulate
    else:
        def fn(x, shift, scale):
            return pf_kernels.adaln_modulate_indexed(x, shift, scale, index)
    _assert_same_bits(_grads_repeat(fn, [x, shift, scale]))


@pytest.mark.parametrize("form", ["per_sample", "indexed"])
def test_gated_residual_modulate_backward_is_deterministic(form):
    x, (gate, shift, scale), index = _inputs(form == "per_sample", form == "indexed", 3)
    y = torch.randn_like(x)
    if index is None:
        fn = pf_kernels.gated_residual_modulate
    else:
        def fn(x, gate, y, shift, scale):
            return pf_kernels.gated_residual_modulate_indexed(x, gate, y, shift, scale, index)
    _assert_same_bits(_grads_repeat(fn, [x, gate, y, shift, scale]))


@pytest.mark.parametrize("form", ["per_token", "indexed"])
def test_ada_rms_norm_backward_is_deterministic(form):
    x, (scale,), index = _inputs(False, form == "indexed", 1)
    if index is None:
        fn = pf_kernels.ada_rms_norm
    else:
        def fn(x, table):
            return pf_kernels.ada_rms_norm_indexed(x, table, index)
    _assert_same_bits(_grads_repeat(fn, [x, scale]))
