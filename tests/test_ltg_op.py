"""pf_kernels.ltg_sample: the compiled LTG sampler (SPEC.md sections 4 and 8).

Three independent checks:
- a pure-Python model of csrc/ltg.h (Philox from test_philox.py, the uniform/normal
  mapping and the series, in numpy float32 / float64 scalars) reproduces the op bit for bit:
  this pins the counter layout and the arithmetic;
- the distribution matches a plain PyTorch implementation of SPEC's LTG (KS statistics of
  per-row summaries, since patches of a row share tbar), and the patch ratios t / tbar
  follow their closed-form law, resampled fraction included;
- the CUDA op equals the CPU op bit for bit (GPU only).
"""

import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from pf_kernels import ltg_sample
from test_philox import philox4x32_10

# ------------------------------------------------------------------ pure-Python model
F32 = dict(F=np.float32, U=np.uint32, mant=23, bias=127, sqrt_half=0x3F3504F3, log_terms=6,
           trig_terms=6, exp_terms=8, exp_max=80.0, ln2_log=(0.693145751953125, 1.428606765330187e-06),
           ln2_exp=(0.693359375, -2.12194440e-4))
F64 = dict(F=np.float64, U=np.uint64, mant=52, bias=1023, sqrt_half=0x3FE6A09E667F3BCD, log_terms=11,
           trig_terms=10, exp_terms=14, exp_max=700.0,
           ln2_log=(6.93147180369123816490e-01, 1.90821492927058770002e-10),
           ln2_exp=(6.93145751953125e-1, 1.42860682030941723212e-6))
INV_FACT = [1.0 / math.prod(range(1, n + 1)) for n in range(23)]  # 1/n!, n! exact in double


def _from_bits(P, u):
    return np.array(u, dtype=P["U"]).view(P["F"])[()]


def _bits(P, x):
    return int(np.array(x, dtype=P["F"]).view(P["U"]))


def py_uniform(P, w):
    F = P["F"]
    return F(w >> 8) * F(2.0**-24) if F is np.float32 else F(w) * F(2.0**-32)


def py_log_unit(P, x):
    F, mant = P["F"], P["mant"]
    ix = _bits(P, x) - P["sqrt_half"]
    e = ix >> mant  # floor, as the C arithmetic shift
    m = _from_bits(P, (ix & ((1 << mant) - 1)) + P["sqrt_half"])
    s = (m - F(1)) / (m + F(1))
    z = s * s
    p = F(1.0 / (2 * P["log_terms"] - 1))
    for k in range(P["log_terms"] - 2, -1, -1):
        p = p * z + F(1.0 / (2 * k + 1))
    log_m = (F(2) * s) * p
    ef = F(e)
    hi, lo = P["ln2_log"]
    return ef * F(hi) + (ef * F(lo) + log_m)


def py_cos_2pi(P, v):
    F, n = P["F"], P["trig_terms"]
    y = v * F(4)
    q = int(y + F(0.5))
    r = y - F(q)
    th = r * F(1.57079632679489661923)
    z = th * th

    def coef(j, k):  # (-1)^k / j!
        return F(-INV_FACT[j] if k % 2 else INV_FACT[j])

    pc, ps = coef(2 * n - 2, n - 1), coef(2 * n - 1, n - 1)
    for k in range(n - 2, -1, -1):
        pc = pc * z + coef(2 * k, k)
        ps = ps * z + coef(2 * k + 1, k)
    mag = th * ps if q & 1 else pc
    return mag * (F(-1) if (q + 1) & 2 else F(1))


def py_normal(P, wa, wb):
    F = P["F"]
    radius = np.sqrt(F(-2) * py_log_unit(P, F(1) - py_uniform(P, wa)))
    return radius * py_cos_2pi(P, py_uniform(P, wb))


def py_exp(P, a):
    F = P["F"]
    a = F(min(max(a, F(-P["exp_max"])), F(P["exp_max"])))
    scaled = a * F(1.44269504088896340736)
    kf = F(int(scaled + (F(0.5) if a >= 0 else F(-0.5))))  # int(): truncation, as C
    hi, lo = P["ln2_exp"]
    r = (a - kf * F(hi)) - kf * F(lo)
    n = P["exp_terms"]
    p = F(INV_FACT[n - 1])
    for j in range(n - 2, -1, -1):
        p = p * r + F(INV_FACT[j])
    return p * _from_bits(P, (int(kf) + P["bias"]) << P["mant"])


