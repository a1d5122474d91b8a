"""gated_residual: Triton kernels (interpreter on the CPU) vs ``x + gate * y`` in float64.

Gates come as chunk views of a modulation tensor ``c`` (per token, per sample, classic DiT
(B, 6D)) or a separate contiguous tensor; grads checked for x, y and c.
"""

import pytest
import torch

import pf_kernels
from pf_kernels.ops._utils import LAUNCHES
from kernel_cases import device_dtype_cases, needs_interp

CASES = device_dtype_cases(cuda=(torch.float32, torch.float16, torch.bfloat16))
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2)}
# (1, 40, 1152) and (2, 9, 1024): the PF-XL/2 width in nine column tiles of 128 (per sample:
# several programs per sample and tile, each walking row steps), and a one-tile width.
SHAPES = [(1, 1, 37), (2, 5, 48), (3, 7, 100), (4, 1, 64), (2, 3, 1152), (1, 300, 48), (1, 40, 1152), (2, 9, 1024)]
FORMS = ["token", "sample", "dit", "contiguous"]


def make_gate(form, c, d):
    """gate from the leaf c: the third of six chunks (gate_msa in DiT's order)."""
    if form == "dit":
        return c.chunk(6, dim=1)[2].unsqueeze(1)
    if form == "contiguous":
        return c.contiguous() * 1  # a separate (B, N, D) tensor
    return c.chunk(6, dim=-1)[2]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, form, device, dtype, triton_backend):
    b, n, d = shape
    gen = torch.Generator().manual_seed(b * 1000 + n * 10 + d)
    x0 = torch.randn(b, n, d, generator=gen).to(dtype)
    y0 = torch.randn(b, n, d, generator=gen).to(dtype)
    grad0 = torch.randn(b, n, d, generator=gen).to(dtype)
    c_shape = {"token": (b, n, 6 * d), "sample": (b, 1, 6 * d), "dit": (b, 6 * d), "contiguous": (b, n, d)}[form]
    c0 = torch.randn(c_shape, generator=gen).to(dtype)

    x, y, c = (t.clone().to(device).requires_grad_() for t in (x0, y0, c0))
    gate = make_gate(form, c, d)
    fwd, bwd = LAUNCHES["gated_residual_fwd"], LAUNCHES["gated_residual_bwd"]
    out = pf_kernels.gated_residual(x, gate, y)
    out.backward(grad0.to(device))
    assert LAUNCHES["gated_residual_fwd"] == fwd + 1 and LAUNCHES["gated_residual_bwd"] == bwd + 1

    xr, yr, cr = (t.double().requires_grad_() for t in (x0, y0, c0))
    ref = xr + make_gate(form, cr, d) * yr
    ref.backward(grad0.double())

    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (b, n, d) and out.is_contiguous()
    for got, want, k in ((out, ref, 1), (x.grad, xr.grad, 1), (y.grad, yr.grad, 1), (c.grad, cr.grad, n**0.5)):
        # dgate of a per-sample gate is a sum over N tokens: allow for it.
        torch.testing.assert_close(got.double().cpu(), want.detach(), atol=atol * max(1.0, k), rtol=rtol)


