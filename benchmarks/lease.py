"""The measurements of one GPU call (``scripts/gpu_check.sh``), one phase per process, each row
appended to a JSON-lines file the moment it is measured.

    python benchmarks/lease.py PHASE --out ROWS.jsonl --seconds S [--toy]

(the rows are written by ``benchmarks/lease_rows.py``, which also writes the GPU test files'
rows without importing torch).

Phases, in the order a lease wants their numbers:
  limits    device copy bandwidth and bf16 matmul (every fraction below is read against them;
            written to limits.json beside ROWS for the later phases)
  ops       each op at B*N = 65536, D = 1152 then 768, bf16: the value check (benchmarks/
            value_check.py, forward and backward against fp32), then fused vs eager forward and
            forward+backward, ms (CUDA events) and the fraction of the copy bandwidth; then the
            LTG op against its torch composite (CUDA graph of the call, and with launch costs)
  train     the PF-XL/2 forward+backward with fused ops checked against the torch path, then one
            training step (bf16 autocast, batch 32): eager, fused, per-block compile (the
            published code), for PF-XL/2 then PF-B/2
  sampling  dual-loop sampling, batch 32, cfg 4, 5 steps (20 NFE): plain, per-block compile
            (published), dedup+fused, +graphs (the whole sampler as one CUDA graph), PF-XL/2
            then PF-B/2
  compile   the torch.compile baselines: each op's expression, the sampling model
            (dedup+compile) and the training step (compile-model), cheapest first
Every row is timed only if the phase's remaining seconds cover the row's estimated cost; a
row that would overrun is not started and a ``cut`` row says so (the shell's timeout is the
backstop, never the plan). ``--toy`` runs the same code on the CPU at toy sizes (no Triton,
no compile, no graphs: those rows are noted as skipped), so the control flow is tested
before any lease. ``PF_GPU_LTG=torch`` (set by gpu_check.sh when the extension build
failed): the LTG sampler's torch path is used and the LTG op row is skipped, so no process
retries the build.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import pf_kernels  # noqa: E402
import value_check as vc  # noqa: E402
from bench_hw_limits import matmul_tflops  # noqa: E402
from conftest import graph_ms, measure_copy_bandwidth, time_ms  # noqa: E402
from lease_rows import Rows  # noqa: E402

CUDA = torch.cuda.is_available()
PHASES = ("limits", "ops", "train", "sampling", "compile")


@contextlib.contextmanager
def guarded(rows: Rows, what: str, check_group: str | None = None):
    """An error in one row is a finding, not the end of the phase: it is noted (as a failed
    value check when ``check_group`` names one) and the phase goes on with the next row."""
    try:
        yield
    except Exception as err:  # noqa: BLE001
        text = f"{what}: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        traceback.print_exc()
        if check_group:
            rows.write(check_group, "check", check="FAIL", failures=text)
        else:
            rows.note(f"FAILED {text}")
        if CUDA:
            torch.cuda.empty_cache()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def wall_ms(fn, reps: int) -> float:
    """Mean ms of ``reps`` synchronised calls (for calls of many ms: training steps, sampling)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / reps


def limits_path(rows: Rows) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(rows.path)), "limits.json")


def copy_limit(rows: Rows) -> float:
    """The copy bandwidth the limits phase measured, or measured now."""
    try:
        with open(limits_path(rows)) as f:
            return float(json.load(f)["copy_gb_per_s"])
    except (OSError, KeyError, ValueError):
        return measure_copy_bandwidth("cuda" if CUDA else "cpu", nbytes=(512 if CUDA else 8) * 2**20)


def matmul_peak(rows: Rows) -> float:
    """The matmul TFLOP/s the limits phase measured, or measured now."""
    try:
        with open(limits_path(rows)) as f:
            return float(json.load(f)["matmul_tflops"])
    except (OSError, KeyError, ValueError):
        return matmul_tflops("cuda" if CUDA else "cpu")


#################################################################################
#                                   limits                                      #
#################################################################################


def phase_limits(rows: Rows) -> None:
    device = "cuda" if CUDA else "cpu"
    nbytes = (512 if CUDA else 8) * 2**20
    copy = measure_copy_bandwidth(device, nbytes=nbytes)
    rows.write("hardware limits", "copy", 2 * nbytes / copy / 1e6, gb_per_s=round(copy, 1), limit="copy",
               target="H100 about 3000 GB/s (KINDS.md), H200 about 4300")
    n = 8192 if CUDA else 256
    tflops = matmul_tflops(device, n)
    rows.write("hardware limits", f"matmul {n}^3 {'bfloat16' if CUDA else 'float32'}", 2 * n**3 / tflops / 1e9,
               tflops=round(tflops, 1), limit="matmul", target="H100 about 790 TFLOP/s bf16 (KINDS.md)")
    with open(limits_path(rows), "w") as f:
        json.dump({"copy_gb_per_s": copy, "matmul_tflops": tflops, "device": device}, f)


