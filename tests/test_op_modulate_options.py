"""The general norm/modulate forms (norm_modulate, residual, residual_norm_modulate): Triton
kernels (interpreter on the CPU) and the torch path vs a float64 formula written here.

Options: an affine LayerNorm / RMSNorm (weight, bias), RMSNorm with a shift, no modulation at
all (Wan's affine norm2), the ungated residual (gate None) and an output dtype. Odd D, N = 1,
a strided x (a column slice of a wider tensor) and modulations as chunk views.
"""

import pytest
import torch

import pf_kernels
from pf_kernels.ops._utils import LAUNCHES
from kernel_cases import needs_interp

SHAPES = [(1, 1, 37), (2, 5, 48), (3, 7, 100)]


def norm64(x, rms, eps=1e-6):
    if rms:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def ref64(x, shift, scale, weight, bias, rms, gate=None, y=None, residual=False):
    """(x_new, h) in float64: the update x + gate * y (x + y without gate), then
    (norm(x_new) * weight + bias) * (1 + scale) + shift with the absent terms left out."""
    if residual:
        x = x + (y if gate is None else gate * y)
    h = norm64(x, rms)
    if weight is not None:
        h = h * weight
    if bias is not None:
        h = h + bias
    if scale is not None:
        h = h * (1 + scale)
    if shift is not None:
        h = h + shift
    return x, h


# (name, rms, affine weight, affine bias, shift, scale, per_sample): the diffusers cases
OPTIONS = [
    ("ln_affine_sample", False, True, True, True, True, True),  # CogVideoX's LayerNormZero
    ("ln_affine_only", False, True, True, False, False, True),  # Wan's norm2 (cross_attn_norm)
    ("rms_shift_token", True, False, False, True, True, False),  # LTX-Video's RMSNorm + shift, per token
    ("rms_weight_scale", True, True, False, False, True, True),  # Lumina2/Mochi's RMS_w(x) * (1 + s)
    ("ln_plain_sample", False, False, False, True, True, True),  # AdaLayerNormZero
]


def _leaves(shape, option, seed, dtype=torch.float32, mod_dtype=None):
    _, rms, has_w, has_b, has_shift, has_scale, per_sample = option
    b, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    wide = 2 * torch.randn(b, n, d + 3, generator=gen) + 0.5
    x = wide.to(dtype)[:, :, 1:d + 1]  # strided rows (stride D + 3), nonzero mean
    mods = 0.5 * torch.randn(b, 1 if per_sample else n, 3 * d, generator=gen)
    mods = mods.to(mod_dtype or dtype)
    w = (1 + 0.5 * torch.randn(d, generator=gen)).to(dtype) if has_w else None
    bb = (0.5 * torch.randn(d, generator=gen)).to(dtype) if has_b else None
    y = torch.randn(b, n, d, generator=gen).to(dtype)
    gh, gx = torch.randn(b, n, d, generator=gen), torch.randn(b, n, d, generator=gen)
    return x, mods, w, bb, y, gh, gx


def _split(mods, option):
    _, _, _, _, has_shift, has_scale, _ = option
    gate, shift, scale = mods.chunk(3, dim=-1)  # strided views
    return gate, shift if has_shift else None, scale if has_scale else None


def _run(backend, x0, mods0, w0, b0, y0, option, residual, gated, out_dtype=None):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x0, mods0, w0, b0, y0)]
    x, mods, w, b, y = leaves
    gate, shift, scale = _split(mods, option)
    rms = option[1]
    with pf_kernels.use_backend(backend):
        if residual:
            x_new, h = pf_kernels.residual_norm_modulate(x, gate if gated else None, y, shift, scale, weight=w,
                                                         bias=b, rms=rms, out_dtype=out_dtype)
        else:
            x_new, h = None, pf_kernels.norm_modulate(x, shift, scale, weight=w, bias=b, rms=rms,
                                                      out_dtype=out_dtype)
    return leaves, x_new, h


