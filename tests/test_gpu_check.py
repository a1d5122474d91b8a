"""The GPU check's plumbing, on the CPU: results streamed as each benchmark finishes, the
table merged from several files, and scripts/gpu_check.sh's plan, phases and time budget,
the whole call rehearsed with PF_GPU_FAKE=1 (benchmarks/lease.py --toy)."""

import importlib.util
import json
import os
import re
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
        if len(cells) == 10 and cells[0] not in ("group", "---"):
            rows[(cells[0], cells[1])] = cells[2:9]
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


def test_checks_notes_phases_and_targets(tmp_path):
    """A lease's files: value checks, notes and phases get sections of their own; a timed
    row's target is its last cell."""
    lines = [
        {"group": "values adaln_modulate B*N=65536 D=1152 bf16", "name": "ops[check]", "stats": {"median": 0.0},
         "extra_info": {"impl": "check", "check": "FAIL", "worst": "grad x", "err": 0.5, "torch_err": 0.01,
                        "bound": 0.03, "failures": "grad x: ..."}},
        {"group": "ops notes", "name": "ops[note]", "stats": {"median": 0.0},
         "extra_info": {"impl": "note", "note": "cut before patch_euler D=768"}},
        _row("adaln fwd", "fused", 0.5, target=">= 85% copy BW"),
        {"group": "gpu tests", "name": "tests/test_x.py", "stats": {"median": 12.0},
         "extra_info": {"impl": "tests/test_x.py", "state": "ok", "passed": 3, "failed": 0, "skipped": 1}},
    ]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    phases = tmp_path / "phases.tsv"
    phases.write_text("phase\tbudget_s\test_s\tlimit_s\ttook_s\tstate\nops\t110\t95\t120\t118\tok\n")
    bt = _bench_table()
    table = bt.table(bt.load([str(rows), str(phases)]))
    assert "| ops | 110 | 95 | 120 | 118 | ok |" in table
    assert "| adaln_modulate B*N=65536 D=1152 bf16 | FAIL | grad x | 0.5 | 0.01 | 0.03 | grad x: ... |" in table
    assert "- cut before patch_euler D=768" in table
    assert "| tests/test_x.py | ok | 3 | 0 | 1 | 12 |  |" in table
    assert table.splitlines()[-1].endswith("| >= 85% copy BW |")
    assert table.count("| adaln fwd |") == 1 and "| values " not in table  # a check is not a timed row


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
    """``PF_BENCH_SCOPE=quick`` (the pytest benchmarks' short run) includes, beside every
    fused case, its torch.compile baseline: ops compiled as expressions, the training step's
    whole-model compile, sampling's compiled torch-ops model."""
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


def _gpu_check(tmp_path, *args, **env):
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", *(args or [str(tmp_path / "out")])],
        cwd=ROOT, env=_env(PYTHON=sys.executable, **env), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


FAILING_BUILD = 'echo "csrc/ltg_cuda.cu(7): error: identifier \\"x\\" is undefined" >&2; exit 1'
PHASE_ORDER = ["env", "build", "limits", "ops", "train", "sampling", "compile", "tests"]


def _plan(stdout: str) -> dict:
    """{phase: (budget_s, est_s)} of the printed plan, in order."""
    plan = {}
    for line in stdout.splitlines():
        cells = line.split()
        if len(cells) >= 3 and cells[1].isdigit() and cells[2].isdigit():
            plan[cells[0]] = (int(cells[1]), int(cells[2]))
    return plan


