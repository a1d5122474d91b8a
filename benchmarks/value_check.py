"""Every ``pf_kernels`` op at a real shape, checked against an fp32 reference with
flash-attention's rule, forward and backward:

    max|kernel - ref32| <= 2 * max|torch_lowprec - ref32| + atol * max(1, max|ref32|)

``ref32`` is ``pf_kernels.reference`` on fp32 copies of the inputs (fp64 for the fp32-only
timestep embedding); ``torch_lowprec`` is the plain PyTorch a model would run in the inputs'
own precision (bf16 / fp16: ``F.layer_norm(x) * (1 + scale) + shift`` and so on, written out
below, not the reference, which computes in fp32). A kernel passes when it is no worse than
PyTorch in the same precision, up to a small floor for outputs PyTorch gets exactly right.

Used by ``benchmarks/lease.py`` (the GPU call's value rows, B*N = 65536) and
``tests/test_gpu_real_shapes.py``; ``check_model`` applies the same rule to a whole model's
output and gradients, the fused ops against the torch path. Stands alone (no pytest, no benchmark conftest).

A case is built by ``make_case(op, b, n, d, dtype, device)``: its leaf inputs, the fused op
(``pf_kernels``' public API), the reference, the eager low-precision expression, and the
minimal traffic of one forward and one forward+backward in bytes (every input read once,
every output written once), for the bandwidth rows.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import pf_kernels
from pf_kernels import reference as ref

EPS = 1e-6
K_DISTINCT = 2  # rows per sample of the indexed forms' tables (dual loop / look-ahead)
# The floor of the rule, relative to the reference's largest magnitude.
ATOL = {torch.bfloat16: 1e-3, torch.float16: 2e-4, torch.float32: 1e-5}
OPS = (
    "adaln_modulate", "gated_residual_modulate", "gated_residual", "ada_rms_norm",
    "adaln_modulate_indexed", "gated_residual_modulate_indexed", "gated_residual_indexed", "ada_rms_norm_indexed",
    "timestep_embedding", "patch_euler",
)  # fmt: skip
FORWARD_ONLY = ("patch_euler",)


@dataclass
class Case:
    op: str
    inputs: dict  # name -> tensor (float ones are autograd leaves when grads are asked for)
    fused: Callable  # (**inputs) -> tensor or tuple of tensors
    reference: Callable
    eager: Callable  # plain PyTorch in the inputs' precision
    bytes_fwd: int
    bytes_fwd_bwd: int
    ref_dtype: torch.dtype = torch.float32
    grads: tuple = field(default=())  # names of the inputs that get gradients


#################################################################################
#                 Eager low-precision PyTorch: what a model would run            #
#################################################################################


def _ln_mod(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale) + shift


def _rms(x, scale):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS) * (1 + scale)


def _gather(table, index):  # (B, K, D), (B, N) -> (B, N, D)
    return table.gather(1, index[:, :, None].expand(-1, -1, table.shape[-1]))


def _timestep_eager(t, dim=256, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t[..., None] * freqs  # (B, N, half) fp32
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _px(values, p, gw):  # (B, N) -> (B, 1, H, W)
    b, n = values.shape
    return values.reshape(b, 1, n // gw, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)


def _euler_eager(x, v, dt, v_other, mask, p=2):
    gw = x.shape[-1] // p
    return x + _px(dt, p, gw).to(x.dtype) * torch.where(_px(mask, p, gw), v, v_other)


#################################################################################
#                                    Cases                                       #
#################################################################################


def make_case(op: str, b: int, n: int, d: int, dtype: torch.dtype, device, seed: int = 0) -> Case:
    """Inputs as the model has them: per-token modulation as strided ``chunk(6)`` views of a
    (B, N, 6D) tensor, (B, K, D) tables with a (B, N) index for the indexed forms."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dt)

    indexed = op.endswith("_indexed")
    rows = K_DISTINCT if indexed else n
    mod = randn(b, rows, 6 * d, scale=0.1).chunk(6, dim=-1)  # (B, N|K, D) views, row stride 6D
    index = torch.randint(0, K_DISTINCT, (b, n), generator=g).to(device)
    x = randn(b, n, d)
    es = x.element_size()
    tok = b * n * d * es  # bytes of one (B, N, D) tensor
    base = op.removesuffix("_indexed")
    gather = (lambda t: _gather(t, index)) if indexed else (lambda t: t)  # noqa: E731

    if base == "adaln_modulate":
        fused = (lambda x, shift, scale: pf_kernels.adaln_modulate_indexed(x, shift, scale, index)) if indexed \
            else (lambda x, shift, scale: pf_kernels.adaln_modulate(x, shift, scale))  # fmt: skip
        return Case(op, {"x": x, "shift": mod[0], "scale": mod[1]}, fused,
                    lambda x, shift, scale: ref.adaln_modulate_ref(x, gather(shift), gather(scale), EPS),
                    lambda x, shift, scale: _ln_mod(x, gather(shift), gather(scale)),
                    (2 if indexed else 4) * tok, (5 if indexed else 9) * tok, grads=("x", "shift", "scale"))
    if base == "gated_residual":
        fused = (lambda x, gate, y: pf_kernels.gated_residual_indexed(x, gate, y, index)) if indexed \
            else (lambda x, gate, y: pf_kernels.gated_residual(x, gate, y))  # fmt: skip
        return Case(op, {"x": x, "gate": mod[2], "y": randn(b, n, d)}, fused,
                    lambda x, gate, y: ref.gated_residual_ref(x, gather(gate), y),
                    lambda x, gate, y: x + gather(gate) * y,
                    (3 if indexed else 4) * tok, (6 if indexed else 9) * tok, grads=("x", "gate", "y"))
    if base == "ada_rms_norm":
        # The T2I model's scale is a contiguous (B, N, D) tensor of its own; indexed, a table.
        scale = mod[1] if indexed else randn(b, n, d, scale=0.1)
        fused = (lambda x, scale: pf_kernels.ada_rms_norm_indexed(x, scale, index, EPS)) if indexed \
            else (lambda x, scale: pf_kernels.ada_rms_norm(x, scale, EPS))  # fmt: skip
        return Case(op, {"x": x, "scale": scale}, fused,
                    lambda x, scale: ref.ada_rms_norm_ref(x, gather(scale), EPS),
                    lambda x, scale: _rms(x, gather(scale)),
                    (2 if indexed else 3) * tok, (5 if indexed else 8) * tok, grads=("x", "scale"))
    if base == "gated_residual_modulate":
        fused = (lambda x, gate, y, shift, scale: pf_kernels.gated_residual_modulate_indexed(
            x, gate, y, shift, scale, index)) if indexed else pf_kernels.gated_residual_modulate  # fmt: skip

        def eager(x, gate, y, shift, scale):
            x_new = x + gather(gate) * y
            return x_new, _ln_mod(x_new, gather(shift), gather(scale))

        return Case(op, {"x": x, "gate": mod[2], "y": randn(b, n, d), "shift": mod[3], "scale": mod[4]}, fused,
                    lambda x, gate, y, shift, scale: ref.gated_residual_modulate_ref(
                        x, gather(gate), y, gather(shift), gather(scale), EPS),
                    eager, (4 if indexed else 7) * tok, (10 if indexed else 17) * tok,
                    grads=("x", "gate", "y", "shift", "scale"))
    if op == "timestep_embedding":  # fp32 in the model whatever the autocast: checked against fp64
        t = torch.rand(b, n, generator=g).to(device)
        unit = b * n * 4
        return Case(op, {"t": t}, lambda t: pf_kernels.timestep_embedding(t, 256),
                    lambda t: ref.timestep_embedding_ref(t, 256), _timestep_eager,
                    257 * unit, (257 + 258) * unit, ref_dtype=torch.float64, grads=("t",))
    # patch_euler: SD-VAE latents (B, 4, H, W) with p = 2, N = (H/2) * (W/2) patches.
    side = 2 * math.isqrt(n)
    if (side // 2) ** 2 != n:
        raise ValueError(f"patch_euler needs a square patch grid, got N = {n}")
    xs, v, vo = (randn(b, 4, side, side) for _ in range(3))
    dt = torch.rand(b, n, generator=g).to(device)
    mask = (torch.rand(b, n, generator=g) < 0.4).to(device)
    return Case(op, {"x": xs, "v": v, "dt": dt, "v_other": vo, "mask": mask},
                lambda x, v, dt, v_other, mask: pf_kernels.patch_euler(x, v, dt, 2, v_other=v_other, mask=mask),
                lambda x, v, dt, v_other, mask: ref.patch_euler_ref(x, v, dt, 2, v_other=v_other, mask=mask),
                _euler_eager, 3 * xs.numel() * es + b * n * 5, 0)


#################################################################################
#                                   The check                                    #
#################################################################################


@dataclass
class Result:
    name: str  # "out", "out[1]", "grad x", ...
    err: float  # max|kernel - ref|
    torch_err: float  # max|torch_lowprec - ref|
    bound: float

    @property
    def ok(self) -> bool:
        return self.err <= self.bound  # NaN fails


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _run(fn, inputs: dict, cast, grads: tuple, cotangents):
    """fn on copies of the inputs (float ones cast by ``cast``); its outputs and, with
    ``cotangents``, the grads of sum(out_i * cot_i) w.r.t. the inputs named in ``grads``."""
    args = {}
    for name, t in inputs.items():
        a = cast(t) if t.is_floating_point() else t
        if name in grads and cotangents is not None:
            a = a.detach().requires_grad_(True)  # a chunk view stays a strided leaf
        args[name] = a
    with torch.enable_grad() if cotangents is not None else torch.no_grad():
        outs = _as_tuple(fn(**args))
        if cotangents is None:
            return [o.detach() for o in outs], []
        leaves = [args[k] for k in grads]
        loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents))
        return [o.detach() for o in outs], list(torch.autograd.grad(loss, leaves))


