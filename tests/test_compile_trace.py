"""The compiled fused path, traced on the CPU as far as a CPU allows, so that the first GPU
run does not discover a trace error.

One child process (``TRITON_INTERPRET`` unset: the kernels are compiled-mode ``JITFunction``s, as
on a GPU, so ``wrap_triton`` takes them) builds the model on the ``meta`` device, turns it into
fake CUDA tensors (``FakeTensorMode``: shapes, strides and a ``cuda`` device, no memory), and
runs ``torch.compile(model, fullgraph=True)`` with backends that only record:
- dynamo's graph: no graph break (``fullgraph``), and the ``pf_kernels`` custom ops in it;
- AOTAutograd's forward graph: each custom op decomposed into its Triton launches
  (``triton_kernel_wrapper_functional``), i.e. every launcher's host code ran on fake CUDA
  tensors through ``wrap_triton``; Triton's driver names an sm_90 target (as
  scripts/kernel_report.py does), so torch's mutation analysis lowers each kernel to TTIR
  for that target, and the test fails on any warning from it.
At PF-XL/2 and PF-B/2 widths (two blocks each: every block runs the same kernels), bf16, the
per-token path, the deduplicated (indexed) path that sampling compiles, and the training
forward (parameters requiring grad: the ``_with_stats`` forwards) at dynamo level.

What a CPU cannot do (tried on torch 2.14.1, Triton 3.8.0):
- trace the backward on fake CUDA tensors: torch's autograd engine asks the CUDA runtime
  about the device (``RuntimeError: hasPrimaryContext expects a valid device index``), so
  AOTAutograd's joint graph cannot be built without a GPU;
- trace it on fake CPU tensors instead: the compiled kernels refuse CPU tensors, and the
  interpreter's kernels read data pointers when ``triton_op`` decomposes them (``Attempted to
  access the data pointer on an invalid python storage``);
- autocast to bf16 on "cuda" (disabled without CUDA): the model is cast to bf16 instead;
- run inductor: it compiles and benchmarks on the device.
The backward under compile is left to the GPU tests (test_kernel_compile's and the
compiled-training GPU tests) and gpu_check.sh's compile phase.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from child_env import ROOT, child_env


def trace(width: int, heads: int, mode: str) -> dict:
    """Trace a two-block model of the given width on fake CUDA tensors; ``mode``:
    ``per-token`` (inference, (B, N) times), ``indexed`` (inference inside ``sync_free(2)``:
    the (B, K, D) tables sampling compiles), ``train`` (parameters requiring grad, dynamo only)."""
    import logging

    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._subclasses.fake_tensor import FakeTensorMode

    import pf_kernels
    from pf.models.dit import PatchForcingDiT

    pf_kernels.set_backend("auto")  # CUDA tensors -> the Triton ops
    graphs: dict = {"dynamo": [], "forward": []}

    def record(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return gm.forward  # never called with data

        return compiler

    def backend(gm, example_inputs):
        graphs["dynamo"].append(gm)
        if mode == "train":
            return gm.forward
        return aot_autograd(fw_compiler=record("forward"), bw_compiler=record("forward"))(gm, example_inputs)

    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if "identify_accessed_tensors" in record.getMessage() or "ttir" in record.getMessage().lower():
                warnings.append(record.getMessage())

    # torch's mutation analysis of a wrapped kernel (it lowers the kernel to TTIR) logs its
    # failures as warnings of the torch._dynamo logger, then assumes every input mutated.
    log = logging.getLogger("torch._dynamo")
    handler = Collect(level=logging.WARNING)
    log.addHandler(handler)
    with torch.device("meta"):
        model = PatchForcingDiT(input_size=32, patch_size=2, in_channels=4, hidden_size=width, depth=2,
                                num_heads=heads, num_classes=1000)  # fmt: skip
        if mode != "train":
            model = model.to(torch.bfloat16).eval()  # what autocast would give the ops
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    b = 4
    with fake:
        model = model.to_empty(device="cuda")
        x = torch.empty(b, 4, 32, 32, device="cuda", dtype=next(model.parameters()).dtype)
        t = torch.empty(b, 256, device="cuda")
        y = torch.zeros(b, dtype=torch.long, device="cuda")
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with fake:
        if mode == "indexed":
            with model.sync_free(distinct_times=2), torch.no_grad():
                out = compiled(x, t, y)
        elif mode == "train":
            model.train()
            out = compiled(x, t, y)
        else:
            with torch.no_grad():
                out = compiled(x, t, y)
    log.removeHandler(handler)  # the next trace of this process collects its own

    def targets(gm):
        return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})

    dynamo_ops = sorted({t for gm in graphs["dynamo"] for t in targets(gm) if t.startswith("pf_kernels.")})
    launches = sum(1 for gm in graphs["forward"] for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target))
    leftover = sorted({t for gm in graphs["forward"] for t in targets(gm) if t.startswith("pf_kernels.")})
    return {"graphs": len(graphs["dynamo"]), "dynamo_ops": dynamo_ops, "launches": launches,
            "ops_left_in_aot_graph": leftover, "warnings": warnings, "out": [list(out.shape), str(out.device)]}


TRACES = [(1152, 16, "per-token"), (1152, 16, "indexed"), (768, 12, "per-token"), (768, 12, "indexed"),
          (1152, 16, "train")]  # fmt: skip


@pytest.fixture(scope="module")
def reports() -> dict:
    """Every trace of ``TRACES`` from one child process (torch and the model imported once):
    ``{"width heads mode": report}``, a trace that raised reported by its traceback."""
    env = child_env(drop=("TRITON_INTERPRET",))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _report(reports: dict, width: int, heads: int, mode: str) -> dict:
    report = reports[f"{width} {heads} {mode}"]
    assert "error" not in report, report.get("error")
    return report


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per-token", "indexed"])
@pytest.mark.parametrize("width,heads", [(1152, 16), (768, 12)], ids=["XL-width", "B-width"])
def test_inference_traces_to_triton_launches(reports, width, heads, mode):
    report = _report(reports, width, heads, mode)
    assert report["graphs"] == 1  # fullgraph: one graph, no break
    assert report["out"] == [[4, 4, 32, 32], "cuda:0"]
    names = report["dynamo_ops"]
    assert any("timestep_embedding" in n for n in names), names
    if mode == "indexed":
        assert any("modulate_indexed" in n for n in names), names
    else:
        assert any("gated_residual_modulate" in n and "indexed" not in n for n in names), names
    # Every custom op was decomposed into Triton launches (none left opaque), and each
    # kernel lowered to TTIR for sm_90 without a warning.
    assert report["ops_left_in_aot_graph"] == []
    assert report["launches"] >= 5  # embedding, first modulate, two seams per block (x2)
    assert report["warnings"] == []


@pytest.mark.slow
def test_training_forward_traces_without_a_break(reports):
    report = _report(reports, 1152, 16, "train")
    assert report["graphs"] == 1
    assert any("gated_residual_modulate" in n for n in report["dynamo_ops"]), report["dynamo_ops"]


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)
    import importlib.util

    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    spec = importlib.util.spec_from_file_location("kernel_report", os.path.join(ROOT, "scripts", "kernel_report.py"))
    kernel_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_report)
    driver.set_active(kernel_report._TargetDriver(GPUTarget("cuda", 90, 32)))  # no GPU to ask
    import traceback

    import torch

    results = {}
    for width, heads, mode in TRACES:
        torch._dynamo.reset()  # each trace from a fresh cache, as in a process of its own
        try:
            results[f"{width} {heads} {mode}"] = trace(width, heads, mode)
        except Exception:  # noqa: BLE001 - one trace's failure is its test's, not the others'
            results[f"{width} {heads} {mode}"] = {"error": traceback.format_exc()[-6000:]}
    print(json.dumps(results))