#################################################################################
#                                     ops                                        #
#################################################################################

# (op, target note) in the order the report wants them; the targets are BENCHMARKS.md's.
OP_TARGETS = {
    "adaln_modulate": "fwd >= 85% copy BW, >= 2.5x eager; fwd+bwd >= 1.8x eager",
    "gated_residual_modulate": "beats the two ops and eager; vs compile in the compile phase",
    "gated_residual": ">= 85% copy BW",
}


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _shapes(toy: bool):
    """(B, N, D) per width: B*N = 65536 at N = 256 on the GPU."""
    return [(2, 16, 48), (2, 16, 32)] if toy else [(256, 256, 1152), (256, 256, 768)]


def time_case(rows: Rows, case: vc.Case, group: str, copy_gbps: float, modes=("fwd", "fwd+bwd")) -> None:
    device = "cuda" if CUDA else "cpu"
    for mode in modes:
        if mode == "fwd+bwd" and case.op in vc.FORWARD_ONLY:
            continue
        nbytes = case.bytes_fwd if mode == "fwd" else case.bytes_fwd_bwd
        for impl, fn in (("fused", case.fused), ("eager", case.eager)):
            run = make_timed(fn, case, mode)
            ms = time_ms(run, device=device)
            gbps = nbytes / (ms * 1e-3) / 1e9
            rows.write(f"{group} {mode}", impl, ms, gb_per_s=round(gbps, 1), frac_of_copy_bw=round(gbps / copy_gbps, 3),
                       bytes_moved=nbytes, target=OP_TARGETS.get(case.op, "") if impl == "fused" else "")


def make_timed(fn, case: vc.Case, mode: str):
    """The timed callable: forward, or forward + autograd.grad of the float inputs."""
    grad = mode != "fwd"
    inputs = {k: (v.detach().requires_grad_(grad and k in case.grads) if v.is_floating_point() else v)
              for k, v in case.inputs.items()}  # fmt: skip
    if not grad:
        return lambda: fn(**inputs)
    leaves = [inputs[k] for k in case.grads]
    outs = fn(**inputs)
    cot = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
    return lambda: torch.autograd.grad(fn(**inputs), leaves, cot)


def phase_ops(rows: Rows) -> None:
    device = "cuda" if CUDA else "cpu"
    copy_gbps = copy_limit(rows)
    est = 2 if rows.toy else 12  # s per op and width: Triton JIT of fwd and bwd, fp32 refs, ~10 timings
    with pf_kernels.use_backend("auto"):
        for op in vc.OPS:
            for b, n, d in _shapes(rows.toy):
                if op == "timestep_embedding" and d != _shapes(rows.toy)[0][2]:
                    continue  # no width: once
                if not rows.fits(f"{op} D={d}", est):
                    return
                shape = f"B*N={b * n}" + ("" if op == "timestep_embedding" else f" D={d}")
                dtype = torch.float32 if op == "timestep_embedding" else (torch.float16 if rows.toy else torch.bfloat16)
                group = f"{op} {shape} {DTYPE_NAMES[dtype]}"
                with guarded(rows, group, check_group=f"values {group}"):
                    case = vc.make_case(op, b, n, d, dtype, device)
                    results = vc.check(case)
                    write_check(rows, f"values {group}", results, vc.failures(results))
                with guarded(rows, f"timing {group}"):
                    time_case(rows, case, group, copy_gbps)
                    del case
        ltg_rows(rows)


def write_check(rows: Rows, group: str, results: list[vc.Result], failures: str) -> None:
    """A value row: ok / FAIL and the output or gradient nearest its bound (or past it)."""
    worst = max(results, key=lambda r: r.err / r.bound if r.bound else float("inf"))
    rows.write(group, "check", check="ok" if all(r.ok for r in results) else "FAIL", worst=worst.name,
               err=float(f"{worst.err:.3g}"), torch_err=float(f"{worst.torch_err:.3g}"),
               bound=float(f"{worst.bound:.3g}"), failures=failures)  # fmt: skip


