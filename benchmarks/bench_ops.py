"""pf_kernels ops vs eager PyTorch and ``torch.compile`` of the same expression.

Run: ``pytest benchmarks/bench_ops.py --benchmark-only`` (add ``--benchmark-json=out.json``
to keep the numbers; ``--benchmark-group-by=group`` puts the three implementations of a case
side by side). Each case records in ``extra_info``: ms (CUDA events, median), GB/s of the
op's minimal traffic (every input read once, every output written once) and that as a
fraction of the measured copy bandwidth (see ``conftest.py``).

Shapes: PF-B/2 (D 768) and PF-XL/2 (D 1152) at N = 256 tokens, B*N from 4096 to 65536;
bf16 and fp32; forward and forward+backward (``PF_BENCH_SCOPE=quick``: B*N = 65536 and bf16
only). The modulation is per token (Patch Forcing's
case) as strided ``chunk(6, -1)`` views of a (B, N, 6D) tensor; ``ada_rms_norm``'s scale a
(B, N, D) tensor of its own, as the T2I model makes it; ``test_per_sample_ops`` has DiT/SiT's
(B, 1, D) modulation, whose grads the backward sums over the tokens. On the CPU only small
cases of the dispatched ops run (the torch path): the numbers mean nothing for the GPU.

Implementations: ``fused`` (the Triton op), ``eager`` and ``compile`` (``torch.compile`` of
the plain expression: the baseline of "x compile"), and at PF-XL/2 ``fused-wholerow``: the
same kernels with each row held as one power-of-two block (D = 1152 padded to 2048 lanes,
``MAX_PAD = 1``) instead of the default nine column tiles of 128, which read each tile twice
(statistics, then outputs; the second read from cache). Which is faster is for the GPU to say.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import pf_kernels
from conftest import QUICK
from pf_kernels import reference as ref

CUDA = torch.cuda.is_available()
PRESETS = {"PF-B/2": 768, "PF-XL/2": 1152}
TOKENS = [65536] if QUICK else [4096, 16384, 65536]  # B * N with N = 256 (B = 16, 64, 256)
INDEXED_TOKENS = [65536] if QUICK else [16384, 65536]
N_TOKENS = 256
DTYPES = {"bf16": torch.bfloat16} if QUICK else {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ["fused", "eager", "compile"]
MODES = ["fwd", "fwd+bwd"]
gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA (GPU-sized cases)")

#################################################################################
#                     Cases: inputs, functions, bytes moved                      #
#################################################################################


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    # A chunk view of a tensor without grad may itself be made a leaf: the backward then
    # writes the op's own grads only (no chunk-backward scatter into (B, N, 6D)).
    return t.requires_grad_(grad)


def adaln_case(tokens, d, dtype, device, grad):
    b = tokens // N_TOKENS
    x = _leaf(torch.randn(b, N_TOKENS, d, device=device, dtype=dtype), grad)
    mod = 0.1 * torch.randn(b, N_TOKENS, 6 * d, device=device, dtype=dtype)
    shift, scale = (_leaf(t, grad) for t in mod.chunk(6, dim=-1)[:2])  # (B, N, D), row stride 6D
    es = x.element_size()
    # fwd: x, shift, scale in, out; bwd: grad, x, scale in, dx, dscale out (dshift = grad).
    per_elem = {"fwd": 4, "fwd+bwd": 9}
    return (x, shift, scale), {"fused": pf_kernels.adaln_modulate, "reference": ref.adaln_modulate_ref}, per_elem, x.numel() * es


def gated_case(tokens, d, dtype, device, grad):
    b = tokens // N_TOKENS
    x, y = (_leaf(torch.randn(b, N_TOKENS, d, device=device, dtype=dtype), grad) for _ in range(2))
    mod = torch.randn(b, N_TOKENS, 6 * d, device=device, dtype=dtype)
    gate = _leaf(mod.chunk(6, dim=-1)[2], grad)
    es = x.element_size()
    # fwd: x, gate, y in, out; bwd: grad, gate, y in, dy, dgate out (dx = grad).
    per_elem = {"fwd": 4, "fwd+bwd": 9}
    return (x, gate, y), {"fused": pf_kernels.gated_residual, "reference": ref.gated_residual_ref}, per_elem, x.numel() * es


def rms_case(tokens, d, dtype, device, grad):
    """AdaRMSNorm as the T2I model has it (SPEC.md section 11): a per-token scale of its own,
    ``Linear(384, D)(c)``, so a contiguous (B, N, D) tensor."""
    b = tokens // N_TOKENS
    x = _leaf(torch.randn(b, N_TOKENS, d, device=device, dtype=dtype), grad)
    scale = _leaf(0.1 * torch.randn(b, N_TOKENS, d, device=device, dtype=dtype), grad)
    # fwd: x, scale in, out; bwd: grad, x, scale in, dx, dscale out.
    per_elem = {"fwd": 3, "fwd+bwd": 8}
    fns = {"fused": pf_kernels.ada_rms_norm, "reference": ref.ada_rms_norm_ref}
    return (x, scale), fns, per_elem, x.numel() * x.element_size()


MODULATION_CASES = {"adaln_modulate": adaln_case, "gated_residual": gated_case, "ada_rms_norm": rms_case}


def indexed_case(op, tokens, d, dtype, device, grad, k=2):
    """Deduplicated conditioning (issue 6): (B, K, D) tables read per token through index.
    Minimal traffic ignores the tiny tables: adaln and rms fwd x in, out; bwd grad, x in, dx
    out; gated fwd x, y in, out; bwd grad, y in, dy out."""
    b = tokens // N_TOKENS
    x = _leaf(torch.randn(b, N_TOKENS, d, device=device, dtype=dtype), grad)
    mod = 0.1 * torch.randn(b, k, 6 * d, device=device, dtype=dtype)
    index = torch.randint(0, k, (b, N_TOKENS), device=device)
    gather = lambda t: t.gather(1, index[:, :, None].expand(-1, -1, d))  # noqa: E731
    if op == "adaln_modulate_indexed":
        shift, scale = (_leaf(t, grad) for t in mod.chunk(6, dim=-1)[:2])
        fns = {
            "fused": lambda x, sh, sc: pf_kernels.adaln_modulate_indexed(x, sh, sc, index),
            "reference": lambda x, sh, sc: ref.adaln_modulate_ref(x, gather(sh), gather(sc)),
        }
        return (x, shift, scale), fns, {"fwd": 2, "fwd+bwd": 5}, x.numel() * x.element_size()
    if op == "ada_rms_norm_indexed":
        table = _leaf(mod.chunk(6, dim=-1)[1], grad)
        fns = {
            "fused": lambda x, t: pf_kernels.ada_rms_norm_indexed(x, t, index),
            "reference": lambda x, t: ref.ada_rms_norm_ref(x, gather(t)),
        }
        return (x, table), fns, {"fwd": 2, "fwd+bwd": 5}, x.numel() * x.element_size()
    y = _leaf(torch.randn_like(x), grad)
    gate = _leaf(mod.chunk(6, dim=-1)[2], grad)
    fns = {
        "fused": lambda x, g, y: pf_kernels.gated_residual_indexed(x, g, y, index),
        "reference": lambda x, g, y: ref.gated_residual_ref(x, gather(g), y),
    }
    return (x, gate, y), fns, {"fwd": 3, "fwd+bwd": 6}, x.numel() * x.element_size()


def residual_modulate_case(tokens, d, dtype, device, grad):
    """The seam between two sub-blocks: ``x + gate1 * y`` and the next sub-block's input
    ``LN(x_new) * (1 + scale2) + shift2`` (gate1, shift2, scale2: chunks 2, 3, 4 of the block's
    (B, N, 6D) modulation). Implementations: the fused op, the two separate ops
    (``gated_residual`` then ``adaln_modulate``), and the plain torch composition (eager, compile)."""
    b = tokens // N_TOKENS
    x, y = (_leaf(torch.randn(b, N_TOKENS, d, device=device, dtype=dtype), grad) for _ in range(2))
    mod = 0.1 * torch.randn(b, N_TOKENS, 6 * d, device=device, dtype=dtype)
    gate, shift, scale = (_leaf(t, grad) for t in mod.chunk(6, dim=-1)[2:5])

    def two_ops(x, gate, y, shift, scale):
        x_new = pf_kernels.gated_residual(x, gate, y)
        return x_new, pf_kernels.adaln_modulate(x_new, shift, scale)

    fns = {"fused": pf_kernels.gated_residual_modulate, "two_ops": two_ops,
           "reference": ref.gated_residual_modulate_ref}
    # fwd: x, gate, y, shift, scale in, x_new, h out; bwd: grad_h, grad_x, x_new, gate, y,
    # scale in, dx, dy, dgate, dscale out (dshift = grad_h).
    per_elem = {"fwd": 7, "fwd+bwd": 17}
    return (x, gate, y, shift, scale), fns, per_elem, x.numel() * x.element_size()


def timestep_case(tokens, device, grad):
    t = _leaf(torch.rand(tokens // N_TOKENS, N_TOKENS, device=device), grad)
    # fwd: t in, (B, N, 256) fp32 out; bwd: grad (B, N, 256) and t in, dt out.
    unit = tokens * 4  # bytes of one fp32 per token
    fused = lambda t: pf_kernels.timestep_embedding(t, 256)  # noqa: E731
    reference = lambda t: ref.timestep_embedding_ref(t, 256)  # noqa: E731
    return (t,), {"fused": fused, "reference": reference}, {"fwd": 257, "fwd+bwd": 257 + 258}, unit


def euler_case(tokens, dtype, device):
    """The look-ahead update: per-patch dt and mask, v or v_other per patch (SD-VAE latents)."""
    b = tokens // N_TOKENS
    x, v, vo = (torch.randn(b, 4, 32, 32, device=device, dtype=dtype) for _ in range(3))
    dt = torch.rand(b, N_TOKENS, device=device)
    mask = torch.rand(b, N_TOKENS, device=device) < 0.4

    def fused(x, v, dt, vo, mask):
        return pf_kernels.patch_euler(x, v, dt, 2, v_other=vo, mask=mask)

    def reference(x, v, dt, vo, mask):
        return ref.patch_euler_ref(x, v, dt, 2, v_other=vo, mask=mask)

    # x in, one of v / v_other per pixel in, out; plus dt (fp32) and mask per patch.
    nbytes = 3 * x.numel() * x.element_size() + b * N_TOKENS * 5
    return (x, v, dt, vo, mask), {"fused": fused, "reference": reference}, nbytes


@contextlib.contextmanager
def whole_rows():
    """The kernels' rows as one power-of-two block each, however much of it is padding."""
    from pf_kernels.ops import _utils

    previous = _utils.MAX_PAD
    _utils.MAX_PAD = 1.0
    try:
        yield
    finally:
        _utils.MAX_PAD = previous


