"""The paper's comparison at small scale: ``python -m pf.experiments.reproduce [key=value ...]``.

SPEC.md section 7 claims that Patch Forcing training beats the SiT baseline (one *uniform*
time per sample, the published baseline config) with plain Euler sampling, and that the
difficulty-aware samplers improve on Euler. On Fashion-MNIST (16x16, 64 patches) this:

1. trains four arms with the same network (``model=tiny``), steps, batch, optimizer, EMA and
   training seeds, through ``pf.train``: SiT with uniform times (the paper's baseline), SiT
   with logit-normal times (a stronger variant), PF with LTG (the method), and PF with one
   logit-normal time per sample (the PF network and loss without patch heterogeneity);
2. trains the feature classifier on the train split only;
3. draws ``eval.num_samples`` images per point (labels ``i mod 10``, no guidance, the same
   noise for every column of a sampling seed) and computes FID / KID / precision / recall
   against the 10,000 held-out test images: Euler at every K of ``eval.nfe`` and the
   adaptive samplers at the K of matched NFE, for every training and sampling seed;
4. writes ``RESULTS.md`` (text generated from the settings used, with the command), the FID
   against NFE plot and the sample grid.

This module holds the study's own settings, stages, statements and report; the machinery
(stages, caching, curves, the command) is the rest of ``pf.experiments``. Every stage (the
classifier, one arm's training, one curve) is cached by its config and resumable: run the
same command again after a kill and it continues. Stage records and every evaluated point are
small JSON files in ``records_dir`` (``results/study``, kept in git, so the study goes on from
a fresh clone); trained runs live in ``out_dir`` and are retrained, exactly, only when a point
still to evaluate needs them. Training runs are trajectories (``pf.experiments.trajectories``),
so more steps resume a shorter run. ``jobs=2`` uses two worker processes (one per core here).
``report_only=true`` rewrites the report from what is cached. The toy size CI runs end to end::

    python -m pf.experiments.reproduce toy=true
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from pf.eval.inputs import load_dataset_images
from pf.eval.metrics import compute_metrics
from pf.experiments import command, comparison, plots
from pf.experiments.common import (TrainedRun, data_config, device_name, feature_classifier, load_test_labels,
                                   reference_images, resolve_device, velocity_profile)
from pf.experiments.comparison import ARMS, SAMPLER_LABELS, SIT_SAMPLERS, euler_sampler, is_pf, stage_study
from pf.experiments.curves import (evaluate_point, realization_pairs, run_curve, series, stored_point,
                                   stored_points)
from pf.experiments.stages import Stage, stage_result
from pf.experiments.summary import fmt, mean_std, paired, rel, shared_runs, stage_table, verdict
from pf.sampling.grid import labelled_panels

DEFAULTS = copy.deepcopy(comparison.DEFAULTS)
DEFAULTS["results"] = "docs/reproduce-v1.md"  # the first version's report; RESULTS.md is the evidence study's
DEFAULTS["arms"] = ["sit_uniform", "sit_logit_normal", "pf_ltg", "pf_logit_normal"]
DEFAULTS["eval"].update({
    "samplers": {                     # per arm; SiT arms: euler, heun or sde (SiT's own, SPEC 13)
        "sit_uniform": ["euler"], "sit_logit_normal": ["euler"],
        "pf_ltg": ["euler_pf", "dual_loop", "look_ahead"], "pf_logit_normal": ["euler_pf"],
    },
    "adaptive_train_seeds": [0],      # training seeds whose adaptive-sampler curves are drawn (Euler: all)
    # Does more training make more steps help? Euler at every K of eval.nfe along the training
    # trajectory (these steps, past train.steps too; the first training and sampling seed).
    "trend_steps": [1000, 3000, 6000, 12000],
    "trend_arms": ["pf_ltg", "sit_uniform"],
    # Where along the path is each network wrong? Its velocity MSE with every patch at t, on
    # held-out test images (fixed noise), and where its timestep sampler put the training times.
    "profile_times": [0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995],
    "profile_images": 1000,
})
TOY = [*comparison.TOY, "eval.adaptive_train_seeds=[0,1]", "eval.trend_steps=[2,6]", "eval.profile_images=20"]
DOC_COMMAND = "python -m pf.experiments.reproduce"
FREE = (*comparison.FREE, "eval.samplers")
TRAINING_ORDER = ["pf_ltg", "sit_uniform", "pf_logit_normal", "sit_logit_normal"]  # the method and its baseline first


#################################################################################
#                                    Stages                                     #
#################################################################################


def curve_stage(study: dict, arm: str, seed: int, sampler: str) -> dict:
    """Stage: one arm's FID against NFE with one sampler, every sampling seed."""
    return {"points": run_curve(study, ARMS[arm]["overrides"], seed, sampler)}


def trend_points(study: dict, arm: str, seed: int, evaluate: bool = True) -> list[dict]:
    """Euler at every K of ``eval.nfe`` at every ``trend_steps`` of one arm's trajectory
    (``evaluate=False``: only the points already stored, for a report in progress)."""
    ec = study["eval"]
    sampler = euler_sampler(ARMS[arm]["overrides"])
    sseed = int(ec["seeds"][0])
    points = []
    for steps in ec["trend_steps"]:
        run = TrainedRun(study, ARMS[arm]["overrides"], seed, int(steps))
        for k in ec["nfe"]:
            p = (evaluate_point(study, run.identity, sampler, {}, int(k), sseed, model=run.model) if evaluate
                 else stored_point(study, run.identity, sampler, {}, int(k), sseed))
            if p is not None:
                val = run.trained["val_loss"] if evaluate else None
                points.append({"train_steps": int(steps), "steps": int(k), "train_seed": seed, "sample_seed": sseed,
                               "val_loss": val, **p})
    return points


