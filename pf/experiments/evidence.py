"""The comparison, version 2: ``python -m pf.experiments.evidence [key=value ...]``.

Version 1 (:mod:`pf.experiments.reproduce`) trained with a constant learning rate, measured
learning speed rather than final quality, mixed feature spaces (a classifier retrained per
machine) and counted sampling seeds as if they were training runs. This version:

1. measures every point in two committed feature spaces (``classifiers``: two independently
   trained Fashion-MNIST classifiers, ``results/classifiers/``), and names both fingerprints
   and the weights' fingerprint in every point; the report refuses cells of another classifier;
2. trains every arm with the same recipe: cosine decay from ``train.lr`` to ``train.lr_min``
   at ``train.steps``, an EMA of ``train.ema_decay`` (mean age about a quarter of the run, the
   stretch where the learning rate is below 15% of its peak), 3 training seeds, and the same
   data order, noise and class dropout for a seed in every arm (their streams are keyed by the
   seed alone, :func:`pf.train._train`);
3. arms: SiT (uniform t, the paper's baseline), PF (LTG, loc 0.7, the paper's), PF (LTG with
   loc shifted for this data's dimension, :func:`shifted_loc`), PF with one time per sample
   drawn from LTG's per-patch marginal (the same time density, no heterogeneity), then SiT
   (logit-normal t) last, if the budget allows;
4. Euler at every K of ``eval.nfe`` for every training seed and sampling seed, ``eval.num_samples``
   images a point, FID and KID (and precision / recall) against the held-out test split; the
   SiT arms also with SiT's own samplers, Heun and the SDE (SPEC section 13, SiT's defaults),
   at ``eval.sit_sampler_nfe`` model calls (Heun: K = NFE / 2) from ``eval.sit_sampler_seeds``;
5. writes the report (``results``) with differences paired per training seed (n = training
   seeds; each the mean over the sampling seeds) at K = 100 and at each arm's best K, and the
   PF arms against SiT with its best sampler (the lowest mean FID over training seeds in the
   first feature space, checked in the second) at that NFE, on the same sampling seeds.

Stages run in the order that makes a partial run most useful: training seed 0 of every arm
(a SiT arm's own samplers right after its curve), then seed 1, then seed 2 (SiT logit-normal
after all of them). Every stage records the CPU seconds it used; a stage does not start once
``cpu_budget_hours`` are spent (it fails with one line, the report is still written). Resumable: run the same command again.
Each run's weights are kept with the records (not in git); continued in a fresh clone, a run whose
points are all stored is not trained again, and one that still needs a point is, which on another
machine ends another model: the report then refuses the run's two models, and
``supersede=[arm:seed]`` moves its records of the earlier model to ``<records_dir>/superseded/``
for the study to measure them again (the report compares the two models' points).
``toy=true`` runs everything at a minute's size (CI); ``report_only=true`` rewrites the report.

Sizing, measured here (2 cores, two stages at a time; the stages table of the report): a
4000-step training took 17.5-19 CPU-minutes (SiT) to 30-34 (PF), a curve (2 x 2000 images x
(10 + 25 + 100) Euler steps plus the metric passes) 16.5-23, SiT's own samplers at NFE 100 on
one seed (Heun at K = 50 and the SDE at M = 100; Euler's point is the curve's) 12.6-13.4, a profile
0.3. The 42 stages of the five arms x 3 seeds come to about 13 CPU-hours, inside the default
16 h budget (the first study's timings had predicted 16.6 h for four arms). 4000
steps is what the budget allows, not a length where FID is known to have flattened: the first
study's constant-learning-rate FID was still falling at 6000 steps (32 -> 14 -> 8 at 1k -> 3k
-> 6k); the decay makes the most of the steps there are, and the report says so.
On a lent GPU (``PF_STUDY_MODULE=pf.experiments.evidence scripts/gpu_study.sh OUT
records_dir=results/evidence-gpu``) the same stages run on 8 worker processes in one call.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import torch

from pf.experiments import command, plots
from pf.eval.inputs import load_dataset_images
from pf.experiments.common import (TrainedRun, compose_train_config, data_config, kept_weights_path, resolve_device,
                                   train_stage as common_train_stage, velocity_profile, weights_fingerprint)
from pf.experiments.comparison import ARMS, SAMPLER_LABELS, SIT_SAMPLERS, euler_sampler, is_pf
from pf.experiments.curves import realization_pairs, steps_for_nfe
from pf.samplers import make as make_sampler
from pf.experiments.realizations import SUPERSEDED, check_one_realization, run_point_files, supersede
from pf.experiments.stages import Stage, stage_result, stored_stage_file
from pf.experiments.spaces import (BUDGET_ENV, CLASSIFIERS, best_k, cells, check_one_space, cpu_spent,
                                   classifier_fingerprint, evaluate, fmt_pairs, measure, paired,
                                   seed_cell, stored, timed)
from pf.experiments.summary import mean_std, rel
from pf.encoders.classifier import load_classifier
from pf.models import load_checkpoint

# The data dimension LTG's location was set for: SD-VAE latents of 256x256 images, 32x32x4.
LTG_REFERENCE_DIM = 32 * 32 * 4
LTG_LOC = 0.7

DEFAULTS = {
    "out_dir": "runs/evidence",        # trained runs (large; recomputable)
    "records_dir": "results/evidence",  # stage records, points, kept weights (small; kept in git)
    "figures": "docs/evidence",
    "results": "RESULTS.md",
    "device": "auto",
    "jobs": 2,
    "threads": 1,
    "data": "fashion_mnist",
    "data_overrides": [],
    "image_size": 16,
    "model": "tiny",
    "train": {
        "steps": 4000,
        "batch_size": 64,
        "lr": 1.0e-3,
        "lr_min": 1.0e-5,             # cosine decay to this at train.steps
        "warmup_steps": 100,
        "ema_decay": 0.999,           # with warm-up; mean age 1000 steps: the run's last quarter
        "seeds": [0, 1, 2],
        "keep_every": 1000,
        "overrides": [],
    },
    "eval": {
        "num_samples": 2000,
        "batch_size": 500,
        "seeds": [0, 1],              # sampling seeds (the same noise and labels in every arm)
        "nfe": [10, 25, 100],         # Euler's K
        "cfg_scale": 1.0,
        "kid_subsets": 50,
        "reference_size": None,
        "compile": True,
        "profile_times": [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995],
        "profile_images": 1000,
        # SiT's own samplers (SPEC section 13) on every SiT arm, at one NFE: Euler's point is the
        # curve's (read back), Heun runs K = NFE / 2 steps, the SDE M = NFE grid points.
        "sit_samplers": ["euler", "heun", "sde"],
        "sit_sampler_nfe": 100,        # the paper's Euler setting
        "sit_sampler_seeds": [0],      # sampling seeds: 2 new points x 3 training seeds, about 1 CPU-hour
    },
    # The two committed feature spaces: the first is the report's, the second checks each conclusion.
    "classifiers": list(CLASSIFIERS),
    "arms": ["pf_ltg", "sit_uniform", "pf_ltg_shifted", "pf_ltg_marginal", "sit_logit_normal"],
    "late_arms": ["sit_logit_normal"],  # trained after every seed of the others
    "cpu_budget_hours": 16.0,
    "diagnostics_summary": "results/diagnostics/summary.json",  # the why-lines of the conclusion
    "toy": False,
    "report_only": False,
    "supersede": [],  # runs "arm:seed" retrained to another model: their older records moved aside, measured again
}
TOY = ["out_dir=runs/toy-evidence", "records_dir=runs/toy-evidence/records", "figures=runs/toy-evidence/figures",
       "results=runs/toy-evidence/RESULTS.md", "train.steps=4", "train.keep_every=2", "train.batch_size=8",
       "train.warmup_steps=1", "train.seeds=[0,1]", "eval.num_samples=20", "eval.batch_size=10", "eval.seeds=[0,1]",
       "eval.nfe=[2,4]", "eval.kid_subsets=2", "eval.compile=false", "eval.reference_size=200",
       "eval.profile_images=20", "eval.profile_times=[0.5,0.95]", "eval.sit_sampler_nfe=4", "image_size=8", "jobs=1"]
FREE: tuple[str, ...] = ()
DOC_COMMAND = "python -m pf.experiments.evidence"


#################################################################################
#                                     Arms                                      #
#################################################################################


def data_dim(study: dict) -> int:
    """Values per image of the data the arms train on (image_size^2 x channels)."""
    cfg = compose_train_config(study, ARMS["pf_ltg"]["overrides"], 0)
    return int(study["image_size"]) ** 2 * int(cfg.data.channels)


def shifted_loc(dim: int, loc: float = LTG_LOC, reference: int = LTG_REFERENCE_DIM) -> float:
    """LTG's location moved by the resolution-shift argument (SD3, Esser et al. 2024): the time
    density shifts by log(sqrt(reference / dim)) in logit space (t = 1 is data: a smaller
    image goes towards the data end)."""
    return loc + 0.5 * math.log(reference / dim)


def arms(study: dict) -> dict:
    """Every arm this study can train: label and pf.train overrides."""
    loc = shifted_loc(data_dim(study))
    out = {k: copy.deepcopy(ARMS[k]) for k in ("sit_uniform", "sit_logit_normal", "pf_ltg")}
    out["pf_ltg_shifted"] = {"label": f"PF (LTG, loc {loc:.2f})",
                             "overrides": ["trainer=pf", "trainer.timesteps.name=ltg",
                                           f"trainer.timesteps.loc={loc:.4f}"]}
    out["pf_ltg_marginal"] = {"label": "PF (one time per sample, LTG's marginal)",
                              "overrides": ["trainer=pf", "trainer.timesteps.name=ltg_marginal"]}
    return out


def arm_labels(study: dict) -> dict[str, str]:
    """Each arm's label in the report, by arm name."""
    return {k: v["label"] for k, v in arms(study).items()}