def make_fn(impl: str, fns: dict, inputs, mode: str):
    """The timed callable: forward, or forward + autograd.grad w.r.t. the float inputs.
    ``fns[impl]`` when the case has it (``fused``, ``two_ops``), else its ``reference``;
    ``fused-wholerow`` is ``fused`` launched under ``whole_rows()``."""
    fn = fns["fused"] if impl == "fused-wholerow" else fns.get(impl, fns["reference"])
    if impl == "compile":
        torch._dynamo.reset()  # a fresh cache per case: no silent fallback past the recompile limit
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    layout = whole_rows if impl == "fused-wholerow" else contextlib.nullcontext
    if mode == "fwd":

        def fwd():
            with layout():
                return fn(*inputs)

        return fwd
    leaves = [t for t in inputs if t.requires_grad]
    out0 = fn(*inputs)
    g = [torch.randn_like(o) for o in out0] if isinstance(out0, tuple) else torch.randn_like(out0)

    def fwd_bwd():
        with layout():
            torch.autograd.grad(fn(*inputs), leaves, g)

    return fwd_bwd


@pytest.fixture
def backend_auto():
    with pf_kernels.use_backend("auto"):  # CUDA tensors -> Triton
        yield


#################################################################################
#                                  GPU cases                                    #
#################################################################################


