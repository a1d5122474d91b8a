"""patch_euler: Triton kernel (interpreter on the CPU) vs a float64 per-pixel loop-free formula.

``out[b, c, h, w] = x + dt[b, n] * (mask[b, n] ? v : v_other)`` with
``n = (h // p) * (W // p) + w // p``; no v_other means a masked-out pixel keeps x.
"""

import pytest
import torch

import pf_kernels
from pf_kernels.ops._utils import LAUNCHES
from kernel_cases import device_dtype_cases, needs_interp

CASES = device_dtype_cases(cuda=(torch.float32, torch.bfloat16))
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-2, 8e-3)}


def euler64(x, v, dt, p, v_other=None, mask=None):
    b, c, h, w = x.shape
    rows = torch.arange(h) // p
    cols = torch.arange(w) // p
    n = rows[:, None] * (w // p) + cols[None, :]  # (H, W) patch index of each pixel
    dt_px = dt[:, n][:, None]  # (B, 1, H, W)
    vel = v
    if mask is not None:
        m = mask[:, n][:, None]
        vel = torch.where(m, v, v_other if v_other is not None else torch.zeros_like(v))
    return x + dt_px * vel


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("variant", ["plain", "mask", "mask_other", "in_place", "out_strided", "strided_inputs"])
@pytest.mark.parametrize(
    "shape,p",
    [
        ((2, 4, 8, 8), 2), ((1, 3, 6, 10), 2), ((2, 1, 9, 9), 3), ((1, 2, 4, 4), 1), ((1, 5, 4, 4), 4),
        ((1, 2, 4, 260), 2),  # W over one column block (128)
        ((3, 5, 40, 8), 4),  # B*C*H = 600 rows: several row tiles, the last one partial
    ],
    ids=str,
)  # fmt: skip
def test_forward(shape, p, variant, device, dtype, triton_backend):
    b, c, h, w = shape
    n = (h // p) * (w // p)
    gen = torch.Generator().manual_seed(b + c + h + w + p)
    x, v, vo = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    dt = (torch.rand(b, n, generator=gen) * 0.1).to(dtype)
    mask = torch.rand(b, n, generator=gen) < 0.5
    kw = {}
    if variant != "plain":
        kw["mask"] = mask.to(device)
    if variant in ("mask_other", "in_place", "out_strided", "strided_inputs"):
        kw["v_other"] = vo.to(device)
    ref = euler64(x.double(), v.double(), dt.double(), p, vo.double() if "v_other" in kw else None, mask if "mask" in kw else None)

    xd = x.clone().to(device)
    vd = v.to(device)
    if variant == "strided_inputs":  # read through strides, as the samplers pass them
        vd = torch.cat([vd, torch.randn_like(vd)], dim=1)[:, :c]  # channel slice of a (B, 2C, H, W) output
        xd = xd.transpose(2, 3).contiguous().transpose(2, 3)  # H and W strides swapped
        kw["v_other"] = torch.cat([kw["v_other"], kw["v_other"]])[b:]  # a batch chunk (offset storage)
        assert vd.stride(0) == 2 * c * h * w and xd.stride(2) == 1 and kw["v_other"].storage_offset() > 0
    launches = LAUNCHES["patch_euler"]
    if variant == "in_place":
        res = pf_kernels.patch_euler(xd, vd, dt.to(device), p, out=xd, **kw)
        assert res is xd
    elif variant == "out_strided":
        buf = torch.zeros(b, c, w, h, dtype=dtype, device=device).transpose(2, 3)  # (B, C, H, W) strided
        res = pf_kernels.patch_euler(xd, vd, dt.to(device), p, out=buf, **kw)
        assert res is buf
        torch.testing.assert_close(xd.cpu(), x)  # x untouched
    else:
        res = pf_kernels.patch_euler(xd, vd, dt.to(device), p, **kw)
        torch.testing.assert_close(xd.cpu(), x)
    assert LAUNCHES["patch_euler"] == launches + 1
    assert res.dtype == dtype and res.shape == shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(res.double().cpu(), ref, atol=atol, rtol=rtol)


@needs_interp
def test_grad_requests_take_the_reference(triton_backend):
    """The kernel is forward only: with grads required the differentiable reference runs."""
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    v = torch.randn(1, 2, 4, 4)
    dt = torch.full((1, 4), 0.5)
    launches = LAUNCHES["patch_euler"]
    out = pf_kernels.patch_euler(x, v, dt, 2)
    out.sum().backward()
    assert LAUNCHES["patch_euler"] == launches
    torch.testing.assert_close(x.grad, torch.ones_like(x))


@needs_interp
def test_opcheck():
    """AOT dispatch without the functional decomposition under the interpreter (see
    test_op_adaln_modulate.test_opcheck)."""
    x, v, vo = (torch.randn(2, 3, 4, 4) for _ in range(3))
    dt, mask = torch.rand(2, 4), torch.rand(2, 4) < 0.5
    op = torch.ops.pf_kernels.patch_euler_.default
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):
        torch.library.opcheck(op, (torch.empty_like(x), x, v, dt, 2, vo, mask))
        torch.library.opcheck(op, (x.clone(), None, v, dt, 2, None, None))


@pytest.mark.gpu
def test_opcheck_gpu():
    x, v = (torch.randn(2, 3, 4, 4, device="cuda") for _ in range(2))
    dt, mask = torch.rand(2, 4, device="cuda"), torch.rand(2, 4, device="cuda") < 0.5
    torch.library.opcheck(torch.ops.pf_kernels.patch_euler_.default, (torch.empty_like(x), x, v, dt, 2, None, mask))


@needs_interp
def test_half_precision_reference_computes_in_fp32_like_the_kernel(triton_backend):
    """The CPU reference and the kernel agree in fp16: both step in fp32, then round once."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 3, 8, 8, generator=gen) * 8).half()
    v = torch.randn(2, 3, 8, 8, generator=gen).half()
    dt = (torch.rand(2, 16, generator=gen) * 0.01).half()
    kernel = pf_kernels.patch_euler(x, v, dt, 2)
    pf_kernels.set_backend("torch")
    reference = pf_kernels.patch_euler(x, v, dt, 2)
    want = euler64(x.double(), v.double(), dt.double(), 2).half()  # one rounding of the exact step
    assert reference.dtype == torch.float16 and torch.equal(reference, kernel)
    assert (reference.double() - want.double()).abs().max() <= 2 ** -7  # half an fp16 ulp for |x| < 32: rounded once
