"""Inpainting with per-patch times against a global-time model by replacement:
``python -m pf.experiments.inpaint [key=value ...]``.

On the comparison's held-out Fashion-MNIST test images (16x16, 64 patches of 2x2) and its
*kept* weights (``results/study/weights``: PF with LTG and SiT with uniform times, training
seed 0, 3000 steps; nothing is trained here), each mask hides part of the image:

- ``centre_box_25``: the centre 8x8 pixels (25%);
- ``right_half_50``: the right half (50%);
- ``random_patches_75``: 48 of the 64 patches, drawn per image from a fixed seed (75%).

PF completes it with the known patches held clean at t = 1 (``euler_pf``, and ``dual_loop`` /
``look_ahead`` ordering the generated patches by predicted uncertainty); SiT by replacement
(``euler``: the known region re-noised to the current time before each step). No class is
given (the null class, no guidance). Each completion is measured by the accuracy of the
committed feature classifier (``results/classifiers/``, seed 0) on the true labels, the mean squared error to the truth over
the generated pixels (values in [-1, 1]), and the FID of the completed images against the
10,000 held-out test images in that classifier's features. The stages (one per mask, model,
sampler and sampling seed) are cached in ``records_dir`` (``results/inpaint``) and the report
is ``docs/inpaint.md`` with its plots and picture grid. A cell's completions are kept in
``out_dir`` (named by their settings) so its metrics stage reads them back.
``toy=true`` runs it at CI size (12 images, the same kept weights and classifier).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from pf.autoencoder import from_uint8, to_uint8
from pf.encoders.classifier import accuracy, load_classifier
from pf.eval.metrics import compute_metrics
from pf.experiments import command, comparison, plots
from pf.experiments.common import load_test_labels, reference_images, resolve_device, weights_fingerprint
from pf.experiments.comparison import stage_study
from pf.experiments.records import config_key
from pf.experiments.stages import Stage, stage_result
from pf.experiments.summary import fmt, rel, stage_table
from pf.flow import time_to_pixels
from pf.inpaint import box_mask, inpaint
from pf.models import load_checkpoint
from pf.sampling.grid import labelled_panels

DEFAULTS = copy.deepcopy(comparison.DEFAULTS)
DEFAULTS.update({
    "records_dir": "results/inpaint",  # this study's stage records
    "page": "docs/inpaint.md",
    "figures": "docs/inpaint",
    "inpaint": {
        "arms": {"pf_ltg": ["euler_pf", "dual_loop", "look_ahead"], "sit_uniform": ["euler"]},
        # the comparison's kept EMA weights of these arms (training seed 0, 3000 steps; RESULTS.md)
        "weights": {"pf_ltg": "results/study/weights/ea3cfc1ccd38-003000.pt",
                    "sit_uniform": "results/study/weights/4e9c5e4b162a-003000.pt"},
        "train_seed": 0,
        "masks": ["centre_box_25", "right_half_50", "random_patches_75"],
        "steps": {"euler_pf": 10, "euler": 10, "dual_loop": 3, "look_ahead": 6},  # about 10 NFE each
        "num_images": 500,             # the first held-out test images
        "seeds": [0, 1],               # sampling seeds (noise; the random-patch masks are fixed)
        "mask_seed": 1234,
        "grid_images": 8,
        # the committed feature classifier (the evidence study's first feature space, results/classifiers/)
        "classifier": "results/classifiers/fashion_mnist16_seed0.safetensors",
    },
})
DEFAULTS["eval"]["compile"] = False
TOY = ["out_dir=runs/toy-inpaint", "records_dir=runs/toy-inpaint/records", "page=runs/toy-inpaint/inpaint.md",
       "figures=runs/toy-inpaint/figures", "eval.reference_size=200",
       "inpaint.num_images=12", "inpaint.grid_images=3", "inpaint.steps={euler_pf: 2, euler: 2, dual_loop: 1, look_ahead: 2}"]
FREE = (*comparison.FREE, "inpaint.arms", "inpaint.steps")
DOC_COMMAND = "python -m pf.experiments.inpaint"
LABELS = {("pf_ltg", "euler_pf"): "PF Euler", ("pf_ltg", "dual_loop"): "PF dual-loop",
          ("pf_ltg", "look_ahead"): "PF look-ahead", ("sit_uniform", "euler"): "SiT replacement"}
MASK_LABELS = {"centre_box_25": "centre box (25%)", "right_half_50": "right half (50%)",
               "random_patches_75": "random patches (75%)"}


#################################################################################
#                                     Masks                                     #
#################################################################################


def generate_mask(name: str, count: int, size: int, patch: int, seed: int) -> torch.Tensor:
    """(count, 1, size, size) bool, True = generate; every mask is whole patches."""
    if name == "centre_box_25":
        return box_mask(size, [size // 4, size // 4, 3 * size // 4, 3 * size // 4]).repeat(count, 1, 1, 1)
    if name == "right_half_50":
        return box_mask(size, [size // 2, 0, size, size]).repeat(count, 1, 1, 1)
    if name == "random_patches_75":
        n = (size // patch) ** 2
        g = torch.Generator().manual_seed(seed)
        hidden = torch.stack([torch.randperm(n, generator=g) < 3 * n // 4 for _ in range(count)])  # (count, N)
        return time_to_pixels(hidden, patch, size, size).clone()
    raise ValueError(f"unknown mask {name!r}; choose from {sorted(MASK_LABELS)}")


#################################################################################
#                                    Stages                                     #
#################################################################################


def kept_run(study: dict, arm: str) -> str:
    """The kept weights of an arm (``inpaint.weights``): never trained here."""
    path = Path(study["inpaint"]["weights"][arm])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the kept weights of {arm} are not there (inpaint.weights.{arm}=PATH)")
    return str(path)


def truth(study: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out images (uint8 (M, C, H, W)) and labels the completions are measured on."""
    count = int(study["inpaint"]["num_images"])
    return reference_images(study)[:count], load_test_labels(study)[:count]


