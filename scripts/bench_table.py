"""Print compact Markdown tables from benchmark results.

    python scripts/bench_table.py RESULTS [RESULTS ...]

Each RESULTS file is a ``--benchmark-json`` file, a ``.jsonl`` file (one row per line, written
as each finishes: ``benchmarks/conftest.py``'s ``PF_BENCH_JSONL`` and ``benchmarks/lease.py``,
which ``scripts/gpu_check.sh`` runs), or gpu_check.sh's ``phases.tsv``; several are merged.

Sections, each only when it has rows: the phases of a gpu_check.sh call (budget, estimate,
limit, time taken, state); the value checks (``impl == "check"``: the largest error against
the fp32 reference, the bound of flash-attention's rule, ok / FAIL); notes (rows cut or
skipped, and why); the GPU test files; then one row per benchmark: its group and
implementation, ms, the speed-up over eager PyTorch and over ``torch.compile`` in the same
group (when those ran), GB/s and the fraction of the measured copy bandwidth (memory-bound
ops) or TFLOP/s and the fraction of the matmul peak (training steps), and the row's target.

"x compile" is the time of the group's ``torch.compile`` baseline over the row's: the plain
torch expression or model compiled whole (``compile`` for an op, ``compile-model`` for a
training step, ``dedup+compile`` for sampling), else the per-block compile of the published
code (``compile`` or ``blockc`` in a training group without ``compile-model``,
``plain+blockc``). For a fused row it is the fused path's speed-up over what a user would
otherwise pick.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict

EAGER_NAMES = ("eager", "torch", "plain")
COMPILE_NAMES = ("compile-model", "dedup+compile", "compile", "blockc", "plain+blockc")  # the first present wins
SPECIAL = ("check", "note")  # impls that are not timings


def _ms(bench: dict) -> float:
    info = bench.get("extra_info", {})
    return float(info.get("ms", bench["stats"]["median"] * 1e3))


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _impl(bench: dict) -> str:
    return bench.get("extra_info", {}).get("impl", bench["name"])


def _phases(rows: list[dict]) -> list[str]:
    lines = ["", "| phase | budget s | est s | limit s | took s | state |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['budget_s']} | {r['est_s']} | {r['limit_s']} | {r['took_s']} | {r['state']} |")
    return lines


def _checks(rows: list[dict]) -> list[str]:
    lines = ["", "| value check | result | worst | max err | torch err | bound | failing |",
             "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    for b in rows:
        i = b["extra_info"]
        lines.append(f"| {b['group'].removeprefix('values ')} | {i.get('check')} | {i.get('worst', '')} | "
                     f"{i.get('err', '')} | {i.get('torch_err', '')} | {i.get('bound', '')} | {i.get('failures', '')} |")
    return lines


def _tests(rows: list[dict]) -> list[str]:
    lines = ["", "| gpu test file | state | passed | failed | skipped | s | failing |", "|---|---|---:|---:|---:|---:|---|"]
    for b in rows:
        i = b["extra_info"]
        lines.append(f"| {_impl(b)} | {i.get('state', '')} | {i.get('passed', '')} | {i.get('failed', '')} | "
                     f"{i.get('skipped', '')} | {_ms(b) / 1e3:.0f} | {i.get('failing', '')} |")
    return lines


def table(data: dict) -> str:
    machine = data.get("machine_info", {})
    card = machine.get("gpu") or f"CPU ({machine.get('cpu', {}).get('brand_raw', 'unknown')})"
    lines = [f"### {card}: torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}, {data.get('datetime', '')[:10]}"]
    if data.get("phases"):
        lines += _phases(data["phases"])
    benches = data.get("benchmarks", [])
    checks = [b for b in benches if _impl(b) == "check"]
    notes = [b for b in benches if _impl(b) == "note"]
    tests = [b for b in benches if b.get("group") == "gpu tests"]
    if checks:
        lines += _checks(checks)
    if notes:
        lines += ["", *(f"- {b['extra_info'].get('note', '')}" for b in notes)]
    if tests:
        lines += _tests(tests)
    timed = [b for b in benches if _impl(b) not in SPECIAL and b.get("group") != "gpu tests"]
    if not timed:
        return "\n".join(lines)
    lines += [
        "",
        "| group | impl | ms | x eager | x compile | GB/s | % copy BW | TFLOP/s | % matmul peak | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in timed:
        groups[bench.get("group") or bench["name"]].append(bench)
    for group in groups:  # in the order measured: a lease's rows read top to bottom
        by_impl = {_impl(b): b for b in groups[group]}
        # The eager-PyTorch baseline is "eager" (ops, training), "torch" (the LTG composite)
        # or "plain" (sampling); the compiled one the whole-model compile where the group has
        # it, else "compile" or the published per-block compile.
        eager = next((by_impl[k] for k in EAGER_NAMES if k in by_impl), None)
        compiled = next((by_impl[k] for k in COMPILE_NAMES if k in by_impl), None)
        for bench in groups[group]:
            info = bench.get("extra_info", {})
            ms = _ms(bench)
            x_eager = _ms(eager) / ms if eager and bench is not eager and ms else None
            x_compile = _ms(compiled) / ms if compiled and bench is not compiled and ms else None
            frac_bw = info.get("frac_of_copy_bw")
            frac_mm = info.get("frac_of_matmul_peak")
            lines.append(
                f"| {group} | {_impl(bench)} | {ms:.3f} | {_fmt(x_eager, '.2f')} | "
                f"{_fmt(x_compile, '.2f')} | {_fmt(info.get('gb_per_s'), '.0f')} | "
                f"{_fmt(frac_bw * 100 if frac_bw is not None else None, '.0f')} | {_fmt(info.get('tflops'), '.1f')} | "
                f"{_fmt(frac_mm * 100 if frac_mm is not None else None, '.0f')} | {info.get('target', '')} |"
            )
    return "\n".join(lines)


def load(paths: list[str]) -> dict:
    """Merge result files into one ``{"machine_info", "datetime", "benchmarks", "phases"}``
    dict; the machine and date are the first that names them (a JSONL row may carry its own)."""
    merged: dict = {"machine_info": {}, "datetime": "", "benchmarks": [], "phases": []}
    for path in paths:
        with open(path) as f:
            if path.endswith(".tsv"):
                merged["phases"] += list(csv.DictReader(f, delimiter="\t"))
                continue
            text = f.read()
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            data = {"benchmarks": rows}
            first = next((r for r in rows if "machine" in r), None)
            if first:
                data.update(machine_info=first["machine"], datetime=first.get("datetime", ""))
        else:
            data = json.loads(text)
        merged["machine_info"] = merged["machine_info"] or data.get("machine_info", {})
        merged["datetime"] = merged["datetime"] or data.get("datetime", "")
        merged["benchmarks"] += data.get("benchmarks", [])
    return merged


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print(table(load(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
