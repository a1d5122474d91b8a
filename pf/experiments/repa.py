"""PF against PF + REPA at small scale: ``python -m pf.experiments.repa [key=value ...]``.

The paper calls Patch Forcing orthogonal to representation alignment. On the study's data and
recipe (``pf.experiments.reproduce``: Fashion-MNIST 16x16, Tiny/2, the same steps, batch,
optimizer, EMA and seeds) this trains PF (LTG) with and without REPA (SPEC.md section 9) and
writes ``docs/repa.md``:

- FID / precision / recall against the held-out test split, Euler at the K of ``repa.nfe``
  (a subset of ``eval.nfe``), paired sampling seeds (PF's points are the comparison's own,
  shared by key);
- the alignment: ``repa_loss`` along training, and the cosine similarity of the projector's
  output to the encoder's tokens on held-out test images noised to several times.

The REPA encoder is a second classifier of the train split (``repa.encoder``: another width
and seed), not the network whose features the FID is computed in: aligning to the metric's
own features would reward the metric, not the images. Stages are cached and resumable as in
``pf.experiments.reproduce`` (records in ``records_dir``). ``toy=true`` runs it at CI size.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from pf.encoders import build_image_encoder
from pf.eval.train_classifier import ensure_classifier
from pf.experiments import command, comparison
from pf.experiments.common import TrainedRun, classifier_accuracy, classifier_file, data_config, held_out_batch
from pf.experiments.common import train_stage as train_arm  # this module's train_stage is the REPA study's
from pf.experiments.comparison import ARMS, stage_study
from pf.experiments.curves import by_run, realization_pairs, run_curve, stored_points
from pf.experiments.stages import Stage, stage_result
from pf.experiments.summary import fmt, mean_std, paired, spread_sentence, stage_table, verdict
from pf.experiments.trajectories import logged_records
from pf.flow import interpolate
from pf.models import load_checkpoint
from pf.training.objective import Alignment

DEFAULTS = copy.deepcopy(comparison.DEFAULTS)
DEFAULTS.update({
    "page": "docs/repa.md",
    "repa": {
        "encoder": {"width": 32, "seed": 1, "epochs": 5},    # the aligned-to classifier (not the FID one)
        "lambda": 0.5,
        "encoder_depth": 2,          # of Tiny/2's 4 blocks
        "projector_dim": 256,
        "train_seeds": [0],
        "nfe": [10, 50],             # Euler K (a subset of eval.nfe: PF's points are the comparison's)
        "times": [0.25, 0.5, 0.75],  # held-out alignment at these (every patch at t)
        "images": 1000,
    },
})
TOY = [*comparison.TOY, "repa.nfe=[2,4]", "repa.encoder.epochs=1", "repa.encoder.width=4", "repa.images=40", "repa.projector_dim=16",
       "repa.times=[0.5]"]
FREE = comparison.FREE
DOC_COMMAND = "python -m pf.experiments.repa"


def encoder_path(study: dict) -> Path:
    return classifier_file(study, "repa_encoder", study["repa"]["encoder"])


def repa_overrides(study: dict) -> list[str]:
    rc = study["repa"]
    return [*ARMS["pf_ltg"]["overrides"], "trainer.repa.enabled=true", "trainer.repa.encoder=classifier",
            f"trainer.repa.weights={encoder_path(study)}", f"trainer.repa.lambda={rc['lambda']}",
            f"trainer.repa.encoder_depth={rc['encoder_depth']}", f"trainer.repa.projector_dim={rc['projector_dim']}"]


def arm_overrides(study: dict, arm: str) -> list[str]:
    return repa_overrides(study) if arm == "pf_ltg_repa" else ARMS[arm]["overrides"]


LABELS = {"pf_ltg": "PF (LTG)", "pf_ltg_repa": "PF (LTG) + REPA"}


#################################################################################
#                                    Stages                                     #
#################################################################################


def encoder_stage(study: dict) -> dict:
    """Stage: the classifier REPA aligns to, trained on the train split; its test accuracy."""
    ec = study["repa"]["encoder"]
    path, info = ensure_classifier(data_config(study, "train"), encoder_path(study), epochs=int(ec["epochs"]),
                                   width=int(ec["width"]), seed=int(ec["seed"]), test_frac=0.0, log=None)
    return {"path": str(path), "test_accuracy": classifier_accuracy(study, path)[0], "seconds": info.get("seconds")}


def train_stage(study: dict, arm: str, seed: int) -> dict:
    """Stage: one arm trained; its losses along training (repa_loss for the REPA arm)."""
    trained = train_arm(study, arm_overrides(study, arm), seed, study["train"]["steps"])
    curve = [{k: r[k] for k in ("step", "loss", "mse", "repa_loss") if k in r} for r in logged_records(trained)
             if "loss" in r]
    return {**{k: v for k, v in trained.items() if k != "flops_per_step"}, "losses": curve}


def curve_stage(study: dict, arm: str, seed: int) -> dict:
    """Stage: Euler FID at every K of ``repa.nfe`` and sampling seed (the comparison's points
    and kept images, by key)."""
    return {"points": run_curve(study, arm_overrides(study, arm), seed, "euler_pf", study["repa"]["nfe"])}


def alignment_stage(study: dict, seed: int) -> dict:
    """Stage: cosine similarity of the REPA model's projection to the encoder's tokens on
    held-out test images, every patch at each time of ``repa.times``."""
    rc = study["repa"]
    trained = train_arm(study, repa_overrides(study), seed, study["train"]["steps"])
    model = load_checkpoint(trained["checkpoint"], use_ema=True).eval()
    term = Alignment(build_image_encoder("classifier", weights=str(encoder_path(study))), model.grid_size)
    x1, labels, x0 = held_out_batch(study, int(rc["images"]), noise_seed=4321)  # x1, x0: (B, C, S, S)
    n = model.grid_size**2
    out = []
    for s in rc["times"]:
        cos = []
        for i in range(0, x1.shape[0], 250):
            xb, yb = x1[i:i + 250], labels[i:i + 250]
            t = torch.full((xb.shape[0], n), float(s))
            xt, _ = interpolate(xb, x0[i:i + 250], t, model.patch_size)
            with torch.no_grad():
                _, z = model(xt, t, yb, return_repa=True)  # (b, N, z_dim)
                h = term.target(xb)
            cos.append(torch.nn.functional.cosine_similarity(z.float(), h.float(), dim=-1).mean(1))  # (b,)
        cos = torch.cat(cos)
        out.append({"t": float(s), "cosine": float(cos.mean()), "std": float(cos.std())})
    return {"seed": seed, "images": int(x1.shape[0]), "times": out}


def build_stages(study: dict) -> list[Stage]:
    stages = [Stage("classifier", "pf.experiments.common:classifier_stage", {"study": stage_study(study)})]
    study = stage_study(study, keep=("repa",))
    stages.append(Stage("repa encoder", "pf.experiments.repa:encoder_stage", {"study": study}))
    for seed in study["repa"]["train_seeds"]:
        for arm in ("pf_ltg_repa", "pf_ltg"):  # PF's run and points are usually the comparison's, made meanwhile
            deps = ("repa encoder",) if arm == "pf_ltg_repa" else ()
            stages.append(Stage(f"train {arm} seed {seed}", "pf.experiments.repa:train_stage",
                                {"study": study, "arm": arm, "seed": int(seed)}, deps=deps))
            stages.append(Stage(f"curve {arm} seed {seed}", "pf.experiments.repa:curve_stage",
                                {"study": study, "arm": arm, "seed": int(seed)},
                                deps=(f"train {arm} seed {seed}", "classifier")))
        stages.append(Stage(f"alignment seed {seed}", "pf.experiments.repa:alignment_stage",
                            {"study": study, "seed": int(seed)}, deps=(f"train pf_ltg_repa seed {seed}",)))
    return stages


#################################################################################
#                                    Report                                     #
#################################################################################


def collect(study: dict) -> dict:
    out = {"stages": [], "encoder": None, "train": {}, "curves": {}, "alignment": []}
    for s in build_stages(study):
        rec = stage_result(study["records_dir"], s)
        out["stages"].append((s.name, rec["seconds"] if rec else None))
        if rec is None and s.name.startswith("curve"):  # points already evaluated (PF's: by the comparison)
            out["curves"].setdefault(s.args["arm"], []).extend(stored_curve(study, s.args["arm"], s.args["seed"]))
        if rec is None:
            continue
        if s.name == "repa encoder":
            out["encoder"] = rec["result"]
        elif s.name.startswith("train"):
            out["train"][(s.args["arm"], s.args["seed"])] = rec["result"]
        elif s.name.startswith("curve"):
            out["curves"].setdefault(s.args["arm"], []).extend(rec["result"]["points"])
        elif s.name.startswith("alignment"):
            out["alignment"].append(rec["result"])
    return out


def stored_curve(study: dict, arm: str, seed: int) -> list[dict]:
    """The points of an unfinished curve that are already evaluated."""
    identity = TrainedRun(study, arm_overrides(study, arm), seed, study["train"]["steps"]).identity
    return stored_points(study, identity, seed, "euler_pf", study["repa"]["nfe"])


def render(study: dict, data: dict, command_line: str) -> str:
    """docs/repa.md: the setup, FID against NFE of both models, the alignment, the stage times."""
    lines = ["# PF against PF + REPA (representation alignment), small scale", "",
             "Generated by `pf/experiments/repa.py`; regenerate (or continue) with:", "", "```", command_line, "```",
             ""]
    lines += setup_section(study, data)
    lines += fid_section(study, data)
    lines += alignment_section(data)
    lines += stage_table(data["stages"])
    return "\n".join(lines) + "\n"


def setup_section(study: dict, data: dict) -> list[str]:
    tc, ec, rc = study["train"], study["eval"], study["repa"]
    return ["## Setup", "",
            f"- Data, network and recipe of the main comparison (docs/reproduce-v1.md): {study['data']} at "
            f"{study['image_size']}x{study['image_size']}, model={study['model']}, {tc['steps']} steps, batch "
            f"{tc['batch_size']}, lr {tc['lr']}, training seed(s) {rc['train_seeds']}.",
            f"- REPA (SPEC.md section 9): projector after block {rc['encoder_depth']} (width {rc['projector_dim']}), "
            f"lambda {rc['lambda']}, aligned to a classifier of the train split (width {rc['encoder']['width']}, "
            f"seed {rc['encoder']['seed']}, {rc['encoder']['epochs']} epochs"
            + (f", test accuracy {data['encoder']['test_accuracy']:.3f}" if data["encoder"] else "")
            + "); its tokens are its last conv stage before pooling, 8x8 at 16x16, the DiT's grid. It is a "
            "different network from the FID classifier, so REPA is not rewarded for copying the metric's features.",
            f"- FID, precision and recall as in docs/reproduce-v1.md: {ec['num_samples']} images per point against the "
            f"held-out test split, no guidance, Euler (per-patch times all equal), sampling seeds {ec['seeds']} "
            f"paired across the two columns.", ""]


def fid_section(study: dict, data: dict) -> list[str]:
    """FID and precision / recall of both models at each K, and REPA against PF, paired."""
    nfe = study["repa"]["nfe"]
    lines = ["## FID against NFE", "", "| model | " + " | ".join(f"K={k}" for k in nfe) + " |",
             "|---|" + "---|" * len(nfe)]
    for arm in ("pf_ltg", "pf_ltg_repa"):
        pts = data["curves"].get(arm, [])
        cells = [fmt([p["fid"] for p in by_run(pts, target_nfe=k).values()]) for k in nfe]
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "Precision / recall:", "", "| model | " + " | ".join(f"K={k}" for k in nfe) + " |",
              "|---|" + "---|" * len(nfe)]
    for arm in ("pf_ltg", "pf_ltg_repa"):
        pts = data["curves"].get(arm, [])
        cells = []
        for k in nfe:
            run = list(by_run(pts, target_nfe=k).values())
            cells.append(f"{mean_std([p['precision'] for p in run])[0]:.3f} / {mean_std([p['recall'] for p in run])[0]:.3f}"
                         if run else "pending")
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    a, b = data["curves"].get("pf_ltg", []), data["curves"].get("pf_ltg_repa", [])
    if a and b:
        diffs = {k: paired(by_run(a, target_nfe=k), by_run(b, target_nfe=k)) for k in nfe}
        lines += ["", "REPA against PF at the same K (FID difference, negative = REPA better): "
                  + "; ".join(f"K={k}: {verdict(d)}" for k, d in diffs.items()) + "."]
        spread = [p["new"] - p["old"] for p in realization_pairs(study)]
        seeds = sorted({p["train_seed"] for p in a + b})
        if len(seeds) < 2:
            lines.append("With one training run per model, compare this with the measured training spread. "
                         + spread_sentence(study["records_dir"])
                         + (f" And the same PF run retrained on another machine moved its FID by "
                            f"{mean_std(spread)[0]:+.2f} on average ({min(spread):+.2f} to {max(spread):+.2f}; "
                            "docs/reproduce-v1.md, 'The same run trained twice')." if spread else ""))
    return lines


def alignment_section(data: dict) -> list[str]:
    """``repa_loss`` along training, and the held-out cosine similarity at each time."""
    lines = ["", "## Alignment", ""]
    for (arm, seed), tr in sorted(data["train"].items()):
        rl = [r for r in tr.get("losses", []) if "repa_loss" in r]
        if rl:
            lines.append(f"- Training seed {seed}: `repa_loss` (minus the mean cosine on training batches) went from "
                         f"{rl[0]['repa_loss']:.3f} at step {rl[0]['step']} to {rl[-1]['repa_loss']:.3f} at step "
                         f"{rl[-1]['step']}; training took {tr['train_seconds'] / 60:.1f} min "
                         f"(PF alone: {data['train'].get(('pf_ltg', seed), {}).get('train_seconds', float('nan')) / 60:.1f} min).")
    for al in data["alignment"]:
        lines.append(f"- Held-out alignment, training seed {al['seed']} ({al['images']} test images, every patch at "
                     f"t): " + ", ".join(f"t={r['t']:g}: cosine {r['cosine']:.3f} ± {r['std']:.3f}" for r in al["times"])
                     + ".")
    if not data["alignment"] and not any("repa_loss" in str(t) for t in data["train"].values()):
        lines.append("pending")
    return lines


def write_report(study: dict, command_line: str) -> None:
    page = Path(study["page"])
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(study, collect(study), command_line))


def expand_toy(argv: list[str]) -> list[str]:
    """``toy=true`` stands for this study's toy sizes."""
    return command.expand_toy(argv, TOY)


def main(cfg, argv: list[str] | None = None) -> None:
    command.run_study(cfg, argv, build_stages, write_report, DOC_COMMAND, "page")


if __name__ == "__main__":
    sys.exit(command.main(main, DEFAULTS, __doc__, free=FREE, toy=TOY))