def ltg_rows(rows: Rows) -> None:
    """The LTG op vs its torch composite: GPU time of one call replayed from a CUDA graph
    (``do_bench_cudagraph``: a microsecond kernel is not timed by wall clock), and ``ms_host``,
    CUDA events around each call with its launch costs (``do_bench``)."""
    from pf import timesteps

    if os.environ.get("PF_GPU_LTG") == "torch":
        rows.note("LTG op skipped: the extension build failed (build.log); training used LTG's torch path")
        return
    if not rows.fits("ltg", 10):
        return
    from pf_kernels import ltg_sample

    device = "cuda" if CUDA else "cpu"
    for batch, n in ([(4, 16)] if rows.toy else [(256, 256), (1024, 256)]):
        torch_ltg = timesteps.make("ltg", backend="torch")
        fns = {"op": lambda: ltg_sample(batch, n, seed=0, offset=0, device=device),
               "torch": lambda: torch_ltg(batch, n, device=device)}  # fmt: skip
        for impl, fn in fns.items():
            with guarded(rows, f"ltg {impl} {batch}x{n}"):
                host = time_ms(fn, device=device)
                graph = graph_ms(fn) if CUDA else host
                rows.write(f"ltg {device} {batch}x{n}", impl, graph, ms_host=round(host, 5),
                           target=">= 5x the composite on a GPU" if impl == "op" else "")


#################################################################################
#                                    train                                      #
#################################################################################


def _presets(toy: bool):
    return ["Tiny/2"] if toy else ["PF-XL/2", "PF-B/2"]


def model_value_check(rows: Rows) -> None:
    """The whole model's forward and backward with the fused ops against the torch path
    (``value_check.check_model``): the output and every gradient (the worst parameter
    reported), PF-XL/2 at batch 4 in bf16 on the GPU."""
    preset, size, batch = ("Tiny/2", 8, 2) if rows.toy else ("PF-XL/2", 32, 4)
    low = torch.bfloat16 if CUDA else torch.float32
    results = vc.check_model(preset, size, batch, low, "auto", "cuda" if CUDA else "cpu")
    failing = [r.name for r in results if not r.ok]
    write_check(rows, f"values {preset} fwd+bwd b{batch} {str(low)[6:]} fused vs torch", results,
                ", ".join(failing[:10]) + (f" (+{len(failing) - 10})" if len(failing) > 10 else ""))


def phase_train(rows: Rows) -> None:
    import bench_train_step as bts

    if rows.fits("model value check", 5 if rows.toy else 25):
        with guarded(rows, "model value check", check_group="values model fwd+bwd fused vs torch"):
            model_value_check(rows)
        release()
    ltg = "torch" if os.environ.get("PF_GPU_LTG") == "torch" else "compiled"
    peak = matmul_peak(rows)
    batch = 2 if rows.toy else 32
    # (variant, kernel backend, estimated s: warm-up + 5 steps, and the compile where there is one)
    variants = [("eager", "torch", 10), ("fused", "auto", 15), ("blockc", "torch", 60)]
    for preset in _presets(rows.toy):
        for variant, backend, est in variants:
            if variant == "blockc" and not CUDA:
                rows.note(f"train {preset} blockc skipped: per-block torch.compile is timed on the GPU only")
                continue
            if not rows.fits(f"train {preset} {variant}", est * (0.3 if "B/2" in preset else 1)):
                return
            with guarded(rows, f"train {preset} {variant}"):
                train_row(rows, bts._make_step, preset, variant, backend, batch, ltg, peak)
            release()