def classify(study: dict, completed: torch.Tensor, labels: torch.Tensor, seed: int) -> dict:
    """Accuracy of the feature classifier and FID of uint8 completions (M, C, H, W)."""
    classifier_file = str(study["inpaint"]["classifier"])
    classifier, _ = load_classifier(classifier_file)
    with torch.no_grad():
        acc = accuracy(classifier, from_uint8(completed), labels)
    fid = compute_metrics(completed, reference_images(study), extractor="classifier", weights=classifier_file,
                          kid=False, prc=False, seed=int(seed), device=resolve_device(study))["fid"]
    return {"accuracy": acc, "fid": float(fid)}


def masked_mse(completed: torch.Tensor, images: torch.Tensor, generated: torch.Tensor) -> float:
    """Mean squared error over the generated pixels, values in [-1, 1]."""
    err = (from_uint8(completed) - from_uint8(images)) ** 2  # (M, C, H, W)
    return float(err[generated.expand_as(err)].mean())


def completions_file(study: dict, mask: str, arm: str, sampler: str, seed: int) -> Path:
    ic = study["inpaint"]
    settings = config_key({"weights": ic["weights"][arm], "steps": ic["steps"][sampler], "mask_seed": ic["mask_seed"],
                           "params": study["eval"].get(sampler), "image_size": study["image_size"]})
    return (Path(study["out_dir"]) / "inpaint"
            / f"{mask}-{arm}-{sampler}-seed{seed}-n{ic['num_images']}-{settings}.pt")