def recipe(study: dict) -> dict:
    """``study`` with the recipe's pf.train overrides: cosine decay over ``train.steps`` to
    ``train.lr_min``, the EMA decay with warm-up."""
    out = copy.deepcopy(study)
    tc = out["train"]
    tc["overrides"] = ["trainer.lr_schedule=cosine", f"trainer.min_lr={tc['lr_min']}",
                       f"trainer.max_steps={tc['steps']}", f"trainer.ema_decay={tc['ema_decay']}",
                       "trainer.ema_warmup=true", *tc.get("overrides", [])]
    return out


STAGE_KEYS = ("out_dir", "records_dir", "device", "data", "data_overrides", "image_size", "model", "train")


def stage_view(study: dict, evaluation: bool = True) -> dict:
    """What a stage sees (and its key hashes): the data, model and recipe; with
    ``evaluation`` the evaluation settings and the classifiers too. Nothing else, so a setting
    added to the study later re-runs nothing."""
    out = {k: copy.deepcopy(study[k]) for k in STAGE_KEYS}
    out = recipe(out)
    if evaluation:
        ec = study["eval"]
        out["eval"] = {k: ec[k] for k in ("num_samples", "batch_size", "seeds", "nfe", "cfg_scale", "kid_subsets",
                                          "reference_size", "compile")}
        out["classifiers"] = list(study["classifiers"])
    return out


def _train(study: dict, arm: str, seed: int) -> dict:
    """Stage: one arm trained (or resumed) for ``train.steps``; its EMA weights kept with the records."""
    out = common_train_stage(study, arms(study)[arm]["overrides"], seed, int(study["train"]["steps"]))
    return {k: v for k, v in out.items() if k not in ("checkpoint", "run_dir")}


