"""What the trainer's memory and speed options cost and give (issue 28), on this machine.

    python benchmarks/bench_train_options.py memory [--preset S/2 --size 32 --batch 32]
        peak memory of one forward and backward with and without
        ``trainer.activation_checkpointing``: CPU peak RSS growth over the built model and its
        gradient buffers (``ru_maxrss``, one fresh process per variant), or CUDA ``max_memory_allocated``
    python benchmarks/bench_train_options.py compile [--steps 60]
        ``python -m pf.train``'s default digits run (Tiny/2, batch 64) with ``trainer.compile``
        false and true: wall seconds for the run (compile included) and the steady-state
        images/s of its last logged window

Each variant runs in its own process (``sys.executable``), so one's peak or compile cache
cannot leak into the other's. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MEMORY_CHILD = r"""
import json, resource, sys, torch
from pf.models.presets import build_model
from pf.training.memory import checkpoint_blocks
from pf.training.objective import FlowBatch, flow_objective
preset, size, batch, ckpt, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
torch.manual_seed(0)
model = build_model(preset, per_token=True, input_size=size, in_channels=4, num_classes=1000).to(device)
if ckpt:
    checkpoint_blocks(model)
x1 = torch.randn(batch, 4, size, size, device=device)
t = torch.rand(batch, (size // 2) ** 2, device=device)
y = torch.randint(0, 1000, (batch,), device=device)
batch_ = FlowBatch(x1, y, t, torch.randn_like(x1))
for p in model.parameters():  # the gradients' memory exists before the measured pass, in both variants
    p.grad = torch.zeros_like(p)
if device == "cuda":
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
flow_objective(model)(model, batch_)["loss"].backward()  # the activations live between these two
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss only grows
print(json.dumps({"peak_bytes": peak}))
"""


def memory(args) -> None:
    """Peak memory growth of one forward and backward (gradient buffers allocated beforehand)."""
    device = "cuda" if _cuda() else "cpu"
    for ckpt in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, args.preset, str(args.size), str(args.batch), ckpt,
                              device], cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
        print(json.dumps({"bench": "activation_memory", "preset": args.preset, "input_size": args.size,
                          "batch": args.batch, "activation_checkpointing": ckpt == "1", "device": device,
                          "peak_MiB": round(peak / 2**20, 1)}), flush=True)


def compile_(args) -> None:
    for flag in ("false", "true"):
        run_dir = Path(args.out) / f"compile-{flag}"
        cmd = [sys.executable, "-m", "pf.train", f"trainer.compile={flag}", f"trainer.max_steps={args.steps}",
               f"trainer.log_every={max(1, args.steps // 3)}", "trainer.progress=false", "trainer.sample_every=100000",
               "trainer.val_every=100000", "trainer.ckpt_every=100000", f"hydra.run.dir={run_dir}", "overwrite=true"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        print(json.dumps({"bench": "train_compile", "compile": flag == "true", "steps": args.steps,
                          "wall_s": round(wall, 1), "steady_img_per_s": round(records[-1]["img_per_s"], 1),
                          "first_window_img_per_s": round(records[0]["img_per_s"], 1)}), flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["memory", "compile"])
    parser.add_argument("--preset", default="S/2")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="/tmp/pf-bench-train-options")
    args = parser.parse_args()
    memory(args) if args.what == "memory" else compile_(args)


if __name__ == "__main__":
    main()
