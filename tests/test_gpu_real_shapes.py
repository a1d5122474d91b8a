"""Every pf_kernels op, and the whole PF-XL/2 model, at the shapes training and sampling run,
on a GPU, against an fp32 reference with flash-attention's rule (benchmarks/value_check.py):

    max|kernel - ref32| <= 2 * max|torch_lowprec - ref32| + atol * max(1, max|ref32|)

Shapes (B, N, D): (16, 256, 1152) is PF-XL/2 at batch 16; (256, 256, 768) is PF-B/2 at
B*N = 65536, the benchmarks' size. bf16 and fp16, forward and backward (patch_euler:
forward). The other GPU tests use small odd shapes; these catch what only a real grid shows
(the CUDA grid's limits, column tiles at the model widths, chunk views of (B, N, 6D)).
Those are marked ``gpu`` (skipped without a CUDA device); scripts/gpu_check.sh runs this file
first in its tests phase. CPU tests keep the check itself honest: the rule passes the
kernels in the Triton interpreter (fp16, a small shape; the whole Tiny/2 model) and fails an
op that is off by a little more than PyTorch's own rounding (alone, and inside the model).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import value_check as vc  # noqa: E402

from kernel_cases import needs_interp  # noqa: E402

gpu = pytest.mark.gpu
SHAPES = [(16, 256, 1152), (256, 256, 768)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", [op for op in vc.OPS if op != "timestep_embedding"])
def test_op_at_real_shape(triton_backend, op, shape, dtype):
    case = vc.make_case(op, *shape, DTYPES[dtype], "cuda")
    results = vc.check(case, backward=op not in vc.FORWARD_ONLY)
    assert all(r.ok for r in results), vc.failures(results)


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_timestep_embedding_at_real_shape(triton_backend, shape):
    """fp32 times (the model embeds them in fp32 under any autocast), against fp64."""
    case = vc.make_case("timestep_embedding", *shape, torch.float32, "cuda")
    results = vc.check(case)
    assert all(r.ok for r in results), vc.failures(results)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_pf_xl_forward_and_backward_fused_vs_torch(dtype):
    """The whole PF-XL/2 model (batch 4, 256 tokens, per-patch times, AdaLN weights non-zero)
    under autocast: the output and every parameter's gradient with the Triton kernels is
    within the rule of the fp32 torch path, as the torch path in the same precision is."""
    results = vc.check_model("PF-XL/2", 32, 4, DTYPES[dtype], "triton", "cuda")
    failing = [r for r in results if not r.ok]
    assert not failing, vc.failures(failing[:10]) + f" ({len(failing)} failing)"


#################################################################################
#                     The check itself, on the CPU (interpreter)                 #
#################################################################################


@needs_interp
@pytest.mark.parametrize("op", vc.OPS)
def test_the_rule_passes_the_interpreted_kernels(triton_backend, op):
    dtype = torch.float32 if op == "timestep_embedding" else torch.float16
    case = vc.make_case(op, 2, 16, 48, dtype, "cpu")
    results = vc.check(case)
    assert all(r.ok for r in results), vc.failures(results)
    grads = set() if op in vc.FORWARD_ONLY else {f"grad {k}" for k in case.grads}
    assert grads <= {r.name for r in results}  # every input's gradient was checked


def test_the_rule_fails_an_op_a_little_off():
    """An adaln_modulate whose output is off by 2% of the output's scale: more than twice
    fp16 PyTorch's own rounding error, so the rule must refuse it (and name the output)."""
    case = vc.make_case("adaln_modulate", 2, 16, 48, torch.float16, "cpu")
    fused = case.fused
    case.fused = lambda **kw: fused(**kw) * 1.02
    results = vc.check(case, backward=False)
    assert not results[0].ok and "out:" in vc.failures(results)
    assert results[0].err > 2 * results[0].torch_err


@pytest.mark.slow
@needs_interp
def test_the_model_rule_passes_the_interpreted_kernels():
    """check_model at Tiny/2 under fp16 autocast, the kernels in the Triton interpreter: the
    output and every parameter's gradient pass."""
    results = vc.check_model("Tiny/2", 8, 2, torch.float16, "triton", "cpu")
    assert results[0].name == "out" and len(results) > 40  # the output, then each parameter's gradient
    assert all(r.ok for r in results), vc.failures(results)


@pytest.mark.slow
@needs_interp
def test_the_model_rule_fails_a_modulate_a_little_off(monkeypatch):
    """The same model with the fused adaln_modulate 2% off (the torch paths untouched): the
    gradients it feeds fail the rule."""
    import pf_kernels

    exact = pf_kernels.adaln_modulate
    monkeypatch.setattr(pf_kernels, "adaln_modulate",
                        lambda *a: exact(*a) * (1.02 if pf_kernels.get_backend() == "triton" else 1.0))  # fmt: skip
    results = vc.check_model("Tiny/2", 8, 2, torch.float16, "triton", "cpu")
    assert any(not r.ok for r in results)