def run_points(study: dict, arm: str, seed: int, specs: list[tuple[str, dict, int, dict]], sample_seeds,
               stored_only: bool) -> list[dict]:
    """The points of one run: each (sampler, params, K, fields) of ``specs`` at every sampling
    seed, evaluated (``stored_only``: those already stored, for a report in progress), each
    with its arm, seeds, K and ``fields``."""
    run = TrainedRun(study, arms(study)[arm]["overrides"], seed, int(study["train"]["steps"]))
    points = []
    for sampler, params, k, fields in specs:
        for sseed in sample_seeds:
            args = (study, run.identity if stored_only else run, sampler, int(k), int(sseed))
            p = (stored if stored_only else evaluate)(*args, params=params or None)
            if p is not None:
                points.append({"arm": arm, "train_seed": seed, "sample_seed": int(sseed), "steps": int(k),
                               **fields, **p})
    return points


def _curve(study: dict, arm: str, seed: int, stored_only: bool = False) -> dict:
    """Stage: Euler at every K of ``eval.nfe`` and every sampling seed on one run
    (``stored_only``: the points already stored, for a report in progress)."""
    sampler = euler_sampler(arms(study)[arm]["overrides"])
    specs = [(sampler, {}, int(k), {}) for k in study["eval"]["nfe"]]
    return {"points": run_points(study, arm, seed, specs, study["eval"]["seeds"], stored_only)}


def sit_sampler_steps(names: list[str], nfe: int) -> list[tuple[str, dict, int]]:
    """(sampler, its SiT parameters, K) of each of SiT's samplers ``names`` at ``nfe`` model calls
    a sample, counted by each sampler's own NFE (Heun: 2 a step, the last included)."""
    unknown = [n for n in names if n not in SIT_SAMPLERS]
    if unknown:
        raise ValueError(f"eval.sit_samplers: unknown sampler(s) {unknown}; choose from {sorted(SIT_SAMPLERS)}")
    if int(nfe) < 2:
        raise ValueError(f"eval.sit_sampler_nfe must be at least 2 (the SDE's fewest grid points), got {nfe}")
    out = []
    for name in names:
        k = steps_for_nfe(make_sampler(name, **SIT_SAMPLERS[name]), int(nfe))
        out.append((name, SIT_SAMPLERS[name], k))
    return out


def _samplers(study: dict, arm: str, seed: int, samplers: list[str], nfe: int, seeds: list[int],
              stored_only: bool = False) -> dict:
    """Stage: SiT's own samplers at ``nfe`` model calls a sample on one SiT run, every sampling
    seed of ``seeds`` (Euler's point is the curve's when ``nfe`` is one of its K: read back)."""
    specs = [(name, params, k, {"sampler": name, "target_nfe": int(nfe)})
             for name, params, k in sit_sampler_steps(samplers, nfe)]
    return {"points": run_points(study, arm, seed, specs, seeds, stored_only)}


def _profile(study: dict, arm: str, seed: int, times: list[float], images: int) -> dict:
    """Stage: the EMA network's velocity MSE with every patch at each of ``times`` (held-out
    test images, fixed noise), and the share of its training times in each tenth of [0, 1]."""
    return velocity_profile(study, arms(study)[arm]["overrides"], seed, times, int(images), 4000)


def _floor(study: dict) -> dict:
    """Stage: ``eval.num_samples`` real *train* images against the test split, per sampling
    seed, in both feature spaces: the best a model of the train split can score here."""
    train, _ = load_dataset_images(data_config(study, "train"))
    runs = []
    for s in study["eval"]["seeds"]:
        idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(int(s)))[:int(study["eval"]["num_samples"])]
        runs.append({"sample_seed": int(s), **measure(study, train[idx], int(s), resolve_device(study))})
    return {"runs": runs}


train_stage = timed(_train, budgeted=True)
curve_stage = timed(_curve, budgeted=True)
profile_stage = timed(_profile, budgeted=True)
floor_stage = timed(_floor, budgeted=True)
samplers_stage = timed(_samplers, budgeted=True)


def build_stages(study: dict) -> list[Stage]:
    """Every stage, in the order they start: training seed 0 of every arm (each followed by its
    curve, for seed 0 its error profile, and for a SiT arm its own samplers), then seed 1, then
    seed 2; ``late_arms`` after all. The samplers' settings reach only their own stages: a study
    from before them has the same stages, keys and records, and gains those stages."""
    known = arms(study)
    for arm in study["arms"]:
        if arm not in known:
            raise ValueError(f"unknown arm {arm!r}; choose from {sorted(known)}")
    ec = study["eval"]
    sit = {"samplers": list(ec.get("sit_samplers", [])), "nfe": int(ec.get("sit_sampler_nfe", 0)),
           "seeds": [int(s) for s in ec.get("sit_sampler_seeds", [])]}
    if sit["samplers"] and sit["seeds"]:
        sit_sampler_steps(sit["samplers"], sit["nfe"])  # a bad setting fails here, not hours in
    ev, tr = stage_view(study), stage_view(study, evaluation=False)
    mod = "pf.experiments.evidence"  # by name, not __name__ (__main__ under python -m): one key however it runs
    stages = [Stage("floor", f"{mod}:floor_stage", {"study": ev})]
    early = [a for a in study["arms"] if a not in study.get("late_arms", [])]
    late = [a for a in study["arms"] if a in study.get("late_arms", [])]
    first = study["train"]["seeds"][0]
    for group in (early, late):
        for seed in study["train"]["seeds"]:
            for arm in group:
                name = f"train {arm} seed {seed}"
                stages.append(Stage(name, f"{mod}:train_stage",
                                    {"study": tr, "arm": arm, "seed": int(seed)}))
                curve = f"curve {arm} seed {seed}"
                stages.append(Stage(curve, f"{mod}:curve_stage", {"study": ev, "arm": arm, "seed": int(seed)},
                                    deps=(name,)))
                if seed == first:
                    stages.append(Stage(f"profile {arm} seed {seed}", f"{mod}:profile_stage",
                                        {"study": ev, "arm": arm, "seed": int(seed),
                                         "times": list(study["eval"]["profile_times"]),
                                         "images": int(study["eval"]["profile_images"])}, deps=(name,)))
                if sit["samplers"] and sit["seeds"] and not is_pf(known[arm]["overrides"]):
                    stages.append(Stage(f"samplers {arm} seed {seed}", f"{mod}:samplers_stage",
                                        {"study": ev, "arm": arm, "seed": int(seed), **sit}, deps=(name, curve)))
    return stages


