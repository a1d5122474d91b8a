"""ada_rms_norm: Triton kernels (interpreter on the CPU) vs a float64 formula written here.

``out = x * rsqrt(mean(x^2) + eps) * (1 + scale)``. Forward and the grads of x and of the
tensor ``c`` the scale is a chunk of (so dscale goes through the real chunk-view backward),
for per-token, per-sample and contiguous scales, and the indexed form with (B, K, D) tables.
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
SHAPES = [(1, 1, 37), (2, 5, 48), (3, 7, 100), (4, 1, 64), (1, 300, 48)]
FORMS = ["token", "sample", "contiguous"]


def rms64(x, scale, eps):
    """The float64 definition: x over the root of its mean square, times (1 + scale)."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + scale)


def gather64(table, index):
    return table.gather(1, index[:, :, None].expand(-1, -1, table.shape[-1]))


def make_c(form, b, n, d, dtype, gen):
    """The leaf tensor ``c`` the scale comes from."""
    shape = {"token": (b, n, 3 * d), "sample": (b, 1, 3 * d), "contiguous": (b, n, d)}[form]
    return (0.5 * torch.randn(shape, generator=gen)).to(dtype)


def take_scale(form, c):
    # The middle of three chunks: a (B, N|1, D) view with row stride 3D and an offset.
    return c if form == "contiguous" else c.chunk(3, dim=-1)[1]


def close(actual, expected, dtype, widen=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.detach(), atol=atol * widen, rtol=rtol)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, form, device, dtype, triton_backend):
    b, n, d = shape
    gen = torch.Generator().manual_seed(b * 1000 + n * 10 + d)
    x0 = (2 * torch.randn(b, n, d, generator=gen) + 0.5).to(dtype)
    grad0 = torch.randn(b, n, d, generator=gen).to(dtype)
    c0 = make_c(form, b, n, d, dtype, gen)

    x = x0.clone().to(device).requires_grad_()
    c = c0.clone().to(device).requires_grad_()
    scale = take_scale(form, c)
    if form != "contiguous":
        assert scale._base is c and scale.stride(1) == 3 * d  # the kernels get the strided view
    fwd, bwd = LAUNCHES["ada_rms_norm_fwd"], LAUNCHES["ada_rms_norm_bwd"]
    out = pf_kernels.ada_rms_norm(x, scale)
    out.backward(grad0.to(device))
    assert LAUNCHES["ada_rms_norm_fwd"] == fwd + 1 and LAUNCHES["ada_rms_norm_bwd"] == bwd + 1

    xr, cr = x0.double().requires_grad_(), c0.double().requires_grad_()
    ref = rms64(xr, take_scale(form, cr), 1e-6)
    ref.backward(grad0.double())

    assert out.dtype == dtype and out.shape == (b, n, d) and out.is_contiguous()
    close(out, ref, dtype)
    close(x.grad, xr.grad, dtype)
    # dscale of a per-sample scale sums over N tokens: allow for the longer sum.
    close(c.grad, cr.grad, dtype, widen=max(1.0, n**0.5) if form == "sample" else 1.0)