def test_dry_run_prints_a_value_first_plan_that_fits_the_call():
    """One device call of at most 9.5 minutes: every phase has a budget and an estimated
    cost beside it, they add up to at most 540 s with the table's reserve, and the phases
    that return numbers come before the compile baselines and the test suite."""
    proc = _gpu_check(None, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    plan = _plan(proc.stdout)
    total = plan.pop("total")
    assert list(plan) == PHASE_ORDER
    assert total == (sum(b for b, _ in plan.values()), sum(e for _, e in plan.values()))
    assert total[0] + 10 <= 540 and total[1] <= total[0]
    assert all(0 < est <= budget for budget, est in plan.values())
    assert "of PF_GPU_BUDGET_S=540 x PF_GPU_BUDGET_SCALE=1 (10 s kept for the table)" in proc.stdout  # the default


def test_dry_run_follows_the_phase_order_asked_for():
    proc = _gpu_check(None, "--dry-run", PF_GPU_PHASES="tests ops")
    assert list(_plan(proc.stdout)) == ["tests", "ops", "total"]


def test_fake_run_streams_rows_and_records_a_build_failure_once(tmp_path):
    """PF_GPU_FAKE=1 on the CPU: the env phase, a build that fails (its error shown and kept
    in build.log, one note, LTG's torch path from then on), the limits phase (its rows in
    rows.jsonl, table.md re-rendered), the real-shape test file run under a timeout."""
    proc = _gpu_check(tmp_path, PF_GPU_FAKE="1", PF_GPU_PHASES="env build limits tests", PF_GPU_BUILD_CMD=FAILING_BUILD,
                      PF_GPU_BUDGET_SCALE="3")  # budgets x3: this shared 2-core CPU is slower than the budgets' GPU machine
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the failed build
    summary = proc.stdout[proc.stdout.index("=== phases") :]
    for phase, state in [("env", "ok"), ("build", "FAILED (exit 1)"), ("limits", "ok"), ("tests", "ok")]:
        assert f"{phase:<9} {state}" in summary, summary
    assert 'BUILD FAILED (exit 1)' in proc.stdout and "error: identifier" in proc.stdout  # shown, not hidden
    assert "error: identifier" in (out / "build.log").read_text()
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    build_notes = [r for r in rows if r["group"] == "build notes"]
    assert len(build_notes) == 1 and "LTG's torch path" in build_notes[0]["extra_info"]["note"]
    limits = {r["extra_info"].get("limit") for r in rows if r["group"] == "hardware limits"}
    assert limits == {"copy", "matmul"}
    assert next(r for r in rows if "machine" in r)["group"] == "hardware limits"  # the first measured row
    tests = [r for r in rows if r["group"] == "gpu tests"]
    assert [r["extra_info"]["impl"] for r in tests] == ["tests/test_gpu_real_shapes.py"]
    assert tests[0]["extra_info"]["skipped"] > 0 and tests[0]["extra_info"]["failed"] == 0
    phases = (out / "phases.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in phases] == ["phase", "env", "build", "limits", "tests"]
    # A phase may use what the phases before it left: limits' limit is above its own budget.
    limits_limit = int(phases[3].split("\t")[3])
    assert 3 * 10 < limits_limit <= 3 * (10 + 40 + 10)  # env, build, limits (x3)
    table = (out / "table.md").read_text()
    assert "| hardware limits | copy |" in table and "| tests/test_gpu_real_shapes.py | ok |" in table
    # Printed at the end, the phase summary last: the device tool returns the output's tail.
    assert proc.stdout.index(table) < proc.stdout.index("=== phases")
    assert "value checks: 0, all ok" in proc.stdout


def test_a_phase_past_its_limit_is_cut_and_the_run_goes_on(tmp_path):
    """Budget 40 s, 10 kept for the table: the build (a command that hangs) is cut at what is
    left of those 30 s with a note, and the next phase is skipped (no time left) instead of
    overrunning."""
    proc = _gpu_check(tmp_path, PF_GPU_FAKE="1", PF_GPU_PHASES="build limits", PF_GPU_BUDGET_S="40",
                      PF_GPU_BUILD_CMD="sleep 120")  # fmt: skip
    assert proc.returncode == 1
    summary = proc.stdout[proc.stdout.index("=== phases") :]
    assert re.search(r"build     CUT at its \d+ s limit +\d+ s", summary), summary
    build = (tmp_path / "out" / "phases.tsv").read_text().splitlines()[1].split("\t")
    limit, took = int(build[3]), int(build[4])
    assert 0 < limit <= 30 and took <= limit + 1  # stopped at its limit, not after the command's 120 s
    assert "limits    SKIPPED" in summary
    notes = (tmp_path / "out" / "table.md").read_text()
    assert "s limit (rows measured before the cut are kept)" in notes and "skipped:" in notes


def test_without_cuda_each_gpu_phase_is_skipped_with_a_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    proc = _gpu_check(tmp_path, PF_GPU_PHASES="limits train tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for phase in ("limits", "train", "tests"):
        assert f"note ({phase}): skipped: no CUDA device" in proc.stdout


@pytest.mark.slow
def test_fake_run_of_every_phase(tmp_path):
    """The whole call on the CPU at toy sizes, after a failed build: every phase's code runs
    (value checks ok, the LTG op skipped instead of a JIT build, training on LTG's torch
    path, the GPU-only rows noted), within the default budget."""
    proc = _gpu_check(tmp_path, PF_GPU_FAKE="1", PF_GPU_BUILD_CMD=FAILING_BUILD, PF_GPU_BUDGET_SCALE="3")
    summary = proc.stdout[proc.stdout.index("=== phases") :]
    for phase in PHASE_ORDER:
        assert f"{phase:<9} {'FAILED (exit 1)' if phase == 'build' else 'ok'}" in summary, proc.stdout[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    checks = [r for r in rows if r["extra_info"]["impl"] == "check"]
    assert len(checks) == 19 + 1 and all(r["extra_info"]["check"] == "ok" for r in checks)  # ops, the model
    notes = " ".join(r["extra_info"]["note"] for r in rows if r["extra_info"]["impl"] == "note")
    assert "LTG op skipped: the extension build failed" in notes
    assert "compile phase skipped" in notes
    train = [r for r in rows if r["group"].startswith("train-step")]
    assert {r["extra_info"]["impl"] for r in train} == {"eager", "fused"}
    assert all(r["extra_info"]["ltg"] == "torch" for r in train)
    sampling = {r["extra_info"]["impl"] for r in rows if r["group"].startswith("sampling ") and "nfe" in r["extra_info"]}
    assert sampling == {"plain", "dedup+fused"}


def test_dry_run_scales_the_budgets():
    plan = _plan(_gpu_check(None, "--dry-run", PF_GPU_BUDGET_SCALE="3").stdout)
    assert plan["env"] == (30, 6) and plan["total"][0] == 3 * 530
    bad = _gpu_check(None, "--dry-run", PF_GPU_BUDGET_SCALE="0.5")
    assert bad.returncode == 2 and "PF_GPU_BUDGET_SCALE must be a positive integer" in bad.stderr


def test_gpu_check_rejects_unknown_phases(tmp_path):
    proc = _gpu_check(tmp_path, PF_GPU_PHASES="build benchmark")
    assert proc.returncode == 2
    assert "unknown phase 'benchmark'" in proc.stderr
