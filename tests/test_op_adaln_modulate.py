"""adaln_modulate: Triton kernels (interpreter on the CPU) vs a float64 formula written here.

``out = LN(x) * (1 + scale) + shift``, LN without affine. Forward and the grads of x and of
the modulation tensor ``c`` the chunks come from (so dshift/dscale go through the real
chunk-view backward), for per-token, per-sample and classic-DiT (B, 6D) modulations.
"""

import pytest
import torch

import pf_kernels
from pf_kernels.ops._utils import LAUNCHES
from kernel_cases import device_dtype_cases, needs_interp

CASES = device_dtype_cases(cuda=(torch.float32, torch.float16, torch.bfloat16))
# (atol, rtol) against float64: fp32 is limited by fp32 sums over D; half types by the
# final rounding of outputs (and grads) of size up to ~10.
TOL = {torch.float32: (5e-5, 5e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}
# Odd D (masked power-of-two blocks), N = 1, B = 1; (1, 300, 48) makes the per-sample
# backward use several programs, each looping over several row blocks.
SHAPES = [(1, 1, 37), (2, 5, 48), (3, 7, 100), (4, 1, 64), (2, 3, 768), (1, 2, 3000), (1, 300, 48)]
FORMS = ["token", "sample", "dit", "contiguous"]


def adaln64(x, shift, scale, eps):
    """The float64 definition: LN over the last dim (biased variance), then modulate."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * (1 + scale) + shift


def make_modulation(form, b, n, d, dtype, seed):
    """The leaf tensor ``c`` whose chunks give shift and scale."""
    g = torch.Generator().manual_seed(seed)
    if form == "token":
        c = torch.randn(b, n, 6 * d, generator=g)  # chunks: (B, N, D) with row stride 6D
    elif form == "sample":
        c = torch.randn(b, 1, 6 * d, generator=g)  # (B, 1, D) chunks
    elif form == "dit":
        c = torch.randn(b, 6 * d, generator=g)  # classic DiT: chunk(6, dim=1), unsqueeze(1)
    else:
        c = torch.randn(b, n, 2 * d, generator=g)
    return (0.5 * c).to(dtype)


def split(form, c):
    if form == "dit":
        shift, scale, *_ = c.chunk(6, dim=1)
        return shift.unsqueeze(1), scale.unsqueeze(1)
    if form == "contiguous":
        shift, scale = c.chunk(2, dim=-1)
        return shift.contiguous(), scale.contiguous()
    shift, scale, *_ = c.chunk(6, dim=-1)
    return shift, scale


def close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.detach(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, form, device, dtype, triton_backend):
    b, n, d = shape
    seed = b * 1000 + n * 10 + d
    gen = torch.Generator().manual_seed(seed)
    x0 = (2 * torch.randn(b, n, d, generator=gen) + 0.5).to(dtype)  # nonzero mean: LN must remove it
    grad0 = torch.randn(b, n, d, generator=gen).to(dtype)
    c0 = make_modulation(form, b, n, d, dtype, seed)

    x = x0.clone().to(device).requires_grad_()
    c = c0.clone().to(device).requires_grad_()
    shift, scale = split(form, c)
    if form != "contiguous":
        assert shift._base is c and scale._base is c  # the kernels get the strided views
    fwd, bwd = LAUNCHES["adaln_modulate_fwd"], LAUNCHES["adaln_modulate_bwd"]
    out = pf_kernels.adaln_modulate(x, shift, scale)
    out.backward(grad0.to(device))
    assert LAUNCHES["adaln_modulate_fwd"] == fwd + 1 and LAUNCHES["adaln_modulate_bwd"] == bwd + 1

    xr = x0.double().requires_grad_()
    cr = c0.double().requires_grad_()
    ref = adaln64(xr, *split(form, cr), 1e-6)
    ref.backward(grad0.double())

    assert out.dtype == dtype and out.shape == (b, n, d) and out.is_contiguous()
    close(out, ref, dtype)
    close(x.grad, xr.grad, dtype)
    # dscale sums over N tokens in the per-sample forms: allow for the longer sum.
    scale_tol = 1.0 if form in ("token", "contiguous") else max(1.0, n**0.5)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(c.grad.double().cpu(), cr.grad, atol=atol * scale_tol, rtol=rtol)


@pytest.mark.parametrize("device,dtype", CASES[:1] + CASES[2:3])
def test_eps_and_mixed_dtypes(device, dtype, triton_backend):
    """eps reaches the kernel; a half-precision modulation with an fp32 stream (autocast-like)
    gives x's dtype out, and the grads come back in each input's own dtype."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 40, generator=gen) * 0.01  # variance ~ eps: eps matters
    c0 = (0.5 * torch.randn(2, 4, 80, generator=gen)).half()
    x = x0.clone().to(device).requires_grad_()
    c = c0.clone().to(device).requires_grad_()
    shift, scale = c.chunk(2, dim=-1)
    out = pf_kernels.adaln_modulate(x, shift, scale, eps=1e-3)
    out.sum().backward()  # an expanded (stride 0) incoming gradient
    xr, cr = x0.double().requires_grad_(), c0.double().requires_grad_()
    ref = adaln64(xr, *cr.chunk(2, dim=-1), 1e-3)
    ref.sum().backward()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.float32 and c.grad.dtype == torch.float16
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(c.grad.double().cpu(), cr.grad, atol=4e-3, rtol=4e-3)


@needs_interp
@pytest.mark.parametrize("op", ["adaln_modulate", "adaln_modulate_backward"])
def test_opcheck(op):
    """torch.library.opcheck: schema, autograd registration, fake tensors, AOT dispatch.

    Under the interpreter ``test_aot_dispatch_dynamic`` runs with triton_op's functional
    decomposition off: that decomposition re-runs the launcher on fake tensors so as to
    capture the kernel as a graph node, which needs a compiled (GPU) kernel, not an
    interpreted one. The op is then traced through its fake impl, which is what this checks
    here; the GPU test below runs the full decomposition.
    """
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 24, generator=gen, requires_grad=True)
    c = torch.randn(2, 1, 72, generator=gen, requires_grad=True)
    shift, scale = c.chunk(3, dim=-1)[:2]
    if op == "adaln_modulate":
        args = (x, shift, scale, 1e-6)
    else:
        args = (torch.randn(2, 3, 24, generator=gen), x.detach(), shift.detach(), scale.detach(), None, 1e-6)
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(getattr(torch.ops.pf_kernels, op).default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["adaln_modulate", "adaln_modulate_backward"])
def test_opcheck_gpu(op):
    x = torch.randn(2, 3, 24, device="cuda", requires_grad=True)
    c = torch.randn(2, 5, 72, device="cuda", requires_grad=True)
    shift, scale = c.chunk(3, dim=-1)[:2]
    if op == "adaln_modulate":
        args = (x, shift, scale, 1e-6)
    else:
        args = (torch.randn(2, 3, 24, device="cuda"), x.detach(), shift.detach()[:, :1], scale.detach()[:, :1], None, 1e-6)
    torch.library.opcheck(getattr(torch.ops.pf_kernels, op).default, args)


