"""Evaluation points and the curves made of them.

A *point* is one evaluation: a trained run, a sampler with its parameters, K outer steps and a
sampling seed -> ``num_samples`` images (labels ``i mod classes``, the same noise for every
column of a seed) -> FID / KID / precision / recall against the held-out test split in the
features of the classifier trained on the train split. Points are cached by everything that
decides them (:func:`point_key`), so the studies share the points they have in common. A
*curve* is a sampler's points at the K of each target NFE of ``eval.nfe``, for every sampling
seed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pf import samplers
from pf.eval.metrics import compute_metrics
from pf.experiments.comparison import SIT_SAMPLERS
from pf.experiments.common import (PointModel, TrainedRun, classifier_path, feature_classifier, reference_images,
                                   resolve_device)
from pf.experiments.realizations import SUPERSEDED
from pf.experiments.records import cached, cached_result, config_key
from pf.pipeline import generate

ADAPTIVE_SAMPLERS = ("dual_loop", "look_ahead")  # their parameters come from the study's eval settings


def point_key(study: dict, train: dict, sampler: str, params: dict, steps: int, seed: int) -> dict:
    """Everything that decides a point's numbers."""
    ec = study["eval"]
    key = {"trajectory": train["trajectory"], "train_steps": train["steps"], "sampler": sampler, "params": params,
           "steps": int(steps), "seed": int(seed), "num_samples": int(ec["num_samples"]),
           "cfg_scale": float(ec["cfg_scale"]), "classifier": str(classifier_path(study)),
           "kid_subsets": int(ec["kid_subsets"]), "device": resolve_device(study), "compile": bool(ec.get("compile"))}
    if ec.get("reference_size"):
        key["reference_size"] = int(ec["reference_size"])
    return key


def stored_point(study: dict, train: dict, sampler: str, params: dict, steps: int, seed: int) -> dict | None:
    """A point already evaluated (by any stage), or None."""
    return cached_result(study["records_dir"], "points", point_key(study, train, sampler, params, steps, seed))


def point_images(study: dict, pm: PointModel, sampler: str, params: dict | None, grid, seed: int):
    """A point's images: ``eval.num_samples`` uint8 images from sampling seed ``seed`` by
    ``sampler`` (with ``params``) on ``grid`` (K outer steps, or a list of times), and what
    :func:`pf.pipeline.generate` reports of the run (NFE, ...)."""
    ec = study["eval"]
    return generate(pm.call, samplers.make(sampler, **(params or {})), int(ec["num_samples"]), grid, seed=int(seed),
                    cfg_scale=float(ec["cfg_scale"]), batch_size=int(ec["batch_size"]), device=pm.device,
                    static=pm.compiled)


def evaluate_point(study: dict, train: dict, sampler: str, params: dict, steps: int, seed: int,
                   model: PointModel | Callable[[], PointModel] | None = None, keep_images: int = 0) -> dict:
    """One cached point: metrics of ``sampler`` at ``steps`` on the trained run ``train`` (a
    train-stage result, or a :class:`TrainedRun`'s ``identity``). ``model``: the loaded model, or
    a function that loads it (called only when the point is not stored yet)."""
    ec = study["eval"]
    key = point_key(study, train, sampler, params, steps, seed)

    def compute() -> dict:
        pm = model() if callable(model) else model or PointModel(train["checkpoint"], study)
        images, info = point_images(study, pm, sampler, params, int(steps), seed)
        t0 = time.perf_counter()
        m = compute_metrics(images, reference_images(study), extractor="classifier",
                            weights=str(feature_classifier(study)[0]), kid_subsets=int(ec["kid_subsets"]),
                            seed=int(seed), device=pm.device)
        out = {**m, **info, "metric_seconds": time.perf_counter() - t0, "weights": pm.weights}
        if keep_images:
            path = Path(study["out_dir"]) / "images" / f"{config_key(key)}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(images[:keep_images].clone(), path)
            out["images"] = str(path)
        return out

    return cached(study["records_dir"], "points", key, compute)