#################################################################################
#                               What was measured                               #
#################################################################################


def collect(study: dict) -> dict:
    """Everything finished so far: stage records, and the stored points of unfinished curves
    (``points``: Euler's curves; ``sampler_points``: SiT's own samplers)."""
    out = {"stages": [], "train": {}, "points": [], "sampler_points": [], "profile": {}, "floor": None}
    pointed = {":curve_stage": ("points", _curve), ":samplers_stage": ("sampler_points", _samplers)}
    for s in build_stages(study):
        rec = stage_result(study["records_dir"], s)
        out["stages"].append((s.name, rec))
        kind = pointed.get(s.fn[s.fn.index(":"):])
        if kind is not None:
            if rec is not None:
                out[kind[0]] += rec["result"]["points"]
            else:  # a stage in progress: the points it has stored
                out[kind[0]] += kind[1](**s.args, stored_only=True)["points"]
        elif rec is None:
            continue
        elif s.fn.endswith(":train_stage"):
            out["train"][(s.args["arm"], s.args["seed"])] = rec["result"]
        elif s.fn.endswith(":profile_stage"):
            out["profile"][s.args["arm"]] = rec["result"]
        elif s.name == "floor":
            out["floor"] = rec["result"]["runs"]
    out["superseded"] = superseded_pairs(study)
    return out


def superseded_pairs(study: dict) -> list[dict]:
    """Each point measured on a superseded model of its run beside the same point (sampler, K,
    sampling seed) on the run's model now (:func:`realization_pairs`: FID in the first feature
    space), with the run's arm and training seed."""
    runs = {(r["trajectory"], int(r["steps"])): run for run, r in _trained_runs(study).items()}
    return [{**p, "arm": run[0], "train_seed": run[1]} for p in realization_pairs(study, f"{SUPERSEDED}/points")
            if (run := runs.get((p["trajectory"], int(p["train_steps"])))) is not None]


def _trained_runs(study: dict) -> dict:
    """(arm, training seed) -> {trajectory, steps} of every run the study trains (as its stages see it)."""
    view, steps = stage_view(study), int(study["train"]["steps"])
    return {(arm, int(seed)): TrainedRun(view, arms(study)[arm]["overrides"], seed, steps).identity
            for arm in study["arms"] for seed in study["train"]["seeds"]}


def supersede_runs(study: dict, specs: list[str]) -> list[tuple[Path, Path]]:
    """``supersede=[arm:seed, ...]``: the records of each run (its stages' and points) measured on
    other weights than its kept ones moved to ``<records_dir>/superseded/``, so that the study
    measures them again on the kept weights: a run trained again where its kept weights were
    gone (a fresh clone) is another model, and one report holds one model per run."""
    runs, records, moves = _trained_runs(study), study["records_dir"], []
    stages = build_stages(study)
    for spec in specs:
        arm, _, seed = str(spec).partition(":")
        if (arm, int(seed) if seed.strip().isdigit() else None) not in runs:
            raise ValueError(f"supersede: {spec!r} is not arm:seed of this study (arms {list(study['arms'])}, "
                             f"training seeds {list(study['train']['seeds'])})")
        run = runs[(arm, int(seed))]
        kept = kept_weights_path(study, run)
        if not kept.is_file():
            raise ValueError(f"supersede={spec}: the run's kept weights {kept} are missing, so there is no model to "
                             "measure it on again; run the study (it trains the run and keeps its weights) first")
        current = weights_fingerprint(load_checkpoint(kept, use_ema=True))
        files = [f for st in stages if st.args.get("arm") == arm and st.args.get("seed") == int(seed)
                 if (f := stored_stage_file(records, st)) is not None]
        moves += supersede(records, files + run_point_files(records, run["trajectory"], run["steps"]), current)
    return moves


COMPARISONS = [
    ("pf_ltg", "sit_uniform", "PF (LTG) against the paper's baseline SiT (uniform t)"),
    ("pf_ltg_shifted", "pf_ltg", "PF with LTG's location shifted for the data dimension against PF (LTG, loc 0.7)"),
    ("pf_ltg_shifted", "sit_uniform", "PF (LTG, shifted loc) against SiT (uniform t)"),
    ("pf_ltg", "pf_ltg_marginal", "what patch heterogeneity adds: PF (LTG) against PF with one time per sample "
                                  "from LTG's marginal (the same time density)"),
    ("pf_ltg_marginal", "sit_uniform", "PF (one time per sample, LTG's marginal) against SiT (uniform t)"),
    ("sit_logit_normal", "sit_uniform", "SiT (logit-normal t) against SiT (uniform t)"),
]


def comparison_lines(study: dict, c: dict, space_name: str) -> list[str]:
    """Each comparison at K = the largest K and at each arm's best K, paired per training seed."""
    labels = arm_labels(study)
    kmax = max(int(k) for k in study["eval"]["nfe"])
    out = []
    for arm, base, what in COMPARISONS:
        if arm not in c or base not in c:
            continue
        seeds = sorted(set().union(*[set(v) for v in c[arm].values()]) & set().union(*[set(v) for v in c[base].values()]))
        ka, kb = best_k(c[arm], seeds), best_k(c[base], seeds)
        at_max = paired(c, arm, base, kmax, kmax)
        line = f"- {what} ({space_name}; {labels[arm]} minus {labels[base]}, negative: {labels[arm]} better): " \
               f"at K = {kmax}: {fmt_pairs(at_max)}"
        if ka is not None and kb is not None:
            line += f"; each at its best K (K = {ka} and K = {kb}): {fmt_pairs(paired(c, arm, base, ka, kb))}"
        out.append(line + ".")
    return out