#################################################################################
#          Indexed form: (B, K, D) tables, one row per token by index (B, N)      #
#################################################################################


def gather64(table, index):
    return table.gather(1, index[:, :, None].expand(-1, -1, table.shape[-1]))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape,k", [((1, 1, 37), 1), ((2, 5, 48), 2), ((3, 7, 100), 3), ((2, 6, 64), 6), ((1, 300, 48), 2),
                                     ((2, 30, 200), 8), ((1, 12, 40), 11)], ids=str)
def test_indexed_forward_backward(shape, k, device, dtype, triton_backend):
    """out[b, n] = LN(x[b, n]) * (1 + scale[b, index[b, n]]) + shift[b, index[b, n]], the
    tables strided chunk views of a (B, K, 6D) tensor; grads scatter-added into the tables."""
    b, n, d = shape
    gen = torch.Generator().manual_seed(b + n + d + k)
    x0 = (2 * torch.randn(b, n, d, generator=gen) + 0.5).to(dtype)
    c0 = (0.5 * torch.randn(b, k, 6 * d, generator=gen)).to(dtype)
    grad0 = torch.randn(b, n, d, generator=gen).to(dtype)
    index = torch.randint(0, k, (b, n), generator=gen)
    x, c = x0.clone().to(device).requires_grad_(), c0.clone().to(device).requires_grad_()
    shift, scale = c.chunk(6, dim=-1)[3:5]  # (B, K, D) views, row stride 6D
    fwd, bwd = LAUNCHES["adaln_modulate_fwd"], LAUNCHES["adaln_modulate_bwd"]
    out = pf_kernels.adaln_modulate_indexed(x, shift, scale, index.to(device))
    out.backward(grad0.to(device))
    assert LAUNCHES["adaln_modulate_fwd"] == fwd + 1 and LAUNCHES["adaln_modulate_bwd"] == bwd + 1

    xr, cr = x0.double().requires_grad_(), c0.double().requires_grad_()
    sr, scr = cr.chunk(6, dim=-1)[3:5]
    ref = adaln64(xr, gather64(sr, index), gather64(scr, index), 1e-6)
    ref.backward(grad0.double())
    close(out, ref, dtype)
    close(x.grad, xr.grad, dtype)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(c.grad.double().cpu(), cr.grad, atol=atol * max(1.0, n**0.5), rtol=rtol)