@pytest.mark.parametrize("device,dtype", CASES[:1] + CASES[2:3])
def test_eps_and_expanded_grad(device, dtype, triton_backend):
    """eps reaches the kernels (mean square ~ eps); an expanded (stride 0) incoming grad."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 40, generator=gen) * 0.03
    c0 = 0.5 * torch.randn(2, 1, 80, generator=gen)
    x, c = x0.clone().to(device).requires_grad_(), c0.clone().to(device).requires_grad_()
    out = pf_kernels.ada_rms_norm(x, c.chunk(2, dim=-1)[0], eps=1e-3)
    out.sum().backward()
    xr, cr = x0.double().requires_grad_(), c0.double().requires_grad_()
    ref = rms64(xr, cr.chunk(2, dim=-1)[0], 1e-3)
    ref.sum().backward()
    assert (ref - rms64(xr, cr.chunk(2, dim=-1)[0], 1e-6)).abs().max() > 0.1  # eps matters here
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(c.grad.double().cpu(), cr.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
@pytest.mark.parametrize("x_dtype,s_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_follows_eager_type_promotion(x_dtype, s_dtype, backend):
    """Out has eager ``x * rsqrt(..) * (1 + scale)``'s dtype (fp32 whichever is fp32), both
    routes; grads come back in each input's own dtype."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 24, generator=gen).to(x_dtype).requires_grad_()
    s = (0.5 * torch.randn(2, 3, 24, generator=gen)).to(s_dtype).requires_grad_()
    with pf_kernels.use_backend(backend):
        out = pf_kernels.ada_rms_norm(x, s)
        out.sum().backward()
    xd, sd = x.detach(), s.detach()
    eager = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6) * (1 + sd)
    assert eager.dtype == torch.float32 and out.dtype == eager.dtype
    assert (x.grad.dtype, s.grad.dtype) == (x_dtype, s_dtype)
    xr, sr = x.detach().double().requires_grad_(), s.detach().double().requires_grad_()
    rms64(xr, sr, 1e-6).sum().backward()
    torch.testing.assert_close(out.double(), rms64(xr, sr, 1e-6).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(s.grad.double(), sr.grad, atol=4e-3, rtol=4e-3)


@needs_interp
def test_routing(triton_backend):
    """float64 and the torch backend take the reference (no launch); the Triton route agrees."""
    gen = torch.Generator().manual_seed(3)
    x, s = torch.randn(2, 3, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    before = LAUNCHES["ada_rms_norm_fwd"]
    out64 = pf_kernels.ada_rms_norm(x.double(), s.double())
    assert out64.dtype == torch.float64 and LAUNCHES["ada_rms_norm_fwd"] == before
    torch.testing.assert_close(out64, rms64(x.double(), s.double(), 1e-6))
    pf_kernels.set_backend("torch")
    ref = pf_kernels.ada_rms_norm(x, s)
    assert LAUNCHES["ada_rms_norm_fwd"] == before
    pf_kernels.set_backend("triton")
    torch.testing.assert_close(pf_kernels.ada_rms_norm(x, s), ref, atol=1e-6, rtol=1e-5)
    assert LAUNCHES["ada_rms_norm_fwd"] == before + 1


#################################################################################
#         Indexed form: a (B, K, D) scale table, one row per token by index        #
#################################################################################


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape,k", [((1, 1, 37), 1), ((2, 5, 48), 2), ((3, 7, 100), 3), ((1, 300, 48), 2),
                                     ((2, 30, 200), 8), ((1, 12, 40), 11)], ids=str)
def test_indexed_forward_backward(shape, k, device, dtype, triton_backend):
    """out[b, n] = rms(x[b, n]) * (1 + table[b, index[b, n]]), the table a strided chunk view
    of a (B, K, 3D) tensor; its grad the per-token grads summed by index (K = 11: the
    scatter fallback; D = 200: several column tiles in the table kernel)."""
    b, n, d = shape
    gen = torch.Generator().manual_seed(b + n + d + k)
    x0 = (2 * torch.randn(b, n, d, generator=gen) + 0.5).to(dtype)
    c0 = (0.5 * torch.randn(b, k, 3 * d, generator=gen)).to(dtype)
    grad0 = torch.randn(b, n, d, generator=gen).to(dtype)
    index = torch.randint(0, k, (b, n), generator=gen)
    x, c = x0.clone().to(device).requires_grad_(), c0.clone().to(device).requires_grad_()
    table = c.chunk(3, dim=-1)[2]  # (B, K, D) view, row stride 3D
    fwd, bwd, tab = (LAUNCHES[f"ada_rms_norm_{s}"] for s in ("fwd", "bwd", "table_grads"))
    out = pf_kernels.ada_rms_norm_indexed(x, table, index.to(device))
    out.backward(grad0.to(device))
    assert LAUNCHES["ada_rms_norm_fwd"] == fwd + 1 and LAUNCHES["ada_rms_norm_bwd"] == bwd + 1
    assert LAUNCHES["ada_rms_norm_table_grads"] == tab + (k <= 8)

    xr, cr = x0.double().requires_grad_(), c0.double().requires_grad_()
    ref = rms64(xr, gather64(cr.chunk(3, dim=-1)[2], index), 1e-6)
    ref.backward(grad0.double())
    assert out.dtype == dtype and out.shape == (b, n, d)
    close(out, ref, dtype)
    close(x.grad, xr.grad, dtype)
    close(c.grad, cr.grad, dtype, widen=max(1.0, n**0.5))