def table(study: dict, c: dict, metric: str, scale: float = 1.0, digits: int = 2) -> list[str]:
    labels = arm_labels(study)
    ks = [int(k) for k in study["eval"]["nfe"]]
    out = ["| arm | training seeds | " + " | ".join(f"K={k}" for k in ks) + " | best K |", "|---|---|" + "---|" * (len(ks) + 1)]
    for arm in study["arms"]:
        if arm not in c:
            out.append(f"| {labels[arm]} | - | " + " | ".join("pending" for _ in ks) + " | - |")
            continue
        seeds = sorted(set().union(*[set(v) for v in c[arm].values()]))
        row = [seed_cell(c[arm].get(k, {}), digits, scale) for k in ks]
        bk = best_k(c[arm], seeds)
        out.append(f"| {labels[arm]} | {', '.join(map(str, seeds))} | " + " | ".join(row) + f" | {bk or '-'} |")
    return out


#################################################################################
#                        SiT with its own samplers                              #
#################################################################################


def models_line(study: dict, data: dict) -> str:
    """Where the runs' weights are kept, and the runs measured again on a second model."""
    line = (f"- Models: each run's EMA weights after {study['train']['steps']} steps are kept beside the records "
            f"(`{study['records_dir']}/weights`, float16; not in git, which has room for the first study's only) "
            "and every point is measured on them and names their fingerprint.")
    pairs = data.get("superseded") or []
    if not pairs:
        return line
    labels = arm_labels(study)
    runs = sorted({(p["arm"], p["train_seed"]) for p in pairs})
    diffs = [p["new"] - p["old"] for p in pairs]
    return (line + " Trained again where its kept weights were gone (a fresh clone; the same config on another "
            "machine rounds differently and ends another model), and every record measured again on the new model "
            f"(the earlier ones in `{study['records_dir']}/{SUPERSEDED}/`): "
            + ", ".join(f"{labels[a]} seed {s}" for a, s in runs)
            + f". The same points on the two models: FID new minus old {mean_std(diffs)[0]:+.2f} on average "
            f"({min(diffs):+.2f} to {max(diffs):+.2f}, {len(diffs)} points, the first feature space).")


def sit_arms(study: dict) -> list[str]:
    """The study's global-time (SiT) arms, the ones its own samplers are measured on."""
    known = arms(study)
    return [a for a in study["arms"] if not is_pf(known[a]["overrides"])]


def sampler_cells(study: dict, data: dict, space: int) -> dict:
    """:func:`cells` of SiT's samplers (arm ``"sit_uniform/heun"`` ..., at the target NFE) beside
    every arm's Euler curve at K = that NFE on the same sampling seeds: what is paired with
    SiT's best sampler."""
    ec = study["eval"]
    nfe, sseeds = int(ec["sit_sampler_nfe"]), {int(x) for x in ec["sit_sampler_seeds"]}
    pts = [{**p, "arm": f"{p['arm']}/{p['sampler']}", "steps": p["target_nfe"]} for p in data["sampler_points"]]
    pts += [p for p in data["points"] if p["steps"] == nfe and p["sample_seed"] in sseeds]
    return cells(pts, space)


def best_sampler(c: dict, arm: str, names: list[str], nfe: int) -> tuple[str | None, list[int]]:
    """The rule: of ``names``, ``arm``'s sampler with the lowest mean FID over the training seeds
    that every one of them has (ties: the earlier in ``names``), and those seeds; (None, [])
    until one training seed has them all."""
    have = [set(c.get(f"{arm}/{n}", {}).get(nfe, {})) for n in names]
    seeds = sorted(set.intersection(*have)) if have else []
    if not seeds:
        return None, []
    return min(names, key=lambda n: sum(c[f"{arm}/{n}"][nfe][s][0] for s in seeds)), seeds


def best_sampler_pairs(study: dict, data: dict) -> list[tuple[str, str, str, list[list[tuple[int, float]]]]]:
    """(PF arm, SiT arm, SiT's best sampler, the paired differences in each feature space) for
    every PF arm against every SiT arm whose best sampler is known: PF at Euler K = NFE against
    SiT with its best sampler at that NFE, on the same sampling seeds, per training seed."""
    ec = study["eval"]
    names, nfe = list(ec.get("sit_samplers", [])), int(ec.get("sit_sampler_nfe", 0))
    if not names or not data["sampler_points"]:
        return []
    cs = [sampler_cells(study, data, i) for i in range(len(study["classifiers"]))]
    pf_arms = [a for a in study["arms"] if a not in sit_arms(study)]
    out = []
    for sit in sit_arms(study):
        best, _ = best_sampler(cs[0], sit, names, nfe)
        if best is not None:
            out += [(pf, sit, best, [paired(c, pf, f"{sit}/{best}", nfe, nfe) for c in cs]) for pf in pf_arms]
    return out