def check(case: Case, backward: bool = True) -> list[Result]:
    """The rule for every output and (with ``backward``) every input's gradient."""
    dtype = next(t.dtype for t in case.inputs.values() if t.is_floating_point())
    low = (lambda t: t.detach().clone()) if case.ref_dtype != torch.float64 else (lambda t: t.detach().float())
    wide = lambda t: t.detach().to(case.ref_dtype)  # noqa: E731
    backward = backward and case.op not in FORWARD_ONLY
    grads = case.grads if backward else ()
    # The same inputs, but fused ops keep their strided views: the kernel reads them as the
    # model gives them (a clone would make them contiguous).
    fused_inputs = {k: (v.detach().requires_grad_(k in grads) if v.is_floating_point() else v)
                    for k, v in case.inputs.items()}  # fmt: skip
    ref_out, _ = _run(case.reference, case.inputs, wide, (), None)
    cot = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.device) for o in ref_out] \
        if backward else None  # fmt: skip
    ref_out, ref_grads = _run(case.reference, case.inputs, wide, grads, cot)
    low_out, low_grads = _run(case.eager, case.inputs, low, grads, cot)
    with torch.enable_grad() if backward else torch.no_grad():
        k_out = _as_tuple(case.fused(**fused_inputs))
        k_grads = list(torch.autograd.grad(sum((o.float() * c).sum() for o, c in zip(k_out, cot)),
                                           [fused_inputs[k] for k in grads])) if backward else []  # fmt: skip
    names = [f"out[{i}]" if len(ref_out) > 1 else "out" for i in range(len(ref_out))] + [f"grad {k}" for k in grads]
    atol = ATOL[dtype if case.ref_dtype != torch.float64 else torch.float32]
    tensors = zip(names, [*k_out, *k_grads], [*low_out, *low_grads], [*ref_out, *ref_grads])
    return [compare(name, k, lo, r, atol) for name, k, lo, r in tensors]


