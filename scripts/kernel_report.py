"""Compile every pf_kernels Triton kernel for a GPU, on a machine without one, and report it.

    python scripts/kernel_report.py [--arch 90] [--json report.json] [--only TEXT] [--shard I/N]

Each op's host code runs on small CPU tensors shaped like the real calls (PF-B/2 and PF-XL/2
widths and an odd one, N = 256 tokens, bf16 / fp16 / fp32, per-token ``chunk`` views,
per-sample and indexed modulation (``adaln_modulate``, ``gated_residual``, ``ada_rms_norm``,
``gated_residual_modulate``), the general forms and the RMSNorm sandwich in bf16,
every ``patch_euler`` form; for the LayerNorm ops also the forward that stores the row
statistics under autograd, ``fwd+stats``, and the backward without them, ``bwd-recompute``),
with two things swapped: Triton's driver names the target instead of asking a GPU, and each
launch becomes ``kernel.warmup`` (compile, no run). So every kernel goes through Triton's real
compiler (TTIR, PTX, then ptxas to a cubin) with exactly the specialisation a launch would give
it (dtypes, 16-byte alignment of pointers and strides, constexprs), which the interpreter never
exercises. Per compiled variant it reports the constexpr flags set (which member of a kernel
family it is: ``IS_RMS_NORM``, ``HAS_RESIDUAL``, ``NO_H``, ``NORM_Y``...), num_warps, the row tiling
(BLOCK_M, BLOCK_D, NUM_TILES) and the fraction of column lanes left empty (``padding``: D
covered by ``cdiv(D, BLOCK_D)`` tiles), registers, stack-frame and spill bytes (``ptxas -v``, the ptxas
Triton bundles), shared memory, and the width of the global loads and stores in the PTX
(``v4`` = 16 bytes per thread for 32-bit words, what coalesced memory-bound code wants).
``--only TEXT`` compiles the cases whose label contains TEXT. Needs ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_TOKENS = 256
WIDTHS = {"B/2": 768, "XL/2": 1152, "odd": 37}


class _TargetDriver:
    """Triton's active driver, reduced to what a compile-only launch asks of it."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


class _Recorder:
    """Stands in for ``wrap`` in the launching modules: ``wrap(kernel)[grid](*args)`` compiles only."""

    def __init__(self):
        self.label = ""
        self.compiled: list[tuple[str, str, object, dict]] = []  # (case label, kernel name, CompiledKernel, args)

    def __call__(self, kernel):
        return _CompileOnly(self, kernel)


class _CompileOnly:
    def __init__(self, recorder: _Recorder, kernel):
        self.recorder, self.kernel = recorder, kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            bound = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
            self.recorder.compiled.append((self.recorder.label, self.kernel.fn.__name__, compiled, bound))

        return run