@needs_interp
def test_indexed_matches_plain_and_checks(triton_backend):
    """K = 1 with index 0 is the per-sample form; int32 indices are accepted; bad ones raise."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 32, generator=gen)
    c = torch.randn(2, 1, 64, generator=gen)
    shift, scale = c.chunk(2, dim=-1)
    plain = pf_kernels.adaln_modulate(x, shift, scale)
    idx = torch.zeros(2, 4, dtype=torch.int32)
    torch.testing.assert_close(pf_kernels.adaln_modulate_indexed(x, shift, scale, idx), plain)
    with pytest.raises(ValueError, match="index"):
        pf_kernels.adaln_modulate_indexed(x, shift, scale, idx[:, :2])
    with pytest.raises(ValueError, match="must lie in"):
        pf_kernels.adaln_modulate_indexed(x, shift, scale, idx + 1)


@needs_interp
def test_opcheck_indexed():
    """See test_opcheck for the interpreter's AOT-dispatch setting."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 24, generator=gen, requires_grad=True)
    c = torch.randn(2, 3, 72, generator=gen, requires_grad=True)
    shift, scale = c.chunk(3, dim=-1)[:2]
    index = torch.randint(0, 3, (2, 5), generator=gen)
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(torch.ops.pf_kernels.adaln_modulate_indexed.default, (x, shift, scale, index, 1e-6))


@needs_interp
def test_indexed_table_grads_are_summed_without_atomics(triton_backend):
    """K <= 8: the tables' grads come from the table kernel (row statistics from the backward,
    column tiles of 128, program partials added in order): the same bits on every run."""
    from pf_kernels.ops.adaln_modulate import adaln_modulate_bwd

    gen = torch.Generator().manual_seed(12)
    b, n, d, k = 2, 33, 200, 5
    x, grad = torch.randn(b, n, d, generator=gen), torch.randn(b, n, d, generator=gen)
    c = torch.randn(b, k, 2 * d, generator=gen)
    shift, scale = c.chunk(2, dim=-1)
    index = torch.randint(0, k, (b, n), generator=gen)
    before = LAUNCHES["adaln_modulate_table_grads"]
    dx, dshift, dscale = adaln_modulate_bwd(grad, x, shift, scale, index, 1e-6)
    assert LAUNCHES["adaln_modulate_table_grads"] == before + 1
    xhat = torch.nn.functional.layer_norm(x.double(), (d,), eps=1e-6)
    rows = index[:, :, None].expand(-1, -1, d)
    want_shift = torch.zeros(b, k, d, dtype=torch.float64).scatter_add_(1, rows, grad.double())
    want_scale = torch.zeros(b, k, d, dtype=torch.float64).scatter_add_(1, rows, grad.double() * xhat)
    assert dshift.shape == dscale.shape == (b, k, d)
    torch.testing.assert_close(dshift.double(), want_shift, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dscale.double(), want_scale, atol=1e-4, rtol=1e-4)
    again = adaln_modulate_bwd(grad, x, shift, scale, index, 1e-6)
    assert torch.equal(again[1], dshift) and torch.equal(again[2], dscale)


