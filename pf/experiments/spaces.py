"""Points measured in the committed feature spaces: the shared part of the evidence study
(:mod:`pf.experiments.evidence`) and the diagnostics on the first study's kept weights
(:mod:`pf.experiments.diagnostics`).

A point is one sampler at K outer steps (or on a cut time grid) from one sampling seed on a
run's kept weights, measured in every classifier of ``study["classifiers"]`` (committed files,
``results/classifiers``; the first is a report's feature space, the others check it), and keyed
by their fingerprints, so a point of another classifier is another point. A report's cells
must share one set of classifiers (:func:`check_one_space`); differences are paired per
training seed, each the mean over its sampling seeds (:func:`cells`, :func:`paired`). Stage
functions record the CPU seconds they used and refuse to start past a budget (:func:`timed`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from pf.encoders.classifier import load_classifier
from pf.eval.metrics import compute_metrics
from pf.experiments.common import TrainedRun, reference_images, resolve_device, state_fingerprint
from pf.experiments.curves import point_images
from pf.experiments.realizations import SUPERSEDED
from pf.experiments.records import cached, cached_result
from pf.experiments.summary import mean_std

# The committed feature spaces (python -m pf.experiments.feature_spaces): two classifiers of the
# train split, trained with different seeds.
CLASSIFIERS = ["results/classifiers/fashion_mnist16_seed0.safetensors",
               "results/classifiers/fashion_mnist16_seed1.safetensors"]


class BudgetSpent(ValueError):
    """The study's CPU budget is used up: no stage starts."""


_FINGERPRINTS: dict = {}


def classifier_fingerprint(path: str | Path) -> str:
    """The fingerprint of a classifier file's weights (:func:`state_fingerprint`)."""
    key = str(path)
    if key not in _FINGERPRINTS:
        model, _ = load_classifier(path)
        _FINGERPRINTS[key] = state_fingerprint(model.state_dict())
    return _FINGERPRINTS[key]


def cpu_spent(records_dir: str | Path) -> float:
    """CPU seconds recorded by the finished stages of ``records_dir``, those measured on a
    superseded model (:mod:`pf.experiments.realizations`) included: the study spent them."""
    total = 0.0
    for folder in (Path(records_dir) / "stages", Path(records_dir) / SUPERSEDED / "stages"):
        for path in folder.glob("*.json"):
            total += float(json.loads(path.read_text())["result"].get("cpu_seconds", 0.0))
    return total


# The budget reaches the stages (worker processes too) through the environment, outside their
# arguments: a larger budget re-runs nothing that is done.
BUDGET_ENV = "PF_EVIDENCE_CPU_HOURS"


def check_budget(records_dir: str | Path) -> None:
    hours = os.environ.get(BUDGET_ENV)
    if hours and cpu_spent(records_dir) >= 3600 * float(hours):
        raise BudgetSpent(f"the study's CPU budget of {hours} h is spent (stage records in {records_dir}); "
                          "raise cpu_budget_hours to go on")


def timed(fn, budgeted: bool = False):
    """A stage function that records its CPU seconds (``budgeted``: and refuses to start once
    the budget of :data:`BUDGET_ENV` is spent)."""
    def stage(study: dict, **kw) -> dict:
        if budgeted:
            check_budget(study["records_dir"])
        c0 = time.process_time()
        out = fn(study, **kw)
        return {**out, "cpu_seconds": time.process_time() - c0}

    stage.__name__, stage.__doc__ = fn.__name__, fn.__doc__
    return stage


def point_key(study: dict, identity: dict, sampler: str, steps: int, seed: int, *, params: dict | None = None,
              cut: float | None = None) -> dict:
    """Everything that decides a point's numbers: the run, sampler (with ``params``, when
    any), K (or the ``cut`` grid), seed, sizes and the fingerprints of both feature spaces."""
    ec = study["eval"]
    key = {"trajectory": identity["trajectory"], "train_steps": identity["steps"], "sampler": sampler,
           "steps": int(steps), "seed": int(seed), "num_samples": int(ec["num_samples"]),
           "cfg_scale": float(ec["cfg_scale"]), "classifiers": [classifier_fingerprint(p) for p in study["classifiers"]],
           "kid_subsets": int(ec["kid_subsets"]), "device": resolve_device(study), "compile": bool(ec["compile"])}
    if ec.get("reference_size"):
        key["reference_size"] = int(ec["reference_size"])
    if params:
        key["params"] = params
    if cut is not None:
        key["cut"] = float(cut)
    return key


def measure(study: dict, images: torch.Tensor, seed: int, device: str) -> dict:
    """FID / KID / precision / recall of uint8 ``images`` in each feature space: the first's at
    the top level, every one (with its fingerprint) under ``spaces``."""
    spaces = []
    for path in study["classifiers"]:
        m = compute_metrics(images, reference_images(study), extractor="classifier", weights=str(path),
                            kid_subsets=int(study["eval"]["kid_subsets"]), seed=int(seed), device=device)
        spaces.append({"classifier": classifier_fingerprint(path), **{k: m[k] for k in
                                                                      ("fid", "kid", "precision", "recall")}})
    return {**{k: spaces[0][k] for k in ("fid", "kid", "precision", "recall")}, "classifier": spaces[0]["classifier"],
            "spaces": spaces}