def sit_sampler_section(study: dict, data: dict) -> list[str]:
    """SiT's arms with Euler, Heun and the SDE at one NFE (per training seed, n named), each
    arm's best sampler by the rule of :func:`best_sampler` (checked in the second feature
    space), and the PF arms paired with it."""
    ec = study["eval"]
    names, nfe = list(ec.get("sit_samplers", [])), int(ec.get("sit_sampler_nfe", 0))
    sseeds = [int(x) for x in ec.get("sit_sampler_seeds", [])]
    if not names or not sseeds or not sit_arms(study):
        return []
    labels = arm_labels(study)
    steps = {n: k for n, _, k in sit_sampler_steps(names, nfe)}
    cs = [sampler_cells(study, data, i) for i in range(len(study["classifiers"]))]
    sde = ", ".join(f"{k} {v}" for k, v in SIT_SAMPLERS["sde"].items())
    others = [int(x) for x in ec["seeds"] if int(x) not in sseeds]
    lines = [f"## SiT with its own samplers at NFE {nfe}", "",
             "Each SiT arm drawn with " + ", ".join(f"{SAMPLER_LABELS[n]} (K = {steps[n]})" for n in names)
             + f" at {nfe} model calls a sample (SPEC section 13; the SDE with SiT's sampling defaults: {sde}), "
             f"sampling seed(s) {sseeds}, {ec['num_samples']} images a point; a value is a training seed's mean "
             "over those sampling seeds. Not measured: these samplers at other NFE (SiT reports its SDE at 250 "
             "steps), " + (f"at the Euler curves' other sampling seeds {others}, " if others else "")
             + "and SiT's adaptive ODE solver (dopri5).", "",
             "The rule: an arm's best sampler has the lowest mean FID over the training seeds every sampler has, in "
             f"the first feature space; the second feature space checks the choice. The PF arms (Euler at K = {nfe}, "
             "on the same sampling seeds) are paired with it per training seed.", "",
             "| arm | sampler | K | NFE measured | FID per training seed | mean ± std (n) | second feature space |",
             "|---|---|---|---|---|---|---|"]
    for arm in sit_arms(study):
        for n in names:
            by_seed = [c.get(f"{arm}/{n}", {}).get(nfe, {}) for c in cs]
            calls = sorted({p["nfe"] for p in data["sampler_points"] if p["arm"] == arm and p["sampler"] == n})
            first = ", ".join(f"seed {s}: {v[0]:.2f}" for s, v in sorted(by_seed[0].items())) or "pending"
            other = seed_cell(by_seed[1]) if len(by_seed) > 1 else "-"
            lines.append(f"| {labels[arm]} | {SAMPLER_LABELS[n]} | {steps[n]} | {', '.join(map(str, calls)) or '-'} | "
                         f"{first} | {seed_cell(by_seed[0])} | {other} |")
    lines.append("")
    for arm in sit_arms(study):
        best, seeds = best_sampler(cs[0], arm, names, nfe)
        if best is None:
            lines.append(f"- {labels[arm]}: best sampler not known yet (no training seed has every sampler).")
            continue
        line = (f"- {labels[arm]}: best sampler **{SAMPLER_LABELS[best]}** (mean FID "
                f"{mean_std([cs[0][f'{arm}/{best}'][nfe][s][0] for s in seeds])[0]:.2f} over training seeds {seeds})")
        if len(cs) > 1:
            check, _ = best_sampler(cs[1], arm, names, nfe)
            line += ("; the second feature space picks the same" if check == best else
                     f"; the second feature space would pick {SAMPLER_LABELS[check]}" if check else "")
        lines.append(line + ".")
    spaces_named = ("first feature space", "second feature space")
    for pf, sit, best, pairs in best_sampler_pairs(study, data):
        lines.append(f"- {labels[pf]} against {labels[sit]} with {SAMPLER_LABELS[best]}, NFE {nfe} ({labels[pf]} minus "
                     f"{labels[sit]}, negative: {labels[pf]} better): "
                     + "; ".join(f"{space}: {fmt_pairs(d)}" for space, d in zip(spaces_named, pairs)) + ".")
    return lines + [""]


