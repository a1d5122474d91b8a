"""Every pf_kernels op, and the whole PF-XL/2 model, at the shapes training and sampling run,
on a GPU, against an fp32 reference with flash-attention's rule (benchmarks/value_check.py):

    max|kernel - ref32| <= 2 * max|torch_lowprec - ref32| + atol * max(1, max|ref32|)

Shapes (B, N, D): (16, 256, 1152) is PF-XL/2 at batch 16; (256, 256, 768) is PF-B/2 at
B*N = 65536, the benchmarks' size. bf16 and fp16, forward and backward (patch_euler:
forward). The other GPU tests use small odd shapes; these catch what only a real grid shows
(the CUDA grid's limits, column tiles at the model widths, chunk views of (B, N, 6D)).
Those are marked ``gpu`` (skipped without a CUDA device); scripts/gpu_check.sh runs this file
first in its tests phase. Two CPU tests keep the check itself honest: the rule passes the
kernels in the Triton interpreter (fp16, a small shape) and fails an op that is off by a
little more than PyTorch's own rounding.
"""

import os
import sys

import pytest
import torch

import pf_kernels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import value_check as vc  # noqa: E402

from kernel_cases import needs_interp  # noqa: E402

gpu = pytest.mark.gpu
SHAPES = [(16, 256, 1152), (256, 256, 768)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture
def triton_on_cuda():
    previous = pf_kernels.get_backend()
    pf_kernels.set_backend("triton")  # the kernels, never a silent fallback to the reference
    yield
    pf_kernels.set_backend(previous)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", [op for op in vc.OPS if op != "timestep_embedding"])
def test_op_at_real_shape(triton_on_cuda, op, shape, dtype):
    case = vc.make_case(op, *shape, DTYPES[dtype], "cuda")
    results = vc.check(case, backward=op not in vc.FORWARD_ONLY)
    assert all(r.ok for r in results), vc.failures(results)


@gpu
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_timestep_embedding_at_real_shape(triton_on_cuda, shape):
    """fp32 times (the model embeds them in fp32 under any autocast), against fp64."""
    case = vc.make_case("timestep_embedding", *shape, torch.float32, "cuda")
    results = vc.check(case)
    assert all(r.ok for r in results), vc.failures(results)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_pf_xl_forward_and_backward_fused_vs_torch(dtype):
    """The whole PF-XL/2 model (batch 4, 256 tokens, per-patch times, AdaLN weights non-zero)
    under autocast: the output and every parameter's gradient with the fused ops is within
    the rule of the fp32 torch path, as the torch path in the same precision is."""
    from pf.models import build_model

    torch.manual_seed(0)
    model = build_model("PF-XL/2", input_size=32, in_channels=4, num_classes=1000).cuda().eval()  # eval: no label dropout
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    x = torch.randn(4, 4, 32, 32, device="cuda")
    t = torch.rand(4, 256, device="cuda")
    y = torch.randint(0, 1000, (4,), device="cuda")
    cot = torch.randn(4, 4, 32, 32, device="cuda")

    def run(backend, low):
        model.zero_grad(set_to_none=True)
        previous = pf_kernels.get_backend()
        pf_kernels.set_backend(backend)
        try:
            with torch.autocast("cuda", dtype=DTYPES[dtype], enabled=low):
                out = model(x, t, y)
            (out.float() * cot).sum().backward()
        finally:
            pf_kernels.set_backend(previous)
        grads = {k: p.grad.double() for k, p in model.named_parameters() if p.grad is not None}
        return {"out": out.detach().double(), **grads}

    ref, eager, fused = run("torch", False), run("torch", True), run("triton", True)
    assert set(fused) == set(ref)
    atol = vc.ATOL[DTYPES[dtype]]
    bad = []
    for name, r in ref.items():
        err, torch_err = (fused[name] - r).abs().max().item(), (eager[name] - r).abs().max().item()
        bound = 2 * torch_err + atol * max(1.0, r.abs().max().item())
        if not err <= bound:
            bad.append(f"{name}: {err:.3g} > {bound:.3g} (torch {torch_err:.3g})")
    assert not bad, "; ".join(bad[:10])


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