def trend_stage(study: dict, arm: str, seed: int) -> dict:
    """Stage: Euler FID at every K of the curves along one arm's training (the same trajectory's
    checkpoints, continued past ``train.steps`` where ``trend_steps`` asks)."""
    return {"points": trend_points(study, arm, seed)}


def profile_stage(study: dict, arm: str, seed: int) -> dict:
    """Stage: one arm's velocity MSE at each of ``eval.profile_times`` (every patch at t; the
    EMA model; held-out test images, fixed noise), and how its timestep sampler spreads the
    training patch times over ten bins of [0, 1] (20,000 patch times drawn per bin edge set)."""
    ec = study["eval"]
    return velocity_profile(study, ARMS[arm]["overrides"], seed, ec["profile_times"], int(ec["profile_images"]), 2000)


def floor_stage(study: dict) -> dict:
    """Stage: real *train* images against the held-out test images (disjoint sets): the best a
    model of the train split can score here, with the same number of images as a point."""
    ec = study["eval"]
    train, _ = load_dataset_images(data_config(study, "train"))
    runs = []
    for s in ec["seeds"]:
        idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(int(s)))[:int(ec["num_samples"])]
        runs.append(compute_metrics(train[idx], reference_images(study), extractor="classifier",
                                    weights=str(feature_classifier(study)[0]), kid_subsets=int(ec["kid_subsets"]),
                                    seed=int(s), device=resolve_device(study)))
    return {"runs": runs}


def build_stages(study: dict) -> list[Stage]:
    """Every stage of the comparison, in the order they are started (when their inputs are ready).

    Each arm's training is followed by every stage that reads its model (curves, profile): a
    trained model lives only in ``out_dir``, which a fresh clone does not have, so a study
    continued elsewhere retrains only the arm it stopped in."""
    shared = stage_study(study)                        # what an evaluating stage sees
    training = stage_study(study, evaluation=False)    # what a training stage sees
    train_names = {}
    stages = [Stage("classifier", "pf.experiments.common:classifier_stage", {"study": shared}),
              Stage("floor", "pf.experiments.reproduce:floor_stage", {"study": shared}, deps=("classifier",))]
    order = sorted(study["arms"], key=lambda a: TRAINING_ORDER.index(a) if a in ARMS else 99)
    for arm in order:
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; choose from {sorted(ARMS)}")
    for seed in study["train"]["seeds"]:
        for arm in order:
            name = f"train {arm} seed {seed}"
            train_names[(arm, seed)] = name
            stages.append(Stage(name, "pf.experiments.common:train_stage",
                                {"study": training, "overrides": ARMS[arm]["overrides"], "seed": int(seed),
                                 "steps": int(study["train"]["steps"])}))
            for sampler in study["eval"]["samplers"].get(arm, []):
                if not is_pf(ARMS[arm]["overrides"]) and sampler not in SIT_SAMPLERS:
                    raise ValueError(f"arm {arm} is a global-time model: eval.samplers.{arm} can only hold "
                                     f"{sorted(SIT_SAMPLERS)}")
                adaptive = sampler not in ("euler_pf", *SIT_SAMPLERS)  # drawn for adaptive_train_seeds only
                if adaptive and seed not in study["eval"].get("adaptive_train_seeds", study["train"]["seeds"]):
                    continue
                stages.append(Stage(f"curve {arm} {sampler} seed {seed}", "pf.experiments.reproduce:curve_stage",
                                    {"study": shared, "arm": arm, "seed": int(seed), "sampler": sampler},
                                    deps=(name, "classifier")))
            if seed == study["train"]["seeds"][0]:
                stages.append(Stage(f"profile {arm} seed {seed}", "pf.experiments.reproduce:profile_stage",
                                    {"study": stage_study(study, keep_eval=("profile_times", "profile_images")),
                                     "arm": arm, "seed": int(seed)}, deps=(name,)))
    # the trend (the first seed's runs continued to longer training) last: the comparison needs
    # every training seed first
    seed = study["train"]["seeds"][0]
    for arm in study["eval"].get("trend_arms", []):
        if arm in study["arms"]:
            stages.append(Stage(f"trend {arm} seed {seed}", "pf.experiments.reproduce:trend_stage",
                                {"study": stage_study(study, keep_eval=("trend_steps",)), "arm": arm,
                                 "seed": int(seed)},
                                deps=(train_names[(arm, seed)], "classifier")))
    return stages


#################################################################################
#                               What was measured                               #
#################################################################################


def collect(study: dict) -> dict:
    """Everything finished so far, read from the stage records (and the points of unfinished
    curves and trends that are already stored)."""
    out = {"stages": [], "train": {}, "curves": {}, "classifier": None, "floor": None, "trend": {}, "profile": {}}
    for s in build_stages(study):
        rec = stage_result(study["records_dir"], s)
        out["stages"].append((s.name, work_seconds(rec)))
        if rec is None:
            if s.fn.endswith("curve_stage") and (s.args["arm"], s.args["seed"]) in out["train"]:
                partial = stored_points(study, out["train"][(s.args["arm"], s.args["seed"])], s.args["seed"],
                                        s.args["sampler"])
                if partial:
                    out["curves"].setdefault((s.args["arm"], s.args["sampler"]), []).extend(partial)
            elif s.fn.endswith("trend_stage"):
                partial = trend_points(study, s.args["arm"], s.args["seed"], evaluate=False)
                if partial:
                    out["trend"][s.args["arm"]] = partial
            continue
        if s.name == "classifier":
            out["classifier"] = rec["result"]
        elif s.name == "floor":
            out["floor"] = rec["result"]["runs"]
        elif s.fn.endswith("train_stage"):
            arm = s.name.split()[1]
            out["train"][(arm, s.args["seed"])] = rec["result"]
        elif s.fn.endswith("trend_stage"):
            out["trend"][s.args["arm"]] = rec["result"]["points"]
        elif s.fn.endswith("profile_stage"):
            out["profile"][s.args["arm"]] = rec["result"]
        else:
            key = (s.args["arm"], s.args["sampler"])
            out["curves"].setdefault(key, []).extend(rec["result"]["points"])
    return out


