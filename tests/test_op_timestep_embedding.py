"""timestep_embedding: Triton kernels (interpreter on the CPU) vs SPEC section 2 in float64.

``[cos(t f_k), sin(t f_k)]``, ``f_k = exp(-ln(P) k / half)``, cos first, a zero column for
odd dim; t of any shape; differentiable in t.
"""

import math

import pytest
import torch

import pf_kernels
from pf_kernels.ops._utils import LAUNCHES
from kernel_cases import device_dtype_cases, needs_interp

CASES = device_dtype_cases(cuda=(torch.float32, torch.bfloat16))


def embedding64(t, dim, max_period):
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = t[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize(
    "shape,dim,max_period",
    [((2, 5), 256, 10000), ((3,), 256, 10000), ((1, 1), 7, 10000), ((2, 3, 4), 64, 100), ((4, 256), 256, 10000), ((0, 3), 16, 10000)],
    ids=str,
)
def test_forward_backward(shape, dim, max_period, device, dtype, triton_backend):
    gen = torch.Generator().manual_seed(sum(shape) + dim)
    t0 = torch.rand(shape, generator=gen).to(dtype)  # per-patch times in [0, 1]
    grad0 = torch.randn(*shape, dim, generator=gen)
    t = t0.clone().to(device).requires_grad_()
    fwd, bwd = LAUNCHES["timestep_embedding_fwd"], LAUNCHES["timestep_embedding_bwd"]
    out = pf_kernels.timestep_embedding(t, dim, max_period)
    out.backward(grad0.to(device))
    if t.numel():
        assert LAUNCHES["timestep_embedding_fwd"] == fwd + 1 and LAUNCHES["timestep_embedding_bwd"] == bwd + 1

    tr = t0.double().requires_grad_()
    ref = embedding64(tr, dim, max_period)
    ref.backward(grad0.double())
    assert out.shape == (*shape, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=2e-6, rtol=1e-5)
    # dt = sum over up to 128 frequencies: fp32 terms, and the rounding of dt to t's dtype.
    atol = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(t.grad.double().cpu(), tr.grad, atol=atol, rtol=1e-2 if atol > 1e-3 else 1e-4)


@pytest.mark.parametrize("device,dtype", [c for c in CASES if c[1] == torch.float32])
def test_large_times(device, dtype, triton_backend):
    """DiT-style times in [0, 1000] (other codebases): arguments up to 1000 rad. The kernel reads
    the reference's own frequency table, so it matches the fp32 reference to the last ulps of
    cos/sin (an approximate exp on the GPU was ~3e-4 off here); against float64 the gap is the
    fp32 rounding of the argument itself (1000 rad * 6e-8)."""
    from pf_kernels.reference import timestep_embedding_ref

    t = torch.tensor([[0.0, 1.0, 999.0, 500.5], [0.25, 250.0, 1000.0, 0.001]], device=device)
    out = pf_kernels.timestep_embedding(t, 256)
    torch.testing.assert_close(out, timestep_embedding_ref(t, 256, 10000), atol=2e-6, rtol=0)
    torch.testing.assert_close(out.double().cpu(), embedding64(t.double().cpu(), 256, 10000), atol=2e-4, rtol=0)


def test_the_frequency_table_is_the_references_bit_for_bit():
    from pf_kernels.reference import timestep_frequencies

    got = timestep_frequencies(128, 10000, torch.float32, "cpu")
    want = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    assert torch.equal(got, want) and got.dtype == torch.float32


@needs_interp
def test_opcheck():
    """AOT dispatch without the functional decomposition under the interpreter (see
    test_op_adaln_modulate.test_opcheck)."""
    t = torch.rand(2, 5, requires_grad=True)
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(torch.ops.pf_kernels.timestep_embedding.default, (t, 256, 10000.0))
        torch.library.opcheck(
            torch.ops.pf_kernels.timestep_embedding_backward.default, (torch.randn(2, 5, 16), t.detach(), 16, 10000.0)
        )


@pytest.mark.gpu
def test_opcheck_gpu():
    t = torch.rand(2, 5, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.pf_kernels.timestep_embedding.default, (t, 256, 10000.0))
