"""The GPU check's plumbing, on the CPU: results streamed as each benchmark finishes, the
table merged from several files, and scripts/gpu_check.sh's phases and time budget."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from child_env import ROOT, child_env


def _bench_table():
    spec = importlib.util.spec_from_file_location("bench_table", os.path.join(ROOT, "scripts", "bench_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(group, impl, ms, **info):
    return {"group": group, "name": f"test[{impl}]", "stats": {"median": ms / 1e3}, "extra_info": {"impl": impl, "ms": ms, **info}}


def _rows_of(table: str) -> dict:
    """{(group, impl): [cells]} of the Markdown table."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] not in ("group", "---"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_table_ratios_and_fractions(tmp_path):
    machine = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0"}
    lines = [
        _row("adaln", "eager", 2.0) | {"machine": machine, "datetime": "2026-11-25T10:00:00+00:00"},
        _row("adaln", "compile", 1.0),
        _row("adaln", "fused", 0.5, gb_per_s=2500.0, frac_of_copy_bw=0.83),
        _row("train", "eager", 300.0, tflops=410.0, frac_of_matmul_peak=0.52),
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    bt = _bench_table()
    table = bt.table(bt.load([str(path)]))
    assert table.splitlines()[0] == "### NVIDIA H100 80GB HBM3: torch 2.11.0, triton 3.6.0, 2026-11-25"
    rows = _rows_of(table)
    assert rows[("adaln", "fused")] == ["0.500", "4.00", "2.00", "2500", "83", "", ""]
    assert rows[("adaln", "compile")][:3] == ["1.000", "2.00", ""]  # no ratio to itself
    assert rows[("adaln", "eager")][1:3] == ["", "0.50"]
    assert rows[("train", "eager")] == ["300.000", "", "", "", "", "410.0", "52"]


def test_x_compile_is_against_the_whole_model_compile(tmp_path):
    """A training group's "x compile" is over ``compile-model`` (torch.compile of the whole
    torch-ops model), a sampling group's over ``dedup+compile``; without them, the per-block
    compile of the published code."""
    lines = [
        _row("train", "eager", 400.0), _row("train", "compile", 300.0), _row("train", "compile-model", 250.0),
        _row("train", "fused", 200.0),
        _row("sampling", "plain", 9.0), _row("sampling", "plain+blockc", 6.0), _row("sampling", "dedup+compile", 4.0),
        _row("sampling", "dedup+fused", 2.0),
        _row("old sampling", "plain", 9.0), _row("old sampling", "plain+blockc", 6.0),
        _row("old sampling", "dedup+fused", 3.0),
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    bt = _bench_table()
    rows = _rows_of(bt.table(bt.load([str(path)])))
    assert rows[("train", "fused")][1:3] == ["2.00", "1.25"]
    assert rows[("train", "compile")][1:3] == ["1.33", "0.83"]
    assert rows[("train", "compile-model")][2] == ""
    assert rows[("sampling", "dedup+fused")][1:3] == ["4.50", "2.00"]
    assert rows[("old sampling", "dedup+fused")][1:3] == ["3.00", "2.00"]


@pytest.mark.slow
def test_quick_scope_has_the_compile_baselines():
    """What gpu_check.sh runs by default (PF_BENCH_SCOPE=quick) includes, beside every fused
    case, its torch.compile baseline: ops compiled as expressions, the training step's
    whole-model compile, sampling's compiled torch-ops model."""
    with open(os.path.join(ROOT, "scripts", "gpu_check.sh")) as f:
        assert 'PF_BENCH_SCOPE="${PF_BENCH_SCOPE:-quick}"' in f.read()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=_env(PF_BENCH_SCOPE="quick"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert "benchmarks/bench_train_step.py::test_train_step_cuda[PF-XL/2-compile-model]" in ids
    assert "benchmarks/bench_train_step.py::test_train_step_cuda[PF-XL/2-fused]" in ids
    assert "benchmarks/bench_sampling.py::test_sampling_cuda[PF-XL/2-dual_loop-dedup+compile]" in ids
    assert "benchmarks/bench_sampling.py::test_sampling_cuda[PF-XL/2-dual_loop-dedup+fused]" in ids
    fused_ops = [i for i in ids if "bench_ops.py" in i and i.endswith("-fused]")]
    assert len(fused_ops) >= 10
    for case in fused_ops:
        assert case.replace("-fused]", "-compile]") in ids, case


def test_load_merges_json_and_jsonl(tmp_path):
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps({"machine_info": {"gpu": None, "torch": "2.14.1"}, "datetime": "2026-11-24",
                                   "benchmarks": [_row("ltg", "torch", 4.0)]}))  # fmt: skip
    as_jsonl = tmp_path / "b.jsonl"
    as_jsonl.write_text(json.dumps(_row("ltg", "op", 1.0)) + "\n\n")
    bt = _bench_table()
    merged = bt.load([str(as_json), str(as_jsonl)])
    assert [b["extra_info"]["impl"] for b in merged["benchmarks"]] == ["torch", "op"]
    assert merged["machine_info"]["torch"] == "2.14.1"
    assert _rows_of(bt.table(merged))[("ltg", "op")][:2] == ["1.000", "4.00"]


def test_main_needs_a_file(capsys):
    assert _bench_table().main([]) == 2
    assert "bench_table.py" in capsys.readouterr().err


def _env(**extra):
    return child_env(drop=("PF_BENCH_SCOPE",), **extra)


@pytest.mark.slow
def test_benchmarks_stream_one_line_each(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_hw_limits.py", "--benchmark-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=_env(PF_BENCH_JSONL=str(out)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    limits = {r["extra_info"]["limit"]: r for r in rows if "limit" in r["extra_info"]}
    assert set(limits) == {"copy", "matmul"}
    assert limits["copy"]["extra_info"]["gb_per_s"] > 0 and limits["matmul"]["extra_info"]["tflops"] > 0
    assert limits["copy"]["stats"]["median"] > 0
    assert rows[0]["machine"]["torch"] and "gpu" in rows[0]["machine"] and "machine" not in rows[1]


def _gpu_check(tmp_path, **env):
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "out")],
        cwd=ROOT, env=_env(PYTHON=sys.executable, **env), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the training phase runs PF-XL/2: gpu_check.sh itself is the check there")
def test_gpu_check_runs_phases_and_prints_the_table(tmp_path):
    proc = _gpu_check(tmp_path, PF_GPU_PHASES="limits train", PF_GPU_BUDGET_S="200")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout[proc.stdout.index("=== phases") :]
    assert "limits    ok" in summary and "train     ok" in summary
    assert "tests" not in summary  # not asked for
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| hardware limits | test_copy_bandwidth |" in table
    assert "| train-step Tiny/2 cpu b8 | fused |" in table
    assert table in proc.stdout  # printed last, for the device tool's output tail
    assert (tmp_path / "out" / "check.log").read_text().count("=== ") >= 3


def test_gpu_check_skips_phases_past_its_budget(tmp_path):
    proc = _gpu_check(tmp_path, PF_GPU_PHASES="limits", PF_GPU_BUDGET_S="5")
    assert proc.returncode == 1
    assert "limits    SKIPPED: under 10 s of the 5 s budget left" in proc.stdout


def test_gpu_check_rejects_unknown_phases(tmp_path):
    proc = _gpu_check(tmp_path, PF_GPU_PHASES="build benchmark")
    assert proc.returncode == 2
    assert "unknown phase 'benchmark'" in proc.stderr