@needs_interp
def test_mixed_dtypes_and_expanded_grad(triton_backend):
    """fp32 stream with a half gate (autocast-like): out in x's dtype, grads in each input's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 40, generator=gen, requires_grad=True)
    y = torch.randn(2, 4, 40, generator=gen).half().requires_grad_()
    c = torch.randn(2, 1, 80, generator=gen).half().requires_grad_()
    out = pf_kernels.gated_residual(x, c.chunk(2, dim=-1)[1], y)
    out.sum().backward()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert y.grad.dtype == torch.float16 and c.grad.dtype == torch.float16
    xr, yr, cr = (t.detach().double().requires_grad_() for t in (x, y, c))
    (xr + cr.chunk(2, dim=-1)[1] * yr).sum().backward()
    torch.testing.assert_close(out.double(), (xr + cr.chunk(2, dim=-1)[1] * yr).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.grad.double(), yr.grad, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(c.grad.double(), cr.grad, atol=1e-2, rtol=2e-3)


@needs_interp
@pytest.mark.parametrize("op", ["gated_residual", "gated_residual_backward"])
def test_opcheck(op):
    """See test_op_adaln_modulate.test_opcheck for why AOT dispatch runs without triton_op's
    functional decomposition under the interpreter."""
    gen = torch.Generator().manual_seed(5)
    x, y = (torch.randn(2, 3, 24, generator=gen, requires_grad=True) for _ in range(2))
    gate = torch.randn(2, 1, 72, generator=gen, requires_grad=True).chunk(3, dim=-1)[1]
    if op == "gated_residual":
        args = (x, gate, y)
    else:
        args = (torch.randn(2, 3, 24, generator=gen), gate.detach(), y.detach(), None)
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(getattr(torch.ops.pf_kernels, op).default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gated_residual", "gated_residual_backward"])
def test_opcheck_gpu(op):
    x, y = (torch.randn(2, 3, 24, device="cuda", requires_grad=True) for _ in range(2))
    gate = torch.randn(2, 3, 72, device="cuda", requires_grad=True).chunk(3, dim=-1)[1]
    if op == "gated_residual":
        args = (x, gate, y)
    else:
        args = (torch.randn(2, 3, 24, device="cuda"), gate.detach()[:, :1], y.detach(), None)
    torch.library.opcheck(getattr(torch.ops.pf_kernels, op).default, args)


#################################################################################
#          Indexed form: a (B, K, D) gate table, one row per token by index        #
#################################################################################


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape,k", [((1, 1, 37), 1), ((2, 5, 48), 2), ((3, 7, 100), 4), ((1, 300, 48), 2),
                                     ((2, 9, 200), 3), ((2, 20, 136), 8), ((1, 12, 40), 11)], ids=str)
def test_indexed_forward_backward(shape, k, device, dtype, triton_backend):
    b, n, d = shape
    gen = torch.Generator().manual_seed(b + n + d + k)
    x0, y0, grad0 = (torch.randn(b, n, d, generator=gen).to(dtype) for _ in range(3))
    c0 = torch.randn(b, k, 6 * d, generator=gen).to(dtype)
    index = torch.randint(0, k, (b, n), generator=gen)
    x, y, c = (t.clone().to(device).requires_grad_() for t in (x0, y0, c0))
    gate = c.chunk(6, dim=-1)[5]  # (B, K, D) view, row stride 6D
    fwd, bwd = LAUNCHES["gated_residual_fwd"], LAUNCHES["gated_residual_bwd"]
    out = pf_kernels.gated_residual_indexed(x, gate, y, index.to(device))
    out.backward(grad0.to(device))
    assert LAUNCHES["gated_residual_fwd"] == fwd + 1 and LAUNCHES["gated_residual_bwd"] == bwd + 1

    xr, yr, cr = (t.double().requires_grad_() for t in (x0, y0, c0))
    gr = cr.chunk(6, dim=-1)[5]
    ref = xr + gr.gather(1, index[:, :, None].expand(-1, -1, d)) * yr
    ref.backward(grad0.double())
    atol, rtol = TOL[dtype]
    for got, want, s in ((out, ref, 1), (x.grad, xr.grad, 1), (y.grad, yr.grad, 1), (c.grad, cr.grad, n**0.5)):
        torch.testing.assert_close(got.double().cpu(), want.detach(), atol=atol * max(1.0, s), rtol=rtol)


@needs_interp
def test_opcheck_indexed():
    gen = torch.Generator().manual_seed(9)
    x, y = (torch.randn(2, 5, 24, generator=gen, requires_grad=True) for _ in range(2))
    gate = torch.randn(2, 3, 72, generator=gen, requires_grad=True).chunk(3, dim=-1)[2]
    index = torch.randint(0, 3, (2, 5), generator=gen)
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(torch.ops.pf_kernels.gated_residual_indexed.default, (x, gate, y, index))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
def test_follows_eager_type_promotion(backend):
    """fp16 x and y with an fp32 gate: eager ``x + gate * y`` is fp32, and so is the op (both routes)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 24, generator=gen).half().requires_grad_()
    y = torch.randn(2, 3, 24, generator=gen).half().requires_grad_()
    g = torch.randn(2, 1, 24, generator=gen, requires_grad=True)
    with pf_kernels.use_backend(backend):
        out = pf_kernels.gated_residual(x, g, y)
        out.sum().backward()
    eager = x.detach() + g.detach() * y.detach()
    assert eager.dtype == torch.float32 and out.dtype == eager.dtype
    assert (x.grad.dtype, y.grad.dtype, g.grad.dtype) == (torch.float16, torch.float16, torch.float32)
    want = x.detach().double() + g.detach().double() * y.detach().double()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@needs_interp