def _words(seed, counter, stream):
    counter %= 1 << 64
    seed %= 1 << 64
    return philox4x32_10((counter & 0xFFFFFFFF, counter >> 32, stream, 0), (seed & 0xFFFFFFFF, seed >> 32))


def py_row(P, seed, row_counter, loc=0.7, scale=1.0, std=0.6):
    """(tbar, sd) of the row whose first element has counter row_counter (stream 1)."""
    F = P["F"]
    w = _words(seed, row_counter, 1)
    n0 = py_normal(P, w[0], w[1])
    x = F(loc) + F(scale) * n0
    tbar = F(1) / (F(1) + py_exp(P, -x))
    half = tbar * F(0.5)
    return tbar, (half if half < F(std) else F(std))


def py_patch(P, seed, counter, tbar, sd):
    """(t, resampled) of the element with this counter (stream 0)."""
    F = P["F"]
    w = _words(seed, counter, 0)
    n = py_normal(P, w[0], w[1])
    t = tbar - abs(n) * sd
    return (py_uniform(P, w[2]) * tbar, True) if t < F(0) else (t, False)


def py_ltg(P, batch, num_patches, seed, offset, **params):
    out = np.empty((batch, num_patches), dtype=P["F"])
    for b in range(batch):
        tbar, sd = py_row(P, seed, offset + b * num_patches, **params)
        for i in range(num_patches):
            out[b, i] = py_patch(P, seed, offset + b * num_patches + i, tbar, sd)[0]
    return out


PRECISIONS = [(torch.float32, F32), (torch.float64, F64)]


# ------------------------------------------------------------- exact layout checks
@pytest.mark.parametrize("dtype,P", PRECISIONS)
@pytest.mark.parametrize(
    "shape,seed,offset",
    [((3, 5), 0, 0), ((1, 1), 7, 0), ((2, 7), 2**40 + 3, 2**32 - 5), ((4, 3), -1, 123456789)],
)
def test_matches_python_model_exactly(dtype, P, shape, seed, offset):
    got = ltg_sample(*shape, seed=seed, offset=offset, dtype=dtype)
    want = py_ltg(P, *shape, seed=seed, offset=offset)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("dtype,P", PRECISIONS)
def test_matches_python_model_other_parameters(dtype, P):
    params = dict(loc=-1.3, scale=2.5, std=0.05)
    got = ltg_sample(2, 6, seed=99, offset=17, dtype=dtype, **params)
    np.testing.assert_array_equal(got.numpy(), py_ltg(P, 2, 6, seed=99, offset=17, **params))


def test_first_elements_of_an_odd_shape():
    got = ltg_sample(5, 123, seed=2024, offset=10**12)
    for b, i in [(0, 0), (0, 1), (0, 122), (4, 0), (4, 122), (2, 61)]:
        tbar, sd = py_row(F32, 2024, 10**12 + b * 123)
        assert got[b, i].item() == float(py_patch(F32, 2024, 10**12 + b * 123 + i, tbar, sd)[0])


@pytest.mark.parametrize("P,tol", [(F32, 2e-6), (F64, 1e-14)])
def test_series_are_accurate(P, tol):
    # The own log/cos/exp of ltg.h (as modelled above) against libm.
    rng = np.random.default_rng(0)
    F = P["F"]
    for x in list(rng.random(200)) + [1.0, 0.5, 2.0**-24, 0.70710677, 0.999999]:
        x = F(max(x, 2.0**-24))
        assert abs(float(py_log_unit(P, x)) - math.log(float(x))) <= tol * max(1.0, abs(math.log(float(x))))
    for v in list(rng.random(200)) + [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 0.999]:
        v = F(v)
        assert abs(float(py_cos_2pi(P, v)) - math.cos(2 * math.pi * float(v))) <= tol
    for a in list(rng.uniform(-30, 30, 200)) + [0.0, 80.0, -80.0]:
        a = F(a)
        assert abs(float(py_exp(P, a)) / math.exp(float(a)) - 1) <= 2 * tol