def work_seconds(rec: dict | None) -> float | None:
    """The time a stage's work took: its training (however often it was resumed) or its points'
    sampling and metrics, not the time a rerun took to read them back."""
    if rec is None:
        return None
    result = rec["result"]
    if "train_seconds" in result:
        return result["train_seconds"]
    points = result.get("points")
    if points:
        return sum(p.get("seconds", 0) + p.get("metric_seconds", 0) for p in points)
    return rec["seconds"]


def euler_curves(study: dict, curves: dict) -> dict:
    """Each arm's Euler curve (``curves``: (arm, sampler) -> series), None where not measured."""
    return {arm: curves.get((arm, euler_sampler(ARMS[arm]["overrides"]))) for arm in study["arms"]}


def trend_rows(points: list[dict]) -> dict[int, dict[int, dict]]:
    """A trend's points as {training steps: {K: point}}, in training order."""
    rows: dict[int, dict[int, dict]] = {}
    for p in sorted(points, key=lambda p: (p["train_steps"], p["steps"])):
        rows.setdefault(int(p["train_steps"]), {})[int(p["steps"])] = p
    return rows


def column_label(arm: str, sampler: str) -> str:
    return f"{ARMS[arm]['label']} {SAMPLER_LABELS[sampler]}"


def train_seeds(*runs: dict) -> list[int]:
    """The training seeds among ``{(train seed, sample seed): point}`` dicts."""
    return sorted({k[0] for r in runs for k in r})


def seed_list(*runs: dict) -> str:
    return ", ".join(str(s) for s in train_seeds(*runs))


def seeds_phrase(*runs: dict) -> str:
    """'training seed 0' or 'training seeds 0, 1'."""
    return f"training seed{'s' if len(train_seeds(*runs)) > 1 else ''} {seed_list(*runs)}"


#################################################################################
#                                   Statements                                  #
#################################################################################


def statements(study: dict, data: dict) -> list[str]:
    """Plain statements read off the points: paired differences, whether more steps help, and
    the paper's ordering at each NFE."""
    curves = {k: series(v) for k, v in data["curves"].items()}
    targets = [int(n) for n in study["eval"]["nfe"]]
    out = paired_statements(study, curves, targets) + falling_statements(curves, targets)
    if not out:
        out.append("- (no complete pair of columns yet)")
    return out + ordering_statements(curves, targets)


def paired_statements(study: dict, curves: dict, targets: list[int]) -> list[str]:
    """The columns compared pairwise, by (training seed, sampling seed), at each target NFE."""
    out = []
    euler = euler_curves(study, curves)

    def compare(title: str, a, b) -> None:
        if a is None or b is None:
            return
        parts = [f"NFE ~{n}: {verdict(paired(a[n], b[n]))}" for n in targets if n in a and n in b]
        if parts:
            out.append(f"- {title} (FID difference, negative = the second is better): " + "; ".join(parts) + ".")

    compare("PF (LTG) Euler against the paper's baseline SiT (uniform t) Euler", euler.get("sit_uniform"),
            euler.get("pf_ltg"))
    compare("PF (LTG) Euler against SiT (logit-normal t) Euler", euler.get("sit_logit_normal"), euler.get("pf_ltg"))
    compare("PF (LTG) Euler against PF (one logit-normal t per sample) Euler: what patch heterogeneity adds",
            euler.get("pf_logit_normal"), euler.get("pf_ltg"))
    compare("PF (one logit-normal t per sample) against SiT (logit-normal t), both Euler: what the PF network and "
            "difficulty head add at the same time weighting", euler.get("sit_logit_normal"), euler.get("pf_logit_normal"))
    for sampler in ("dual_loop", "look_ahead"):
        compare(f"PF (LTG) {SAMPLER_LABELS[sampler]} against PF (LTG) Euler at matched NFE", euler.get("pf_ltg"),
                curves.get(("pf_ltg", sampler)))
    return out


def falling_statements(curves: dict, targets: list[int]) -> list[str]:
    """Per column: does FID fall with every step of NFE (over the runs every NFE has)?"""
    out = []
    for (arm, sampler), ser in curves.items():
        measured = [n for n in targets if n in ser]
        runs = dict(zip(measured, shared_runs(*(ser[n] for n in measured))))
        if len(measured) < 2 or not runs[measured[0]]:
            continue
        ms = [(n, mean_std([r["fid"] for r in runs[n].values()])[0]) for n in measured]
        falling = all(b[1] < a[1] for a, b in zip(ms, ms[1:]))
        best = min(ms, key=lambda x: x[1])
        trend = ", ".join(f"{m:.2f}" for _, m in ms) + f"; {seeds_phrase(runs[measured[0]])}"
        if falling:
            out.append(f"- {column_label(arm, sampler)}: FID falls with every step of NFE ({trend}).")
        else:
            out.append(f"- {column_label(arm, sampler)}: FID does **not** fall monotonically with NFE ({trend}); "
                       f"best at NFE ~{best[0]}.")
    return out