def complete(study: dict, mask: str, arm: str, sampler: str, seed: int) -> tuple[torch.Tensor, dict]:
    """Every held-out image completed under one mask by one model and sampler: uint8 (M, C, H, W)
    (cached in ``out_dir``) and what the run was (NFE, steps, weights)."""
    ic = study["inpaint"]
    path = completions_file(study, mask, arm, sampler, seed)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["images"], saved["info"]
    images, _ = truth(study)
    model = load_checkpoint(kept_run(study, arm), use_ema=True).to(resolve_device(study)).eval()
    generated = generate_mask(mask, images.shape[0], images.shape[-1], model.patch_size, int(ic["mask_seed"]))
    params = dict(study["eval"].get(sampler, {})) if sampler in ("dual_loop", "look_ahead") else {}
    noise = torch.randn((images.shape[0], *images.shape[1:]), generator=torch.Generator().manual_seed(int(seed)))
    null = torch.full((images.shape[0],), model.num_classes)
    done, nfe = [], None
    for rows in torch.arange(images.shape[0]).split(int(study["eval"]["batch_size"])):
        out = inpaint(model, from_uint8(images[rows]), generated[rows], sampler, steps=int(ic["steps"][sampler]),
                      y=null[rows], noise=noise[rows], sampler_params=params)
        done.append(to_uint8(out.images))
        nfe = out.nfe
    completed = torch.cat(done)
    kept = ~generated.expand_as(images)
    if not torch.equal(completed[kept], images[kept]):
        raise AssertionError("a kept pixel changed")  # the method's promise, checked on every image
    info = {"nfe": nfe, "steps": int(ic["steps"][sampler]), "weights": weights_fingerprint(model),
            "kept_fraction": float(kept.float().mean())}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": completed, "info": info}, path)
    return completed, info


def completion_stage(study: dict, mask: str, arm: str, sampler: str, seed: int) -> dict:
    """Stage: one model and sampler completing every held-out image under one mask; the MSE."""
    completed, info = complete(study, mask, arm, sampler, seed)
    images, _ = truth(study)
    generated = generate_mask(mask, images.shape[0], images.shape[-1], 2, int(study["inpaint"]["mask_seed"]))
    return {**info, "mse": masked_mse(completed, images, generated), "images": int(images.shape[0]),
            "examples": completed[:int(study["inpaint"]["grid_images"])].tolist()}


def metrics_stage(study: dict, mask: str, arm: str, sampler: str, seed: int) -> dict:
    """Stage: class accuracy and FID of one cell's completions (made again if ``out_dir`` lost them)."""
    completed, info = complete(study, mask, arm, sampler, seed)
    _, labels = truth(study)
    return {**classify(study, completed, labels, seed), "weights": info["weights"]}


def baseline_stage(study: dict, mask: str) -> dict:
    """Stage: the yardsticks of one mask: the true images, and the masked input left grey."""
    ic = study["inpaint"]
    images, labels = truth(study)
    generated = generate_mask(mask, images.shape[0], images.shape[-1], 2, int(ic["mask_seed"]))
    grey = torch.where(generated.expand_as(images), torch.full_like(images, 128), images)
    n = int(ic["grid_images"])
    return {"truth": {**classify(study, images, labels, 0), "mse": 0.0},
            "grey": {**classify(study, grey, labels, 0), "mse": masked_mse(grey, images, generated)},
            "examples": {"truth": images[:n].tolist(), "grey": grey[:n].tolist()}}


def build_stages(study: dict) -> list[Stage]:
    shared = stage_study(study, keep=("inpaint",))
    shared.pop("classifier", None)  # the committed classifier (inpaint.classifier) is used, not one trained here
    # a stage gets its own sampling seed: more seeds add stages, and leave the finished ones as they are
    shared["inpaint"] = {k: v for k, v in shared["inpaint"].items() if k != "seeds"}
    stages = []
    for mask in study["inpaint"]["masks"]:
        stages.append(Stage(f"baseline {mask}", "pf.experiments.inpaint:baseline_stage", {"study": shared, "mask": mask}))
        for arm, names in study["inpaint"]["arms"].items():
            for sampler in names:
                for seed in study["inpaint"]["seeds"]:
                    name = f"{mask} {arm} {sampler} seed {seed}"
                    args = {"study": shared, "mask": mask, "arm": arm, "sampler": sampler, "seed": int(seed)}
                    stages.append(Stage(f"complete {name}", "pf.experiments.inpaint:completion_stage", args))
                    stages.append(Stage(f"metrics {name}", "pf.experiments.inpaint:metrics_stage", args,
                                        deps=(f"complete {name}",)))
    return stages