# --------------------------------------------------------------- determinism, bounds
def test_deterministic_per_seed_and_offset():
    a = ltg_sample(64, 256, seed=5, offset=1000)
    assert torch.equal(a, ltg_sample(64, 256, seed=5, offset=1000))
    assert not torch.equal(a, ltg_sample(64, 256, seed=5, offset=1000 + 64 * 256))
    assert not torch.equal(a, ltg_sample(64, 256, seed=6, offset=1000))
    # Any offset change moves every element: no two consecutive calls share a value.
    b = ltg_sample(64, 256, seed=5, offset=1001)
    assert (a != b).float().mean() > 0.99


def test_counter_layout_rows_are_shifted_calls():
    # Row b of a (B, N) call is the (1, N) call at offset + b*N: counter = offset + b*N + i.
    full = ltg_sample(6, 37, seed=3, offset=11)
    for b in range(6):
        assert torch.equal(full[b], ltg_sample(1, 37, seed=3, offset=11 + b * 37)[0])


def test_values_in_unit_interval_and_below_row_max():
    batch, n = 64, 256
    t = ltg_sample(batch, n, seed=11, offset=7).double()
    assert t.min() >= 0 and t.max() <= 1
    tbar = torch.tensor([float(py_row(F32, 11, 7 + b * n)[0]) for b in range(batch)], dtype=torch.float64)
    assert (t <= tbar[:, None]).all()
    assert (t.max(dim=1).values > 0.8 * tbar).all()  # the maximum sits near tbar


def test_resampled_fraction():
    # At the defaults tbar < 1.2, so sd = tbar/2 and P(t_i < 0) = P(|n| > 2) = 4.55%.
    batch, n, seed, offset = 128, 128, 21, 4096
    t = ltg_sample(batch, n, seed=seed, offset=offset).numpy()
    count = 0
    for b in range(batch):
        tbar, sd = py_row(F32, seed, offset + b * n)
        for i in range(n):
            value, resampled = py_patch(F32, seed, offset + b * n + i, tbar, sd)
            assert t[b, i] == value
            count += resampled
    frac = count / (batch * n)
    assert abs(frac - 2 * (1 - 0.5 * (1 + math.erf(2 / math.sqrt(2))))) < 0.006, frac


# ------------------------------------------------------------------- distribution
def ltg_torch(batch, n, generator, loc=0.7, scale=1.0, std=0.6):
    """SPEC section 4 LTG in plain PyTorch (float64)."""
    n0 = torch.randn(batch, 1, generator=generator, dtype=torch.float64)
    tbar = torch.sigmoid(loc + scale * n0)
    sd = torch.clamp(tbar / 2, max=std)
    t = tbar - torch.randn(batch, n, generator=generator, dtype=torch.float64).abs() * sd
    u = torch.rand(batch, n, generator=generator, dtype=torch.float64)
    return torch.where(t < 0, u * tbar, t)


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = torch.sort(a.double()).values, torch.sort(b.double()).values
    grid = torch.cat([a, b])
    fa = torch.searchsorted(a, grid, right=True).double() / a.numel()
    fb = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return (fa - fb).abs().max().item()


@pytest.mark.parametrize("params", [{}, dict(loc=-0.5, scale=0.5, std=0.1)])
def test_distribution_matches_spec_ltg(params):
    rows, n = 16384, 64
    got = ltg_sample(rows, n, seed=123, offset=0, **params).double()
    ref = ltg_torch(rows, n, torch.Generator().manual_seed(0), **params)
    # Rows share tbar, so compare per-row summaries (independent across rows).
    # 99.9% two-sample critical value: 1.95 * sqrt(2 / rows) = 0.0215.
    for name, f in [
        ("max", lambda t: t.max(1).values),
        ("mean", lambda t: t.mean(1)),
        ("spread", lambda t: t.max(1).values - t.min(1).values),
    ]:
        d = ks_statistic(f(got), f(ref))
        assert d < 0.0215, f"row {name}: KS {d:.4f}"