def _indexed_backward_args(k, gen, device="cpu"):
    """Args of adaln_modulate_backward with (B, K, D) tables (strided chunk views), as the
    indexed op's autograd passes them."""
    x, grad = (torch.randn(2, 7, 24, generator=gen).to(device) for _ in range(2))
    shift, scale = torch.randn(2, k, 72, generator=gen).to(device).chunk(3, dim=-1)[:2]
    index = torch.randint(0, k, (2, 7), generator=gen).to(device)
    return grad, x, shift, scale, index, 1e-6


@needs_interp
@pytest.mark.parametrize("k", [3, 5])
def test_opcheck_indexed_backward(k):
    """K not a power of two: the table kernel pads K to TABLE_K rows, and the real table grads
    must still have the fake impl's contiguous layout (it once returned a slice of the
    padded sum, strides (TABLE_K*D, D, 1))."""
    args = _indexed_backward_args(k, torch.Generator().manual_seed(20 + k))
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(torch.ops.pf_kernels.adaln_modulate_backward.default, args)


@needs_interp
@pytest.mark.parametrize("k", [3, 5, 8])
def test_indexed_backward_table_grads_are_contiguous(k, triton_backend):
    from pf_kernels.ops.adaln_modulate import _bwd_fake, adaln_modulate_bwd

    args = _indexed_backward_args(k, torch.Generator().manual_seed(30 + k))
    real, fake = adaln_modulate_bwd(*args), _bwd_fake(*args)
    for got, want in zip(real, fake):
        assert got.shape == want.shape and got.stride() == want.stride() and got.is_contiguous()
    assert real[1].stride() == (k * 24, 24, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [3, 5])
def test_opcheck_indexed_backward_gpu(k):
    torch.library.opcheck(torch.ops.pf_kernels.adaln_modulate_backward.default,
                          _indexed_backward_args(k, torch.Generator().manual_seed(20 + k), "cuda"))


#################################################################################
#     Wide rows in column tiles; the forward's statistics read by the backward    #
#################################################################################


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("form", ["sample", "dit", "token"])
@pytest.mark.parametrize("shape", [(1, 40, 1152), (2, 9, 1024), (2, 5, 768)], ids=str)
def test_wide_rows(shape, form, device, dtype, triton_backend):
    """The PF widths: D = 1152 in nine column tiles of 128 (8 rows a step), 768 in three of
    256, 1024 in one. (1, 40, 1152) per sample: two programs walking three and two row steps
    (the last one partly masked), each summing dshift/dscale over its rows per column tile."""
    b, n, d = shape
    gen = torch.Generator().manual_seed(b * 1000 + n * 10 + d)
    x0 = (2 * torch.randn(b, n, d, generator=gen) + 0.5).to(dtype)
    grad0 = torch.randn(b, n, d, generator=gen).to(dtype)
    c0 = make_modulation(form, b, n, d, dtype, b + n)
    x, c = x0.clone().to(device).requires_grad_(), c0.clone().to(device).requires_grad_()
    stats_fwd, stats_bwd = LAUNCHES["adaln_modulate_fwd_stats"], LAUNCHES["adaln_modulate_bwd_stats"]
    out = pf_kernels.adaln_modulate(x, *split(form, c))
    out.backward(grad0.to(device))
    # under autograd the forward stores each row's mean and rstd, and the backward reads them
    assert LAUNCHES["adaln_modulate_fwd_stats"] == stats_fwd + 1
    assert LAUNCHES["adaln_modulate_bwd_stats"] == stats_bwd + 1
    xr, cr = x0.double().requires_grad_(), c0.double().requires_grad_()
    ref = adaln64(xr, *split(form, cr), 1e-6)
    ref.backward(grad0.double())
    close(out, ref, dtype)
    close(x.grad, xr.grad, dtype)
    atol, rtol = TOL[dtype]
    scale_tol = 1.0 if form == "token" else max(1.0, n**0.5)
    torch.testing.assert_close(c.grad.double().cpu(), cr.grad, atol=atol * scale_tol, rtol=rtol)