def _padding(bound: dict):
    """Fraction of the column lanes that hold no element: a row of D columns is covered by
    ``cdiv(D, BLOCK_D)`` tiles of ``BLOCK_D`` (one padded block when BLOCK_D >= D). None for a
    kernel without that layout (timestep_embedding, patch_euler)."""
    if "D" not in bound or "BLOCK_D" not in bound:
        return None
    d, block_d = int(bound["D"]), int(bound["BLOCK_D"])
    lanes = -(-d // block_d) * block_d
    return round(1.0 - d / lanes, 3)


def _cases(torch, ops):
    """(label, thunk) for every launch form the ops have. Each thunk is called before the
    next is made, so the lambdas may read the loop's current tensors."""
    am, gr, te, pe = ops["adaln_modulate"], ops["gated_residual"], ops["timestep_embedding"], ops["patch_euler"]
    rn = ops["ada_rms_norm"]
    rm = ops["gated_residual_modulate"]
    mo = ops["modulate_options"]
    sw = ops["rms_sandwich"]
    gen = torch.Generator().manual_seed(0)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    for width, d in WIDTHS.items():
        for dname, dtype in dtypes.items():
            x, y, grad = (randn(2, N_TOKENS, d, dtype=dtype) for _ in range(3))
            shift, scale, gate = randn(2, N_TOKENS, 6 * d, dtype=dtype).chunk(6, dim=-1)[:3]  # row stride 6D
            s_shift, s_scale, s_gate = randn(2, 1, 6 * d, dtype=dtype).chunk(6, dim=-1)[:3]  # per sample
            k_shift, k_scale, k_gate = randn(2, 2, 6 * d, dtype=dtype).chunk(6, dim=-1)[:3]  # K = 2 table
            index = torch.randint(0, 2, (2, N_TOKENS), generator=gen)
            tag = f"{width} D={d} {dname}"
            stats = torch.rand(2, N_TOKENS, 2, generator=gen)  # the forward's LN mean and rstd (fp32)
            # adaln: "fwd" is inference, "fwd+stats" the forward under autograd (it stores the
            # LN statistics), "bwd" the backward that reads them, "bwd-recompute" one without
            for form, (sh_, sc_, idx_) in (("per-token", (shift, scale, None)),
                                           ("per-sample", (s_shift, s_scale, None)),
                                           ("indexed", (k_shift, k_scale, index))):
                yield f"adaln fwd {form} {tag}", lambda: am.adaln_modulate_fwd(x, sh_, sc_, idx_, 1e-6)
                yield f"adaln fwd+stats {form} {tag}", lambda: am.adaln_modulate_fwd_stats(x, sh_, sc_, idx_, 1e-6)
                yield f"adaln bwd {form} {tag}", lambda: am.adaln_modulate_bwd(grad, x, sh_, sc_, idx_, 1e-6, stats)
                yield (f"adaln bwd-recompute {form} {tag}",
                       lambda: am.adaln_modulate_bwd(grad, x, sh_, sc_, idx_, 1e-6))
            yield f"gated fwd per-token {tag}", lambda: gr.gated_residual_fwd(x, gate, y, None)
            yield f"gated bwd per-token {tag}", lambda: gr.gated_residual_bwd(grad, gate, y, None)
            yield f"gated fwd per-sample {tag}", lambda: gr.gated_residual_fwd(x, s_gate, y, None)
            yield f"gated bwd per-sample {tag}", lambda: gr.gated_residual_bwd(grad, s_gate, y, None)
            yield f"gated fwd indexed {tag}", lambda: gr.gated_residual_fwd(x, k_gate, y, index)
            yield f"gated bwd indexed {tag}", lambda: gr.gated_residual_bwd(grad, k_gate, y, index)
            yield f"rms fwd per-token {tag}", lambda: rn.ada_rms_norm_fwd(x, scale, None, 1e-6)
            yield f"rms bwd per-token {tag}", lambda: rn.ada_rms_norm_bwd(grad, x, scale, None, 1e-6)
            yield f"rms fwd per-sample {tag}", lambda: rn.ada_rms_norm_fwd(x, s_scale, None, 1e-6)
            yield f"rms bwd per-sample {tag}", lambda: rn.ada_rms_norm_bwd(grad, x, s_scale, None, 1e-6)
            yield f"rms fwd indexed {tag}", lambda: rn.ada_rms_norm_fwd(x, k_scale, index, 1e-6)
            yield f"rms bwd indexed {tag}", lambda: rn.ada_rms_norm_bwd(grad, x, k_scale, index, 1e-6)
            # the fused residual + modulate: (gate, shift, scale) in each form, grad_h = grad_x = grad;
            # fwd / fwd+stats / bwd / bwd-recompute as adaln's
            for form, (g_, sh_, sc_, idx_) in (("per-token", (gate, shift, scale, None)),
                                               ("per-sample", (s_gate, s_shift, s_scale, None)),
                                               ("indexed", (k_gate, k_shift, k_scale, index))):
                yield (f"resmod fwd {form} {tag}",
                       lambda: rm.gated_residual_modulate_fwd(x, g_, y, sh_, sc_, idx_, 1e-6))
                yield (f"resmod fwd+stats {form} {tag}",
                       lambda: rm.gated_residual_modulate_fwd_stats(x, g_, y, sh_, sc_, idx_, 1e-6))
                yield (f"resmod bwd {form} {tag}",
                       lambda: rm.gated_residual_modulate_bwd(grad, grad, x, g_, y, sh_, sc_, idx_, 1e-6, stats))
                yield (f"resmod bwd-recompute {form} {tag}",
                       lambda: rm.gated_residual_modulate_bwd(grad, grad, x, g_, y, sh_, sc_, idx_, 1e-6))
            # the general forms (diffusers' blocks): RMSNorm with shift (LTX, per token), the
            # ungated residual + norm with fp32 modulations and outputs in the stream's dtype
            # (Wan), the gated residual writing that dtype; bf16 only (the same kernels as above
            # with other constexpr flags: this checks those members compile)
            if dname != "bf16":
                continue
            yield f"opts rms+shift fwd per-token {tag}", lambda: mo.norm_modulate_op(x, shift, scale, True, 1e-6, dtype)
            yield (f"opts rms+shift bwd per-token {tag}",
                   lambda: mo.norm_modulate_bwd_op(grad, x, shift, scale, True, 1e-6, stats))
            yield (f"opts ungated resmod fwd per-sample fp32-mods {tag}",
                   lambda: mo.residual_norm_modulate_fwd(x, None, y, s_shift.float(), s_scale.float(), False, 1e-6,
                                                         dtype))
            yield (f"opts ungated resmod bwd per-sample fp32-mods {tag}",
                   lambda: mo.residual_norm_modulate_bwd(grad, grad, x, None, y, s_shift.float(), s_scale.float(),
                                                         False, 1e-6, stats))
            yield (f"gated fwd per-sample fp32-gate out={dname} {tag}",
                   lambda: gr.gated_residual_fwd(x, s_gate.float(), y, None, dtype))
            # the RMSNorm sandwich (Lumina2, Mochi): NORM_Y with the next RMSNorm, and x_new alone
            # (NO_H / no HAS_H), gated per sample and ungated (Lumina2's refiners)
            for form, g_ in (("per-sample", s_gate), ("ungated", None)):
                yield (f"sandwich fwd {form} {tag}",
                       lambda: sw.sandwich_norm_modulate_fwd(x, g_, y, s_scale, 1e-5, 1e-6, dtype))
                yield (f"sandwich bwd {form} {tag}",
                       lambda: sw.sandwich_norm_modulate_bwd(grad, grad, x, g_, y, s_scale, 1e-5, 1e-6))
                yield f"sandwich last fwd {form} {tag}", lambda: sw.sandwich_residual_fwd(x, g_, y, 1e-5, dtype)
                yield f"sandwich last bwd {form} {tag}", lambda: sw.sandwich_residual_bwd(grad, g_, y, 1e-5)
    t = torch.rand(2, N_TOKENS, generator=gen)
    for dim in (256, 37):
        yield f"timestep_embedding fwd dim={dim}", lambda: te.timestep_embedding_fwd(t, dim, 10000.0)
        g = randn(2, N_TOKENS, dim)
        yield f"timestep_embedding bwd dim={dim}", lambda: te.timestep_embedding_bwd(g, t, dim, 10000.0)
    for dname in ("bf16", "fp32"):
        x, v, vo = (randn(2, 4, 32, 32, dtype=dtypes[dname]) for _ in range(3))
        dt, mask = torch.rand(2, N_TOKENS, generator=gen), torch.rand(2, N_TOKENS, generator=gen) < 0.5
        for form, kw in (("plain", {}), ("mask", {"mask": mask}), ("mask+other", {"mask": mask, "v_other": vo})):
            yield f"patch_euler {form} {dname}", lambda: pe.patch_euler_launch(torch.empty_like(x), x, v, dt, 2, kw.get("v_other"), kw.get("mask"))
        yield f"patch_euler in-place {dname}", lambda: pe.patch_euler_launch(x.clone(), None, v, dt, 2, None, mask)


def _ptxas() -> str | None:
    """The ptxas Triton itself uses (bundled in its wheel), else the CUDA toolkit's."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    for cand in (str(bundled), shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _resources(ptx: str, arch: str, ptxas: str | None) -> dict:
    """Registers, stack frame and spill bytes, from ``ptxas -v`` on the kernel's PTX."""
    if ptxas is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=True)  # fmt: skip
    info = proc.stdout + proc.stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, info)) else -1  # noqa: E731
    return {
        "regs": num(r"Used (\d+) registers"),
        "stack": num(r"(\d+) bytes stack frame"),
        "spill": num(r"(\d+) bytes spill stores") + max(num(r"(\d+) bytes spill loads"), 0),
    }


