"""The RMSNorm sandwich (sandwich_residual, sandwich_residual_norm_modulate): Triton kernels
(interpreter on the CPU) and the torch path vs a float64 formula written here from the blocks'
math, ``x_new = x + tanh(g) * RMS(y) * w_y`` and ``h = RMS(x_new) * w * (1 + s)``, forward and
backward through both outputs.

Cases: Lumina2's (weighted norms, per-sample gate and scale), Mochi's (unweighted), Lumina2's
unmodulated refiner blocks (no gate, no scale) and per-token gate and scale; odd D (one and
several column tiles), N = 1, a strided x (a column slice of a wider tensor), the gate and scale
as chunk views of one modulation tensor.
"""

import pytest
import torch

import pf_kernels
from pf_kernels.ops._utils import LAUNCHES
from kernel_cases import needs_interp

SHAPES = [(1, 1, 37), (2, 5, 32), (3, 7, 100)]  # N = 1; one 32-wide tile; 100 = 7 tiles of 16
Y_EPS, EPS = 1e-5, 1e-6

# (name, gate, y_weight, weight, scale, per_sample)
OPTIONS = [
    ("lumina2", True, True, True, True, True),
    ("mochi", True, False, False, True, True),
    ("lumina2_refiner", False, True, True, False, True),  # modulation=False: x + RMS_w(y), RMS_w'(x)
    ("per_token", True, True, False, True, False),
]


def rms64(v, eps):
    return v / torch.sqrt((v * v).mean(-1, keepdim=True) + eps)


def ref64(x, gate, y, scale, y_weight, weight):
    """(x_new, h) in float64, the absent terms left out."""
    ry = rms64(y, Y_EPS) * (1 if y_weight is None else y_weight)
    x_new = x + (ry if gate is None else torch.tanh(gate) * ry)
    h = rms64(x_new, EPS) * (1 if weight is None else weight)
    return x_new, h if scale is None else h * (1 + scale)


def _leaves(shape, option, seed):
    _, _, has_yw, has_w, _, per_sample = option
    b, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(b, n, d + 3, generator=gen) + 0.5)[:, :, 1:d + 1]  # strided rows (stride D + 3)
    y = 3 * torch.randn(b, n, d, generator=gen) - 1  # not unit-scale: RMS(y) matters
    mods = torch.randn(b, 1 if per_sample else n, 2 * d, generator=gen)
    y_weight = 1 + 0.5 * torch.randn(d, generator=gen) if has_yw else None
    weight = 1 + 0.5 * torch.randn(d, generator=gen) if has_w else None
    return [x, y, mods, y_weight, weight]


def _split(mods, option):
    gate, scale = mods.chunk(2, dim=-1)  # strided views
    return gate if option[1] else None, scale if option[4] else None


def _forward(leaves, option, last, backend):
    """(x_new, h) of sandwich_residual_norm_modulate, or (x_new,) of sandwich_residual (``last``)."""
    x, y, mods, y_weight, weight = leaves
    gate, scale = _split(mods, option)
    with pf_kernels.use_backend(backend):
        if last:
            return (pf_kernels.sandwich_residual(x, gate, y, y_weight=y_weight, y_eps=Y_EPS),)
        return pf_kernels.sandwich_residual_norm_modulate(x, gate, y, scale, y_weight=y_weight, weight=weight,
                                                          y_eps=Y_EPS, eps=EPS)