def _check_against_ref(shape, option, residual, gated, backend, atol=2e-5):
    x0, mods0, w0, b0, y0, gh, gx = _leaves(shape, option, sum(shape))
    leaves, x_new, h = _run(backend, x0, mods0, w0, b0, y0, option, residual, gated)
    outs, grads = ([x_new, h], [gx, gh]) if residual else ([h], [gh])
    torch.autograd.backward(outs, grads)

    ref = [None if t is None else t.detach().double().requires_grad_() for t in (x0, mods0, w0, b0, y0)]
    xr, mr, wr, br, yr = ref
    g, s, sc = _split(mr, option)
    want_new, want_h = ref64(xr, s, sc, wr, br, option[1], g if gated else None, yr, residual)
    want = [want_new, want_h] if residual else [want_h]
    torch.autograd.backward(want, [t.double() for t in grads])
    for got, exp in zip(outs, want):
        assert got.dtype == torch.float32 and got.shape == shape
        torch.testing.assert_close(got.double(), exp.detach(), atol=atol, rtol=atol)
    for got, exp in zip(leaves, ref):
        if got is None:
            continue
        if exp.grad is None:  # y without a residual
            assert got.grad is None
            continue
        # per-sample and affine grads are sums over tokens
        torch.testing.assert_close(got.grad.double(), exp.grad, atol=atol * shape[1] ** 0.5 * 2, rtol=atol)


@needs_interp
@pytest.mark.parametrize("option", OPTIONS, ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_norm_modulate_triton(shape, option, triton_backend):
    before = LAUNCHES["norm_modulate_fwd"], LAUNCHES["norm_modulate_bwd"]
    _check_against_ref(shape, option, residual=False, gated=False, backend="triton")
    assert (LAUNCHES["norm_modulate_fwd"], LAUNCHES["norm_modulate_bwd"]) == (before[0] + 1, before[1] + 1)


@needs_interp
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("option", OPTIONS, ids=[o[0] for o in OPTIONS])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_residual_norm_modulate_triton(shape, option, gated, triton_backend):
    before = LAUNCHES["residual_norm_modulate_fwd"], LAUNCHES["residual_norm_modulate_bwd"]
    _check_against_ref(shape, option, residual=True, gated=gated, backend="triton")
    assert LAUNCHES["residual_norm_modulate_fwd"] == before[0] + 1
    assert LAUNCHES["residual_norm_modulate_bwd"] == before[1] + 1


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "residual"])
@pytest.mark.parametrize("option", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_torch_path(option, residual):
    _check_against_ref((2, 5, 48), option, residual=residual, gated=True, backend="torch", atol=1e-5)


@pytest.mark.parametrize("backend,dtype", [pytest.param("triton", torch.float16, marks=needs_interp),
                                           ("torch", torch.bfloat16)], ids=["triton-fp16", "torch-bf16"])
def test_out_dtype_keeps_a_half_stream_with_fp32_modulations(backend, dtype):
    """Wan's pattern: x, y in half precision, fp32 gate/shift/scale, everything computed in fp32
    and the stream and h written in x's dtype (the interpreter has no bf16: fp16 there)."""
    option = OPTIONS[4]
    x0, mods0, _, _, y0, gh, gx = _leaves((2, 5, 48), option, 3, dtype=dtype, mod_dtype=torch.float32)
    leaves, x_new, h = _run(backend, x0, mods0, None, None, y0, option, True, True, out_dtype=dtype)
    assert x_new.dtype == h.dtype == dtype
    torch.autograd.backward([x_new, h], [gx.to(dtype), gh.to(dtype)])
    x, mods, _, _, y = leaves
    assert (x.grad.dtype, y.grad.dtype, mods.grad.dtype) == (dtype, dtype, torch.float32)
    # eager Wan: (x.float() + y * gate).type_as(x), then (LN(x_new.float()) * (1 + scale) + shift).type_as(x)
    gate, shift, scale = mods0.chunk(3, dim=-1)
    want_new = (x0.float() + y0 * gate).to(dtype)
    want_h = (torch.nn.functional.layer_norm(want_new.float(), (48,), eps=1e-6) * (1 + scale) + shift).to(dtype)
    torch.testing.assert_close(x_new, want_new, atol=0, rtol=0)
    ulp = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(h.float(), want_h.float(), atol=2 * ulp, rtol=ulp)
    with pf_kernels.use_backend(backend):
        out = pf_kernels.residual(x0, gate, y0, out_dtype=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, want_new, atol=0, rtol=0)


@needs_interp
def test_residual_out_dtype_grads(triton_backend):
    """The gated residual writing fp16 from fp32 arithmetic: grads as eager's through the cast."""
    gen = torch.Generator().manual_seed(8)
    x0, y0 = (torch.randn(2, 3, 37, generator=gen).half() for _ in range(2))
    g0 = torch.randn(2, 1, 37, generator=gen)
    grad = torch.randn(2, 3, 37, generator=gen).half()
    got = [t.clone().requires_grad_() for t in (x0, g0, y0)]
    out = pf_kernels.residual(got[0], got[1], got[2], out_dtype=torch.float16)
    out.backward(grad)
    want = [t.clone().requires_grad_() for t in (x0, g0, y0)]
    (want[0].float() + want[2] * want[1]).half().backward(grad)
    assert out.dtype == torch.float16
    for a, b in zip(got, want):
        assert a.grad.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad, b.grad, atol=2e-3, rtol=2e-3)