def train_row(rows: Rows, make_step, preset: str, variant: str, backend: str, batch: int, ltg: str,
              peak: float) -> None:
    device = "cuda" if CUDA else "cpu"
    with pf_kernels.use_backend(backend):
        step = make_step(preset, {"blockc": "compile"}.get(variant, variant), batch, device, ltg_backend=ltg)
        t0 = time.perf_counter()
        for _ in range(3 if "compile" in variant or variant == "blockc" else 2):  # warm-up, and the compile
            step()
        warm_s = time.perf_counter() - t0
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        ms = wall_ms(step, 1 if rows.toy else 5)
    tflops = 6 * step.params * batch * step.tokens / (ms * 1e-3) / 1e12
    info = {"images_per_s": round(batch / ms * 1e3, 2), "tflops": round(tflops, 1),
            "frac_of_matmul_peak": round(tflops / peak, 3), "warmup_s": round(warm_s, 1), "ltg": ltg}
    if CUDA:
        info["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    target = "fused >= 1.25x eager with per-block compile, at no higher peak memory" if variant == "fused" else ""
    rows.write(f"train-step {preset} bf16 b{batch}", variant, ms, target=target, **info)


def release() -> None:
    """Free the last row's model before the next is built (PF-XL/2 with AdamW: ~11 GB)."""
    import gc

    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


#################################################################################
#                                   sampling                                    #
#################################################################################


def phase_sampling(rows: Rows) -> None:
    import bench_sampling as bs

    device = "cuda" if CUDA else "cpu"
    batch, steps, size = (2, 2, 8) if rows.toy else (32, 5, 32)
    # (variant, estimated s: warm-up (compile, graph capture) + 2 timed runs at PF-XL/2)
    variants = [("plain", 8), ("plain+blockc", 40), ("dedup+fused", 8), ("+graphs", 10)]
    for preset in _presets(rows.toy):
        model = bs.make_model(preset, size, device)
        for variant, est in variants:
            if variant in ("plain+blockc", "+graphs") and not CUDA:
                rows.note(f"sampling {preset} {variant} skipped: needs CUDA")
                continue
            if not rows.fits(f"sampling {preset} {variant}", est * (0.3 if "B/2" in preset else 1)):
                return
            with guarded(rows, f"sampling {preset} {variant}"):
                sampling_row(rows, model, preset, variant, batch, steps, size)
        del model
        release()


def sampling_row(rows: Rows, model, preset: str, variant: str, batch: int, steps: int, size: int) -> None:
    """Dual-loop sampling, guided (cfg 4): one warm-up (Triton JIT, compile, graph capture),
    then the mean of timed runs."""
    import bench_sampling as bs
    from pf import samplers

    device = "cuda" if CUDA else "cpu"
    sampler = samplers.make("dual_loop")
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    # +graphs: the dedup+fused eager model captured whole (no torch.compile: the compiled
    # model is the compile phase's), where bench_sampling's +graphs captures the compiled one.
    setup = "dedup+fused" if variant == "+graphs" else variant
    with bs.setup(model, setup, sampler) as runner, autocast(device):
        fn, counter = bs.sample_fn(model, runner, variant, sampler, x, y, steps)
        t0 = time.perf_counter()
        fn()
        sync()
        warm_s = time.perf_counter() - t0
        ms = wall_ms(fn, 1 if rows.toy else 2)
    target = "guided sampling >= 1.5x images/s over plain with per-block compile" \
        if variant in ("dedup+fused", "+graphs") else ""  # fmt: skip
    rows.write(f"sampling {preset} dual_loop b{batch} cfg{bs.CFG} {steps} steps", variant, ms,
               images_per_s=round(batch / ms * 1e3, 2), nfe=counter.nfe, warmup_s=round(warm_s, 1),
               target=target)  # fmt: skip


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


#################################################################################
#                                   compile                                     #
#################################################################################


def phase_compile(rows: Rows) -> None:
    """The torch.compile baselines, cheapest first: each op's plain expression (fwd+bwd at
    PF-XL/2), then the sampling model (dedup+compile, PF-XL/2), then the training step's
    whole-model compile (PF-B/2, then PF-XL/2: 100-160 s cold)."""
    if not CUDA:
        rows.note("compile phase skipped: the torch.compile baselines are timed on the GPU only")
        return
    import bench_sampling as bs
    import bench_train_step as bts

    copy_gbps = copy_limit(rows)
    b, n, d = _shapes(False)[0]
    for op in ("adaln_modulate", "gated_residual_modulate", "gated_residual", "ada_rms_norm"):
        if not rows.fits(f"compile {op}", 12):
            return
        with guarded(rows, f"compile {op}"):
            case = vc.make_case(op, b, n, d, torch.bfloat16, "cuda")
            torch._dynamo.reset()  # a fresh cache per op: no silent fallback past the recompile limit
            compiled = torch.compile(case.eager, fullgraph=True, dynamic=False)
            for mode in ("fwd", "fwd+bwd"):
                nbytes = case.bytes_fwd if mode == "fwd" else case.bytes_fwd_bwd
                ms = time_ms(make_timed(compiled, case, mode), device="cuda")
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.write(f"{op} B*N={b * n} D={d} bf16 {mode}", "compile", ms, gb_per_s=round(gbps, 1),
                           frac_of_copy_bw=round(gbps / copy_gbps, 3), bytes_moved=nbytes)
    if rows.fits("sampling PF-XL/2 dedup+compile", 90):
        model = bs.make_model("PF-XL/2", 32, "cuda")
        with guarded(rows, "sampling PF-XL/2 dedup+compile"):
            sampling_row(rows, model, "PF-XL/2", "dedup+compile", 32, 5, 32)
        del model
        release()
    ltg = "torch" if os.environ.get("PF_GPU_LTG") == "torch" else "compiled"
    for preset, est in (("PF-B/2", 60), ("PF-XL/2", 150)):
        if not rows.fits(f"train {preset} compile-model", est):
            return
        with guarded(rows, f"train {preset} compile-model"):
            train_row(rows, bts._make_step, preset, "compile-model", "torch", 32, ltg, matmul_peak(rows))
        release()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=PHASES)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--toy", action="store_true")
    args = parser.parse_args(argv)
    rows = Rows(args.out, args.phase, args.seconds, args.toy)
    if not CUDA and not args.toy:
        rows.note(f"{args.phase}: no CUDA device, nothing measured (--toy runs the CPU rehearsal)")
        return 0
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = True
    globals()[f"phase_{args.phase}"](rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