def test_indexed_table_grads_are_summed_in_the_kernel_deterministically(triton_backend):
    """K <= 8: the backward returns the (B, K, D) table grads itself (no per-token buffer, no
    atomics), over several column tiles (D = 200 > 128) and program partials; the same bits
    on every run."""
    from pf_kernels.ops.gated_residual import gated_residual_bwd

    gen = torch.Generator().manual_seed(11)
    b, n, d, k = 2, 40, 200, 5
    grad, y = torch.randn(b, n, d, generator=gen), torch.randn(b, n, d, generator=gen)
    gate = torch.randn(b, k, 2 * d, generator=gen).chunk(2, dim=-1)[1]  # strided table
    index = torch.randint(0, k, (b, n), generator=gen)
    dy, dtable = gated_residual_bwd(grad, gate, y, index)
    want = torch.zeros(b, k, d, dtype=torch.float64).scatter_add_(1, index[:, :, None].expand(-1, -1, d),
                                                                   (grad * y).double())
    assert dtable.shape == (b, k, d)
    torch.testing.assert_close(dtable.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dy, grad * gate.gather(1, index[:, :, None].expand(-1, -1, d)))
    assert torch.equal(gated_residual_bwd(grad, gate, y, index)[1], dtable)


def _indexed_backward_args(k, gen, device="cpu"):
    """Args of gated_residual_backward with a (B, K, D) gate table (a strided chunk view)."""
    grad, y = (torch.randn(2, 7, 24, generator=gen).to(device) for _ in range(2))
    gate = torch.randn(2, k, 72, generator=gen).to(device).chunk(3, dim=-1)[1]
    return grad, gate, y, torch.randint(0, k, (2, 7), generator=gen).to(device)


@needs_interp
@pytest.mark.parametrize("k", [3, 5])
def test_opcheck_indexed_backward(k):
    """K not a power of two: the table grad must have the fake impl's contiguous layout (it
    once was a slice of the sum over the TABLE_K-padded partials)."""
    args = _indexed_backward_args(k, torch.Generator().manual_seed(20 + k))
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(torch.ops.pf_kernels.gated_residual_backward.default, args)


@needs_interp
@pytest.mark.parametrize("k", [3, 5, 8])
def test_indexed_backward_table_grad_is_contiguous(k, triton_backend):
    from pf_kernels.ops.gated_residual import _bwd_fake, gated_residual_bwd

    args = _indexed_backward_args(k, torch.Generator().manual_seed(30 + k))
    real, fake = gated_residual_bwd(*args), _bwd_fake(*args)
    for got, want in zip(real, fake):
        assert got.shape == want.shape and got.stride() == want.stride() and got.is_contiguous()
    assert real[1].stride() == (k * 24, 24, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [3, 5])
def test_opcheck_indexed_backward_gpu(k):
    torch.library.opcheck(torch.ops.pf_kernels.gated_residual_backward.default,
                          _indexed_backward_args(k, torch.Generator().manual_seed(20 + k), "cuda"))