def cut_grid(steps: int, cut: float) -> list[float]:
    """Euler's times on [0, ``cut``] at about the step of K = ``steps`` (ceil(cut K) equal
    steps), then one step from ``cut`` to 1: the K-step path without its queries near the data."""
    n = math.ceil(cut * steps - 1e-9)
    return [cut * i / n for i in range(n + 1)] + [1.0]


def evaluate(study: dict, run: TrainedRun, sampler: str, steps: int, seed: int, *, params: dict | None = None,
             cut: float | None = None, points_dir: str | None = None) -> dict:
    """One cached point: ``sampler`` (with ``params``) at ``steps`` outer steps from sampling
    seed ``seed`` on ``run``'s kept weights; ``cut``: on :func:`cut_grid` instead. Stored in
    ``points_dir`` (default: the study's records)."""
    key = point_key(study, run.identity, sampler, steps, seed, params=params, cut=cut)

    def compute() -> dict:
        pm = run.model()
        t0 = time.perf_counter()
        grid = int(steps) if cut is None else cut_grid(int(steps), float(cut))
        images, info = point_images(study, pm, sampler, params, grid, seed)
        seconds = time.perf_counter() - t0
        return {**measure(study, images, seed, pm.device), **info, "seconds": seconds, "weights": pm.weights}

    return cached(points_dir or study["records_dir"], "points", key, compute)


def stored(study: dict, identity: dict, sampler: str, steps: int, seed: int, *, params: dict | None = None,
           cut: float | None = None, points_dir: str | None = None) -> dict | None:
    """The point :func:`evaluate` stored for these arguments, or None (nothing is computed)."""
    key = point_key(study, identity, sampler, steps, seed, params=params, cut=cut)
    return cached_result(points_dir or study["records_dir"], "points", key)


def check_one_space(points: list[dict], fingerprints: list[str]) -> None:
    """Every point of a report was measured in the same feature spaces, ``fingerprints``
    (the first: the report's); a point of another classifier is refused, never averaged in."""
    for p in points:
        got = [s["classifier"] for s in p.get("spaces", [])]
        if got != list(fingerprints):
            raise ValueError(f"a point of {p.get('arm')} (training seed {p.get('train_seed')}, K={p.get('steps')}) "
                             f"was measured with classifiers {got}, not the report's {list(fingerprints)}: "
                             "re-measure it or drop it")


def cells(points: list[dict], space: int = 0, metric: str = "fid") -> dict:
    """arm -> K -> training seed -> the mean over its sampling seeds (and how many there were)."""
    acc: dict = {}
    for p in points:
        acc.setdefault(p["arm"], {}).setdefault(p["steps"], {}).setdefault(p["train_seed"], []).append(
            p["spaces"][space][metric])
    return {a: {k: {s: (sum(v) / len(v), len(v)) for s, v in by_seed.items()} for k, by_seed in by_k.items()}
            for a, by_k in acc.items()}


def best_k(cell: dict, seeds: list[int]) -> int | None:
    """The K with the lowest mean (over ``seeds``) of an arm's cell, among the K every seed has."""
    ks = [k for k, by_seed in cell.items() if all(s in by_seed for s in seeds)]
    if not ks:
        return None
    return min(ks, key=lambda k: sum(cell[k][s][0] for s in seeds))


def paired(c: dict, arm: str, base: str, k_arm: int, k_base: int) -> list[tuple[int, float]]:
    """(training seed, arm minus base) for every training seed both have at those K."""
    a, b = c.get(arm, {}).get(k_arm, {}), c.get(base, {}).get(k_base, {})
    return [(s, a[s][0] - b[s][0]) for s in sorted(set(a) & set(b))]


#################################################################################
#                                    Report                                     #
#################################################################################


def cell_text(values: list[float], digits: int = 2) -> str:
    """A table cell: mean ± std over training seeds and n, or "pending" (one seed has no std)."""
    if not values:
        return "pending"
    m, sd = mean_std(values)
    if len(values) == 1:
        return f"{m:.{digits}f} (n=1)"
    return f"{m:.{digits}f} ± {sd:.{digits}f} (n={len(values)})"


def seed_cell(by_seed: dict, digits: int = 2, scale: float = 1.0) -> str:
    """The table cell of one :func:`cells` entry ({training seed: (mean, count)}) over its seeds."""
    return cell_text([m * scale for m, _ in by_seed.values()], digits)


def fmt_pairs(pairs: list[tuple[int, float]]) -> str:
    """Paired differences: their mean ± std over training seeds, n, and each seed's value."""
    if not pairs:
        return "not measured yet"
    d = [v for _, v in pairs]
    if len(d) == 1:
        return f"{d[0]:+.2f} (n = 1 training seed, seed {pairs[0][0]})"
    m, s = mean_std(d)
    return f"{m:+.2f} ± {s:.2f} (n = {len(d)} training seeds: " + ", ".join(f"{v:+.2f}" for v in d) + ")"
