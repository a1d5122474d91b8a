"""Diagnostics on the first study's kept weights (no training): ``python -m pf.experiments.diagnostics``.

The models of :mod:`pf.experiments.reproduce` (3000 steps, constant learning rate; their EMA
weights kept in ``results/study/weights``) measured again in the committed feature spaces of
:mod:`pf.experiments.evidence`, every point naming both classifiers and the weights:

1. *near the data end*: Euler at K = 25 and 100 beside the same path cut at t = 0.9 and
   finished in one step (:func:`pf.experiments.spaces.cut_grid`), for PF (LTG) and SiT
   (uniform t): if PF's deficit comes from its network's error near t = 1, where more Euler
   steps query it, the cut removes most of the deficit and most of the loss from K = 25 to 100;
2. *the adaptive samplers under both protocols*: dual-loop and look-ahead on PF (LTG) at the
   K of matched NFE (25 and 100) and at the paper's protocol (K = 100 outer steps for every
   sampler), with uncertainty selection (the method) and random selection beside it;
3. *finding 1 and the selection on foreground patches*: the rank correlation of predicted
   variance with the actual error over every patch and over foreground patches only (37% of
   Fashion-MNIST's 2x2 patches are background), and how much of the "certain" selection is
   background (:func:`_foreground`);
4. *the first report re-measured*: every Euler point of its curves (K = 10, 25, 50, 100) in
   the committed feature spaces, for the linked page of the first report.

A run whose kept weights are gone is dropped (listed), never retrained: a retrained run is
another model. Stages are cached and resumable; ``report_only=true`` rewrites the page.
"""

from __future__ import annotations

import copy
import sys

import torch
from pathlib import Path

from pf import samplers
from pf.experiments import command, comparison, spaces
from pf.experiments.common import (TrainedRun, forward_with_uncertainty, held_out_batch, kept_weights_path,
                                   patch_stats, weights_fingerprint)
from pf.flow import interpolate
from pf.models import load_checkpoint
from pf.samplers import certain_patches
from pf.experiments.comparison import ARMS, euler_sampler
from pf.experiments.curves import steps_for_nfe
from pf.experiments.records import write_json
from pf.experiments.stages import Stage, stage_result

DEFAULTS = copy.deepcopy(comparison.DEFAULTS)
DEFAULTS.update({
    "records_dir": "results/study",          # where the first study's kept weights are (read only)
    "points_dir": "results/diagnostics",     # this study's records
    "page": "docs/diagnostics.md",
    "classifiers": list(spaces.CLASSIFIERS),
    "near": {"arms": ["pf_ltg", "sit_uniform"], "seeds": [0, 1], "steps": [25, 100], "cut": 0.9,
             "sample_seeds": [0]},
    "adaptive": {"seed": 0, "samplers": ["dual_loop", "look_ahead"], "rules": ["uncertainty", "random"],
                 "nfe": [25, 100], "paper_steps": 100, "sample_seeds": [0]},
    "foreground": {"arms": ["pf_ltg", "pf_logit_normal"], "seeds": [0, 1], "images": 1000,
                   "times": [0.2, 0.4, 0.6, 0.8], "p": 0.4, "threshold": -0.98},
    "remeasure": {"arms": ["pf_ltg", "sit_uniform", "pf_logit_normal", "sit_logit_normal"], "seeds": [0, 1],
                  "steps": [10, 25, 50, 100], "sample_seeds": [0, 1, 2]},
})
DEFAULTS["eval"]["nfe"] = [10, 25, 50, 100]
TOY = [*comparison.TOY, "points_dir=runs/toy/diagnostics", "foreground.images=20", "foreground.seeds=[0]", "page=runs/toy/diagnostics.md", "near.steps=[2,4]",
       "near.seeds=[0]", "adaptive.nfe=[4]", "adaptive.paper_steps=2", "remeasure.steps=[2]",
       "remeasure.seeds=[0]", "remeasure.arms=[pf_ltg]", "remeasure.sample_seeds=[0]"]
FREE = comparison.FREE
DOC_COMMAND = "python -m pf.experiments.diagnostics"
VIEW = ("out_dir", "records_dir", "device", "data", "data_overrides", "image_size", "model", "train", "eval",
        "classifiers", "points_dir")