def ordering_statements(curves: dict, targets: list[int]) -> list[str]:
    """The paper's ordering (SiT > PF Euler > dual-loop > look-ahead in FID) at each NFE, over
    the runs all four columns have."""
    out = []
    order = [("sit_uniform", "euler"), ("pf_ltg", "euler_pf"), ("pf_ltg", "dual_loop"), ("pf_ltg", "look_ahead")]
    for n in targets:
        if not all((a, s) in curves and n in curves[(a, s)] for a, s in order):
            continue
        runs = shared_runs(*(curves[c][n] for c in order))
        if not runs[0]:
            continue
        vals = [(column_label(*c), mean_std([r["fid"] for r in r_.values()])[0]) for c, r_ in zip(order, runs)]
        paper = all(b[1] < a[1] for a, b in zip(vals, vals[1:]))
        out.append(f"- The paper's ordering (SiT > PF Euler > dual-loop > look-ahead in FID) at NFE ~{n}: "
                   + ("**reproduced**" if paper else "**not reproduced**") + " ("
                   + ", ".join(f"{name} {v:.2f}" for name, v in vals)
                   + f"; over the {len(runs[0])} run{'s' if len(runs[0]) > 1 else ''} all four have, {seeds_phrase(runs[0])}).")
    return out


def trend_statements(trend: dict, ks: list[int]) -> list[str]:
    """Per arm: how the FID gap between the largest and smallest K moves with training, and from
    which training length (if any) FID falls with every step of K."""
    out = []
    lo, hi = min(ks), max(ks)
    for arm, points in trend.items():
        rows = {st: row for st, row in trend_rows(points).items() if all(k in row for k in ks)}
        if len(rows) < 2:
            continue
        gaps = [(st, row[hi]["fid"] - row[lo]["fid"], row[hi]["precision"] - row[lo]["precision"],
                 row[hi]["recall"] - row[lo]["recall"]) for st, row in rows.items()]
        falling = [st for st, row in rows.items() if all(row[b]["fid"] < row[a]["fid"] for a, b in zip(ks, ks[1:]))]
        best_k = {st: min(ks, key=lambda k: row[k]["fid"]) for st, row in rows.items()}
        shrinking = all(g[1] < f[1] for f, g in zip(gaps, gaps[1:]))
        line = (f"- {ARMS[arm]['label']}: going from K={lo} to K={hi} changes FID by "
                + ", ".join(f"{g[1]:+.2f} at {g[0]} steps" for g in gaps)
                + f"; precision by {', '.join(f'{g[2]:+.3f}' for g in gaps)}, recall by "
                f"{', '.join(f'{g[3]:+.3f}' for g in gaps)}. The best K is "
                + ", ".join(f"{best_k[st]} at {st} steps" for st in rows) + ". ")
        line += ("The gap falls with every stage of training. " if shrinking else "The gap does not fall steadily. ")
        line += (f"FID falls with every step of K from {falling[0]} training steps on."
                 if falling and all(st in falling for st in rows if st >= falling[0])
                 else "At no training length here does FID fall with every step of K.")
        out.append(line)
    return out


#################################################################################
#                                     Report                                    #
#################################################################################


def render(study: dict, data: dict, command_line: str) -> str:
    """RESULTS.md: the study's settings, tables, statements and figures, section by section."""
    figures, results = Path(study["figures"]), Path(study["results"])
    lines = header(study, data, command_line)
    lines += setup_section(study, data)
    lines += nfe_section(study, data, figures, results)
    lines += ["", "## What this shows", ""] + statements(study, data)
    lines += segment_table(study, data)
    lines += profile_section(study, data, figures, results)
    lines += trend_section(study, data, figures, results)
    lines += realization_section(study, data)
    lines += samples_section(study, figures, results)
    lines += pages_section(study, results)
    lines += stage_table(data["stages"])
    lines += ["", "Paper, for scale (ImageNet-256, 400K steps, FID-50K, no guidance, SPEC.md section 7): B/2 SiT 33.0, "
              "PF Euler 27.9, dual-loop 26.0, look-ahead 24.2 (NFE of the adaptive columns not published).", ""]
    return "\n".join(lines)


def header(study: dict, data: dict, command_line: str) -> list[str]:
    done = sum(1 for _, s in data["stages"] if s is not None)
    total_min = sum(s for _, s in data["stages"] if s is not None) / 60
    return [
        f"# Version 1 of the study (superseded by [RESULTS.md]({rel(Path('RESULTS.md'), study['results'])})): the "
        "small-scale reproduction: the paper's SiT baseline against Patch Forcing, Euler against the adaptive "
        "samplers, on held-out data",
        "",
        f"Generated by `pf/experiments/reproduce.py` from the stages finished so far ({done} of "
        f"{len(data['stages'])}); regenerate (or continue) with:",
        "",
        "```",
        command_line,
        "```",
        "",
        f"Device: {device_name(study)}. Stage time so far: {total_min:.0f} min (per stage at the end).",
    ]


