"""The paper's findings, each measured and drawn: ``python -m pf.experiments.findings [key=value ...]``.

Uses the study of ``pf.experiments.reproduce`` (the same ``out_dir`` and ``records_dir``, data, recipe and keys,
so its trained models and evaluation points are reused) and writes ``docs/findings.md``:

1. *Uncertainty tracks difficulty*: on held-out test images noised to a time ``s`` (every
   patch at ``s``), each patch's predicted variance (``exp(logvar)`` averaged over the patch)
   against its actual squared velocity error; rank correlation pooled and within images, and
   the error per bin of predicted variance.
2. *Context helps*: the error of the uncertain patches (all but the ``p`` least uncertain)
   when the certain ones are moved ahead to ``min(s * ratio, 1)`` (as look-ahead moves them,
   along the model's own velocity; and, as an upper bound, to their true noisy value there),
   against when they are not, and against a control: the same patches at the same later time
   holding another image's true noisy value (a change of context that says nothing of this image).
3. *Context reduces uncertainty*: the predicted variance of the same patches in both cases.
4. *The timestep-sampler ablation*: PF trained with each timestep sampler of SPEC section 4 at
   one (smaller, stated) budget; FID with Euler and look-ahead.
5. *Patch selection at fixed compute*: the adaptive samplers with the patches that go ahead
   chosen by uncertainty (the method), at random, and most-uncertain first (a control).

Every stage is cached and resumable like the comparison's (``jobs=2`` for two processes).
``toy=true`` is a minute-sized run of everything (CI).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

import pf_kernels
from pf import samplers
from pf.experiments import command, comparison, plots
from pf.experiments.common import (TrainedRun, device_name, forward_with_uncertainty, held_out_batch, patch_stats,
                                   weights_fingerprint)
from pf.experiments.comparison import ARMS, SAMPLER_LABELS, stage_study
from pf.experiments.curves import by_run, evaluate_point, sampler_params, steps_for_nfe, stored_point
from pf.experiments.stages import Stage, stage_result
from pf.experiments.summary import fmt, mean_std, paired, rel, spread_sentence, stage_table, verdict
from pf.flow import interpolate, time_to_pixels
from pf.models import load_checkpoint
from pf.samplers import certain_patches

DEFAULTS = copy.deepcopy(comparison.DEFAULTS)
DEFAULTS.update({
    "page": "docs/findings.md",
    "findings": {
        "arms": ["pf_ltg", "pf_logit_normal"],   # models of findings 1-3 (main budget, every training seed)
        "images": 1000,                          # held-out test images for findings 1-3
        "times": [0.2, 0.4, 0.6, 0.8],           # the noise level s of every patch
        "p": 0.4,                                # fraction of certain patches (moved ahead)
        "context_t_ratio": 1.4,
        "bins": 10,
        "ablation": {
            "steps": 1000,                       # the ablation's (smaller) training budget
            "seed": 0,
            "samplers": ["independent", "uniform", "logit_normal", "gaussian", "truncated_gaussian", "srm", "ltg"],
            "eval": [["euler_pf", 25], ["look_ahead", 25]],   # sampler and target NFE
        },
        "selection": {
            "samplers": ["dual_loop", "look_ahead"],
            "rules": ["uncertainty", "random", "most_uncertain"],
            "nfe": 50,
            "train_seeds": [0],
        },
    },
})
TOY = [*comparison.TOY, "findings.images=40", "findings.times=[0.3,0.7]", "findings.bins=4",
       "findings.ablation.steps=2", "findings.ablation.eval=[[euler_pf,2],[look_ahead,3]]", "findings.selection.nfe=4",
       "findings.ablation.samplers=[independent,ltg]"]
FREE = (*comparison.FREE, "findings.ablation", "findings.selection")
DOC_COMMAND = "python -m pf.experiments.findings"


#################################################################################
#                        Findings 1-3: uncertainty and context                  #
#################################################################################


def _rank_rows(a):
    # scipy is an optional dependency (the ``eval`` extra): imported where a finding is measured
    from scipy.stats import rankdata

    return rankdata(a, axis=1)


def _row_corr(a, b):
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (numpy (B, N))."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = (a * a).sum(1) ** 0.5 * (b * b).sum(1) ** 0.5
    return (a * b).sum(1) / den


def uncertainty_stage(study: dict, arm: str, seed: int) -> dict:
    """Stage: findings 1-3 for one trained model, on held-out test images."""
    # scipy is an optional dependency (the ``eval`` extra): imported where a finding is measured
    from scipy.stats import spearmanr

    fc = study["findings"]
    run = TrainedRun(study, ARMS[arm]["overrides"], seed, study["train"]["steps"])
    model = load_checkpoint(run.checkpoint(), use_ema=True).eval()
    x1, labels, x0 = held_out_batch(study, int(fc["images"]), noise_seed=1234)  # x1, x0: (B, 1, S, S)
    ps = model.patch_size
    n = (x1.shape[-1] // ps) ** 2
    out = {"arm": arm, "seed": seed, "images": int(x1.shape[0]), "weights": weights_fingerprint(model),
           "times": []}
    map_s = min((float(s) for s in fc["times"]), key=lambda s: abs(s - 0.5))  # the time of the pictured maps
    for s in fc["times"]:
        s = float(s)
        t = torch.full((x1.shape[0], n), s)
        xt, target = interpolate(x1, x0, t, ps)
        v, lv = forward_with_uncertainty(model, xt, t, labels)
        var, err = patch_stats(v, lv, target, ps)  # (B, N)
        a, b = var.numpy(), err.numpy()
        within = _row_corr(_rank_rows(a), _rank_rows(b))
        edges = np.quantile(a.ravel(), np.linspace(0, 1, int(fc["bins"]) + 1))
        which = np.clip(np.searchsorted(edges, a.ravel(), side="right") - 1, 0, int(fc["bins"]) - 1)
        bins = [{"var": float(a.ravel()[which == k].mean()), "err": float(b.ravel()[which == k].mean())}
                for k in range(int(fc["bins"])) if (which == k).any()]

        # context: the certain patches moved ahead, the uncertain ones left at s
        certain = certain_patches(lv, ps, float(fc["p"]))  # (B, N)
        uncertain = ~certain
        d = min(s * float(fc["context_t_ratio"]), 1.0) - s
        t_ctx = torch.where(certain, torch.full_like(t, s + d), t)
        x_model = pf_kernels.patch_euler(xt, v, torch.full_like(t, d), ps, mask=certain)  # look-ahead's move
        x_true, _ = interpolate(x1, x0, t_ctx, ps)  # the certain patches' true noisy value at s + d
        # control: the same patches at the same later time, but holding another image's true noisy
        # value there (the next one of the batch): a change of context that tells nothing about this
        # image, so what it does to the uncertain patches is what any change would do
        x_other, _ = interpolate(x1.roll(1, 0), x0.roll(1, 0), t_ctx, ps)
        moved = time_to_pixels(certain, ps, xt.shape[-2], xt.shape[-1])  # (B, 1, H, W) bool
        x_shuffled = torch.where(moved, x_other, xt)
        rows = {}
        for name, x_ctx in (("model", x_model), ("true", x_true), ("other", x_shuffled)):
            v2, lv2 = forward_with_uncertainty(model, x_ctx, t_ctx, labels)
            var2, err2 = patch_stats(v2, lv2, target, ps)
            rows[name] = (var2, err2)

        def on_uncertain(values):
            """Per image: mean over its uncertain patches."""
            return (values * uncertain).sum(1) / uncertain.sum(1).clamp(min=1)

        base_err, base_var = on_uncertain(err), on_uncertain(var)
        context = {}
        for name, (var2, err2) in rows.items():
            e2, u2 = on_uncertain(err2), on_uncertain(var2)
            context[name] = {"err": float(e2.mean()), "var": float(u2.mean()),
                             "err_change": float((e2.mean() - base_err.mean()) / base_err.mean()),
                             "var_change": float((u2.mean() - base_var.mean()) / base_var.mean()),
                             "err_lower_frac": float((e2 < base_err).double().mean()),
                             "var_lower_frac": float((u2 < base_var).double().mean())}
        out["times"].append({
            "s": s, "context_t": s + d, "spearman_pooled": float(spearmanr(a.ravel(), b.ravel()).statistic),
            "spearman_within": float(np.nanmean(within)), "bins": bins,
            "certain_err": float(((err * certain).sum(1) / certain.sum(1).clamp(min=1)).mean()),
            "uncertain_err": float(base_err.mean()), "uncertain_var": float(base_var.mean()), "context": context})
        if s == map_s:
            maps = Path(study["out_dir"]) / "findings" / f"maps_{arm}_{seed}_{s}.pt"
            maps.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"x1": x1[:8].clone(), "xt": xt[:8].clone(), "var": var[:8].float().clone(),
                        "err": err[:8].float().clone(), "certain": certain[:8].clone(), "s": s}, maps)
            out["maps"] = str(maps)
    return out


#################################################################################
#                      Findings 4 and 5: ablation and selection                 #
#################################################################################


def ablation_overrides(name: str) -> list[str]:
    return ["trainer=pf", f"trainer.timesteps.name={name}"]


def ablation_stage(study: dict, sampler_name: str) -> dict:
    """Stage: PF trained with one timestep sampler at the ablation budget, and its FID points."""
    ac = study["findings"]["ablation"]
    seed = int(ac["seed"])
    run = TrainedRun(study, ablation_overrides(sampler_name), seed, int(ac["steps"]))
    points = []
    for name, target in ac["eval"]:
        params = sampler_params(study, name)
        k = steps_for_nfe(samplers.make(name, **params), int(target))
        for sseed in study["eval"]["seeds"]:
            p = evaluate_point(study, run.identity, name, params, k, sseed, model=run.model)
            points.append({"sampler": name, "target_nfe": int(target), "steps": k, "train_seed": seed,
                           "sample_seed": int(sseed), **p})
    trained = run.trained  # the run's losses and time (a fresh clone retrains it for them)
    return {"train": {k: trained[k] for k in ("val_loss", "final_loss", "train_seconds", "steps")}, "points": points}


def selection_stage(study: dict, sampler: str, rule: str, seed: int) -> dict:
    """Stage: one adaptive sampler with one selection rule at the fixed NFE, every sampling seed."""
    sc = study["findings"]["selection"]
    run = TrainedRun(study, ARMS["pf_ltg"]["overrides"], seed, study["train"]["steps"])
    params = sampler_params(study, sampler)
    if rule != "uncertainty":  # the method's own points are the comparison's (same key)
        params = {**params, "selection": rule}
    k = steps_for_nfe(samplers.make(sampler, **params), int(sc["nfe"]))
    points = []
    for sseed in study["eval"]["seeds"]:
        if rule == "random":
            params = {**params, "selection_seed": int(sseed)}
        p = evaluate_point(study, run.identity, sampler, params, k, sseed, model=run.model)
        points.append({"steps": k, "train_seed": seed, "sample_seed": int(sseed), **p})
    return {"points": points}


def build_stages(study: dict) -> list[Stage]:
    """The ablation's own training runs first; then, model by model of the comparison, every
    stage that reads it (findings 1-3, the selection, the ablation arm on its trajectory): a
    trained model lives only in ``out_dir``, which a fresh clone does not have, so a study
    continued elsewhere retrains only the model it stopped at."""
    fc = study["findings"]
    stages = [Stage("classifier", "pf.experiments.common:classifier_stage", {"study": stage_study(study)})]
    study = stage_study(study, keep=("findings",))
    ac, sc = fc["ablation"], fc["selection"]
    ablation = {name: Stage(f"ablation {name}", "pf.experiments.findings:ablation_stage",
                            {"study": study, "sampler_name": name}, deps=("classifier",)) for name in ac["samplers"]}
    # an ablation sampler that is an arm of the comparison (same overrides) reuses that arm's trajectory
    on_arm = {arm: name for name in ablation for arm in ARMS if ARMS[arm]["overrides"] == ablation_overrides(name)}
    selection = {seed: [Stage(f"selection {sampler} {rule} seed {seed}", "pf.experiments.findings:selection_stage",
                              {"study": study, "sampler": sampler, "rule": rule, "seed": int(seed)},
                              deps=("classifier",)) for sampler in sc["samplers"] for rule in sc["rules"]]
                 for seed in sc["train_seeds"]}
    stages += [st for name, st in ablation.items() if name not in on_arm.values()]
    for seed in study["train"]["seeds"]:
        for arm in fc["arms"]:
            stages.append(Stage(f"uncertainty {arm} seed {seed}", "pf.experiments.findings:uncertainty_stage",
                                {"study": study, "arm": arm, "seed": int(seed)}))
            if arm == "pf_ltg":
                stages += selection.pop(seed, [])
            if seed == int(ac["seed"]) and arm in on_arm:
                stages.append(ablation[on_arm.pop(arm)])
    # what reads a model the findings do not otherwise load
    stages += [st for sts in selection.values() for st in sts] + [ablation[name] for name in on_arm.values()]
    return stages


#################################################################################
#                                    Report                                     #
#################################################################################


def collect(study: dict) -> dict:
    out = {"stages": [], "uncertainty": [], "selection": {}, "ablation": {}}
    for s in build_stages(study):
        rec = stage_result(study["records_dir"], s)
        out["stages"].append((s.name, rec["seconds"] if rec else None))
        if rec is None or s.name == "classifier":
            continue
        if s.name.startswith("uncertainty"):
            out["uncertainty"].append(rec["result"])
        elif s.name.startswith("selection"):
            out["selection"].setdefault((s.args["sampler"], s.args["rule"]), []).extend(rec["result"]["points"])
        else:
            out["ablation"][s.args["sampler_name"]] = rec["result"]
    return out


def plot_uncertainty(data: dict, path: Path) -> None:
    """Finding 1 (binned predicted variance against the actual error) and findings 2 and 3 (the
    uncertain patches' error and variance with and without context), PF (LTG) where measured."""
    plt = plots.pyplot()
    results = [r for r in data["uncertainty"] if r["arm"] == "pf_ltg"] or data["uncertainty"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = plt.get_cmap("viridis")
    times = [t["s"] for t in results[0]["times"]]
    for i, s in enumerate(times):
        for j, r in enumerate(results):
            row = next(t for t in r["times"] if t["s"] == s)
            xs, ys = [b["var"] for b in row["bins"]], [b["err"] for b in row["bins"]]
            ax[0].plot(xs, ys, "-o" if j == 0 else "--", color=cmap(i / max(len(times) - 1, 1)), ms=3,
                       label=f"s={s}" if j == 0 else None)
    lo = min(b["var"] for r in results for t in r["times"] for b in t["bins"])
    hi = max(b["var"] for r in results for t in r["times"] for b in t["bins"])
    ax[0].plot([lo, hi], [lo, hi], "k:", lw=0.8, label="error = variance")
    ax[0].set(xscale="log", yscale="log", xlabel="predicted variance (bin mean)", ylabel="actual squared error (bin mean)",
              title=f"1. uncertainty tracks difficulty ({ARMS[results[0]['arm']]['label']})")
    ax[0].legend(fontsize=7)
    kinds = [("model", "certain moved ahead (model, as look-ahead)", "tab:blue"),
             ("true", "certain moved ahead (true values)", "tab:green"),
             ("other", "control: another image's patches there", "tab:orange")]
    kinds = [k for k in kinds if all(k[0] in t["context"] for r in results for t in r["times"])]
    width = 0.8 / (len(kinds) + 1)
    for k, (key, title) in enumerate((("err", "2. error of the uncertain patches"),
                                      ("var", "3. predicted variance of the uncertain patches"))):
        a = ax[k + 1]
        xs = range(len(times))
        base = [mean_std([next(t for t in r["times"] if t["s"] == s)[f"uncertain_{key}"] for r in results])[0]
                for s in times]
        a.bar([x - 0.4 + width / 2 for x in xs], base, width, label="no context", color="tab:gray")
        for j, (kind, label, color) in enumerate(kinds, start=1):
            vals = [mean_std([next(t for t in r["times"] if t["s"] == s)["context"][kind][key] for r in results])[0]
                    for s in times]
            a.bar([x - 0.4 + width * (j + 0.5) for x in xs], vals, width, label=label, color=color)
        a.set_xticks(list(xs), [f"s={s}" for s in times])
        a.set(title=title)
        a.legend(fontsize=7)
    plots.save(fig, path)


def plot_maps(data: dict, path: Path) -> bool:
    """Per-patch predicted variance beside the actual error on a few test images (PF, LTG)."""
    plt = plots.pyplot()
    r = next((r for r in data["uncertainty"] if r["arm"] == "pf_ltg" and r.get("maps")), None)
    if r is None or not Path(r["maps"]).is_file():
        return False
    m = torch.load(r["maps"], weights_only=True)
    n = m["x1"].shape[0]
    g = int(m["var"].shape[1] ** 0.5)
    fig, ax = plt.subplots(4, n, figsize=(1.4 * n, 6))
    rows = [("clean test image", m["x1"][:, 0], "gray"), (f"noisy, s={m['s']}", m["xt"][:, 0], "gray"),
            ("predicted variance", m["var"].reshape(n, g, g), "magma"), ("actual error", m["err"].reshape(n, g, g), "magma")]
    for i, (title, values, cmap) in enumerate(rows):
        for j in range(n):
            ax[i, j].imshow(values[j].numpy(), cmap=cmap)
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
        ax[i, 0].set_ylabel(title, fontsize=7)
    fig.suptitle("per-patch predicted variance against the actual error (PF, LTG; brighter = larger)", fontsize=9)
    plots.save(fig, path)
    return True


def render(study: dict, data: dict, command_line: str) -> str:
    """docs/findings.md: a section per finding measured so far, then the stage times."""
    figures, page = Path(study["figures"]), Path(study["page"])
    lines = header(study, data, command_line, page)
    if data["uncertainty"]:
        lines += uncertainty_section(study, data["uncertainty"], figures, page)
        lines += context_section(study, data["uncertainty"])
    if data["ablation"]:
        lines += ablation_section(study, data["ablation"], figures, page)
    if data["selection"]:
        lines += selection_section(study, data["selection"], figures, page)
    lines += stage_table(data["stages"])
    return "\n".join(lines) + "\n"


def header(study: dict, data: dict, command_line: str, page: Path) -> list[str]:
    tc = study["train"]
    return ["# The paper's findings, measured at small scale", "",
            f"Generated by `pf/experiments/findings.py` from the stages finished so far "
            f"({sum(s is not None for _, s in data['stages'])} of {len(data['stages'])}); regenerate (or continue) "
            f"with:", "", "```", command_line, "```", "",
            f"Data `data={study['data']}` {study['image_size']}x{study['image_size']}, `model={study['model']}`; the "
            f"models of the main comparison ([docs/reproduce-v1.md]({rel('docs/reproduce-v1.md', page)}): {tc['steps']} steps, batch "
            f"{tc['batch_size']}, lr {tc['lr']}, training seeds {list(tc['seeds'])}). Held-out test images only. "
            f"Device: {device_name(study)}.", ""]


def uncertainty_section(study: dict, unc: list[dict], figures: Path, page: Path) -> list[str]:
    """Finding 1: rank correlation of the predicted variance with the actual error, per model and s."""
    fc = study["findings"]
    lines = ["## 1. Uncertainty tracks difficulty", "",
             f"{unc[0]['images']} test images, every patch noised to the same time s (fixed noise), one forward "
             f"pass: per patch the predicted variance (exp(logvar) averaged over the patch) and the actual "
             f"squared error of the velocity. Spearman rank correlation over all patches pooled, and within an "
             f"image (what the samplers use: they rank the patches of one image), mean ± std over training "
             f"seeds.", "",
             f"![uncertainty against error]({rel(figures / 'uncertainty.png', page)})", "",
             "| model | s | Spearman pooled | Spearman within an image | error of the certain / uncertain patches |",
             "|---|---|---|---|---|"]
    for arm in fc["arms"]:
        rs = [r for r in unc if r["arm"] == arm]
        if not rs:
            continue
        for s in fc["times"]:
            rows = [next(t for t in r["times"] if t["s"] == float(s)) for r in rs]
            lines.append(f"| {ARMS[arm]['label']} | {s} | {fmt([t['spearman_pooled'] for t in rows], 3)} | "
                         f"{fmt([t['spearman_within'] for t in rows], 3)} | "
                         f"{mean_std([t['certain_err'] for t in rows])[0]:.4f} / "
                         f"{mean_std([t['uncertain_err'] for t in rows])[0]:.4f} |")
    if (figures / "difficulty_maps.png").is_file():
        lines += ["", f"![difficulty maps]({rel(figures / 'difficulty_maps.png', page)})"]
    return lines


def context_section(study: dict, unc: list[dict]) -> list[str]:
    """Findings 2 and 3: the uncertain patches' error and predicted variance with context, and
    the statements on findings 1-3."""
    fc = study["findings"]
    lines = ["", "## 2 and 3. Context helps, and reduces uncertainty", "",
             f"The same images: the certain patches (the {fc['p']} least uncertain) moved ahead to "
             f"min(s x {fc['context_t_ratio']}, 1), either along the model's own velocity (as look-ahead moves "
             f"them) or to their true noisy value there (an upper bound), the uncertain ones left at s; a second "
             f"pass. Control (*other image*): the same patches at the same later time holding the true noisy "
             f"value of another test image, a change of context that says nothing about this one. Mean over the "
             f"uncertain patches, relative change against no context, and the share of images where it went "
             f"down; mean over training seeds.", "",
             "| model | s -> context t | uncertain-patch error: no context | with context (model) | "
             "with context (true) | control (other image) | predicted variance: no context | with context (model) "
             "| with context (true) | control (other image) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in fc["arms"]:
        rs = [r for r in unc if r["arm"] == arm]
        for s in fc["times"] if rs else []:
            rows = [next(t for t in r["times"] if t["s"] == float(s)) for r in rs]

            def cell(kind, key, rows=rows):
                if kind not in rows[0]["context"]:  # a record from before the control was measured
                    return "not measured"
                m = mean_std([t["context"][kind][key] for t in rows])[0]
                ch = mean_std([t["context"][kind][f"{key}_change"] for t in rows])[0]
                fr = mean_std([t["context"][kind][f"{key}_lower_frac"] for t in rows])[0]
                return f"{m:.4f} ({ch * 100:+.1f}%, lower in {fr * 100:.0f}% of images)"

            lines.append(f"| {ARMS[arm]['label']} | {s} -> {rows[0]['context_t']:.2f} | "
                         f"{mean_std([t['uncertain_err'] for t in rows])[0]:.4f} | {cell('model', 'err')} | "
                         f"{cell('true', 'err')} | {cell('other', 'err')} | "
                         f"{mean_std([t['uncertain_var'] for t in rows])[0]:.4f} | "
                         f"{cell('model', 'var')} | {cell('true', 'var')} | {cell('other', 'var')} |")
    return lines + [""] + uncertainty_statements(fc, unc)


def ablation_section(study: dict, ab: dict, figures: Path, page: Path) -> list[str]:
    """Finding 4: FID of PF trained with each timestep sampler at the ablation's budget."""
    fc, ec, tc = study["findings"], study["eval"], study["train"]
    ac = fc["ablation"]
    lines = ["", "## 4. The timestep-sampler ablation", "",
             f"PF (same network, recipe and seed {ac['seed']}) trained for **{ac['steps']} steps** (a smaller "
             f"budget than the comparison's {tc['steps']}) with each timestep sampler of SPEC section 4; FID "
             f"against the test split, {ec['num_samples']} images, mean ± std over {len(ec['seeds'])} sampling "
             f"seeds.", "",
             f"![ablation]({rel(figures / 'ablation.png', page)})", "",
             "| timestep sampler | validation MSE | " + " | ".join(
                 f"{SAMPLER_LABELS[n]} NFE ~{t}" for n, t in ac["eval"]) + " |",
             "|---|---|" + "---|" * len(ac["eval"])]
    for name in ac["samplers"]:
        r = ab.get(name)
        if r is None:
            lines.append(f"| {name} | pending |" + " pending |" * len(ac["eval"]))
            continue
        cells = []
        for sname, target in ac["eval"]:
            runs = list(by_run(r["points"], sampler=sname, target_nfe=int(target)).values())
            cells.append(f"{fmt([p['fid'] for p in runs])} (K={runs[0]['steps']}, NFE {runs[0]['nfe']})")
        lines.append(f"| {name} | {r['train']['val_loss']:.4f} | " + " | ".join(cells) + " |")
    return lines + [""] + ablation_statements(fc, ab) + [
        "", f"Each sampler here is one training run (seed {ac['seed']}); the ± is the sampling seeds' spread alone. "
        + spread_sentence(study["records_dir"])]


def selection_section(study: dict, sel: dict, figures: Path, page: Path) -> list[str]:
    """Finding 5: the adaptive samplers with each patch selection rule at a fixed NFE, against
    each other and against Euler with every patch together."""
    sc, tc = study["findings"]["selection"], study["train"]
    lines = ["", "## 5. Patch selection at fixed compute", "",
             f"PF (LTG), {tc['steps']} steps, training seed(s) {list(sc['train_seeds'])}; the adaptive samplers at "
             f"NFE ~{sc['nfe']} with the patches that go ahead chosen by uncertainty (the method: least "
             f"uncertain first), at random (as many patches), or most uncertain first; FID mean ± std over "
             f"{len(study['eval']['seeds'])} sampling seeds, paired by seed.", "",
             f"![patch selection]({rel(figures / 'selection.png', page)})", "",
             "| sampler | " + " | ".join(sc["rules"]) + " |", "|---|" + "---|" * len(sc["rules"])]
    for sampler in sc["samplers"]:
        cells = []
        for rule in sc["rules"]:
            pts = sel.get((sampler, rule), [])
            cells.append(f"{fmt([p['fid'] for p in pts])} (K={pts[0]['steps']}, NFE {pts[0]['nfe']})"
                         if pts else "pending")
        lines.append(f"| {SAMPLER_LABELS[sampler]} | " + " | ".join(cells) + " |")
    lines.append("")
    euler = parallel_points(study)
    if euler:
        lines.append(f"For reference, Euler with every patch together at K={sc['nfe']} (NFE {sc['nfe']}; the main "
                     f"comparison's point of the same model): FID {fmt([p['fid'] for p in euler.values()])}.")
        lines.append("")
    return lines + selection_statements(sc, sel, euler)


def selection_statements(sc: dict, sel: dict, euler: dict) -> list[str]:
    """Uncertainty-guided selection against the other rules, and each rule against Euler."""
    lines = []
    for sampler in sc["samplers"]:
        base = by_run(sel.get((sampler, "uncertainty"), []))
        for rule in sc["rules"]:
            if rule != "uncertainty" and (sampler, rule) in sel:
                d = paired(by_run(sel[(sampler, rule)]), base)
                lines.append(f"- {SAMPLER_LABELS[sampler]}: uncertainty-guided against {rule} "
                             f"selection, FID difference {verdict(d)} (negative: uncertainty-guided is better).")
        for rule in ("random", "uncertainty"):
            if euler and (sampler, rule) in sel:
                d = paired(euler, by_run(sel[(sampler, rule)]))
                lines.append(f"- {SAMPLER_LABELS[sampler]} with {rule} selection against Euler (every "
                             f"patch together) at about the same NFE, FID difference {verdict(d)} (negative: "
                             f"{rule} selection is better"
                             + ("; the paper: random selection is worse than plain parallel sampling)."
                                if rule == "random" else ")."))
    return lines


def parallel_points(study: dict) -> dict:
    """The main comparison's stored Euler points of PF (LTG) at the selection's NFE, by (training
    seed, sampling seed): the plain parallel sampler that finding 5 is measured against."""
    sc, k = study["findings"]["selection"], int(study["findings"]["selection"]["nfe"])
    out = {}
    for seed in sc["train_seeds"]:
        identity = TrainedRun(study, ARMS["pf_ltg"]["overrides"], seed, study["train"]["steps"]).identity
        for sseed in study["eval"]["seeds"]:
            p = stored_point(study, identity, "euler_pf", {}, k, int(sseed))
            if p is not None:
                out[(int(seed), int(sseed))] = p
    return out


def uncertainty_statements(fc: dict, unc: list[dict]) -> list[str]:
    out = []
    rs = [r for r in unc if r["arm"] == "pf_ltg"]
    if not rs:
        return out
    pooled = [t["spearman_pooled"] for r in rs for t in r["times"]]
    within = [t["spearman_within"] for r in rs for t in r["times"]]
    out.append(f"- Finding 1 (PF, LTG): the predicted variance ranks the actual error with Spearman "
               f"{min(pooled):.2f} to {max(pooled):.2f} pooled and {min(within):.2f} to {max(within):.2f} within an "
               f"image over s = {list(fc['times'])}: "
               + ("uncertainty tracks difficulty, as the paper says." if min(within) > 0.3 else
                  "weaker than the paper suggests at some times." if max(within) > 0.3 else
                  "it does **not** track it well here."))
    times = [t["s"] for t in rs[0]["times"]]

    def where(values: dict) -> str:
        lower = [s for s in times if values[s] < 0]
        return ("at every time" if len(lower) == len(times) else "at no time" if not lower else
                f"at {len(lower)} of {len(times)} times ({', '.join(f's={s}' for s in lower)})")

    for kind, what in (("model", "moved along the model's velocity (as look-ahead moves them)"),
                       ("true", "set to their true noisy values (an upper bound)")):
        changes = {s: _mean_change(rs, s, kind) for s in times}
        err, var = ({s: c[i] for s, c in changes.items()} for i in (0, 1))
        out.append(f"- Findings 2 and 3, certain patches {what}: the uncertain patches' error changes by "
                   f"{min(err.values()) * 100:+.1f}% to {max(err.values()) * 100:+.1f}%, lower {where(err)}; their "
                   f"predicted variance by {min(var.values()) * 100:+.1f}% to {max(var.values()) * 100:+.1f}%, lower "
                   f"{where(var)}.")
    if all("other" in t["context"] for r in rs for t in r["times"]):
        err, var = (list(v) for v in zip(*(_mean_change(rs, s, "other") for s in times)))
        out.append(f"- Control, the same patches holding another image's values at the same later time: the uncertain "
                   f"patches' error changes by {min(err) * 100:+.1f}% to {max(err) * 100:+.1f}% and their predicted "
                   f"variance by {min(var) * 100:+.1f}% to {max(var) * 100:+.1f}%: "
                   + ("the network reads what the moved patches hold, not only their later time (a context that does "
                      "not fit the image hurts)." if min(err) > 0 else
                      "a context that does not fit the image does not hurt at every time here."))
    other = [r for r in unc if r["arm"] == "pf_logit_normal"]
    if other:
        times = sorted({t["s"] for t in rs[0]["times"]} & {t["s"] for t in other[0]["times"]})
        ltg = sum(_mean_change(rs, s, "model")[0] for s in times) / len(times)
        ln = sum(_mean_change(other, s, "model")[0] for s in times) / len(times)
        out.append(f"- Context along the model's own velocity, the uncertain patches' error, mean over s = {times}: "
                   f"{ltg * 100:+.1f}% for PF (LTG) against {ln * 100:+.1f}% for the PF network trained with one time "
                   f"per sample (never shown patches at different times): "
                   + ("training with heterogeneous times makes the context more useful here." if ltg < ln else
                      "training with heterogeneous times does **not** make the context more useful here."))
    return out


def _mean_change(records: list[dict], s: float, kind: str) -> tuple[float, float]:
    """(error change, variance change) of the uncertain patches with context ``kind`` at time
    ``s``, mean over the training seeds' records."""
    rows = [next(t for t in r["times"] if t["s"] == s)["context"][kind] for r in records]
    return (sum(c["err_change"] for c in rows) / len(rows), sum(c["var_change"] for c in rows) / len(rows))


def ablation_statements(fc: dict, ab: dict) -> list[str]:
    """The ranking of the arms measured so far; a verdict on the paper's claims only once every
    arm is measured (one training seed each: the ± is the sampling seeds' spread alone)."""
    out = []
    names = list(fc["ablation"]["samplers"])
    pending = [n for n in names if n not in ab]
    for sname, target in fc["ablation"]["eval"]:
        means = {n: mean_std([p["fid"] for p in by_run(r["points"], sampler=sname, target_nfe=int(target)).values()])[0]
                 for n, r in ab.items()}
        if len(means) < 2:
            continue
        order = sorted(means, key=means.get)
        text = (f"- {SAMPLER_LABELS[sname]} NFE ~{target}, best to worst FID of the {len(order)} of "
                f"{len(names)} samplers measured: " + ", ".join(f"{n} {means[n]:.2f}" for n in order) + ". ")
        if pending:
            text += f"No verdict until {', '.join(pending)} {'is' if len(pending) == 1 else 'are'} measured."
        else:
            rank = {n: order.index(n) + 1 for n in order}
            text += ("LTG is **best**, as the paper says" if rank.get("ltg") == 1 else
                     f"LTG is **not** best (rank {rank['ltg']} of {len(order)}), against the paper")
            if "independent" in rank:
                text += (f"; independent per-patch times rank {rank['independent']} of {len(order)}"
                         + (", performing poorly as the paper says" if rank["independent"] > len(order) / 2 else
                            ", **not** among the worse half, against the paper"))
            text += (f" (one training run per sampler, seed {fc['ablation']['seed']}: the spread of the training "
                     f"run is not measured).")
        out.append(text)
        if "ltg" in ab and "independent" in ab:
            d = paired(by_run(ab["independent"]["points"], sampler=sname, target_nfe=int(target)),
                       by_run(ab["ltg"]["points"], sampler=sname, target_nfe=int(target)))
            out.append(f"  - LTG against independent, paired by sampling seed: {verdict(d)}.")
    return out


def write_report(study: dict, command_line: str) -> None:
    """The figures, then the page, from what is stored."""
    data = collect(study)
    figures = Path(study["figures"])
    figures.mkdir(parents=True, exist_ok=True)
    if data["uncertainty"]:
        plot_uncertainty(data, figures / "uncertainty.png")
        plot_maps(data, figures / "difficulty_maps.png")
    fc = study["findings"]
    if data["ablation"]:
        groups = []
        for sname, target in fc["ablation"]["eval"]:
            bars = [(n, [p["fid"] for p in by_run(data["ablation"][n]["points"], sampler=sname,
                                                target_nfe=int(target)).values()])
                    for n in fc["ablation"]["samplers"] if n in data["ablation"]]
            groups.append((f"{SAMPLER_LABELS[sname]}, NFE ~{target}", bars))
        plots.bars(groups, figures / "ablation.png", f"PF trained with each timestep sampler "
                   f"({fc['ablation']['steps']} steps): FID against the test split", "FID ↓")
    if data["selection"]:
        groups = [(f"{SAMPLER_LABELS[s]}, NFE ~{fc['selection']['nfe']}",
                   [(r, [p["fid"] for p in data["selection"].get((s, r), [])]) for r in fc["selection"]["rules"]])
                  for s in fc["selection"]["samplers"]]
        plots.bars(groups, figures / "selection.png", "which patches go ahead: FID at fixed compute", "FID ↓")
    Path(study["page"]).parent.mkdir(parents=True, exist_ok=True)
    Path(study["page"]).write_text(render(study, data, command_line))


def expand_toy(argv: list[str]) -> list[str]:
    """``toy=true`` stands for this study's toy sizes."""
    return command.expand_toy(argv, TOY)


def main(cfg, argv: list[str] | None = None) -> None:
    command.run_study(cfg, argv, build_stages, write_report, DOC_COMMAND, "page")


if __name__ == "__main__":
    sys.exit(command.main(main, DEFAULTS, __doc__, free=FREE, toy=TOY))