#################################################################################
#                                    Report                                     #
#################################################################################


def collect(study: dict) -> dict:
    out = {"stages": [], "baseline": {}, "cells": {}}
    for s in build_stages(study):
        rec = stage_result(study["records_dir"], s)
        out["stages"].append((s.name, rec["seconds"] if rec else None))
        if rec is None:
            continue
        a = s.args
        if s.fn.endswith("baseline_stage"):
            out["baseline"][a["mask"]] = rec["result"]
        elif s.fn.endswith("completion_stage"):
            out["cells"].setdefault((a["mask"], a["arm"], a["sampler"]), {})[a["seed"]] = dict(rec["result"])
        elif (a["mask"], a["arm"], a["sampler"]) in out["cells"]:
            out["cells"][(a["mask"], a["arm"], a["sampler"])][a["seed"]].update(rec["result"])
    out["cells"] = {k: [r for _, r in sorted(v.items())] for k, v in out["cells"].items()}
    return out


def value(run: dict, key: str) -> float:
    return run.get(key, float("nan"))


def cell(values: list[float], digits: int) -> str:
    """One seed's value, or mean ± std over the seeds."""
    return f"{values[0]:.{digits}f}" if len(values) == 1 else fmt(values, digits)


def results_table(study: dict, data: dict) -> list[str]:
    lines = ["| mask | model, sampler | NFE | class accuracy | MSE, generated pixels | FID |", "|---|---|---|---|---|---|"]
    for mask in study["inpaint"]["masks"]:
        base = data["baseline"].get(mask)
        if base:
            lines.append(f"| {MASK_LABELS[mask]} | true images | - | {base['truth']['accuracy']:.3f} | 0 | "
                         f"{base['truth']['fid']:.2f} |")
            lines.append(f"| {MASK_LABELS[mask]} | masked input, left grey | - | {base['grey']['accuracy']:.3f} | "
                         f"{base['grey']['mse']:.4f} | {base['grey']['fid']:.2f} |")
        for arm, names in study["inpaint"]["arms"].items():
            for sampler in names:
                runs = data["cells"].get((mask, arm, sampler), [])
                if not runs:
                    lines.append(f"| {MASK_LABELS[mask]} | {LABELS[(arm, sampler)]} | | pending | pending | pending |")
                    continue
                lines.append(f"| {MASK_LABELS[mask]} | {LABELS[(arm, sampler)]} | {runs[0]['nfe']} | "
                             f"{cell([value(r, 'accuracy') for r in runs], 3)} | {cell([r['mse'] for r in runs], 4)} | "
                             f"{cell([value(r, 'fid') for r in runs], 2)} |")
    return lines