def setup_section(study: dict, data: dict) -> list[str]:
    """The data, network, recipe, arms, metrics, seeds, models, NFE and floor."""
    tc, ec = study["train"], study["eval"]
    lines = [
        "",
        "## Setup",
        "",
        f"- Data: `data={study['data']}` at {study['image_size']}x{study['image_size']} "
        f"({(study['image_size'] // 2) ** 2} patches of 2x2). Training uses the train split (the validation loss holds "
        f"out a few hundred of its images); every metric is against the held-out **test split**, which no model "
        f"and not the feature classifier ever trained on.",
        f"- Network: `model={study['model']}` for every arm. Recipe, identical for every arm: {tc['steps']} steps, "
        f"batch {tc['batch_size']}, AdamW lr {tc['lr']} ({tc['warmup_steps']} warm-up steps, then constant), "
        f"grad clip 1, EMA 0.999 (with warm-up), EMA weights evaluated, training seeds {list(tc['seeds'])}"
        + (f", extra overrides `{' '.join(tc['overrides'])}`" if tc["overrides"] else "") + ".",
    ]
    lines += arm_lines(study, data)
    lines += metric_lines(study, data)
    lines.append(models_line(study, data))
    adaptive_seeds = list(ec.get("adaptive_train_seeds", tc["seeds"]))
    if adaptive_seeds != list(tc["seeds"]):
        lines.append(f"- The adaptive samplers' curves (dual-loop, look-ahead) are drawn for training seed(s) "
                     f"{adaptive_seeds} only (x {len(ec['seeds'])} sampling seeds), to keep the study within its "
                     f"CPU budget; every Euler curve has all {len(tc['seeds'])} training seeds.")
    lines.append(f"- NFE: Euler at K = {list(ec['nfe'])}; dual-loop (p={ec['dual_loop']['p']}, "
                 f"n_inner={ec['dual_loop']['n_inner']}) and look-ahead (p={ec['look_ahead']['p']}, ratio "
                 f"{ec['look_ahead']['context_t_ratio']}) at the K whose NFE is closest to each (ties: the cheaper).")
    if data["floor"]:
        fl = data["floor"]
        lines.append(f"- Floor: {ec['num_samples']} real *train* images against the test split give FID "
                     f"{fmt([r['fid'] for r in fl])}, precision {fmt([r['precision'] for r in fl], 3)}, recall "
                     f"{fmt([r['recall'] for r in fl], 3)} (no model can be expected to do better with this many "
                     f"images).")
    return lines


def arm_lines(study: dict, data: dict) -> list[str]:
    """Each arm with the overrides that make it and what its training cost and reached."""
    tc = study["train"]
    lines = ["- Arms (the pf.train overrides that make them):"]
    for arm in study["arms"]:
        runs = [v for (a, _), v in data["train"].items() if a == arm]
        extra = ""
        if runs:
            r = runs[0]
            extra = (f": {r['params'] / 1e6:.2f}M parameters, {r['flops_per_step'] / 1e9:.1f} GFLOP per training "
                     f"step (forward + backward, matmuls and attention, batch {tc['batch_size']}), "
                     f"{r['seconds_per_step']:.2f} s per step here (wall time on the shared 2 cores, other stages "
                     f"running); final loss " + ", ".join(f"{v['final_loss']:.3f}" for v in runs)
                     + "; validation MSE " + ", ".join(f"{v['val_loss']:.3f}" for v in runs if v["val_loss"]))
        lines.append(f"  - **{ARMS[arm]['label']}** (`{' '.join(ARMS[arm]['overrides'])}`){extra}")
    lines.append("  - SiT (uniform t) is the paper's baseline column (SPEC.md section 7); SiT (logit-normal t) is "
                 "the stronger variant; PF (one logit-normal t per sample) has PF's network, difficulty head and "
                 "loss but no patch heterogeneity, so PF (LTG) against it measures what per-patch times add.")
    return lines


def metric_lines(study: dict, data: dict) -> list[str]:
    """How a point is measured, and how the seeds pair the columns."""
    tc, ec = study["train"], study["eval"]
    clf = data["classifier"]
    lines = []
    if clf:
        lines.append(f"- Metrics: torch-fidelity FID, KID and precision/recall (k=3) in the penultimate features of "
                     f"a small CNN trained on the {clf['train_size']:,} train images only ({clf['epochs']} epochs; "
                     f"accuracy on the {clf['test_size']:,} test images {clf['test_accuracy'] * 100:.1f}%). "
                     f"{ec['num_samples']} generated images per point (labels i mod 10, no guidance) against "
                     + (f"the first {ec['reference_size']:,}" if ec.get("reference_size") else f"all {clf['test_size']:,}")
                     + " test images. KID in raw feature units.")
    lines.append(f"- Seeds: every number is mean ± sample std over the training seeds its row names (up to "
                 f"{len(tc['seeds'])}: {list(tc['seeds'])}) x {len(ec['seeds'])} sampling seeds ({list(ec['seeds'])}). "
                 f"Within a sampling seed every column starts from the same noise and labels, so comparisons below "
                 f"are paired by (training seed, sampling seed), and a statement that sets columns side by side uses "
                 f"only the runs they all have.")
    return lines


def models_line(study: dict, data: dict) -> str:
    """Where the runs' weights are kept, and which runs' points come from more than one realization."""
    # a point from before the weights were kept records none: beside fingerprinted ones it is another realization
    fingerprints: dict = {}  # (arm, training seed) -> the weights its points name
    for (arm, _), pts in data["curves"].items():
        for p in pts:
            fingerprints.setdefault((arm, p["train_seed"]), set()).add(p.get("weights"))
    mixed = sorted(f"{ARMS[arm]['label']} seed {seed}" for (arm, seed), fps in fingerprints.items() if len(fps) > 1)
    return (f"- Models: each run's EMA weights after {study['train']['steps']} steps are kept in "
            f"`{rel(Path(study['records_dir']) / 'weights', Path(study['results']))}/` and later points are "
            f"measured on them, not on a retrained copy: the same config trained on another machine rounds "
            f"differently and ends a slightly different model. Every point records the fingerprint of the "
            f"weights it came from (points from before the weights were kept record none, and count as "
            f"another realization beside fingerprinted ones); "
            + (f"runs measured on more than one such realization: {', '.join(mixed)}." if mixed else
               "no run's points come from two realizations."))