def steps_for_nfe(sampler, budget: int) -> int:
    """The K whose expected NFE is closest to ``budget`` (ties: the cheaper one)."""
    best = None
    for k in range(1, 4 * budget + 1):
        nfe = sampler.expected_nfe(k)
        key = (abs(nfe - budget), nfe)
        if best is None or key < best[0]:
            best = (key, k)
        if nfe > 2 * budget:
            break
    return best[1]


#################################################################################
#                                     Curves                                    #
#################################################################################


def sampler_params(study: dict, name: str) -> dict:
    """The parameters the study draws sampler ``name`` with (``eval.dual_loop`` / ``eval.look_ahead``;
    SiT's samplers: its defaults, :data:`pf.experiments.comparison.SIT_SAMPLERS`)."""
    return dict(study["eval"].get(name, {})) if name in ADAPTIVE_SAMPLERS else dict(SIT_SAMPLERS.get(name, {}))


def curve_points(study: dict, name: str) -> list[tuple[int, int]]:
    """(target NFE, K) of a sampler's curve."""
    s = samplers.make(name, **sampler_params(study, name))
    return [(int(n), steps_for_nfe(s, int(n))) for n in study["eval"]["nfe"]]


def curve_specs(study: dict, sampler: str) -> list[tuple[int, int, int, int]]:
    """(target NFE, K, sampling seed, images kept for the grid) of every point of a curve."""
    ec = study["eval"]
    return [(target, k, int(sseed), 30 if (sseed == ec["seeds"][0] and target == ec["grid_steps"]) else 0)
            for target, k in curve_points(study, sampler) for sseed in ec["seeds"]]


def run_curve(study: dict, overrides: list[str], seed: int, sampler: str, targets=None) -> list[dict]:
    """Every point of one run's curve (or of the target NFEs in ``targets``), evaluated or read back."""
    run = TrainedRun(study, overrides, seed, study["train"]["steps"])
    points = []
    for target, k, sseed, keep in curve_specs(study, sampler):
        if targets is not None and target not in targets:
            continue
        p = evaluate_point(study, run.identity, sampler, sampler_params(study, sampler), k, sseed,
                           model=run.model, keep_images=keep)
        points.append({"target_nfe": target, "steps": k, "train_seed": seed, "sample_seed": sseed, **p})
    return points


def stored_points(study: dict, trained: dict, seed: int, sampler: str, targets=None) -> list[dict]:
    """The points of a curve that are already evaluated (``trained``: a train-stage result or a
    run's identity), for a report in progress."""
    out = []
    for target, k, sseed, _ in curve_specs(study, sampler):
        p = (stored_point(study, trained, sampler, sampler_params(study, sampler), k, sseed)
             if targets is None or target in targets else None)
        if p is not None:
            out.append({"target_nfe": target, "steps": k, "train_seed": seed, "sample_seed": sseed, **p})
    return out


def by_run(points: list[dict], **match) -> dict:
    """The points whose fields equal ``match`` by (training seed, sampling seed): the runs a
    number is averaged over and paired by."""
    return {(p["train_seed"], p["sample_seed"]): p for p in points if all(p.get(k) == v for k, v in match.items())}


def series(points: list[dict]) -> dict[int, dict]:
    """A curve's points as target NFE -> {(train seed, sample seed): point}."""
    out: dict[int, dict] = {}
    for p in points:
        out.setdefault(p["target_nfe"], {})[(p["train_seed"], p["sample_seed"])] = p
    return out


def realization_pairs(study: dict, folder: str = SUPERSEDED) -> list[dict]:
    """Points measured on two realizations of one run: each superseded point (kept in
    ``<records_dir>/<folder>``, measured on an earlier training of the same config, since
    replaced) beside the point of the same key measured on the run's kept weights."""
    pairs = []
    for path in sorted((Path(study["records_dir"]) / folder).glob("*.json")):
        old = json.loads(path.read_text())
        new = cached_result(study["records_dir"], "points", old["key"])
        if new is not None and new.get("weights") != old["result"].get("weights"):
            k = old["key"]
            pairs.append({"trajectory": k["trajectory"], "train_steps": k["train_steps"], "sampler": k["sampler"],
                          "steps": k["steps"], "seed": k["seed"], "old": old["result"]["fid"], "new": new["fid"]})
    return pairs