def _check(shape, option, last, backend, atol=2e-5):
    leaves0 = _leaves(shape, option, sum(shape))
    got_leaves = [None if t is None else t.clone().requires_grad_() for t in leaves0]
    outs = _forward(got_leaves, option, last, backend)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen) for o in outs]
    torch.autograd.backward(outs, grads)

    ref = [None if t is None else t.double().requires_grad_() for t in leaves0]
    x, y, mods, y_weight, weight = ref
    gate, scale = _split(mods, option)
    want = ref64(x, gate, y, scale, y_weight, None if last else weight)[:len(outs)]
    torch.autograd.backward(want, [g.double() for g in grads])
    for got, exp in zip(outs, want):
        assert got.dtype == torch.float32 and got.shape == shape
        torch.testing.assert_close(got.double(), exp.detach(), atol=atol, rtol=atol)
    for name, got, exp in zip("x y mods y_weight weight".split(), got_leaves, ref):
        if got is None:
            continue
        if exp.grad is None:  # weight in the last update: not used
            assert got.grad is None, name
            continue
        # per-sample and weight grads are sums over tokens
        torch.testing.assert_close(got.grad.double(), exp.grad, atol=atol * (shape[0] * shape[1]) ** 0.5 * 2,
                                   rtol=atol, msg=lambda m: f"{name}: {m}")


CASES = [(shape, option, False) for shape in SHAPES for option in OPTIONS] + [
    (shape, option, True) for shape in (SHAPES[0], SHAPES[2]) for option in OPTIONS]


@needs_interp
@pytest.mark.parametrize("shape,option,last", CASES,
                         ids=[f"{s}-{o[0]}-{'last_update' if last else 'with_next_norm'}" for s, o, last in CASES])
def test_triton_against_float64(shape, option, last, triton_backend):
    op = "sandwich_residual" if last else "sandwich_residual_norm_modulate"
    before = LAUNCHES[f"{op}_fwd"], LAUNCHES[f"{op}_bwd"]
    _check(shape, option, last, "triton")
    assert (LAUNCHES[f"{op}_fwd"], LAUNCHES[f"{op}_bwd"]) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("last", [False, True], ids=["with_next_norm", "last_update"])
@pytest.mark.parametrize("option", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_torch_path_against_float64(option, last):
    _check((2, 5, 37), option, last, "torch", atol=1e-5)


@needs_interp
def test_half_stream_with_fp32_gate(triton_backend):
    """Mochi's pattern in half precision (the interpreter has no bf16): x, y fp16, the gate and
    scale fp32; x_new and h written fp16 from fp32 arithmetic, grads in each input's dtype,
    close to eager's chain (which rounds RMS(y) * tanh(g) to fp16 before the add)."""
    gen = torch.Generator().manual_seed(4)
    x0, y0 = (torch.randn(2, 5, 40, generator=gen).half() for _ in range(2))
    g0, s0 = (torch.randn(2, 1, 40, generator=gen) for _ in range(2))
    gx, gh = (torch.randn(2, 5, 40, generator=gen).half() for _ in range(2))

    def run(fused):
        leaves = [t.clone().requires_grad_() for t in (x0, y0, g0, s0)]
        x, y, g, s = leaves
        if fused:
            outs = pf_kernels.sandwich_residual_norm_modulate(x, g, y, s, y_eps=Y_EPS, eps=EPS,
                                                              out_dtype=torch.float16)
        else:
            x_new = x + (rms64(y.float(), Y_EPS) * torch.tanh(g)).half()
            outs = x_new, (rms64(x_new.float(), EPS) * (1 + s)).half()
        torch.autograd.backward(outs, [gx, gh])
        return outs, leaves

    (got, got_leaves), (want, want_leaves) = run(True), run(False)
    for a, b in zip(got, want):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.float(), b.float(), atol=4e-3, rtol=4e-3)
    for a, b in zip(got_leaves, want_leaves):
        assert a.grad.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=2e-2, rtol=1e-2)


@needs_interp
def test_opcheck():
    gen = torch.Generator().manual_seed(5)
    x, y = (torch.randn(2, 3, 24, generator=gen, requires_grad=True) for _ in range(2))
    c = torch.randn(2, 1, 48, generator=gen, requires_grad=True)
    gate, scale = c.chunk(2, dim=-1)
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(torch.ops.pf_kernels.sandwich_residual_norm_modulate.default,
                              (x, gate, y, scale, 1e-5, 1e-6, torch.float32))
        torch.library.opcheck(torch.ops.pf_kernels.sandwich_residual.default, (x, None, y, 1e-5, torch.float32))