@needs_interp
def test_indexed_matches_gathered_scale(triton_backend):
    """The indexed op equals the per-token op on the gathered rows (same kernels' arithmetic),
    and K = 1 with index 0 equals the per-sample form; int32 indices are accepted."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 40, generator=gen)
    table = torch.randn(2, 4, 40, generator=gen)
    index = torch.randint(0, 4, (2, 6), generator=gen)
    got = pf_kernels.ada_rms_norm_indexed(x, table, index.to(torch.int32))
    torch.testing.assert_close(got, pf_kernels.ada_rms_norm(x, gather64(table, index)), atol=0, rtol=0)
    row = table[:, :1]
    zeros = torch.zeros(2, 6, dtype=torch.int64)
    torch.testing.assert_close(pf_kernels.ada_rms_norm_indexed(x, row, zeros), pf_kernels.ada_rms_norm(x, row),
                               atol=0, rtol=0)  # fmt: skip


@needs_interp
def test_indexed_backward_is_deterministic(triton_backend):
    """K <= 8: the table grad is summed by the table kernel (row rstd from the backward, column
    tiles of 128, program partials added in order), not by atomics: the same bits every run."""
    from pf_kernels.ops.ada_rms_norm import ada_rms_norm_bwd

    gen = torch.Generator().manual_seed(12)
    b, n, d, k = 2, 33, 200, 5
    x, grad = torch.randn(b, n, d, generator=gen), torch.randn(b, n, d, generator=gen)
    table = torch.randn(b, k, 2 * d, generator=gen).chunk(2, dim=-1)[1]
    index = torch.randint(0, k, (b, n), generator=gen)
    before = LAUNCHES["ada_rms_norm_table_grads"]
    dx, dtable = ada_rms_norm_bwd(grad, x, table, index, 1e-6)
    assert LAUNCHES["ada_rms_norm_table_grads"] == before + 1
    xhat = x.double() / torch.sqrt(x.double().square().mean(-1, keepdim=True) + 1e-6)
    want = torch.zeros(b, k, d, dtype=torch.float64).scatter_add_(1, index[:, :, None].expand(-1, -1, d),
                                                                   grad.double() * xhat)  # fmt: skip
    assert dtable.shape == (b, k, d)
    torch.testing.assert_close(dtable.double(), want, atol=1e-4, rtol=1e-4)
    again = ada_rms_norm_bwd(grad, x, table, index, 1e-6)
    assert torch.equal(again[0], dx) and torch.equal(again[1], dtable)
    # And through autograd: two backward passes give the same bits.
    grads = []
    for _ in range(2):
        leaf = table.detach().clone().requires_grad_()
        pf_kernels.ada_rms_norm_indexed(x, leaf, index).backward(grad)
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


#################################################################################
#                          Argument checks, registration                          #
#################################################################################


def test_bad_arguments_get_clear_errors():
    x, s = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    table, index = torch.randn(2, 4, 8), torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"ada_rms_norm: x must be \(B, N, D\)"):
        pf_kernels.ada_rms_norm(x[0], s[0])
    with pytest.raises(ValueError, match=r"ada_rms_norm: scale must be \(2, 3, 8\) or \(2, 1, 8\)"):
        pf_kernels.ada_rms_norm(x, s[:, :2])
    with pytest.raises(ValueError, match="scale must be"):
        pf_kernels.ada_rms_norm(x, s[..., :7])
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got torch.int64"):
        pf_kernels.ada_rms_norm(x.long(), s)
    with pytest.raises(ValueError, match="scale must be a floating-point tensor"):
        pf_kernels.ada_rms_norm(x, s.int())
    with pytest.raises(ValueError, match=r"ada_rms_norm: the tensors must be on one device, got x on cpu, scale on"):
        pf_kernels.ada_rms_norm(x, torch.empty(2, 3, 8, device="meta"))
    with pytest.raises(ValueError, match=r"scale_table must be a \(2, K, 8\) table"):
        pf_kernels.ada_rms_norm_indexed(x, table[:1], index)
    with pytest.raises(ValueError, match=r"index must be an int64 or int32 tensor of shape \(2, 3\)"):
        pf_kernels.ada_rms_norm_indexed(x, table, index[:, :2])
    with pytest.raises(ValueError, match="index must be an int64 or int32 tensor"):
        pf_kernels.ada_rms_norm_indexed(x, table, index.float())
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 4\), got \[0, 4\]"):
        pf_kernels.ada_rms_norm_indexed(x, table, index + torch.tensor([0, 0, 4]))
    with pytest.raises(ValueError, match="must lie in"):
        pf_kernels.ada_rms_norm_indexed(x, table, index - 1)
    with pytest.raises(ValueError, match="scale_table must be a floating-point tensor"):
        pf_kernels.ada_rms_norm_indexed(x, table.long(), index)


SCHEMAS = {
    "ada_rms_norm": "(Tensor x, Tensor scale, float eps) -> Tensor",
    "ada_rms_norm_indexed": "(Tensor x, Tensor scale_table, Tensor index, float eps) -> Tensor",
    "ada_rms_norm_backward": "(Tensor grad, Tensor x, Tensor scale, Tensor? index, float eps) -> (Tensor, Tensor)",
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_registered_schemas(name):
    """triton_op infers the schemas from the annotations (torch 2.11 ignores a schema string)."""
    assert str(getattr(torch.ops.pf_kernels, name).default._schema) == f"pf_kernels::{name}{SCHEMAS[name]}"


def _opcheck_args(op, device, gen=None):
    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=gen, device=device).requires_grad_(grad)

    x = randn(2, 5, 24, grad=True)
    c = randn(2, 5, 72, grad=True)
    table = randn(2, 3, 72, grad=True).chunk(3, dim=-1)[1]
    index = torch.randint(0, 3, (2, 5), generator=gen, device=device)
    if op == "ada_rms_norm":
        return (x, c.chunk(3, dim=-1)[1], 1e-6)
    if op == "ada_rms_norm_indexed":
        return (x, table, index, 1e-6)
    g = randn(2, 5, 24)
    if op == "backward per-sample":
        return (g, x.detach(), c.detach()[:, :1, :24], None, 1e-6)
    return (g, x.detach(), table.detach(), index, 1e-6)  # backward indexed (the table kernel)


OPCHECKS = ["ada_rms_norm", "ada_rms_norm_indexed", "backward per-sample", "backward indexed"]


@needs_interp
@pytest.mark.parametrize("op", OPCHECKS)
def test_opcheck(op):
    """torch.library.opcheck; under the interpreter AOT dispatch runs without triton_op's
    functional decomposition (see test_op_adaln_modulate.test_opcheck)."""
    name = op if op.startswith("ada_rms_norm") else "ada_rms_norm_backward"
    args = _opcheck_args(op, "cpu", torch.Generator().manual_seed(2))
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(getattr(torch.ops.pf_kernels, name).default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPCHECKS)
def test_opcheck_gpu(op):
    name = op if op.startswith("ada_rms_norm") else "ada_rms_norm_backward"
    torch.manual_seed(2)
    torch.library.opcheck(getattr(torch.ops.pf_kernels, name).default, _opcheck_args(op, "cuda"))


def _norms(x, c, table, index):
    """Both forms once, as a block of the T2I model would use them."""
    h = pf_kernels.ada_rms_norm(x, c.chunk(2, dim=-1)[0])
    return pf_kernels.ada_rms_norm_indexed(h * 2, table, index) + c.chunk(2, dim=-1)[1]


def _compile_matches_eager(atol, rtol, **config):
    gen = torch.Generator().manual_seed(5)
    x, c = torch.randn(2, 6, 24, generator=gen), torch.randn(2, 6, 48, generator=gen)
    table, index = torch.randn(2, 3, 24, generator=gen), torch.randint(0, 3, (2, 6), generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, c, table)]
    torch._dynamo.reset()
    with torch._functorch.config.patch(**config):
        out = torch.compile(_norms, fullgraph=True, backend="aot_eager")(*leaves, index)
        out.square().sum().backward()
    torch._dynamo.reset()
    xr, cr, tr = (t.detach().double().requires_grad_() for t in (x, c, table))
    h = rms64(xr, cr.chunk(2, dim=-1)[0], 1e-6)
    ref = rms64(h * 2, gather64(tr, index), 1e-6) + cr.chunk(2, dim=-1)[1]
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), atol=atol, rtol=rtol)
    for got, want in zip(leaves, (xr, cr, tr)):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=atol * 10, rtol=rtol)


def test_compile_fullgraph_cpu_torch_path():
    """auto on the CPU = the torch reference: both forms trace whole, forward and backward."""
    with pf_kernels.use_backend("auto"):
        before = LAUNCHES["ada_rms_norm_fwd"]
        _compile_matches_eager(1e-5, 1e-5)
        assert LAUNCHES["ada_rms_norm_fwd"] == before


@needs_interp
def test_compile_fullgraph_triton_ops_interpreter(triton_backend):
    """The custom ops trace with fullgraph=True too (opaque nodes under the interpreter; the
    kernels run when the graph executes)."""
    before = LAUNCHES["ada_rms_norm_fwd"]
    _compile_matches_eager(1e-5, 1e-5, decompose_custom_triton_ops=False)
    assert LAUNCHES["ada_rms_norm_fwd"] >= before + 2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_gpu(dtype, triton_backend):
    """On a GPU, inductor captures the Triton kernels themselves (triton_op + wrap_triton)."""
    gen = torch.Generator().manual_seed(6)
    x, c = torch.randn(4, 64, 1152, generator=gen), 0.5 * torch.randn(4, 64, 2304, generator=gen)
    table, index = 0.5 * torch.randn(4, 2, 1152, generator=gen), torch.randint(0, 2, (4, 64), generator=gen)
    leaves = [t.to("cuda", dtype).requires_grad_() for t in (x, c, table)]
    index = index.cuda()
    torch._dynamo.reset()
    out = torch.compile(_norms, fullgraph=True)(*leaves, index)
    out.float().square().sum().backward()
    eager = [t.detach().clone().requires_grad_() for t in leaves]
    ref = _norms(*eager, index)
    ref.float().square().sum().backward()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, **tol)


def test_launchers_trace_with_symbolic_shapes(monkeypatch):
    """What triton_op's decomposition does under torch.compile(dynamic=True) on a GPU: the
    launchers run on symbolic shapes, and every constexpr comes out a plain int or bool."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import pf_kernels.ops.ada_rms_norm as rn
    import pf_kernels.ops.norm_modulate as family

    launches = []

    class Stub:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(family, "wrap", Stub)
    x = torch.randn(2, 300, 48)
    mod, mod1 = torch.randn(2, 300, 96), torch.randn(2, 1, 96)
    index = torch.zeros(2, 300, dtype=torch.int64)
    cases = [
        (lambda x, m: rn.ada_rms_norm_fwd(x, m[..., 48:], None, 1e-6), (x, mod)),
        (lambda g, x, m: rn.ada_rms_norm_bwd(g, x, m[..., 48:], None, 1e-6), (x, x, mod)),
        (lambda g, x, m: rn.ada_rms_norm_bwd(g, x, m[..., 48:], None, 1e-6), (x, x, mod1)),
        (lambda g, x, m, i: rn.ada_rms_norm_bwd(g, x, m[..., 48:], i, 1e-6), (x, x, mod1, index)),
    ]
    for fn, args in cases:
        make_fx(fn, tracing_mode="symbolic")(*args)
    assert len(launches) == len(cases) + 1  # the indexed backward adds its table kernel
    for kwargs in launches:
        for name, value in kwargs.items():
            if name.isupper() or name == "num_warps":
                assert type(value) in (int, bool), (name, value)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("per_sample", [True, False], ids=["sample", "token"])