def test_patch_ratio_follows_closed_form():
    # r = t / tbar: 1 - |n|/2 when |n| <= 2, else U(0,1):
    # CDF(x) = 2 (Phi(2) - Phi(2 - 2x)) + 2 (1 - Phi(2)) x.
    batch, n, seed = 512, 256, 8
    t = ltg_sample(batch, n, seed=seed, dtype=torch.float64)
    tbar = torch.tensor([float(py_row(F64, seed, b * n)[0]) for b in range(batch)], dtype=torch.float64)
    r = torch.sort((t / tbar[:, None]).flatten()).values
    phi = lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # noqa: E731
    cdf = 2 * (phi(torch.tensor(2.0)) - phi(2 - 2 * r)) + 2 * (1 - phi(torch.tensor(2.0))) * r
    m = r.numel()
    emp_hi = torch.arange(1, m + 1, dtype=torch.float64) / m
    d = torch.maximum(emp_hi - cdf, cdf - (emp_hi - 1 / m)).max().item()
    # Patches within a row are independent given tbar, and r does not depend on tbar here.
    assert d < 1.95 / math.sqrt(m), d


# ---------------------------------------------------------- dtypes, devices, compile
def test_shapes_dtypes_and_empty():
    assert ltg_sample(0, 5, seed=0).shape == (0, 5)
    assert ltg_sample(3, 0, seed=0).shape == (3, 0)
    base = ltg_sample(4, 9, seed=1)
    assert base.dtype == torch.float32 and base.device.type == "cpu"
    for dt in (torch.float16, torch.bfloat16):
        half = ltg_sample(4, 9, seed=1, dtype=dt)
        assert half.dtype == dt and torch.equal(half, base.to(dt))
    x64 = ltg_sample(4, 9, seed=1, dtype=torch.float64)
    assert (x64 - base.double()).abs().max() < 2e-3  # different uniform resolution only


def test_meta_device_and_compile():
    m = ltg_sample(3, 4, seed=0, device="meta", dtype=torch.float64)
    assert m.shape == (3, 4) and m.device.type == "meta" and m.dtype == torch.float64

    def f(offset):
        return ltg_sample(8, 16, seed=4, offset=offset) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(0), f(0))
    assert torch.equal(compiled(128), f(128))


def test_opcheck():
    op = torch.ops.pf_kernels.ltg_sample.default
    torch.library.opcheck(op, (3, 5, 0.7, 1.0, 0.6, 1, 0, torch.float32, torch.device("cpu")))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,seed,offset",
    [((256, 256), 0, 0), ((5, 123), 2**40 + 3, 2**32 - 100), ((1024, 256), -7, 10**15), ((1, 1), 1, 0)],
)
def test_cuda_bit_equal_to_cpu(dtype, shape, seed, offset):
    cpu = ltg_sample(*shape, seed=seed, offset=offset, dtype=dtype)
    gpu = ltg_sample(*shape, seed=seed, offset=offset, dtype=dtype, device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
def test_cuda_uses_current_stream():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = ltg_sample(64, 64, seed=2, device="cuda")
    s.synchronize()
    assert torch.equal(out.cpu(), ltg_sample(64, 64, seed=2))


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,err",
    [
        (dict(batch=-1), ValueError),
        (dict(num_patches=-3), ValueError),
        (dict(batch=2.5), TypeError),
        (dict(loc=float("nan")), ValueError),
        (dict(scale=float("inf")), ValueError),
        (dict(std=float("-inf")), ValueError),
        (dict(std=0.0), ValueError),
        (dict(std=-0.1), ValueError),
        (dict(loc="a"), TypeError),
        (dict(dtype=torch.int32), TypeError),
        (dict(dtype=torch.complex64), TypeError),
        (dict(dtype="float32"), TypeError),
        (dict(device="mps"), ValueError),
        (dict(seed=2**64), ValueError),
        (dict(seed=1.5), TypeError),
        (dict(offset=-1), ValueError),
        (dict(offset=2**64), ValueError),
    ],
)
def test_bad_input(kwargs, err):
    args = dict(batch=2, num_patches=3, seed=0)
    args.update(kwargs)
    batch, n = args.pop("batch"), args.pop("num_patches")
    with pytest.raises(err):
        ltg_sample(batch, n, **args)


def test_op_checks_its_arguments():
    op = torch.ops.pf_kernels.ltg_sample
    cpu = torch.device("cpu")
    with pytest.raises(RuntimeError, match="sizes"):
        op(-1, 3, 0.7, 1.0, 0.6, 0, 0, torch.float32, cpu)
    with pytest.raises(RuntimeError, match="std"):
        op(1, 3, 0.7, 1.0, 0.0, 0, 0, torch.float32, cpu)
    with pytest.raises(RuntimeError, match="dtype"):
        op(1, 3, 0.7, 1.0, 0.6, 0, 0, torch.float16, cpu)


