"""Print a compact Markdown table from ``pytest-benchmark`` results.

    python scripts/bench_table.py RESULTS [RESULTS ...]

Each RESULTS file is a ``--benchmark-json`` file or a ``PF_BENCH_JSONL`` file (one benchmark
per line, written as each finishes: see ``benchmarks/conftest.py``); several are merged.

One row per benchmark: its group and implementation, ms, the speed-up over eager PyTorch
and over ``torch.compile`` in the same group (when those ran), GB/s and the fraction of
the measured copy bandwidth (memory-bound ops) or TFLOP/s and the fraction of the matmul
peak (training steps), and the card's name in the heading.

"x compile" is the time of the group's ``torch.compile`` baseline over the row's: the plain
torch expression or model compiled whole (``compile`` for an op, ``compile-model`` for a
training step, ``dedup+compile`` for sampling), else the per-block compile of the published
code (``compile`` in a training group without ``compile-model``, ``plain+blockc``). For a
fused row it is the fused path's speed-up over what a user would otherwise pick.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


EAGER_NAMES = ("eager", "torch", "plain")
COMPILE_NAMES = ("compile-model", "dedup+compile", "compile", "plain+blockc")  # the first present is the baseline


def _ms(bench: dict) -> float:
    info = bench.get("extra_info", {})
    return float(info.get("ms", bench["stats"]["median"] * 1e3))


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(data: dict) -> str:
    machine = data.get("machine_info", {})
    card = machine.get("gpu") or f"CPU ({machine.get('cpu', {}).get('brand_raw', 'unknown')})"
    lines = [
        f"### {card}: torch {machine.get('torch', '?')}, triton {machine.get('triton', '?')}, {data.get('datetime', '')[:10]}",
        "",
        "| group | impl | ms | x eager | x compile | GB/s | % copy BW | TFLOP/s | % matmul peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data.get("benchmarks", []):
        groups[bench.get("group") or bench["name"]].append(bench)
    for group in sorted(groups):
        by_impl = {b.get("extra_info", {}).get("impl"): b for b in groups[group]}
        # The eager-PyTorch baseline is "eager" (ops, training), "torch" (the LTG composite)
        # or "plain" (sampling); the compiled one the whole-model compile where the group has
        # it, else "compile" or "plain+blockc" (per-block).
        eager = next((by_impl[k] for k in EAGER_NAMES if k in by_impl), None)
        compiled = next((by_impl[k] for k in COMPILE_NAMES if k in by_impl), None)
        for bench in groups[group]:
            info = bench.get("extra_info", {})
            ms = _ms(bench)
            x_eager = _ms(eager) / ms if eager and bench is not eager else None
            x_compile = _ms(compiled) / ms if compiled and bench is not compiled else None
            frac_bw = info.get("frac_of_copy_bw")
            frac_mm = info.get("frac_of_matmul_peak")
            lines.append(
                f"| {group} | {info.get('impl', bench['name'])} | {ms:.3f} | {_fmt(x_eager, '.2f')} | "
                f"{_fmt(x_compile, '.2f')} | {_fmt(info.get('gb_per_s'), '.0f')} | "
                f"{_fmt(frac_bw * 100 if frac_bw is not None else None, '.0f')} | {_fmt(info.get('tflops'), '.1f')} | "
                f"{_fmt(frac_mm * 100 if frac_mm is not None else None, '.0f')} |"
            )
    return "\n".join(lines)


def load(paths: list[str]) -> dict:
    """Merge result files into one ``{"machine_info", "datetime", "benchmarks"}`` dict; the
    machine and date are the first file's (a JSONL row carries its own)."""
    merged: dict = {"machine_info": {}, "datetime": "", "benchmarks": []}
    for path in paths:
        with open(path) as f:
            text = f.read()
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            data = {"benchmarks": rows}
            if rows:
                data.update(machine_info=rows[0].get("machine", {}), datetime=rows[0].get("datetime", ""))
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