# Findings 1 and 5 on foreground patches: a patch is background when every clean pixel of it is at
# most ``foreground.threshold`` in [-1, 1] (Fashion-MNIST's background is exactly -1).


def view(study: dict) -> dict:
    """What a stage sees (its key): the first study's settings, the classifiers and the records."""
    return {k: copy.deepcopy(study[k]) for k in VIEW}


def kept_run(study: dict, arm: str, seed: int) -> TrainedRun | None:
    """The first study's run of ``arm`` and ``seed`` on its kept weights, or None when they are gone."""
    run = TrainedRun(study, ARMS[arm]["overrides"], seed, int(study["train"]["steps"]))
    return run if kept_weights_path(study, run.identity).is_file() else None


def _points(study: dict, arm: str, seed: int, specs: list[dict], stored_only: bool = False) -> dict:
    """Each point of ``specs`` on the kept run (``stored_only``: the ones already stored, for a
    page in progress)."""
    run = kept_run(study, arm, seed)
    if run is None:
        return {"points": [], "gone": f"{arm} seed {seed}"}
    out = []
    for sp in specs:
        kw = {"params": sp.get("params"), "cut": sp.get("cut"), "points_dir": study["points_dir"]}
        p = (spaces.stored(study, run.identity, sp["sampler"], sp["steps"], sp["sample_seed"], **kw) if stored_only
             else spaces.evaluate(study, run, sp["sampler"], sp["steps"], sp["sample_seed"], **kw))
        if p is not None:
            out.append({**sp, "arm": arm, "train_seed": seed, **p})
    return {"points": out}


def _near(study: dict, arm: str, seed: int, steps: list[int], cut: float, sample_seeds: list[int],
          stored_only: bool = False) -> dict:
    """Stage: Euler at each K of ``steps``, whole and cut at ``cut``, on one kept run."""
    sampler = euler_sampler(ARMS[arm]["overrides"])
    specs = [{"sampler": sampler, "steps": int(k), "sample_seed": int(s), "cut": c}
             for k in steps for c in (None, cut) for s in sample_seeds]
    return _points(study, arm, seed, specs, stored_only)


def _adaptive(study: dict, seed: int, sampler: str, rule: str, nfe: list[int], paper_steps: int,
              sample_seeds: list[int], stored_only: bool = False) -> dict:
    """Stage: one adaptive sampler with one selection rule on PF (LTG): at the K of each matched
    NFE and at ``paper_steps`` outer steps."""
    params = dict(study["eval"][sampler])
    if rule != "uncertainty":
        params["selection"] = rule
    ks = [(f"matched NFE {n}", steps_for_nfe(samplers.make(sampler, **params), int(n))) for n in nfe]
    ks.append(("paper's protocol", int(paper_steps)))
    specs = []
    for protocol, k in ks:
        for s in sample_seeds:
            ps = {**params, "selection_seed": int(s)} if rule == "random" else params
            specs.append({"sampler": sampler, "steps": int(k), "sample_seed": int(s), "params": ps,
                          "protocol": protocol, "rule": rule})
    return _points(study, "pf_ltg", seed, specs, stored_only)


def _remeasure(study: dict, arm: str, seed: int, steps: list[int], sample_seeds: list[int],
               stored_only: bool = False) -> dict:
    """Stage: the first report's Euler points of one run, in the committed feature spaces."""
    sampler = euler_sampler(ARMS[arm]["overrides"])
    return _points(study, arm, seed, [{"sampler": sampler, "steps": int(k), "sample_seed": int(s)}
                                      for k in steps for s in sample_seeds], stored_only)