def test_seed_is_taken_modulo_2_64():
    assert torch.equal(ltg_sample(2, 3, seed=-1), ltg_sample(2, 3, seed=2**64 - 1))


# ------------------------------------------------------------- pf.timesteps wiring
def test_timesteps_make_ltg_compiled_advances_offset():
    from pf import timesteps

    s = timesteps.make("ltg", seed=42)
    assert s.backend == "compiled" and s.offset == 0
    a, b = s(4, 16), s(4, 16)
    assert s.offset == 2 * 4 * 16
    assert torch.equal(a, ltg_sample(4, 16, seed=42, offset=0))
    assert torch.equal(b, ltg_sample(4, 16, seed=42, offset=64))
    resumed = timesteps.make("ltg")
    resumed.load_state_dict({"seed": 42, "offset": 64})
    assert torch.equal(resumed(4, 16), b) and resumed.state_dict() == {"seed": 42, "offset": 128}


def test_timesteps_make_ltg_torch_backend_uses_generator():
    from pf import timesteps

    s = timesteps.make("ltg", backend="torch")
    a = s(4, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, s(4, 16, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError):
        timesteps.make("ltg", backend="cuda")


def test_portable_cpu_path_equals_avx2_path():
    # PF_LTG_NO_AVX2=1 makes the CPU kernel skip its AVX2 Philox; the bits must not change.
    # The child loads only the extension module (not pf_kernels and its Triton imports).
    from pf_kernels.ltg import load_extension

    ext = load_extension()
    code = (
        "import importlib.util, sys, torch\n"
        "spec = importlib.util.spec_from_file_location(sys.argv[1], sys.argv[2])\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "op, cpu = torch.ops.pf_kernels.ltg_sample, torch.device('cpu')\n"
        "a = op(5, 123, 0.7, 1.0, 0.6, 9, 2**32 - 300, torch.float32, cpu)\n"
        "b = op(3, 77, 0.7, 1.0, 0.6, 9, 5, torch.float64, cpu)\n"
        "torch.save((a, b), sys.argv[3])\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.pt")
        env = dict(os.environ, PF_LTG_NO_AVX2="1")
        subprocess.run([sys.executable, "-c", code, ext.__name__, ext.__file__, path], env=env, check=True)
        a, b = torch.load(path)
    assert torch.equal(a, ltg_sample(5, 123, seed=9, offset=2**32 - 300))
    assert torch.equal(b, ltg_sample(3, 77, seed=9, offset=5, dtype=torch.float64))


def test_registered_under_the_pf_kernels_namespace():
    ltg_sample(1, 1, seed=0)  # loads the extension
    assert str(torch.ops.pf_kernels.ltg_sample.default._schema).startswith("pf_kernels::ltg_sample(")
    with pytest.raises((AttributeError, RuntimeError)):
        torch.ops.pf.ltg_sample  # the short name is left free for others


def test_the_jit_build_sets_the_arch_list_only_for_itself(monkeypatch):
    from pf_kernels import ltg

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with ltg._build_arch_list(True):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"  # PTX: GPUs newer than sm_90 run it too
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # the user's process is left as it was
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    with ltg._build_arch_list(True):
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"  # the user's choice wins
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"


def test_the_built_cuda_op_carries_sm90_ptx():
    import glob
    import shutil

    import pf_kernels

    so = glob.glob(os.path.join(os.path.dirname(pf_kernels.__file__), "_C*.so"))
    tool = shutil.which("cuobjdump") or ("/usr/local/cuda/bin/cuobjdump" if os.path.exists("/usr/local/cuda/bin/cuobjdump")
                                         else None)
    if not so or tool is None:
        pytest.skip("no built extension or no cuobjdump")
    from pf_kernels.ltg import load_extension

    if not getattr(load_extension(), "with_cuda", False):
        pytest.skip("the extension was built without CUDA")
    ptx = subprocess.run([tool, "--list-ptx", so[0]], capture_output=True, text=True).stdout
    elf = subprocess.run([tool, "--list-elf", so[0]], capture_output=True, text=True).stdout
    assert "sm_90" in ptx and "sm_80" in elf and "sm_90" in elf