def render(study: dict, data: dict, command_line: str, conclusion: list[str]) -> str:
    ec, tc = study["eval"], study["train"]
    fps = [classifier_fingerprint(p) for p in study["classifiers"]]
    check_one_space(data["points"] + data["sampler_points"], fps)
    check_one_realization(data["points"] + data["sampler_points"], data["train"])
    done = [n for n, r in data["stages"] if r is not None]
    pending = [n for n, r in data["stages"] if r is None]
    cpu = cpu_spent(study["records_dir"]) / 3600  # what the budget counts
    dim = data_dim(study)
    lines = ["# Patch Forcing at small scale: the evidence (study v2)", ""]
    lines += conclusion
    finished = (f"all {len(done)} of its stages (" if not pending
                else f"the stages finished so far ({len(done)} of {len(data['stages'])}; ")
    lines += ["", f"Generated by `pf/experiments/evidence.py` from {finished}CPU time used {cpu:.1f} h of the "
              f"{study.get('cpu_budget_hours')} h budget); regenerate or continue with:", "", "```", command_line, "```", ""]
    if pending:
        lines += ["**Partial results.** Stages still pending: " + ", ".join(pending) + ".", ""]
    clf = []
    for p, fp in zip(study["classifiers"], fps):
        _, info = load_classifier(p)
        clf.append(f"`{p}` (fingerprint {fp}, seed {info.get('seed', '?')}, accuracy on the test split "
                   f"{info.get('test_accuracy_full', info.get('test_accuracy', float('nan'))):.4f})")
    labels = arm_labels(study)
    lines += [
        "## Setup", "",
        f"- Data: `data={study['data']}` at {study['image_size']}x{study['image_size']} ({dim} values an image; "
        f"{(study['image_size'] // 2) ** 2} patches of 2x2). Training on the train split; every metric against the "
        "held-out test split.",
        f"- Recipe, identical for every arm: `model={study['model']}`, {tc['steps']} steps, batch {tc['batch_size']}, "
        f"AdamW lr {tc['lr']:g} ({tc['warmup_steps']} warm-up steps, then half a cosine down to {tc['lr_min']:g} at "
        f"step {tc['steps']}), grad clip 1, EMA {tc['ema_decay']} with warm-up (mean age {1 / (1 - tc['ema_decay']):.0f} "
        f"steps), EMA weights evaluated; training seeds {tc['seeds']}. A seed draws the same data order, noise and "
        "class dropout in every arm (those streams are keyed by the seed alone).",
        "- Arms: " + "; ".join(f"**{labels[a]}** (`{' '.join(arms(study)[a]['overrides'])}`)" for a in study["arms"]),
        f"- The shifted location: LTG's loc 0.7 was set for SD-VAE latents of 256x256 images ({LTG_REFERENCE_DIM} "
        f"values); by the resolution-shift argument of SD3 the logit-space location moves by ln(sqrt({LTG_REFERENCE_DIM}"
        f"/{dim})) = {0.5 * math.log(LTG_REFERENCE_DIM / dim):.3f} for this data's {dim} values: loc "
        f"{shifted_loc(dim):.3f}, towards the data end.",
        f"- Metrics: FID and KID (and precision / recall, k=3) of {ec['num_samples']} images a point (labels i mod 10, "
        f"no guidance) against the whole test split, in the penultimate features of two committed classifiers trained "
        f"on the train split with different seeds: " + "; ".join(clf) + ". The first is the report's feature space; "
        "every conclusion is repeated in the second. Every point names both fingerprints and its weights' fingerprint; "
        "the report refuses a point of another classifier.",
        f"- Training length: {tc['steps']} steps is what the CPU budget allows for {len(tc['seeds'])} seeds of every "
        "arm, not a length where FID is known to have flattened (the first study's constant-learning-rate FID was "
        "still falling at 6000 steps: 32, 14, 8 at 1k, 3k, 6k). Final validation MSE (EMA, mean over the seeds "
        "trained): " + ("; ".join(f"{labels[a]} {mean_std(v)[0]:.4f} (n={len(v)})" for a in study["arms"]
                                    if (v := [r["val_loss"] for (aa, _), r in data["train"].items()
                                              if aa == a and r.get("val_loss") is not None])) or "none trained yet")
        + ".",
        models_line(study, data),
        f"- Sampling: Euler at K = {ec['nfe']}, sampling seeds {ec['seeds']} (the same noise and labels in every arm). "
        "A cell is the mean over training seeds of each training seed's sampling-seed mean; ± is the std over "
        "training seeds; n is the number of training seeds."
        + (f" SiT's arms also with its own samplers (Heun, SDE) at NFE {ec['sit_sampler_nfe']}, below."
           if ec.get("sit_samplers") and ec.get("sit_sampler_seeds") and sit_arms(study) else ""), ""]
    for i, name in enumerate(["the first feature space", "the second feature space"][:len(fps)]):
        c = cells(data["points"], i)
        lines += [f"## FID ({name}, classifier {fps[i]})", ""] + table(study, c, "fid") + [""]
        if i == 0:
            kc = cells(data["points"], i, "kid")
            lines += [f"KID x 1000 ({name}):", ""] + table(study, kc, "kid", 1000.0, 2) + [""]
        lines += [f"### Paired differences ({name})", ""] + comparison_lines(study, c, name) + [""]
    lines += sit_sampler_section(study, data)
    if data["floor"]:
        f = [r["fid"] for r in data["floor"]]
        lines += [f"Floor: {ec['num_samples']} real train images against the test split give FID "
                  f"{mean_std(f)[0]:.2f} (sampling seeds {[r['sample_seed'] for r in data['floor']]}).", ""]
    if data["profile"]:
        times = next(iter(data["profile"].values()))["times"]
        lines += ["## Where along the path each network is wrong", "",
                  f"Velocity MSE of each arm's EMA network (training seed {tc['seeds'][0]}) with every patch at one "
                  "time t (held-out test images, fixed noise), and the share of its training times above t = 0.9.", "",
                  "| arm | " + " | ".join(f"t={t:g}" for t in times) + " | training times > 0.9 |",
                  "|---|" + "---|" * (len(times) + 1)]
        for arm, p in data["profile"].items():
            lines.append(f"| {labels[arm]} | " + " | ".join(f"{v:.3f}" for v in p["mse"]) + f" | {100 * p['above_0.9']:.2f}% |")
        lines.append("")
    lines += pages_section(study)
    lines += ["## Stages", "",
              "CPU minutes of the attempt that finished each stage: a stage resumed after an interruption (a "
              "training from its last checkpoint, a curve from its stored points) does not count what the "
              "earlier attempts kept, so the total above is a lower bound"
              + (" (it also counts the stages measured on a superseded model, in "
                 f"`{study['records_dir']}/{SUPERSEDED}/`)." if data.get("superseded") else "."), "",
              "| stage | CPU minutes | finished |", "|---|---|---|"]
    for n, r in data["stages"]:
        lines.append(f"| {n} | {r['result'].get('cpu_seconds', 0) / 60:.1f} | {r['finished']} |" if r else f"| {n} | pending | |")
    return "\n".join(lines) + "\n"


PAGES = [("docs/diagnostics.md", "Diagnostics on the first study's kept weights",
          "Euler cut at t = 0.9 and finished in one step (the near-data test), the adaptive samplers at matched NFE "
          "and at the paper's protocol with random selection beside uncertainty selection, and the first report's "
          "Euler curves re-measured in the committed feature spaces (`python -m pf.experiments.diagnostics`)."),
         ("docs/reproduce-v1.md", "The first version of this study",
          "Constant learning rate, 3000 steps, 2 training seeds, its own retrained classifier (superseded; its numbers "
          "are in another feature space, re-measured on its kept weights in the diagnostics page) "
          "(`python -m pf.experiments.reproduce`)."),
         ("docs/findings.md", "The paper's findings, measured",
          "Uncertainty against error, context, the timestep-sampler ablation and patch selection "
          "(`python -m pf.experiments.findings`)."),
         ("docs/repa.md", "With representation alignment", "PF against PF + REPA (`python -m pf.experiments.repa`)."),
         ("docs/t2i.md", "Text-to-image", "Whether the text-to-image demo follows held-out prompts "
                                          "(`python -m pf.experiments.t2i`)."),
         ("docs/inpaint.md", "Inpainting", "PF's kept patches at t = 1 against SiT by replacement, completing "
                                           "held-out images under three masks (`python -m pf.experiments.inpaint`).")]