def test_bad_affine_shape_is_one_clear_error():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"weight must be a \(8,\) tensor"):
        pf_kernels.norm_modulate(x, weight=torch.ones(7))


@needs_interp
@pytest.mark.parametrize("op", ["norm_modulate", "residual_norm_modulate", "gated_residual_to"])
def test_opcheck(op):
    gen = torch.Generator().manual_seed(5)
    x, y = (torch.randn(2, 3, 24, generator=gen, requires_grad=True) for _ in range(2))
    c = torch.randn(2, 1, 72, generator=gen, requires_grad=True)
    gate, shift, scale = c.chunk(3, dim=-1)
    args = {"norm_modulate": (x, shift, scale, True, 1e-6, torch.float32),
            "residual_norm_modulate": (x, None, y, shift, scale, False, 1e-6, torch.float32),
            "gated_residual_to": (x, gate, y, torch.float16)}[op]
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(getattr(torch.ops.pf_kernels, op).default, args)


def _block_seam(x, c, y):
    gate, shift, scale = c.chunk(3, dim=-1)
    x_new, h = pf_kernels.residual_norm_modulate(x, None, y, shift, scale, rms=True)
    x_new = pf_kernels.residual(x_new, gate, h, out_dtype=torch.float32)
    return pf_kernels.norm_modulate(x_new, shift, None, weight=scale[0, 0], rms=False) * h.sigmoid()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interp)])
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the general forms, forward and backward: the torch
    path on the CPU, or the Triton route as opaque custom-op nodes under the interpreter (as
    test_op_gated_residual_modulate.test_compile_fullgraph), against the eager torch path."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 4, 24, generator=gen), torch.randn(2, 4, 24, generator=gen)
    c = torch.randn(2, 1, 72, generator=gen)
    with pf_kernels.use_backend(backend):
        leaves = [t.clone().requires_grad_() for t in (x, c, y)]
        torch._dynamo.reset()
        with torch._functorch.config.patch(decompose_custom_triton_ops=False):
            got = torch.compile(_block_seam, fullgraph=True, backend="aot_eager")(*leaves)
            got.square().sum().backward()
        torch._dynamo.reset()
    with pf_kernels.use_backend("torch"):
        eager = [t.clone().requires_grad_() for t in (x, c, y)]
        want = _block_seam(*eager)
        want.square().sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)