def _impls(preset, op):
    """IMPLS, and fused-wholerow where the row layout differs (PF-XL/2's LayerNorm ops)."""
    wholerow = preset == "PF-XL/2" and op in ("adaln_modulate", "gated_residual_modulate")
    return IMPLS + (["fused-wholerow"] if wholerow else [])


def _cases(ops, presets, tokens, dtypes, extra=(), modes=MODES):
    """(op, preset, tokens, dtype, mode, impl) parameters, the impls depending on op and preset."""
    return [pytest.param(op, p, t, dt, m, impl, id=f"{op}-{p}-{t}-{dt}-{m}-{impl}")
            for op in ops for p in presets for t in tokens for dt in dtypes for m in modes
            for impl in [*_impls(p, op), *extra]]


@gpu_only
@pytest.mark.parametrize("op,preset,tokens,dtype,mode,impl", _cases(MODULATION_CASES, PRESETS, TOKENS, DTYPES))
def test_modulation_ops(benchmark, record, backend_auto, op, preset, tokens, dtype, mode, impl):
    d = PRESETS[preset]
    inputs, fns, per_elem, elem_bytes = MODULATION_CASES[op](tokens, d, DTYPES[dtype], "cuda", mode != "fwd")
    benchmark.group = f"{op} {preset} B*N={tokens} {dtype} {mode}"
    record(benchmark, make_fn(impl, fns, inputs, mode), per_elem[mode] * elem_bytes,
           op=op, preset=preset, tokens=tokens, dim=d, dtype=dtype, mode=mode, impl=impl)  # fmt: skip