def figures(study: dict, data: dict) -> list[str]:
    """The bar plot of the three metrics and the picture grid (truth, input, each completion)."""
    fig_dir = Path(study["figures"])
    lines = []
    columns = [(arm, s) for arm, names in study["inpaint"]["arms"].items() for s in names]
    if data["cells"]:
        for metric, title in (("accuracy", "class accuracy (higher is better)"), ("mse", "MSE on generated pixels"),
                              ("fid", "FID of completed images")):
            groups = [(MASK_LABELS[m], [(LABELS[c], [value(r, metric) for r in data["cells"].get((m, *c), [])])
                                         for c in columns]) for m in study["inpaint"]["masks"]]
            plots.bars(groups, fig_dir / f"{metric}.png", f"Inpainting: {title}", metric)
            lines.append(f"![{metric}]({rel(fig_dir / f'{metric}.png', study['page'])})")
    panels = []
    for mask in study["inpaint"]["masks"]:
        base = data["baseline"].get(mask)
        if not base:
            continue
        panels.append((f"{MASK_LABELS[mask]}\ntrue image", torch.tensor(base["examples"]["truth"], dtype=torch.uint8)))
        panels.append(("input (grey =\ngenerated region)", torch.tensor(base["examples"]["grey"], dtype=torch.uint8)))
        for c in columns:
            runs = data["cells"].get((mask, *c))
            if runs:
                panels.append((f"{LABELS[c]}\n(NFE {runs[0]['nfe']})", torch.tensor(runs[0]["examples"], dtype=torch.uint8)))
    if panels:
        grid = labelled_panels(panels, fig_dir / "grid.png", nrow=int(study["inpaint"]["grid_images"]),
                               per_row=(2 + len(columns) + 1) // 2)  # a mask on two rows
        lines.append(f"![completions]({rel(grid, study['page'])})")
    return lines


def render(study: dict, data: dict, command_line: str) -> str:
    ic = study["inpaint"]
    lines = ["# Inpainting: per-patch times against a global-time model by replacement", "",
             "Generated by `pf/experiments/inpaint.py`; regenerate (or continue) with:", "", "```", command_line, "```",
             "", "## Setup", "",
             f"- Models: the first comparison's kept weights (`{', '.join(ic['weights'].values())}`, "
             "docs/reproduce-v1.md): PF with LTG "
             f"and SiT with uniform times, training seed {ic['train_seed']}, {study['train']['steps']} steps, "
             f"model={study['model']}, {study['data']} at {study['image_size']}x{study['image_size']} (8x8 patches "
             "of 2x2 pixels). Nothing is trained.",
             f"- Images: the first {ic['num_images']} held-out test images; no class is given (the null class, no "
             f"guidance); sampling seeds {list(ic['seeds'])}; the random-patch masks are drawn per image from seed "
             f"{ic['mask_seed']}, the same for every sampler.",
             "- PF holds the known patches clean at t = 1 as context (docs/per_patch_schedules.md); dual-loop and "
             "look-ahead order the generated patches by predicted uncertainty. SiT inpaints by replacement "
             "(RePaint without resampling): the known region re-noised to the current time before each step. "
             "Every kept pixel of every completion is checked equal to the input's.",
             f"- Steps: {dict(ic['steps'])} (dual-loop: p {study['eval']['dual_loop']['p']}, n_inner "
             f"{study['eval']['dual_loop']['n_inner']}; look-ahead: p {study['eval']['look_ahead']['p']}, ratio "
             f"{study['eval']['look_ahead']['context_t_ratio']}), NFE in the table.",
             f"- Metrics: accuracy on the true labels of the committed feature classifier `{ic['classifier']}` (the "
             "evidence study's first feature space, RESULTS.md); mean squared error to "
             "the true image over the generated pixels (pixel values in [-1, 1]); FID of the completed images "
             f"against the {study['eval']['reference_size'] or 10000} held-out test images in the classifier's "
             "features (the completed images are "
             "themselves test images in part, so the true images' FID is not 0: it is the floor of this many images). "
             "A cell is mean ± std over the sampling seeds (one seed: its value); the 'true images' and 'left grey' "
             "rows bracket what completion can do.", "", "## Results", ""]
    lines += results_table(study, data)
    lines += [""] + figures(study, data) + [""]
    lines += stage_table(data["stages"])
    lines += ["", "A `complete` stage reads back a cell's completions when `out_dir` holds them (named by their "
              "settings); its time is then the read, not the sampling."]
    return "\n".join(lines) + "\n"


def write_report(study: dict, command_line: str) -> None:
    page = Path(study["page"])
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(study, collect(study), command_line))


def main(cfg, argv: list[str] | None = None) -> None:
    command.run_study(cfg, argv, build_stages, write_report, DOC_COMMAND, "page")


if __name__ == "__main__":
    sys.exit(command.main(main, DEFAULTS, __doc__, free=FREE, toy=TOY))