def nfe_section(study: dict, data: dict, figures: Path, results: Path) -> list[str]:
    """The FID and precision / recall tables against NFE, with the plot."""
    targets = [int(n) for n in study["eval"]["nfe"]]
    lines = ["", "## FID against NFE", "", f"![FID against NFE]({rel(figures / 'fid_vs_nfe.png', results)})", "",
             "FID ↓ (mean ± std), with K and the measured NFE:", ""]
    lines += nfe_table(data, targets, lambda runs: f"{fmt([r['fid'] for r in runs])} (K={runs[0]['steps']}, "
                                                   f"NFE {runs[0]['nfe']})")
    lines += ["", "Precision ↑ / recall ↑ at the same points:", ""]
    lines += nfe_table(data, targets, lambda runs: f"{mean_std([r['precision'] for r in runs])[0]:.3f} / "
                                                   f"{mean_std([r['recall'] for r in runs])[0]:.3f}")
    return lines


def nfe_table(data: dict, targets: list[int], cell) -> list[str]:
    """Rows: every (arm, sampler) curve; columns: the target NFEs; ``cell(runs)`` fills a cell."""
    lines = ["| model + sampler | training seeds | " + " | ".join(f"NFE ~{n}" for n in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for (arm, sampler), points in data["curves"].items():
        ser = series(points)
        row_seeds = train_seeds(*ser.values())
        cells = []
        for n in targets:
            runs = ser.get(n, {})
            # a cell over fewer training seeds than its row (a curve still running) says which
            partial = "" if train_seeds(runs) == row_seeds else f" [seeds {seed_list(runs)}]"
            cells.append(cell(list(runs.values())) + partial if runs else "pending")
        lines.append(f"| {column_label(arm, sampler)} | {seed_list(*ser.values())} | " + " | ".join(cells) + " |")
    return lines


def segment_table(study: dict, data: dict) -> list[str]:
    """Validation MSE of each arm's EMA network at the 8 fixed times, mean over training seeds:
    where along the path each arm's network is accurate."""
    rows = {}
    for arm in study["arms"]:
        segs = [data["train"][(arm, s)].get("val_segments") for s in study["train"]["seeds"] if (arm, s) in data["train"]]
        segs = [sg for sg in segs if sg]
        if segs:
            rows[arm] = ([sum(col) / len(col) for col in zip(*segs)], len(segs))
    if not rows:
        return []
    n = len(next(iter(rows.values()))[0])
    times = [(k + 0.5) / n for k in range(n)]
    best = [min(r[0][k] for r in rows.values()) for k in range(n)]
    out = ["", "## Where along the path each network is accurate", "",
           f"Validation MSE of the EMA network after {study['train']['steps']} steps with every patch at one time t "
           f"(fixed noise, images held out of the train split; the loss of SPEC section 3), mean over the training "
           f"seeds recorded; **bold**: the lowest at that t. t = 0 is noise, t = 1 data; the error that no network "
           f"can remove grows towards t = 1, so compare the arms column by column.", "",
           "| arm | seeds | " + " | ".join(f"t={t:.2f}" for t in times) + " | mean |", "|---|---|" + "---|" * (n + 1)]
    for arm, (seg, count) in rows.items():
        cells = [f"**{v:.4f}**" if v == best[k] else f"{v:.4f}" for k, v in enumerate(seg)]
        out.append(f"| {ARMS[arm]['label']} | {count} | " + " | ".join(cells) + f" | {sum(seg) / n:.4f} |")
    return out


def profile_section(study: dict, data: dict, figures: Path, results: Path) -> list[str]:
    """Each arm's velocity error along the path next to where its training put the patch times,
    and how that lines up with what more sampling steps do to its FID."""
    prof = data["profile"]
    if not prof:
        return []
    first = next(iter(prof.values()))
    times = first["times"]
    out = ["", "## Why more sampling steps do not help here", "",
           f"![error along the path]({rel(figures / 'profile.png', results)})", "",
           f"Velocity MSE of each arm's EMA network (training seed {study['train']['seeds'][0]}, "
           f"{study['train']['steps']} steps) with every patch at one time t, on {first['images']} held-out test "
           "images with fixed noise (left), and the share of its training patch times in each tenth of [0, 1] "
           "(right). Euler with K steps queries the network at t = 0, 1/K, ..., 1 - 1/K: more steps query it "
           "closer to t = 1.", "",
           "| arm | " + " | ".join(f"t={t:g}" for t in times) + " | training times in [0.9, 1] |",
           "|---|" + "---|" * (len(times) + 1)]
    for arm, p in prof.items():
        out.append(f"| {ARMS[arm]['label']} | " + " | ".join(f"{v:.3f}" for v in p["mse"])
                   + f" | {100 * p['train_time_bins'][-1]:.1f}% |")
    return out + profile_statement(study, data)


def profile_statement(study: dict, data: dict) -> list[str]:
    """The measured link: each arm's error near t = 1 against its Euler FID change from the
    smallest to the largest K."""
    curves = {k: series(v) for k, v in data["curves"].items()}
    euler = euler_curves(study, curves)
    lo, hi = min(study["eval"]["nfe"]), max(study["eval"]["nfe"])
    rows = []
    for arm, p in data["profile"].items():
        ser = euler.get(arm)
        if ser and lo in ser and hi in ser:
            gap = mean_std([r["fid"] for r in ser[hi].values()])[0] - mean_std([r["fid"] for r in ser[lo].values()])[0]
            near = [v for t, v in zip(p["times"], p["mse"]) if t >= 0.9]
            rows.append((arm, sum(near) / len(near), gap, p["train_time_bins"][-1]))
    if len(rows) < 2:
        return []
    rows.sort(key=lambda r: r[1])
    same_order = all(a[2] <= b[2] for a, b in zip(rows, rows[1:]))
    return ["", "- Mean velocity MSE over t >= 0.9 against the Euler FID change from K=" f"{lo} to K={hi}: "
            + "; ".join(f"{ARMS[a]['label']} {m:.3f} and {g:+.2f} ({100 * f:.1f}% of its training times in "
                        f"[0.9, 1])" for a, m, g, f in rows) + ". "
            + ("The arms order the same way on both: the larger a network's error near the data end, the more "
               "FID it loses when more steps query it there." if same_order else
               "The two orders differ: the error near the data end does not account for the whole effect.")]


def trend_section(study: dict, data: dict, figures: Path, results: Path) -> list[str]:
    """Euler FID at every K along the training of the first training seed, with the plot."""
    if not data["trend"]:
        return []
    tc, ec = study["train"], study["eval"]
    ks = [int(k) for k in ec["nfe"]]
    lo, hi = min(ks), max(ks)
    lines = ["", "## Do more sampling steps help as training goes on?", "",
             f"Euler at every K along the training of the first training seed (sampling seed "
             f"{ec['seeds'][0]}, {ec['num_samples']} images per point): the checkpoints of one run, continued "
             f"past the comparison's {tc['steps']} steps with the same recipe (constant learning rate).", "",
             f"![FID against K along training]({rel(figures / 'trend.png', results)})", "",
             "| arm | training steps | validation MSE | " + " | ".join(f"FID K={k}" for k in ks)
             + f" | FID K={hi} - K={lo} | precision K={lo} / K={hi} | recall K={lo} / K={hi} |",
             "|---|---|---|" + "---|" * len(ks) + "---|---|---|"]
    for arm, points in data["trend"].items():
        for st, row in trend_rows(points).items():
            if lo not in row or hi not in row:
                continue
            a, b = row[lo], row[hi]
            val = f"{a['val_loss']:.4f}" if a.get("val_loss") is not None else "pending"
            lines.append(f"| {ARMS[arm]['label']} | {st} | {val} | "
                         + " | ".join(f"{row[k]['fid']:.2f}" if k in row else "pending" for k in ks)
                         + f" | {b['fid'] - a['fid']:+.2f} | {a['precision']:.3f} / {b['precision']:.3f} | "
                         f"{a['recall']:.3f} / {b['recall']:.3f} |")
    return lines + [""] + trend_statements(data["trend"], ks)


def realization_section(study: dict, data: dict) -> list[str]:
    """Points measured on an earlier realization of a run beside the same points on its kept weights."""
    pairs = realization_pairs(study)
    if not pairs:
        return []
    runs = {r["trajectory"]: f"{ARMS[arm]['label']} seed {seed}" for (arm, seed), r in data["train"].items()}
    groups: dict = {}
    for p in pairs:
        groups.setdefault((p["trajectory"], p["sampler"], p["steps"]), []).append(p)
    out = ["", "## The same run trained twice", "",
           "A run retrained with the same code and config on another machine is another model: floating-point "
           "rounding differs from the first step and training amplifies it. Points measured on an earlier "
           "realization (kept in `superseded/` beside the records) against the same points (sampler, K, sampling "
           "seed, noise) on the run's kept weights:", "",
           "| run | sampler | K | sampling seeds | FID, earlier realization | FID, kept weights | difference |",
           "|---|---|---|---|---|---|---|"]
    for (traj, sampler, k), ps in sorted(groups.items(), key=lambda g: g[0]):
        d = [p["new"] - p["old"] for p in ps]
        out.append(f"| {runs.get(traj, traj)} | {SAMPLER_LABELS.get(sampler, sampler)} | {k} | "
                   f"{sorted(p['seed'] for p in ps)} | {fmt([p['old'] for p in ps])} | {fmt([p['new'] for p in ps])} | "
                   f"{fmt(d)} |")
    d = [p["new"] - p["old"] for p in pairs]
    m, _ = mean_std(d)
    out += ["", f"Over these {len(d)} points the kept weights' FID differs from the earlier realization's by "
                f"{m:+.2f} on average ({min(d):+.2f} to {max(d):+.2f}): differences of that size between single "
                f"training runs above are within what one run's realization decides. The second training seed "
                f"measures that spread properly."]
    return out


def samples_section(study: dict, figures: Path, results: Path) -> list[str]:
    if not (figures / "samples.png").is_file():
        return []
    tc, ec = study["train"], study["eval"]
    return ["", "## Samples", "",
            f"The first 30 images of sampling seed {ec['seeds'][0]} (training seed {tc['seeds'][0]}) of every "
            f"column at NFE ~{ec['grid_steps']}, beside real test images; column j is class j; the same noise "
            f"in every panel.", "", f"![samples]({rel(figures / 'samples.png', results)})"]


def pages_section(study: dict, results: Path) -> list[str]:
    """Links to the other studies' pages that exist beside the figures."""
    docs = Path(study["figures"]).parent
    pages = [("findings.md", "The paper's findings, measured",
              "Uncertainty against error, context, the timestep-sampler ablation and patch selection: {link} "
              "(`python -m pf.experiments.findings`)."),
             ("t2i.md", "Text-to-image",
              "Whether the text-to-image demo follows held-out prompts: {link} (`python -m pf.experiments.t2i`)."),
             ("repa.md", "With representation alignment",
              "PF against PF + REPA on the same data and recipe: {link} (`python -m pf.experiments.repa`).")]
    lines = []
    for name, title, text in pages:
        page = docs / name
        if page.is_file():
            lines += ["", f"## {title}", "", text.format(link=f"[{page.as_posix()}]({rel(page, results)})")]
    return lines


#################################################################################
#                                    Figures                                    #
#################################################################################


def plot_curves(study: dict, data: dict, path: Path) -> None:
    """FID and precision / recall against NFE, a line per column, with the real-image floor."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"euler": "-o", "euler_pf": "-o", "dual_loop": "--s", "look_ahead": ":^"}
    floor = [r["fid"] for r in data["floor"]] if data["floor"] else []
    for ax, key, title in ((axes[0], "fid", "FID ↓"), (axes[1], "precision", "precision ↑ / recall (dotted grey)")):
        for (arm, sampler), points in data["curves"].items():
            ser = series(points)
            xs, ms, ss = [], [], []
            for target in sorted(ser):
                runs = list(ser[target].values())
                xs.append(mean_std([r["nfe"] for r in runs])[0])
                m, s = mean_std([r[key] for r in runs])
                ms.append(m)
                ss.append(s)
            ax.errorbar(xs, ms, yerr=ss, fmt=styles[sampler], color=plots.ARM_COLORS.get(arm), capsize=3,
                        label=f"{column_label(arm, sampler)} ({seeds_phrase(*ser.values())})")
            if key == "precision":
                rec = [mean_std([r["recall"] for r in ser[t].values()])[0] for t in sorted(ser)]
                ax.plot(xs, rec, styles[sampler], color=plots.ARM_COLORS.get(arm), alpha=0.35)
        if key == "fid" and floor:
            ax.axhline(mean_std(floor)[0], color="k", lw=0.8, ls="--", label="real train images (floor)")
        ax.set_xscale("log")
        ax.set_xlabel("NFE (model calls per image)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{study['data']} {study['image_size']}x{study['image_size']}, {study['train']['steps']} training "
                 f"steps; mean ± std over each curve's training seeds (legend) x {len(study['eval']['seeds'])} "
                 f"sampling seeds, {study['eval']['num_samples']} images each vs the held-out test split", fontsize=9)
    plots.save(fig, path)


def sample_grid(study: dict, data: dict, path: Path) -> bool:
    """Samples of every column at the grid's NFE (first training and sampling seed) beside real test images."""
    target = int(study["eval"]["grid_steps"])
    panels = []
    ref = reference_images(study)
    labels = load_test_labels(study)
    panels.append(("real test images", torch.stack([ref[torch.nonzero(labels == c)[r, 0]]
                                                    for r in range(3) for c in range(10)])))
    for (arm, sampler), points in data["curves"].items():
        p = next((p for p in points if p["target_nfe"] == target and p.get("images")), None)
        if p is not None and Path(p["images"]).is_file():
            panels.append((f"{column_label(arm, sampler)}\nK={p['steps']}, NFE={p['nfe']}",
                           torch.load(p["images"], weights_only=True)))
    if len(panels) < 2:
        return False
    labelled_panels(panels, path, nrow=10)
    return True


def plot_profile(study: dict, prof: dict, path: Path) -> None:
    """Velocity MSE along the path (left) and the share of training patch times per tenth (right)."""
    plt = plots.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, p in prof.items():
        ax.plot(p["times"], p["mse"], "-o", ms=3, color=plots.ARM_COLORS.get(arm), label=ARMS[arm]["label"])
        bins = p["train_time_bins"]
        bx.step([i / len(bins) for i in range(len(bins) + 1)], [bins[0], *bins], where="pre",
                color=plots.ARM_COLORS.get(arm), label=ARMS[arm]["label"])
    ax.set_yscale("log")
    ax.set_xlabel("t (0 = noise, 1 = data), every patch")
    ax.set_title("velocity MSE on held-out images ↓")
    bx.set_xlabel("patch time t")
    bx.set_title("share of training patch times per tenth")
    for a in (ax, bx):
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    plots.save(fig, path)


def plot_trend(study: dict, trend: dict, path: Path) -> None:
    """FID against K, one line per training length, a panel per arm."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, len(trend), figsize=(5.5 * len(trend), 4.2), squeeze=False)
    for ax, (arm, points) in zip(axes[0], trend.items()):
        rows = trend_rows(points)
        cmap = plt.get_cmap("viridis")
        for i, (st, row) in enumerate(rows.items()):
            ks = sorted(row)
            ax.plot(ks, [row[k]["fid"] for k in ks], "-o", color=cmap(i / max(1, len(rows) - 1)),
                    label=f"{st} training steps")
        ax.set_xscale("log")
        ax.set_xlabel("Euler steps K (= NFE)")
        ax.set_ylabel("FID ↓")
        ax.set_title(ARMS[arm]["label"])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ec = study["eval"]
    fig.suptitle(f"FID against K along training ({study['data']} {study['image_size']}x{study['image_size']}, "
                 f"training seed {study['train']['seeds'][0]}, sampling seed {ec['seeds'][0]}, "
                 f"{ec['num_samples']} images per point vs the held-out test split)", fontsize=9)
    plots.save(fig, path)


#################################################################################
#                                     Main                                      #
#################################################################################


def write_report(study: dict, command_line: str) -> None:
    """The figures, then RESULTS.md, from what is stored."""
    data = collect(study)
    figures = Path(study["figures"])
    if data["curves"]:
        plot_curves(study, data, figures / "fid_vs_nfe.png")
        sample_grid(study, data, figures / "samples.png")
    if data["trend"]:
        plot_trend(study, data["trend"], figures / "trend.png")
    if data["profile"]:
        plot_profile(study, data["profile"], figures / "profile.png")
    Path(study["results"]).parent.mkdir(parents=True, exist_ok=True)
    Path(study["results"]).write_text(render(study, data, command_line))


def expand_toy(argv: list[str]) -> list[str]:
    """``toy=true`` stands for this study's toy sizes."""
    return command.expand_toy(argv, TOY)


def main(cfg, argv: list[str] | None = None) -> None:
    command.run_study(cfg, argv, build_stages, write_report, DOC_COMMAND, "results")


if __name__ == "__main__":
    sys.exit(command.main(main, DEFAULTS, __doc__, free=FREE, toy=TOY))