@torch.no_grad()
def _foreground(study: dict, arm: str, seed: int, images: int, times: list[float], p: float,
                threshold: float) -> dict:
    """Stage: finding 1 (rank correlation of the predicted variance with the actual error, pooled
    over patches) on every patch and on foreground patches only, and the selection (the ``p``
    least uncertain patches, as the adaptive samplers pick them): how many of them are
    background, and the error of the chosen and the other patches on foreground only."""
    from scipy.stats import spearmanr  # scipy is an optional dependency (the eval extra)

    run = kept_run(study, arm, seed)
    if run is None:
        return {"gone": f"{arm} seed {seed}", "times": []}
    model = load_checkpoint(run.checkpoint(), use_ema=True).eval()
    x1, labels, x0 = held_out_batch(study, int(images), noise_seed=1234)  # (B, 1, S, S)
    ps = model.patch_size
    n = (x1.shape[-1] // ps) ** 2
    clean_max = torch.nn.functional.max_pool2d(x1.amax(1, keepdim=True), ps).flatten(1)  # (B, N)
    fg = clean_max > float(threshold)
    out = {"arm": arm, "seed": seed, "images": int(x1.shape[0]), "foreground_share": float(fg.double().mean()),
           "weights": weights_fingerprint(model), "times": []}
    for s in times:
        t = torch.full((x1.shape[0], n), float(s))
        xt, target = interpolate(x1, x0, t, ps)
        v, lv = forward_with_uncertainty(model, xt, t, labels)
        var, err = patch_stats(v, lv, target, ps)  # (B, N)
        certain = certain_patches(lv, ps, float(p))  # (B, N): the ones the samplers move ahead
        a, b, f = var.numpy().ravel(), err.numpy().ravel(), fg.numpy().ravel()
        cf, uf = (certain & fg), (~certain & fg)
        out["times"].append({
            "s": float(s), "spearman_all": float(spearmanr(a, b).statistic),
            "spearman_foreground": float(spearmanr(a[f], b[f]).statistic),
            "certain_background_share": float((certain & ~fg).sum() / certain.sum().clamp(min=1)),
            "certain_err_foreground": float((err * cf).sum() / cf.sum().clamp(min=1)),
            "uncertain_err_foreground": float((err * uf).sum() / uf.sum().clamp(min=1)),
            "certain_err_all": float((err * certain).sum() / certain.sum().clamp(min=1)),
            "uncertain_err_all": float((err * ~certain).sum() / (~certain).sum().clamp(min=1))})
    return out


foreground_stage = spaces.timed(_foreground)
near_stage = spaces.timed(_near)
adaptive_stage = spaces.timed(_adaptive)
remeasure_stage = spaces.timed(_remeasure)


def build_stages(study: dict) -> list[Stage]:
    """The foreground findings first (cheap), then the near-data test, the adaptive samplers,
    and last the re-measured report (the most CPU)."""
    v, mod, out = view(study), "pf.experiments.diagnostics", []  # by name: one key however it runs
    nc, ac, rc = study["near"], study["adaptive"], study["remeasure"]
    fc = study["foreground"]
    for seed in fc["seeds"]:
        for arm in fc["arms"]:
            out.append(Stage(f"foreground {arm} seed {seed}", f"{mod}:foreground_stage",
                             {"study": v, "arm": arm, "seed": int(seed), "images": int(fc["images"]),
                              "times": list(fc["times"]), "p": float(fc["p"]), "threshold": float(fc["threshold"])}))
    for seed in nc["seeds"]:
        for arm in nc["arms"]:
            out.append(Stage(f"near {arm} seed {seed}", f"{mod}:near_stage",
                             {"study": v, "arm": arm, "seed": int(seed), "steps": list(nc["steps"]),
                              "cut": float(nc["cut"]), "sample_seeds": list(nc["sample_seeds"])}))
    for sampler in ac["samplers"]:
        for rule in ac["rules"]:
            out.append(Stage(f"adaptive {sampler} {rule}", f"{mod}:adaptive_stage",
                             {"study": v, "seed": int(ac["seed"]), "sampler": sampler, "rule": rule,
                              "nfe": list(ac["nfe"]), "paper_steps": int(ac["paper_steps"]),
                              "sample_seeds": list(ac["sample_seeds"])}))
    for seed in rc["seeds"]:
        for arm in rc["arms"]:
            out.append(Stage(f"remeasure {arm} seed {seed}", f"{mod}:remeasure_stage",
                             {"study": v, "arm": arm, "seed": int(seed), "steps": list(rc["steps"]),
                              "sample_seeds": list(rc["sample_seeds"])}))
    return out


#################################################################################
#                                     Page                                      #
#################################################################################


def collect(study: dict) -> dict:
    out = {"stages": [], "points": [], "gone": [], "foreground": []}
    for s in build_stages(study):
        rec = stage_result(study["points_dir"], s)
        out["stages"].append((s.name, rec))
        if rec is None and not s.name.startswith("foreground"):  # a stage in progress: its stored points
            fn = {"near": _near, "adaptive": _adaptive, "remeasure": _remeasure}[s.name.split()[0]]
            part = fn(**s.args, stored_only=True)["points"]
            out["points"] += [{**p, "stage": s.name.split()[0]} for p in part]
        if rec is not None:
            if s.name.startswith("foreground"):
                out["foreground"].append(rec["result"])
            else:
                out["points"] += [{**p, "stage": s.name.split()[0]} for p in rec["result"]["points"]]
            if rec["result"].get("gone"):
                out["gone"].append(rec["result"]["gone"])
    return out


def render(study: dict, data: dict, command_line: str) -> str:
    fps = [spaces.classifier_fingerprint(p) for p in study["classifiers"]]
    spaces.check_one_space(data["points"], fps)
    pending = [n for n, r in data["stages"] if r is None]
    lines = ["# Diagnostics on the first study's kept weights", "",
             f"Generated by `pf/experiments/diagnostics.py`; regenerate or continue with `{command_line}`. Models: the "
             f"first study's EMA weights after {study['train']['steps']} steps (constant learning rate), kept in "
             f"`{study['records_dir']}/weights`; {study['eval']['num_samples']} images a point against the test split, "
             f"in the committed feature spaces (classifiers {', '.join(fps)}); every point names both and its weights. "
             "n counts training seeds (each the mean of its sampling seeds); the adaptive samplers' table is one training run.", ""]
    if pending:
        lines += ["**Partial.** Stages pending: " + ", ".join(pending) + ".", ""]
    if data["gone"]:
        lines += ["Dropped (kept weights gone, never retrained): " + ", ".join(data["gone"]) + ".", ""]
    labels = {k: v["label"] for k, v in ARMS.items()}
    near = [p for p in data["points"] if p["stage"] == "near"]
    if near:
        lines += ["## Near the data end: Euler whole against Euler cut at t = 0.9 and finished in one step", "",
                  "| arm | training seeds | K | " + " | ".join(f"FID ({i + 1}) whole | FID ({i + 1}) cut"
                                                           for i in range(len(fps))) + " | NFE whole / cut |",
                  "|---|---|---|" + "---|---|" * len(fps) + "---|"]
        cuts = (None, study["near"]["cut"])
        cs = {(i, cut): spaces.cells([p for p in near if p.get("cut") == cut], i)
              for i in range(len(fps)) for cut in cuts}
        for arm in study["near"]["arms"]:
            for k in study["near"]["steps"]:
                ps = [p for p in near if p["arm"] == arm and p["steps"] == k]
                if not ps:
                    continue
                row = [spaces.seed_cell(cs[i, cut].get(arm, {}).get(k, {})) for i in range(len(fps)) for cut in cuts]
                nfe = [p["nfe"] for p in ps if p.get("cut") is None][:1] + [p["nfe"] for p in ps if p.get("cut")][:1]
                seeds = sorted({p["train_seed"] for p in ps})
                lines.append(f"| {labels[arm]} | {seeds} | {k} | " + " | ".join(row) + f" | {' / '.join(map(str, nfe))} |")
        lines += [""] + near_statements(study, near, len(fps)) + [""]
    ad = [p for p in data["points"] if p["stage"] == "adaptive"]
    if ad:
        lines += ["## The adaptive samplers at matched NFE and at the paper's protocol (PF (LTG))", "",
                  "| sampler | selection | protocol | K | NFE | " + " | ".join(f"FID ({i + 1})" for i in range(len(fps))) + " |",
                  "|---|---|---|---|---|" + "---|" * len(fps)]
        for p in sorted(ad, key=lambda p: (p["sampler"], p["protocol"], p["rule"])):
            lines.append(f"| {p['sampler']} | {p['rule']} | {p['protocol']} | {p['steps']} | {p['nfe']} | "
                         + " | ".join(f"{s['fid']:.2f}" for s in p["spaces"]) + " |")
        lines.append("")
    fgr = [r for r in data["foreground"] if r["times"]]
    if fgr:
        fc = study["foreground"]
        lines += ["## Finding 1 and the selection on foreground patches", "",
                  f"A patch is background when all its clean pixels are at most {fc['threshold']} in [-1, 1]. "
                  f"Rank correlation of the predicted variance with the actual squared error, pooled over every "
                  f"patch and over foreground patches only; the {int(100 * fc['p'])}% least uncertain patches "
                  "(what the adaptive samplers move ahead): their share of background, and the error of these "
                  "against the other patches on foreground only. Held-out test images, every patch at t = s.", "",
                  "| model | training seed | foreground share | s | Spearman, all | Spearman, foreground | "
                  "certain: background share | error certain / other (all) | error certain / other (foreground) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in fgr:
            for t in r["times"]:
                lines.append(f"| {labels[r['arm']]} | {r['seed']} | {100 * r['foreground_share']:.0f}% | {t['s']:g} | "
                             f"{t['spearman_all']:.3f} | {t['spearman_foreground']:.3f} | "
                             f"{100 * t['certain_background_share']:.0f}% | {t['certain_err_all']:.3f} / "
                             f"{t['uncertain_err_all']:.3f} | {t['certain_err_foreground']:.3f} / "
                             f"{t['uncertain_err_foreground']:.3f} |")
        lines.append("")
    lines += remeasure_lines(study["remeasure"], [p for p in data["points"] if p["stage"] == "remeasure"],
                             len(fps), labels)
    lines += ["## Stages", "", "| stage | CPU minutes |", "|---|---|"]
    lines += [f"| {n} | {r['result']['cpu_seconds'] / 60:.1f} |" if r else f"| {n} | pending |" for n, r in data["stages"]]
    return "\n".join(lines) + "\n"


def remeasure_lines(rc: dict, points: list[dict], n_spaces: int, labels: dict) -> list[str]:
    """The first report's Euler curves re-measured: a cell per arm, K and feature space over
    training seeds (each its sampling-seed mean), then PF minus SiT per training seed."""
    if not points:
        return []
    cs = [spaces.cells(points, i) for i in range(n_spaces)]
    lines = ["## The first report's Euler curves, re-measured", "",
             f"Euler FID at every K of the first report, sampling seeds {rc['sample_seeds']}: a cell is the mean "
             "over training seeds of each seed's sampling-seed mean, ± the std over training seeds, n the "
             "number of training seeds ((1), (2): the feature space).", "",
             "| arm | " + " | ".join(f"K={k} ({i + 1})" for k in rc["steps"] for i in range(n_spaces)) + " |",
             "|---|" + "---|" * (len(rc["steps"]) * n_spaces)]
    for arm in rc["arms"]:
        if arm in cs[0]:
            lines.append(f"| {labels[arm]} | " + " | ".join(
                spaces.seed_cell(cs[i][arm].get(k, {})) for k in rc["steps"]
                for i in range(n_spaces)) + " |")
    lines.append("")
    for a, b in (("pf_ltg", "sit_uniform"), ("pf_logit_normal", "sit_logit_normal")):
        for i in range(n_spaces):
            per_k = [(k, spaces.paired(cs[i], a, b, k, k)) for k in rc["steps"]]
            if any(d for _, d in per_k):
                lines.append(f"- Feature space {i + 1}: {labels[a]} minus {labels[b]} (negative: {labels[a]} "
                             "better), per training seed: " + "; ".join(
                                 f"K = {k}: {spaces.fmt_pairs(d)}" for k, d in per_k if d) + ".")
    return lines + [""]


def near_pairs(near: list[dict], k: int, cut: bool, space: int = 0) -> list[tuple[int, float]]:
    """(training seed, PF (LTG) minus SiT (uniform t) FID in feature space ``space``) at Euler K =
    ``k``, whole or ``cut``; each seed's value the mean over its sampling seeds."""
    chosen = [p for p in near if (p.get("cut") is not None) == cut]
    return spaces.paired(spaces.cells(chosen, space), "pf_ltg", "sit_uniform", k, k)


def near_statements(study: dict, near: list[dict], n_spaces: int) -> list[str]:
    """Per training seed (each the sampling-seed mean): PF minus SiT whole and cut, per feature
    space and K."""
    out = []
    for i in range(n_spaces):
        for k in study["near"]["steps"]:
            for cut in (False, True):
                pairs = near_pairs(near, k, cut, i)
                if pairs:
                    out.append(f"- Feature space {i + 1}, K = {k}, {'cut at 0.9' if cut else 'whole'}: PF (LTG) minus "
                               f"SiT (uniform t) {spaces.fmt_pairs(pairs)}.")
    return out


def summary_lines(study: dict) -> list[str]:
    """Lines for the main report's conclusion (it takes the first two): the near-data test at the
    largest K, finding 1 on foreground patches, and the adaptive samplers under both protocols
    (first feature space)."""
    data = collect(study)
    out = []
    near = [p for p in data["points"] if p["stage"] == "near"]
    for k in sorted(study["near"]["steps"], reverse=True):  # the largest K measured in both arms, whole and cut
        parts = []
        for cut in (False, True):
            pairs = near_pairs(near, k, cut)
            if pairs:
                parts.append(f"{'cut at t = 0.9 and finished in one step' if cut else 'whole'} "
                             + spaces.fmt_pairs(pairs))
        if len(parts) == 2:
            ns = study["near"]["sample_seeds"]
            out.append(f"- Why (the first study's kept models, 3000 steps, [docs/diagnostics.md](docs/diagnostics.md); "
                       f"{study['eval']['num_samples']} images, {len(ns)} sampling seed{'s' if len(ns) > 1 else ''}): "
                       f"PF (LTG) minus SiT (uniform t) FID with Euler K = {k}, " + "; ".join(parts) + ".")
            break
    fg = [r for r in data["foreground"] if r["times"] and r["arm"] == "pf_ltg"]
    if fg:
        s_mid = min((t["s"] for t in fg[0]["times"]), key=lambda v: abs(v - 0.6))
        rows = [next(t for t in r["times"] if t["s"] == s_mid) for r in fg]
        mean = lambda k: sum(t[k] for t in rows) / len(rows)  # noqa: E731
        out.append(f"- Finding 1 on PF (LTG) at s = {s_mid:g} (n = {len(rows)} training seeds, "
                   "[docs/diagnostics.md](docs/diagnostics.md)): the predicted variance ranks the actual error with "
                   f"Spearman {mean('spearman_all'):.2f} over all patches but {mean('spearman_foreground'):.2f} over "
                   f"foreground patches; {100 * mean('certain_background_share'):.0f}% of the patches the adaptive "
                   "samplers treat as certain are background.")
    ad = [p for p in data["points"] if p["stage"] == "adaptive"]
    if ad:
        out.append("- Adaptive samplers on PF (LTG) (training seed " + str(study["adaptive"]["seed"]) + ", n = 1 run), "
                   "FID with " + " / ".join(f"{r} selection" for r in study["adaptive"]["rules"]) + ": "
                   + "; ".join(adaptive_cells(ad, study["adaptive"]["rules"])) + ".")
    return out


def adaptive_cells(points: list[dict], rules: list[str]) -> list[str]:
    """One cell per sampler and protocol, the selection rules' FIDs side by side (first feature
    space; "-" for a rule not measured yet), ordered by sampler and NFE."""
    cells: dict = {}
    for p in points:
        cells.setdefault((p["sampler"], p["nfe"], p["protocol"], p["steps"]), {})[p["rule"]] = p["fid"]
    return [f"{sampler} {protocol} (K = {k}, NFE {nfe}) "
            + " / ".join(f"{fids[r]:.2f}" if r in fids else "-" for r in rules)
            for (sampler, nfe, protocol, k), fids in sorted(cells.items())]


SUMMARY = "summary.json"  # the lines the main report's conclusion takes, beside the records


def write_report(study: dict, command_line: str) -> None:
    """The page, and its summary lines for the main report (``<points_dir>/summary.json``)."""
    data = collect(study)
    Path(study["page"]).parent.mkdir(parents=True, exist_ok=True)
    Path(study["page"]).write_text(render(study, data, command_line))
    write_json(Path(study["points_dir"]) / SUMMARY, {"lines": summary_lines(study), "page": study["page"]})


def main(cfg, argv: list[str] | None = None) -> None:
    """Run (or continue) the stages, records in ``points_dir``; then the page."""
    command.run_study(cfg, argv, build_stages, write_report, DOC_COMMAND, "page", records="points_dir")


if __name__ == "__main__":
    sys.exit(command.main(main, DEFAULTS, __doc__, free=FREE, toy=TOY))