@pytest.mark.parametrize("shape", [(1, 40, 1152), (2, 9, 1024), (2, 5, 768)], ids=str)
def test_wide_rows(shape, per_sample, device, dtype, triton_backend):
    """Rows in column tiles (D = 1152: nine of 128; 768: three of 256; 1024: one); per sample,
    (1, 40, 1152) has two programs walking several row steps."""
    b, n, d = shape
    gen = torch.Generator().manual_seed(b + n + d)
    x0 = (2 * torch.randn(b, n, d, generator=gen) + 0.5).to(dtype)
    s0 = (0.5 * torch.randn(b, 1 if per_sample else n, d, generator=gen)).to(dtype)
    grad0 = torch.randn(b, n, d, generator=gen).to(dtype)
    x, s = x0.clone().to(device).requires_grad_(), s0.clone().to(device).requires_grad_()
    out = pf_kernels.ada_rms_norm(x, s)
    out.backward(grad0.to(device))
    xr, sr = x0.double().requires_grad_(), s0.double().requires_grad_()
    ref = rms64(xr, sr, 1e-6)
    ref.backward(grad0.double())
    close(out, ref, dtype)
    close(x.grad, xr.grad, dtype)
    close(s.grad, sr.grad, dtype, widen=n**0.5 if per_sample else 1.0)