def _memory_widths(ptx: str) -> dict:
    """Counts of global load/store instructions by vector width in the PTX."""
    counts = {}
    for op in ("ld", "st"):
        insts = re.findall(rf"\b{op}\.global(?:\.[a-z0-9]+)*", ptx)
        counts[f"{op}_v4"] = sum(".v4" in i for i in insts)
        counts[f"{op}_v2"] = sum(".v2" in i for i in insts)
        counts[f"{op}_scalar"] = sum(".v2" not in i and ".v4" not in i for i in insts)
    return counts


def compile_all(arch: int, only: str | None = None, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Every launch form (``only``: those whose label holds it) compiled for ``arch``; ``shard``
    (i, n): only every n-th case from the i-th, so n processes share the compiles."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernel_report.py: unset TRITON_INTERPRET (it compiles, the interpreter does not)")
    sys.path.insert(0, str(ROOT))
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    import pf_kernels.ops.ada_rms_norm as rn
    import pf_kernels.ops.adaln_modulate as am
    import pf_kernels.ops.gated_residual as gr
    import pf_kernels.ops.gated_residual_modulate as rm
    import pf_kernels.ops.modulate_options as mo
    import pf_kernels.ops.norm_modulate as family
    import pf_kernels.ops.patch_euler as pe
    import pf_kernels.ops.rms_sandwich as sw
    import pf_kernels.ops.timestep_embedding as te

    ops = {"adaln_modulate": am, "gated_residual": gr, "ada_rms_norm": rn, "gated_residual_modulate": rm,
           "timestep_embedding": te, "patch_euler": pe, "modulate_options": mo, "rms_sandwich": sw}
    launching = (family, gr, te, pe)  # the modules that launch kernels (through their ``wrap``)
    recorder = _Recorder()
    saved = [mod.wrap for mod in launching]
    previous = getattr(driver, "_active", None)  # reset_active() would look for a real GPU
    driver.set_active(_TargetDriver(GPUTarget("cuda", arch, 32)))
    try:
        for mod in launching:
            mod.wrap = recorder
        picked = 0  # the cases ``only`` picks, counted to share them out (a thunk runs before the next is made)
        for label, thunk in _cases(torch, ops):
            if only and only not in label:
                continue
            picked += 1
            if (picked - 1) % shard[1] != shard[0]:
                continue
            recorder.label = label
            thunk()
    finally:
        for mod, wrap in zip(launching, saved):
            mod.wrap = wrap
        driver.set_active(previous)

    ptxas = _ptxas()
    rows = []
    for label, kernel, ck, bound in recorder.compiled:
        meta = ck.metadata
        tiles = {k: int(bound[k]) for k in ("BLOCK_M", "BLOCK_D", "NUM_TILES") if k in bound}
        flags = " ".join(k for k, v in bound.items() if k.isupper() and v is True)  # the constexpr flags set
        rows.append({
            "case": label, "kernel": kernel, "flags": flags, "arch": arch, "num_warps": meta.num_warps,
            "shared": meta.shared,
            **tiles, "padding": _padding(bound),
            **_resources(ck.asm["ptx"], re.search(r"\.target (sm_\w+)", ck.asm["ptx"]).group(1), ptxas),
            **_memory_widths(ck.asm["ptx"]),
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    cols = ["case", "kernel", "flags", "num_warps", "BLOCK_M", "BLOCK_D", "NUM_TILES", "padding", "regs", "stack", "spill",
            "shared", "ld_v4", "ld_v2", "ld_scalar", "st_v4", "st_v2", "st_scalar"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200) or 80 (A100)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--only", help="compile only the cases whose label contains this text")
    parser.add_argument("--shard", default="0/1", help="I/N: only every N-th case from the I-th (N processes at once)")
    args = parser.parse_args(argv)
    i, _, n = args.shard.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        parser.error(f"--shard {args.shard}: expected I/N with 0 <= I < N, e.g. 0/2")
    rows = compile_all(args.arch, args.only, (int(i), int(n)))
    import triton

    print(f"### pf_kernels compiled for sm_{args.arch} with Triton {triton.__version__}: {len(rows)} launches\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
