"""Numbers as the studies' reports state them: mean ± std, paired differences and their verdict,
links between report files, and the table of stage times every report ends with."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def fmt(values, digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if math.isfinite(m) else "pending"


def shared_runs(*runs: dict) -> list[dict]:
    """Each ``{(training seed, sampling seed): point}`` dict cut to the runs every one of them has
    (in key order), so numbers set side by side come from the same models and noise."""
    keys = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    return [{k: r[k] for k in keys} for r in runs]


def paired(a: dict, b: dict, key: str = "fid") -> list[float]:
    """``b - a`` over the (training seed, sampling seed) pairs both have: same noise, labels and seeds."""
    a, b = shared_runs(a, b)
    return [b[k][key] - a[k][key] for k in a]


def verdict(diffs: list[float], lower_is_better: bool = True) -> str:
    """``mean ± std`` of paired differences and how many pairs favour the second column."""
    if not diffs:
        return "not measured yet"
    better = sum((d < 0) == lower_is_better for d in diffs if d != 0)
    worse = sum(1 for d in diffs if d != 0) - better
    m, s = mean_std(diffs)
    n = len(diffs)
    if better == n:
        word = f"better in all {n} paired runs"
    elif worse == n:
        word = f"worse in all {n} paired runs"
    else:
        word = f"better in {better}, worse in {worse}" + (f", equal in {n - better - worse}" if n - better - worse else "") \
            + f" of {n} paired runs"
    return f"{m:+.2f} ± {s:.2f}, {word}"


def rel(path: str | Path, results_file: str | Path) -> str:
    """``path`` as a link from the folder of ``results_file``."""
    return Path(os.path.relpath(Path(path).resolve(), Path(results_file).resolve().parent)).as_posix()


def stage_table(stages: list[tuple[str, float | None]]) -> list[str]:
    """The report's closing section: each stage's minutes of work, or ``pending``."""
    return ["", "## Stages", "", "| stage | minutes |", "|---|---|",
            *(f"| {name} | {f'{s / 60:.1f}' if s is not None else 'pending'} |" for name, s in stages)]


def training_spread(records_dir: str | Path) -> list[dict]:
    """The measured spread between training runs: for every stored Euler curve with two or more
    training seeds, the range of the training seeds' FID means (each over its sampling seeds) at
    each K, by arm (read from the stage records of ``records_dir``; nothing is computed)."""
    out = []
    for path in sorted(Path(records_dir).glob("stages/*.json")):
        rec = json.loads(path.read_text())
        name = rec.get("name", "")
        if not (name.startswith("curve ") and name.split()[2] in ("euler", "euler_pf")):
            continue
        by: dict = {}
        for p in rec["result"]["points"]:
            by.setdefault(p["steps"], {}).setdefault(p["train_seed"], []).append(p["fid"])
        for k, seeds in by.items():
            for seed, fids in seeds.items():
                out.append({"arm": name.split()[1], "steps": k, "train_seed": seed, "fid": mean_std(fids)[0]})
    ranges = []
    cells: dict = {}
    for r in out:
        cells.setdefault((r["arm"], r["steps"]), {})[r["train_seed"]] = r["fid"]
    for (arm, k), seeds in sorted(cells.items()):
        if len(seeds) >= 2:
            ranges.append({"arm": arm, "steps": k, "seeds": sorted(seeds), "range": max(seeds.values()) - min(seeds.values())})
    return ranges


def spread_sentence(records_dir: str | Path) -> str:
    """One sentence: how far apart training seeds of one arm land, for a single run's result."""
    r = training_spread(records_dir)
    if not r:
        return "The spread between training runs is not measured in these records."
    lo, hi = min(x["range"] for x in r), max(x["range"] for x in r)
    return (f"Two training seeds of the same arm and recipe land {lo:.2f} to {hi:.2f} FID apart (Euler, every arm and "
            f"K of the first comparison, {len(r)} cells, each seed the mean of its sampling seeds; "
            f"docs/reproduce-v1.md): a single run's difference smaller than that is within the training spread.")