@gpu_only
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens", INDEXED_TOKENS)
@pytest.mark.parametrize("op", ["adaln_modulate_indexed", "gated_residual_indexed", "ada_rms_norm_indexed"])
def test_indexed_ops(benchmark, record, backend_auto, op, tokens, mode, impl):
    """PF-XL/2, bf16, K = 2 distinct times per sample (dual loop / look-ahead)."""
    inputs, fns, per_elem, elem_bytes = indexed_case(op, tokens, 1152, torch.bfloat16, "cuda", mode != "fwd")
    benchmark.group = f"{op} PF-XL/2 K=2 B*N={tokens} bf16 {mode}"
    record(benchmark, make_fn(impl, fns, inputs, mode), per_elem[mode] * elem_bytes,
           op=op, preset="PF-XL/2", tokens=tokens, dim=1152, dtype="bf16", mode=mode, impl=impl, k=2)  # fmt: skip


@gpu_only
@pytest.mark.parametrize("op,preset,tokens,dtype,mode,impl",
                         _cases(["gated_residual_modulate"], PRESETS, TOKENS, DTYPES, extra=["two_ops"]))
def test_residual_modulate(benchmark, record, backend_auto, op, preset, tokens, dtype, mode, impl):
    """gated_residual_modulate vs the two ops it replaces vs eager and compiled plain torch."""
    d = PRESETS[preset]
    inputs, fns, per_elem, elem_bytes = residual_modulate_case(tokens, d, DTYPES[dtype], "cuda", mode != "fwd")
    benchmark.group = f"gated_residual_modulate {preset} B*N={tokens} {dtype} {mode}"
    record(benchmark, make_fn(impl, fns, inputs, mode), per_elem[mode] * elem_bytes,
           op="gated_residual_modulate", preset=preset, tokens=tokens, dim=d, dtype=dtype, mode=mode,
           impl=impl)  # fmt: skip


def per_sample_case(op, tokens, d, dtype, device, grad):
    """DiT/SiT's modulation: one (B, 1, D) shift/scale/gate per sample (chunks of a (B, 1, 6D)
    tensor), so the backward sums their grads over the N tokens. Minimal traffic ignores the
    (B, 1, D) rows: adaln fwd x in, out; bwd grad, x in, dx out; the residual seam fwd x, y in,
    x_new, h out; bwd grad_h, grad_x, x_new, y in, dx, dy out."""
    b = tokens // N_TOKENS
    x = _leaf(torch.randn(b, N_TOKENS, d, device=device, dtype=dtype), grad)
    mod = (0.1 * torch.randn(b, 1, 6 * d, device=device, dtype=dtype)).chunk(6, dim=-1)
    if op == "adaln_modulate":
        fns = {"fused": pf_kernels.adaln_modulate, "reference": ref.adaln_modulate_ref}
        return (x, *(_leaf(t, grad) for t in mod[:2])), fns, {"fwd": 2, "fwd+bwd": 5}, x.numel() * x.element_size()
    y = _leaf(torch.randn_like(x), grad)
    gate, shift, scale = (_leaf(t, grad) for t in mod[2:5])
    fns = {"fused": pf_kernels.gated_residual_modulate, "reference": ref.gated_residual_modulate_ref}
    return (x, gate, y, shift, scale), fns, {"fwd": 4, "fwd+bwd": 10}, x.numel() * x.element_size()