def pages_section(study: dict) -> list[str]:
    """Links to the other pages that exist, from the report's folder."""
    out = []
    for path, title, text in PAGES:
        if Path(path).is_file():
            out += [f"## {title}", "", f"[{path}]({rel(path, study['results'])}): {text}", ""]
    return out


def conclusion_lines(study: dict, data: dict) -> list[str]:
    """The report's opening, from what is measured (n named): at most three lines here (the paper's
    comparison with where the study stands, the resolution-shift hypothesis, what patch
    heterogeneity adds), two more from the diagnostics (:func:`why_lines`): five at most."""
    c = cells(data["points"], 0)
    kmax = max(int(k) for k in study["eval"]["nfe"])
    done = sum(r is not None for _, r in data["stages"])

    def diff(arm: str, base: str) -> str | None:
        d = paired(c, arm, base, kmax, kmax)
        return fmt_pairs(d) if d else None

    head = (f"- This comparison (cosine recipe, {study['train']['steps']} steps, {len(study['train']['seeds'])} training "
            f"seeds per arm, {study['eval']['num_samples']} images a point, differences paired per training seed, "
            f"FID in the first feature space at Euler K = {kmax}) ")
    head += (f"is **partial**: {done} of {len(data['stages'])} stages done." if done < len(data["stages"])
             else "is complete.")
    paper = diff("pf_ltg", "sit_uniform")
    if paper:
        head += f" PF (LTG) minus the paper's baseline SiT (uniform t): {paper}"
        # every SiT arm with its best sampler, the paper's baseline first: a SiT trained with
        # another time density may be the stronger baseline at this scale
        labels = arm_labels(study)
        for pf, sit, b, pairs in sorted(best_sampler_pairs(study, data), key=lambda r: r[1] != "sit_uniform"):
            if pf == "pf_ltg" and pairs[0]:
                head += (f"; minus {labels[sit]} with its best sampler ({SAMPLER_LABELS[b]}, NFE "
                         f"{study['eval']['sit_sampler_nfe']}): {fmt_pairs(pairs[0])}")
        head += "."
    out = [head]
    shifted = [(what, d) for what, d in (("minus PF (LTG, loc 0.7)", diff("pf_ltg_shifted", "pf_ltg")),
                                         ("minus SiT (uniform t)", diff("pf_ltg_shifted", "sit_uniform"))) if d]
    if shifted:
        out.append("- The resolution-shift hypothesis, PF with LTG's location shifted for the data dimension: "
                   + "; ".join(f"{what} {d}" for what, d in shifted) + ".")
    het = diff("pf_ltg", "pf_ltg_marginal")
    if het:
        out.append("- What patch heterogeneity adds: PF (LTG) minus PF with one time per sample from LTG's marginal "
                   f"(the same time density): {het}.")
    return out


def plot_curves(study: dict, data: dict, path: Path) -> None:
    """FID against K per arm (mean over training seeds, bars: std over training seeds)."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = arm_labels(study)
    for i, ax in enumerate(axes[:len(study["classifiers"])]):
        c = cells(data["points"], i)
        for arm in study["arms"]:
            if arm not in c:
                continue
            ks = sorted(c[arm])
            ms = [mean_std([v[0] for v in c[arm][k].values()]) for k in ks]
            ax.errorbar(ks, [m for m, _ in ms], yerr=[s for _, s in ms], fmt="-o", capsize=3,
                        color=plots.ARM_COLORS.get(arm), label=labels[arm])
        ax.set_xscale("log")
        ax.set_xlabel("Euler steps K")
        ax.set_ylabel("FID ↓")
        ax.set_title(f"feature space {i + 1}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    plots.save(fig, path)


def why_lines(study: dict) -> list[str]:
    """The diagnostics' lines for the conclusion, as that study last wrote them
    (``diagnostics_summary``; ``python -m pf.experiments.diagnostics``), or none."""
    path = Path(study.get("diagnostics_summary") or "")
    return json.loads(path.read_text())["lines"] if path.is_file() else []


def write_report(study: dict, command_line: str) -> None:
    data = collect(study)
    text = render(study, data, command_line, conclusion_lines(study, data) + why_lines(study)[:2])
    if data["points"]:
        plot_curves(study, data, Path(study["figures"]) / "fid_vs_k.png")
        link = rel(Path(study["figures"]) / "fid_vs_k.png", study["results"])
        text = text.replace("## Setup", f"![FID against K]({link})\n\n## Setup", 1)
    Path(study["results"]).parent.mkdir(parents=True, exist_ok=True)
    Path(study["results"]).write_text(text)


def main(cfg, argv: list[str] | None = None) -> None:
    hours = cfg.get("cpu_budget_hours")
    before = os.environ.get(BUDGET_ENV)
    if hours is None:
        os.environ.pop(BUDGET_ENV, None)
    else:
        os.environ[BUDGET_ENV] = str(float(hours))
    try:
        if cfg.get("supersede"):
            study = command.study_config(cfg)
            moves = supersede_runs(study, list(study["supersede"]))
            print(f"moved {len(moves)} records measured on an earlier model to "
                  f"{Path(study['records_dir']) / SUPERSEDED}" + "".join(f"\n  {a.name} -> {b}" for a, b in moves))
        command.run_study(cfg, argv, build_stages, write_report, DOC_COMMAND, "results")
    finally:  # the budget is this command's: nothing else in the process sees it
        if before is None:
            os.environ.pop(BUDGET_ENV, None)
        else:
            os.environ[BUDGET_ENV] = before


if __name__ == "__main__":
    sys.exit(command.main(main, DEFAULTS, __doc__, free=FREE, toy=TOY))
