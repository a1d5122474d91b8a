"""gated_residual_modulate: Triton kernels (interpreter on the CPU) vs a float64 formula written here.

``x_new = x + gate * y``, ``h = LN(x_new) * (1 + scale) + shift`` (LN without affine), both
outputs returned and both taking grads. gate, shift and scale are the chunks 2, 3, 4 of a
modulation tensor ``c`` (gate1, shift2, scale2 of a DiT block: exactly the model's call), so
their grads go through the real chunk-view backward; per token, per sample, classic DiT
(B, 6D), separate contiguous tensors, a mix of forms, and (B, K, D) tables with an index.
"""

import pytest
import torch

import pf_kernels
from pf_kernels.ops._utils import LAUNCHES
from kernel_cases import device_dtype_cases, needs_interp

CASES = device_dtype_cases(cuda=(torch.float32, torch.float16, torch.bfloat16))
# (atol, rtol) against float64: half types round x_new before LN reads it, and the outputs
# and grads (of size up to ~10) once more.
TOL = {torch.float32: (5e-5, 5e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
# Odd D (masked power-of-two blocks), N = 1, B = 1; (1, 300, 48) gives the per-sample
# backward several programs, each looping over several row blocks.
SHAPES = [(1, 1, 37), (2, 5, 48), (3, 7, 100), (4, 1, 64), (1, 300, 48)]
FORMS = ["token", "sample", "dit", "contiguous", "mixed"]


def ref64(x, gate, y, shift, scale, eps=1e-6):
    """The float64 definition: the residual update, then LN (biased variance) and modulate."""
    x_new = x + gate * y
    mu = x_new.mean(-1, keepdim=True)
    var = ((x_new - mu) ** 2).mean(-1, keepdim=True)
    return x_new, (x_new - mu) / torch.sqrt(var + eps) * (1 + scale) + shift


def make_c(form, b, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    shape = {"token": (b, n, 6 * d), "sample": (b, 1, 6 * d), "dit": (b, 6 * d), "contiguous": (b, n, 3 * d),
             "mixed": (b, n, 6 * d)}[form]
    return 0.5 * torch.randn(shape, generator=g)


def split(form, c):
    """(gate, shift, scale) from the leaf c."""
    if form == "dit":
        return tuple(t.unsqueeze(1) for t in c.chunk(6, dim=1)[2:5])
    if form == "contiguous":
        return tuple(t.contiguous() for t in c.chunk(3, dim=-1))
    gate, shift, scale = c.chunk(6, dim=-1)[2:5]
    if form == "mixed":  # a per-sample gate and shift beside a per-token scale
        return gate[:, :1], shift[:, :1], scale
    return gate, shift, scale


def inputs(b, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(b, n, d, generator=g) + 0.5).to(dtype)  # nonzero mean: LN must remove it
    y, grad_x, grad_h = (torch.randn(b, n, d, generator=g).to(dtype) for _ in range(3))
    return x, y, grad_x, grad_h


def check(got, want, dtype, k=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.detach(), atol=atol * max(1.0, k), rtol=rtol)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, form, device, dtype, triton_backend):
    b, n, d = shape
    seed = b * 1000 + n * 10 + d
    x0, y0, gx0, gh0 = inputs(b, n, d, dtype, seed)
    c0 = make_c(form, b, n, d, seed).to(dtype)
    x, y, c = (t.clone().to(device).requires_grad_() for t in (x0, y0, c0))
    gate, shift, scale = split(form, c)
    if form not in ("contiguous", "dit"):
        assert gate._base is c and scale._base is c  # the kernels get the strided views
    fwd, bwd = LAUNCHES["gated_residual_modulate_fwd"], LAUNCHES["gated_residual_modulate_bwd"]
    x_new, h = pf_kernels.gated_residual_modulate(x, gate, y, shift, scale)
    torch.autograd.backward([x_new, h], [gx0.to(device), gh0.to(device)])
    assert LAUNCHES["gated_residual_modulate_fwd"] == fwd + 1 and LAUNCHES["gated_residual_modulate_bwd"] == bwd + 1

    xr, yr, cr = (t.double().requires_grad_() for t in (x0, y0, c0))
    g, s, sc = split(form, cr)
    want_new, want_h = ref64(xr, g, yr, s, sc)
    torch.autograd.backward([want_new, want_h], [gx0.double(), gh0.double()])

    for out in (x_new, h):
        assert out.dtype == dtype and out.shape == (b, n, d) and out.is_contiguous()
    check(x_new, want_new, dtype)
    check(h, want_h, dtype)
    check(x.grad, xr.grad, dtype)
    check(y.grad, yr.grad, dtype)
    # a per-sample modulation's grads are sums over N tokens: allow for the longer sums
    check(c.grad, cr.grad, dtype, k=1.0 if form in ("token", "contiguous") else n**0.5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
def test_equals_the_two_ops_and_follows_eager_type_promotion(backend):
    """fp16 x and y with an fp32 modulation (autocast-like): x_new and h are fp32 as eager
    ``x + gate * y`` is, grads come back in each input's dtype, and the outputs are those of
    gated_residual then adaln_modulate (on the torch path, the very same bits)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 40, generator=gen).half().requires_grad_()
    y = torch.randn(2, 3, 40, generator=gen).half().requires_grad_()
    c = (0.5 * torch.randn(2, 1, 120, generator=gen)).requires_grad_()
    gate, shift, scale = c.chunk(3, dim=-1)
    with pf_kernels.use_backend(backend):
        x_new, h = pf_kernels.gated_residual_modulate(x, gate, y, shift, scale)
        (x_new.sum() + h.square().sum()).backward()
        two = pf_kernels.gated_residual(x, gate, y)
        two_h = pf_kernels.adaln_modulate(two, shift, scale)
    assert x_new.dtype == h.dtype == torch.float32
    assert (x.grad.dtype, y.grad.dtype, c.grad.dtype) == (torch.float16, torch.float16, torch.float32)
    if backend == "torch":
        assert torch.equal(x_new, two) and torch.equal(h, two_h)
    torch.testing.assert_close(x_new, two, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h, two_h, atol=1e-5, rtol=1e-5)
    xr, yr, cr = (t.detach().double().requires_grad_() for t in (x, y, c))
    g, s, sc = cr.chunk(3, dim=-1)
    want_new, want_h = ref64(xr, g, yr, s, sc)
    (want_new.sum() + want_h.square().sum()).backward()
    torch.testing.assert_close(h.double(), want_h.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=4e-3, rtol=2e-3)
    torch.testing.assert_close(c.grad.double(), cr.grad, atol=2e-3, rtol=1e-4)


#################################################################################
#          Indexed form: (B, K, D) tables, one row per token by index (B, N)      #
#################################################################################


def gather64(table, index):
    return table.gather(1, index[:, :, None].expand(-1, -1, table.shape[-1]))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape,k", [((1, 1, 37), 1), ((2, 5, 48), 2), ((3, 7, 100), 3), ((1, 300, 48), 2),
                                     ((2, 30, 200), 8), ((1, 12, 40), 11)], ids=str)
def test_indexed_forward_backward(shape, k, device, dtype, triton_backend):
    """Tables as strided chunk views of a (B, K, 6D) tensor; K <= 8 sums the table grads in
    the kernel (D = 200: two column tiles), K = 11 scatters per-token grads."""
    b, n, d = shape
    x0, y0, gx0, gh0 = inputs(b, n, d, dtype, b + n + d + k)
    gen = torch.Generator().manual_seed(k)
    c0 = (0.5 * torch.randn(b, k, 6 * d, generator=gen)).to(dtype)
    index = torch.randint(0, k, (b, n), generator=gen)
    x, y, c = (t.clone().to(device).requires_grad_() for t in (x0, y0, c0))
    gate, shift, scale = c.chunk(6, dim=-1)[2:5]
    fwd, bwd = LAUNCHES["gated_residual_modulate_fwd"], LAUNCHES["gated_residual_modulate_bwd"]
    table = LAUNCHES["gated_residual_modulate_table_grads"]
    x_new, h = pf_kernels.gated_residual_modulate_indexed(x, gate, y, shift, scale, index.to(device))
    torch.autograd.backward([x_new, h], [gx0.to(device), gh0.to(device)])
    assert LAUNCHES["gated_residual_modulate_fwd"] == fwd + 1 and LAUNCHES["gated_residual_modulate_bwd"] == bwd + 1
    assert LAUNCHES["gated_residual_modulate_table_grads"] == table + (k <= 8)

    xr, yr, cr = (t.double().requires_grad_() for t in (x0, y0, c0))
    g, s, sc = (gather64(t, index) for t in cr.chunk(6, dim=-1)[2:5])
    want_new, want_h = ref64(xr, g, yr, s, sc)
    torch.autograd.backward([want_new, want_h], [gx0.double(), gh0.double()])
    check(x_new, want_new, dtype)
    check(h, want_h, dtype)
    check(x.grad, xr.grad, dtype)
    check(y.grad, yr.grad, dtype)
    check(c.grad, cr.grad, dtype, k=n**0.5)


@needs_interp
def test_indexed_backward_is_deterministic(triton_backend):
    """K <= 8: the table grads are summed per program in fp32 and then over programs in order
    (several programs and column tiles here): the same bits on every run, through autograd too."""
    from pf_kernels.ops.gated_residual_modulate import gated_residual_modulate_bwd

    gen = torch.Generator().manual_seed(12)
    b, n, d, k = 2, 33, 200, 5
    x_new, y, grad_x, grad_h = (torch.randn(b, n, d, generator=gen) for _ in range(4))
    gate, shift, scale = (0.5 * torch.randn(b, k, 3 * d, generator=gen)).chunk(3, dim=-1)
    index = torch.randint(0, k, (b, n), generator=gen)
    first = gated_residual_modulate_bwd(grad_h, grad_x, x_new, gate, y, shift, scale, index, 1e-6)
    second = gated_residual_modulate_bwd(grad_h, grad_x, x_new, gate, y, shift, scale, index, 1e-6)
    assert [t.shape for t in first] == [(b, n, d), (b, k, d), (b, n, d), (b, k, d), (b, k, d)]
    assert all(torch.equal(u, v) for u, v in zip(first, second))
    # the table grads against scatter-adds in float64
    rows = index[:, :, None].expand(-1, -1, d)
    xhat = torch.nn.functional.layer_norm(x_new.double(), (d,), eps=1e-6)
    for got, per_token in ((first[3], grad_h.double()), (first[4], grad_h.double() * xhat)):
        want = torch.zeros(b, k, d, dtype=torch.float64).scatter_add_(1, rows, per_token)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (x_new, gate, y, shift, scale)]
        out = pf_kernels.gated_residual_modulate_indexed(*leaves, index)
        torch.autograd.backward(out, [grad_x, grad_h])
        return [t.grad for t in leaves]

    assert all(torch.equal(u, v) for u, v in zip(grads(), grads()))


#################################################################################
#                    Registration: opcheck, compile, schemas, checks             #
#################################################################################


def _op_args(op, gen):
    x, y = (torch.randn(2, 5, 24, generator=gen, requires_grad=True) for _ in range(2))
    c = torch.randn(2, 5, 72, generator=gen, requires_grad=True)
    gate, shift, scale = c.chunk(3, dim=-1)
    if op == "gated_residual_modulate":
        return x, gate, y, shift[:, :1], scale, 1e-6  # a per-sample shift beside per-token gate and scale
    if op == "gated_residual_modulate_indexed":
        index = torch.randint(0, 5, (2, 5), generator=gen)
        return x, gate, y, shift, scale, index, 1e-6
    grads = [torch.randn(2, 5, 24, generator=gen) for _ in range(3)]
    return (*grads, gate.detach()[:, :1], y.detach(), shift.detach(), scale.detach(), None, 1e-6)


@needs_interp
@pytest.mark.parametrize("op", ["gated_residual_modulate", "gated_residual_modulate_indexed",
                                "gated_residual_modulate_backward"])
def test_opcheck(op):
    """See test_op_adaln_modulate.test_opcheck for why AOT dispatch runs without triton_op's
    functional decomposition under the interpreter."""
    args = _op_args(op, torch.Generator().manual_seed(5))
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(getattr(torch.ops.pf_kernels, op).default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["gated_residual_modulate", "gated_residual_modulate_indexed",
                                "gated_residual_modulate_backward"])
def test_opcheck_gpu(op):
    args = [a.cuda() if torch.is_tensor(a) else a for a in _op_args(op, torch.Generator().manual_seed(5))]
    torch.library.opcheck(getattr(torch.ops.pf_kernels, op).default, tuple(args))


SCHEMAS = {
    "gated_residual_modulate": "(Tensor x, Tensor gate, Tensor y, Tensor shift, Tensor scale, float eps)"
    " -> (Tensor, Tensor)",
    "gated_residual_modulate_indexed": "(Tensor x, Tensor gate, Tensor y, Tensor shift, Tensor scale, Tensor index,"
    " float eps) -> (Tensor, Tensor)",
    "gated_residual_modulate_with_stats": "(Tensor x, Tensor gate, Tensor y, Tensor shift, Tensor scale,"
    " Tensor? index, float eps) -> (Tensor, Tensor, Tensor)",
    "gated_residual_modulate_backward": "(Tensor grad_h, Tensor grad_x, Tensor x_new, Tensor gate, Tensor y,"
    " Tensor shift, Tensor scale, Tensor? index, float eps, Tensor? stats=None)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_registered_schemas(name):
    assert str(getattr(torch.ops.pf_kernels, name).default._schema) == f"pf_kernels::{name}{SCHEMAS[name]}"


def _seam(x, c, y, index=None):
    """A block's seam as the model makes it: the attention's residual fused with the MLP's input."""
    _, _, gate, shift, scale, _ = c.chunk(6, dim=-1)
    if index is None:
        x_new, h = pf_kernels.gated_residual_modulate(x, gate, y, shift, scale)
    else:
        x_new, h = pf_kernels.gated_residual_modulate_indexed(x, gate, y, shift, scale, index)
    return x_new * h.sigmoid()


@pytest.mark.parametrize("indexed", [False, True], ids=["per_token", "indexed"])
@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_interp)])
def test_compile_fullgraph(backend, indexed):
    """torch.compile(fullgraph=True) traces the op whole, forward and backward: on the CPU
    ``auto`` is the torch path; the Triton route stays an opaque custom-op node under the
    interpreter (see test_opcheck). Measured against the eager torch reference (the Triton
    route's own eager call would run the same kernels and the same registered backward)."""
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 7, 40, generator=gen), torch.randn(2, 7, 40, generator=gen)
    c = torch.randn(2, 3 if indexed else 7, 240, generator=gen)
    index = torch.randint(0, 3, (2, 7), generator=gen) if indexed else None
    with pf_kernels.use_backend(backend):
        leaves = [t.clone().requires_grad_() for t in (x, c, y)]
        torch._dynamo.reset()
        with torch._functorch.config.patch(decompose_custom_triton_ops=False):
            out = torch.compile(_seam, fullgraph=True, backend="aot_eager")(*leaves, index)
            out.square().sum().backward()
        torch._dynamo.reset()
    with pf_kernels.use_backend("torch"):
        eager = [t.clone().requires_grad_() for t in (x, c, y)]
        want = _seam(*eager, index)
        want.square().sum().backward()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_launchers_trace_with_symbolic_shapes(monkeypatch):
    """As test_dispatch's: under torch.compile(dynamic=True) on a GPU the host launchers run
    on symbolic shapes; every constexpr must come out a plain int (kernel launches stubbed)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    import pf_kernels.ops.gated_residual_modulate as grm
    import pf_kernels.ops.norm_modulate as family

    launches = []

    class Stub:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(family, "wrap", Stub)  # the kernel family's launches, ln_stats' among them
    x = torch.randn(2, 300, 48)
    mod, mod1, table = torch.randn(2, 300, 144), torch.randn(2, 1, 144), torch.randn(2, 3, 144)
    index = torch.zeros(2, 300, dtype=torch.int64)

    def fwd(x, m, y):
        gate, shift, scale = m.chunk(3, -1)
        return grm.gated_residual_modulate_fwd(x, gate, y, shift, scale, None, 1e-6)

    def bwd(g, m, y, index):
        gate, shift, scale = m.chunk(3, -1)
        return grm.gated_residual_modulate_bwd(g, g, y, gate, y, shift, scale, index, 1e-6)

    cases = [(fwd, (x, mod, x)), (lambda g, m, y: bwd(g, m, y, None), (x, mod1, x)), (bwd, (x, table, x, index))]
    for fn, args in cases:
        make_fx(fn, tracing_mode="symbolic")(*args)
    # each backward adds its statistics kernel (ln_stats), the indexed one its table kernel
    assert len(launches) == len(cases) + 3
    for kwargs in launches:
        for name, value in kwargs.items():
            if name.isupper() or name == "num_warps":
                assert type(value) in (int, bool), (name, value)


def test_bad_inputs_get_one_clear_error():
    x = torch.randn(2, 5, 8)
    c = torch.randn(2, 5, 24)
    gate, shift, scale = c.chunk(3, dim=-1)
    op, op_indexed = pf_kernels.gated_residual_modulate, pf_kernels.gated_residual_modulate_indexed
    with pytest.raises(ValueError, match=r"gated_residual_modulate: x must be \(B, N, D\)"):
        op(x[0], gate[0], x[0], shift[0], scale[0])
    with pytest.raises(ValueError, match=r"gated_residual_modulate: shift must be \(2, 5, 8\) or \(2, 1, 8\)"):
        op(x, gate, x, shift[:, :2], scale)
    with pytest.raises(ValueError, match=r"gated_residual_modulate: y must have x's shape"):
        op(x, gate, x[:, :1], shift, scale)
    with pytest.raises(ValueError, match=r"gated_residual_modulate: the tensors must be on one device"):
        op(x, gate, torch.empty(2, 5, 8, device="meta"), shift, scale)
    index = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"gated_residual_modulate_indexed: the tables must have the same K"):
        op_indexed(x, gate[:, :2], x, shift[:, :3], scale[:, :3], index)
    with pytest.raises(ValueError, match=r"gated_residual_modulate_indexed: index values must lie in \[0, 2\)"):
        op_indexed(x, gate[:, :2], x, shift[:, :2], scale[:, :2], index + 2)
    with pytest.raises(ValueError, match=r"gated_residual_modulate_indexed: index must be an int64 or int32 tensor"):
        op_indexed(x, gate[:, :2], x, shift[:, :2], scale[:, :2], index[:, :3])


#################################################################################
#            The model: unchanged outputs against the unfused composition         #
#################################################################################


def unfused_forward(model, x, t, y):
    """PatchForcingDiT's forward before the fusion: every block's gated residuals and
    modulations as separate ops (the plain per-token path, or per sample for a (B,) t)."""
    _, _, h, w = x.shape
    tokens = model.x_embedder(x) + model.pos_embed
    c = (model.embed_time(t) + model.y_embedder(y)[:, None, :]).to(tokens.dtype)
    for blk in model.blocks:
        shift1, scale1, gate1, shift2, scale2, gate2 = blk.adaLN_modulation(c).chunk(6, dim=-1)
        tokens = pf_kernels.gated_residual(tokens, gate1, blk.attn(pf_kernels.adaln_modulate(tokens, shift1, scale1)))
        tokens = pf_kernels.gated_residual(tokens, gate2, blk.mlp(pf_kernels.adaln_modulate(tokens, shift2, scale2)))
    shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=-1)
    out = model.final_layer.linear(pf_kernels.adaln_modulate(tokens, shift, scale))
    return model.unpatchify(out, h, w)


def _run(fn, model, x, t, y):
    model.zero_grad()
    out = fn(x, t, y)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("per_sample_t", [False, True], ids=["t_per_patch", "t_per_sample"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
def test_model_outputs_unchanged(backend, per_sample_t):
    """The fused model (two fused calls per block, across the block boundaries) gives the
    outputs and grads of the unfused composition: the same bits on the torch path."""
    from model_helpers import tiny_model

    model = tiny_model(dtype=torch.float32).train()
    model.y_embedder.dropout_prob = 0.0
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    t = torch.rand(2, generator=gen) if per_sample_t else torch.rand(2, 16, generator=gen)
    y = torch.tensor([3, 10])
    with pf_kernels.use_backend(backend):
        fused = _run(lambda *a: torch.cat(model(*a, return_uncertainty=True), 1), model, x, t, y)
        plain = _run(lambda *a: unfused_forward(model, *a), model, x, t, y)
    assert fused[1].keys() == plain[1].keys()
    if backend == "torch":
        assert torch.equal(fused[0], plain[0])
        assert all(torch.equal(fused[1][k], plain[1][k]) for k in plain[1])
    torch.testing.assert_close(fused[0], plain[0], atol=1e-5, rtol=1e-5)
    for k in plain[1]:
        torch.testing.assert_close(fused[1][k], plain[1][k], atol=1e-5, rtol=1e-4, msg=k)


def _indexed_backward_args(k, gen, device="cpu"):
    """Args of gated_residual_modulate_backward with (B, K, D) tables (strided chunk views)."""
    grad_h, grad_x, x_new, y = (torch.randn(2, 7, 24, generator=gen).to(device) for _ in range(4))
    gate, shift, scale = (0.5 * torch.randn(2, k, 72, generator=gen)).to(device).chunk(3, dim=-1)
    index = torch.randint(0, k, (2, 7), generator=gen).to(device)
    return grad_h, grad_x, x_new, gate, y, shift, scale, index, 1e-6


@needs_interp
@pytest.mark.parametrize("k", [3, 5])
def test_opcheck_indexed_backward(k):
    """K not a power of two: the three table grads must have the fake impl's contiguous
    layout (they once were slices of sums over the TABLE_K-padded partials)."""
    args = _indexed_backward_args(k, torch.Generator().manual_seed(20 + k))
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(torch.ops.pf_kernels.gated_residual_modulate_backward.default, args)


@needs_interp
@pytest.mark.parametrize("k", [3, 5, 8])
def test_indexed_backward_table_grads_are_contiguous(k, triton_backend):
    from pf_kernels.ops.gated_residual_modulate import _bwd_fake, gated_residual_modulate_bwd

    args = _indexed_backward_args(k, torch.Generator().manual_seed(30 + k))
    real, fake = gated_residual_modulate_bwd(*args), _bwd_fake(*args)
    for got, want in zip(real, fake):
        assert got.shape == want.shape and got.stride() == want.stride() and got.is_contiguous()
    assert real[1].stride() == real[3].stride() == real[4].stride() == (k * 24, 24, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [3, 5])
def test_opcheck_indexed_backward_gpu(k):
    torch.library.opcheck(torch.ops.pf_kernels.gated_residual_modulate_backward.default,
                          _indexed_backward_args(k, torch.Generator().manual_seed(20 + k), "cuda"))


#################################################################################
#     Wide rows in column tiles; the forward's statistics read by the backward    #
#################################################################################


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("form", ["sample", "dit", "token", "mixed"])
@pytest.mark.parametrize("shape", [(1, 40, 1152), (2, 9, 1024), (2, 5, 768)], ids=str)
def test_wide_rows(shape, form, device, dtype, triton_backend):
    """The PF widths: D = 1152 in nine column tiles of 128 (x_new stored in pass 1 and read
    back for h), 768 in three of 256, 1024 in one (x_new kept in registers). (1, 40, 1152) per
    sample: two programs walking several row steps, summing the three grads per column tile."""
    b, n, d = shape
    seed = b * 1000 + n * 10 + d
    x0, y0, gx0, gh0 = inputs(b, n, d, dtype, seed)
    c0 = make_c(form, b, n, d, seed).to(dtype)
    x, y, c = (t.clone().to(device).requires_grad_() for t in (x0, y0, c0))
    stats_fwd = LAUNCHES["gated_residual_modulate_fwd_stats"]
    stats_bwd = LAUNCHES["gated_residual_modulate_bwd_stats"]
    gate, shift, scale = split(form, c)
    x_new, h = pf_kernels.gated_residual_modulate(x, gate, y, shift, scale)
    torch.autograd.backward([x_new, h], [gx0.to(device), gh0.to(device)])
    assert LAUNCHES["gated_residual_modulate_fwd_stats"] == stats_fwd + 1
    assert LAUNCHES["gated_residual_modulate_bwd_stats"] == stats_bwd + 1
    xr, yr, cr = (t.double().requires_grad_() for t in (x0, y0, c0))
    g, s, sc = split(form, cr)
    want_new, want_h = ref64(xr, g, yr, s, sc)
    torch.autograd.backward([want_new, want_h], [gx0.double(), gh0.double()])
    check(x_new, want_new, dtype)
    check(h, want_h, dtype)
    check(x.grad, xr.grad, dtype)
    check(y.grad, yr.grad, dtype)
    check(c.grad, cr.grad, dtype, k=1.0 if form == "token" else n**0.5)


@needs_interp
@pytest.mark.parametrize("d", [1152, 48])
def test_stored_statistics_equal_recomputed(d, triton_backend):
    """The forward's statistics of x_new are those the backward would recompute; without grads
    none are stored."""
    import pf_kernels.ops.gated_residual_modulate as grm

    gen = torch.Generator().manual_seed(d)
    x = 3 * torch.randn(2, 11, d, generator=gen) + 20.0
    y, grad_x, grad_h = (torch.randn(2, 11, d, generator=gen) for _ in range(3))
    gate, shift, scale = (0.5 * torch.randn(2, 1, 3 * d, generator=gen)).chunk(3, dim=-1)
    x_new, h, stats = grm.gated_residual_modulate_fwd_stats(x, gate, y, shift, scale, None, 1e-6)
    plain = grm.gated_residual_modulate_fwd(x, gate, y, shift, scale, None, 1e-6)
    assert torch.equal(x_new, plain[0]) and torch.equal(h, plain[1])
    xd = x_new.double()
    torch.testing.assert_close(stats[..., 0].double(), xd.mean(-1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(stats[..., 1].double(), (xd.var(-1, unbiased=False) + 1e-6).rsqrt(), atol=0, rtol=1e-5)
    args = (grad_h, grad_x, x_new, gate, y, shift, scale, None, 1e-6)
    for a, b in zip(grm.gated_residual_modulate_bwd(*args, stats), grm.gated_residual_modulate_bwd(*args)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    before = LAUNCHES["gated_residual_modulate_fwd_stats"]
    with torch.no_grad():
        pf_kernels.gated_residual_modulate(x.clone().requires_grad_(), gate, y, shift, scale)
    assert LAUNCHES["gated_residual_modulate_fwd_stats"] == before


@needs_interp
@pytest.mark.parametrize("form", ["sample", "indexed"])
def test_opcheck_with_stats(form):
    gen = torch.Generator().manual_seed(41)
    x, y = (torch.randn(2, 5, 24, generator=gen, requires_grad=True) for _ in range(2))
    k = 1 if form == "sample" else 3
    gate, shift, scale = torch.randn(2, k, 72, generator=gen, requires_grad=True).chunk(3, dim=-1)
    index = None if form == "sample" else torch.randint(0, 3, (2, 5), generator=gen)
    op = torch.ops.pf_kernels.gated_residual_modulate_with_stats
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(op.default, (x, gate, y, shift, scale, index, 1e-6))
        x_new, _, stats = op(x, gate, y, shift, scale, index, 1e-6)
        grads = [torch.randn(2, 5, 24, generator=gen) for _ in range(2)]
        args = (*grads, x_new.detach(), gate.detach(), y.detach(), shift.detach(), scale.detach(), index, 1e-6, stats)
        torch.library.opcheck(torch.ops.pf_kernels.gated_residual_modulate_backward.default, args)