@gpu_only
@pytest.mark.parametrize("op,preset,tokens,dtype,mode,impl",
                         _cases(["adaln_modulate", "gated_residual_modulate"], ["PF-XL/2"], [65536], ["bf16"],
                                modes=["fwd+bwd"]))
def test_per_sample_ops(benchmark, record, backend_auto, op, preset, tokens, dtype, mode, impl):
    """PF-XL/2, bf16, B*N = 65536 with per-sample modulation, forward+backward (the backward
    sums the modulation's grads over the tokens; the forward is the per-token one's)."""
    d = PRESETS[preset]
    inputs, fns, per_elem, elem_bytes = per_sample_case(op, tokens, d, DTYPES[dtype], "cuda", mode != "fwd")
    benchmark.group = f"{op} per-sample {preset} B*N={tokens} {dtype} {mode}"
    record(benchmark, make_fn(impl, fns, inputs, mode), per_elem[mode] * elem_bytes,
           op=op, preset=preset, tokens=tokens, dim=d, dtype=dtype, mode=mode, impl=impl, form="per-sample")  # fmt: skip


@gpu_only
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_timestep_embedding(benchmark, record, backend_auto, tokens, mode, impl):
    inputs, fns, per_unit, unit = timestep_case(tokens, "cuda", mode != "fwd")
    benchmark.group = f"timestep_embedding B*N={tokens} fp32 {mode}"
    record(benchmark, make_fn(impl, fns, inputs, mode), per_unit[mode] * unit,
           op="timestep_embedding", tokens=tokens, dim=256, dtype="fp32", mode=mode, impl=impl)  # fmt: skip


@gpu_only
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", TOKENS)
def test_patch_euler(benchmark, record, backend_auto, tokens, dtype, impl):
    inputs, fns, nbytes = euler_case(tokens, DTYPES[dtype], "cuda")
    benchmark.group = f"patch_euler B*N={tokens} {dtype} fwd"
    record(benchmark, make_fn(impl, fns, inputs, "fwd"), nbytes,
           op="patch_euler", tokens=tokens, dtype=dtype, mode="fwd", impl=impl)  # fmt: skip


#################################################################################
#                  CPU cases: the dispatched ops' torch path, small                #
#################################################################################


@pytest.mark.skipif(CUDA, reason="the GPU cases above run instead")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", [*MODULATION_CASES, "gated_residual_modulate", "timestep_embedding", "patch_euler"])
def test_cpu_small(benchmark, record, backend_auto, op, mode):
    tokens, d = 512, 768
    if op in MODULATION_CASES:
        inputs, fns, per_elem, elem_bytes = MODULATION_CASES[op](tokens, d, torch.float32, "cpu", mode != "fwd")
        nbytes = per_elem[mode] * elem_bytes
    elif op == "gated_residual_modulate":
        inputs, fns, per_elem, elem_bytes = residual_modulate_case(tokens, d, torch.float32, "cpu", mode != "fwd")
        nbytes = per_elem[mode] * elem_bytes
    elif op == "timestep_embedding":
        inputs, fns, per_unit, unit = timestep_case(tokens, "cpu", mode != "fwd")
        nbytes = per_unit[mode] * unit
    else:
        if mode != "fwd":
            pytest.skip("patch_euler is forward only")
        inputs, fns, nbytes = euler_case(tokens, torch.float32, "cpu")
    benchmark.group = f"cpu {op} B*N={tokens} fp32 {mode}"
    record(benchmark, make_fn("fused", fns, inputs, mode), nbytes, op=op, tokens=tokens, mode=mode, impl="dispatch-cpu")