def compare(name: str, kernel: torch.Tensor, lowprec: torch.Tensor, ref32: torch.Tensor, atol: float) -> Result:
    """The rule for one tensor: ``kernel`` and ``lowprec`` (plain PyTorch in the same precision)
    against ``ref32``, in fp64."""
    if not ref32.numel():
        return Result(name, 0.0, 0.0, atol)
    r = ref32.double()
    err = (kernel.double() - r).abs().max().item()
    torch_err = (lowprec.double() - r).abs().max().item()
    return Result(name, err, torch_err, 2 * torch_err + atol * max(1.0, r.abs().max().item()))


def check_model(preset: str, size: int, batch: int, low: torch.dtype, backend: str, device,
                seed: int = 0) -> list[Result]:
    """The rule for a whole model's forward and backward: its output (``out``) and every
    parameter's gradient with the kernels of ``backend`` under ``low`` autocast, against the
    torch path in fp32, the torch path under the same autocast giving the torch error.
    Per-patch times; AdaLN-Zero's zero weights drawn at random (zeros would make the fused
    ops trivial); eval(): no label dropout, so the three runs see the same labels."""
    from pf.models import build_model

    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(preset, input_size=size, in_channels=4, num_classes=1000).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    x = torch.randn(batch, 4, size, size, device=device)
    t = torch.rand(batch, (size // 2) ** 2, device=device)  # (B, N): one time per 2x2 patch
    y = torch.randint(0, 1000, (batch,), device=device)
    cot = torch.randn(batch, 4, size, size, device=device)

    def run(backend: str, dtype: torch.dtype) -> dict:
        model.zero_grad(set_to_none=True)
        autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype != torch.float32 \
            else contextlib.nullcontext()  # fmt: skip
        with pf_kernels.use_backend(backend), autocast:
            out = model(x, t, y)
        (out.float() * cot).sum().backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        return {"out": out.detach(), **grads}

    ref32, eager, fused = run("torch", torch.float32), run("torch", low), run(backend, low)
    missing = torch.tensor(float("nan"))  # a gradient the fused path did not give fails the rule
    return [compare(name, fused.get(name, missing), eager[name], r, ATOL[low]) for name, r in ref32.items()]


def failures(results: list[Result]) -> str:
    """One line per failing output, for an assertion message."""
    return "; ".join(f"{r.name}: |kernel - ref| {r.err:.3g} > bound {r.bound:.3g} (torch {r.torch_err:.3g})"
                     for r in results if not r.ok)  # fmt: skip