@needs_interp
@pytest.mark.parametrize("d", [1152, 768, 48])
def test_stored_statistics_equal_recomputed(d, triton_backend):
    """The statistics the forward stores are those the backward would recompute (the same
    tile-by-tile merge): grads with and without them agree; no grad needed, nothing stored."""
    from pf_kernels.ops.adaln_modulate import adaln_modulate_bwd, adaln_modulate_fwd, adaln_modulate_fwd_stats

    gen = torch.Generator().manual_seed(d)
    x = 3 * torch.randn(2, 11, d, generator=gen) + 20.0  # a large mean: the merge keeps precision
    grad = torch.randn(2, 11, d, generator=gen)
    shift, scale = (0.5 * torch.randn(2, 1, 2 * d, generator=gen)).chunk(2, dim=-1)
    out, stats = adaln_modulate_fwd_stats(x, shift, scale, None, 1e-6)
    assert stats.shape == (2, 11, 2) and stats.dtype == torch.float32
    torch.testing.assert_close(out, adaln_modulate_fwd(x, shift, scale, None, 1e-6), atol=0, rtol=0)
    xd = x.double()
    torch.testing.assert_close(stats[..., 0].double(), xd.mean(-1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(stats[..., 1].double(), (xd.var(-1, unbiased=False) + 1e-6).rsqrt(), atol=0, rtol=1e-5)
    with_stats = adaln_modulate_bwd(grad, x, shift, scale, None, 1e-6, stats)
    recomputed = adaln_modulate_bwd(grad, x, shift, scale, None, 1e-6)
    for a, b in zip(with_stats, recomputed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    before = LAUNCHES["adaln_modulate_fwd_stats"]
    with torch.no_grad():
        pf_kernels.adaln_modulate(x.requires_grad_(), shift, scale)
    pf_kernels.adaln_modulate(x.detach(), shift, scale)
    assert LAUNCHES["adaln_modulate_fwd_stats"] == before


@needs_interp
@pytest.mark.parametrize("form", ["sample", "indexed"])
def test_opcheck_with_stats(form):
    """The forward that also returns the statistics, and the backward that takes them."""
    gen = torch.Generator().manual_seed(40)
    x = torch.randn(2, 5, 24, generator=gen, requires_grad=True)
    k = 1 if form == "sample" else 3
    shift, scale = torch.randn(2, k, 72, generator=gen, requires_grad=True).chunk(3, dim=-1)[:2]
    index = None if form == "sample" else torch.randint(0, 3, (2, 5), generator=gen)
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(torch.ops.pf_kernels.adaln_modulate_with_stats.default, (x, shift, scale, index, 1e-6))
        _, stats = torch.ops.pf_kernels.adaln_modulate_with_stats(x, shift, scale, index, 1e-6)
        args = (torch.randn(2, 5, 24, generator=gen), x.detach(), shift.detach(), scale.detach(), index, 1e-6,
                stats)
        torch.library.opcheck(torch.ops.pf_kernels.adaln_modulate_backward.default, args)
