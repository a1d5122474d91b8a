"""Does the text-to-image demo follow its prompts? ``python -m pf.experiments.t2i [key=value ...]``.

Trains ``python -m pf.train experiment=t2i_demo`` (PFT2I-Tiny on the captioned digits with the
frozen all-MiniLM-L6-v2 encoder; resumed where a run stopped), then samples every *held-out*
prompt of the digits (wordings no training caption uses, ``pf.data.captions.demo_prompts``)
``eval.per_prompt`` times per sampling seed and asks this project's digits classifier (trained
on the digits' images, not on samples) which digit each image shows. The recognition rate is
the fraction classified as the prompted digit; chance is 10%. Two controls: the training
captions (prompts the model saw) and the empty prompt (the null condition: how often the
classifier's most frequent answer comes up with no prompt at all). Writes ``docs/t2i.md``
with a grid of samples; stage records (small JSON) go to ``records_dir`` (kept in git), the
run and images to ``out_dir``. ``toy=true`` is a minute-sized run (CI).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pf import samplers
from pf.autoencoder import from_uint8
from pf.data.captions import demo_prompts
from pf.encoders.classifier import load_classifier
from pf.eval.train_classifier import ensure_classifier
from pf.experiments import command
from pf.experiments.records import config_key
from pf.experiments.stages import Stage, stage_result
from pf.experiments.summary import fmt, stage_table
from pf.experiments.trajectories import ensure_trained, logged_records
from pf.models import load_checkpoint, num_params
from pf.pipeline import Pipeline
from pf.sampling.grid import rgb_nhwc, save_png, tile_grid
from pf.training.schema import compose_config

DEFAULTS = {
    "out_dir": "runs/t2i_demo",       # the training run, the classifier, sample grids (recomputable)
    "records_dir": "results/t2i",     # stage records (small JSON, kept in git)
    "page": "docs/t2i.md",
    "figures": "docs/t2i",
    "threads": 1,                     # torch threads
    "train": {"steps": 2000, "overrides": []},   # pf.train experiment=t2i_demo, these steps and overrides
    "eval": {
        "seeds": [0, 1, 2],           # sampling seeds
        "per_prompt": 5,              # images per prompt and seed
        "sampler": "euler_pf",
        "steps": 25,
        "cfg": 4.0,                   # guidance against the empty prompt
        "batch_size": 100,
    },
    "classifier": {"epochs": 40, "width": 32},   # the digits classifier (pf.eval.train_classifier)
    "toy": False,
    "report_only": False,             # rewrite the page from the stored records; run nothing
}
TOY = ["out_dir=runs/t2i_toy", "records_dir=runs/t2i_toy/records", "page=runs/t2i_toy/t2i.md",
       "figures=runs/t2i_toy/fig", "train.steps=4", "train.overrides=[trainer.batch_size=8,data.val_size=16]",
       "eval.seeds=[0]", "eval.per_prompt=1", "eval.steps=2", "classifier.epochs=1", "classifier.width=4"]
DOC_COMMAND = "python -m pf.experiments.t2i"
LAYOUT_KEYS = ("threads", "page", "figures", "toy")


def train_config(study: dict):
    """The pf.train config of the demo (hydra's compose): experiment=t2i_demo at ``train.steps``."""
    tc = study["train"]
    every = max(1, min(500, int(tc["steps"])))
    overrides = ["experiment=t2i_demo", f"trainer.max_steps={int(tc['steps'])}", "trainer.progress=false",
                 f"trainer.ckpt_every={every}", f"trainer.keep_every={every}", f"trainer.val_every={every}",
                 f"trainer.sample_every={every}", *tc.get("overrides", [])]
    return compose_config(overrides)


def trained(study: dict) -> dict:
    """The demo's run at ``train.steps``, trained or resumed as needed (a trajectory of
    :mod:`pf.experiments.trajectories`: keyed by its config but its length; longer runs resume shorter ones)."""
    return ensure_trained(train_config(study), study["out_dir"], int(study["train"]["steps"]), log=lambda *_: None)


def train_stage(study: dict) -> dict:
    """Stage: the demo trained to ``train.steps``; its wall time and losses."""
    out = trained(study)
    upto = logged_records(out)
    val = [r for r in upto if "val_loss" in r]
    return {**out, "first_loss": upto[0]["loss"], "final_loss": upto[-1]["loss"],
            "val_loss": val[-1]["val_loss"] if val else None, "params": _params(Path(out["checkpoint"]))}


def _params(checkpoint: Path) -> int:
    return num_params(load_checkpoint(checkpoint))


def classifier_path(study: dict) -> Path:
    cc = study["classifier"]
    return Path(study["out_dir"]) / f"digits_classifier_{config_key(cc)}.pt"


def digits_data():
    return OmegaConf.create({"name": "digits", "path": None, "split": "train", "image_size": 16, "channels": 1,
                             "num_classes": 10})


def classifier_stage(study: dict) -> dict:
    """Stage: the digits classifier (real digits only; 20% held out for its accuracy)."""
    cc = study["classifier"]
    _, info = ensure_classifier(digits_data(), classifier_path(study), epochs=int(cc["epochs"]),
                                width=int(cc["width"]), log=None)
    return {"test_accuracy": info["test_accuracy"], "test_size": info["test_size"], "train_size": info["train_size"]}


def prompt_sets() -> dict[str, list[tuple[str, int]]]:
    """(prompt, digit) pairs: the held-out wordings, and the training captions."""
    return {"held-out prompts": demo_prompts("digits", "test"), "training captions": demo_prompts("digits", "train")}


@torch.no_grad()
def recognition_stage(study: dict, seed: int) -> dict:
    """Stage: every prompt of each set ``eval.per_prompt`` times (sampling seed ``seed``), classified."""
    ec = study["eval"]
    pipe = Pipeline.from_checkpoint(trained(study)["checkpoint"], samplers.make(ec["sampler"]),
                                    source="the demo's checkpoint")
    classifier, _ = load_classifier(classifier_path(study))
    out, grid = {}, None
    sets = {**prompt_sets(), "empty prompt": [("", c) for c in range(10)]}
    for name, pairs in sets.items():
        prompts = [p for p, _ in pairs for _ in range(int(ec["per_prompt"]))]
        digits = torch.tensor([c for _, c in pairs for _ in range(int(ec["per_prompt"]))])
        images, info = pipe.generate(len(prompts), int(ec["steps"]), seed=int(seed) * 1009 + len(out),
                                     cfg_scale=float(ec["cfg"]), batch_size=int(ec["batch_size"]), prompts=prompts)
        predicted = classifier(from_uint8(images)).argmax(1)
        hits = predicted == digits
        out[name] = {"prompts": len(pairs), "images": len(prompts), "rate": float(hits.float().mean()),
                     "per_digit": [float(hits[digits == c].float().mean()) for c in range(10)],
                     "predicted_counts": torch.bincount(predicted, minlength=10).tolist(), "nfe": info["nfe"]}
        if name == "held-out prompts" and int(seed) == int(ec["seeds"][0]):
            grid = _save_grid(study, images, prompts, int(ec["per_prompt"]))
    return {"seed": int(seed), "sets": out, "grid": grid}


def _save_grid(study: dict, images: torch.Tensor, prompts: list[str], per_prompt: int) -> str:
    """The first image of every held-out prompt: one column per digit, one row per wording."""
    first = list(range(0, len(prompts), per_prompt))  # prompts are grouped by digit, then wording
    per_digit = len(first) // 10
    order = [first[d * per_digit + w] for w in range(per_digit) for d in range(10)]
    path = Path(study["figures"]) / "samples.png"
    save_png(tile_grid(rgb_nhwc(images[order]), 10, labels=[prompts[i] for i in order], min_size=80,
                       caption=f"PFT2I-Tiny after {study['train']['steps']} steps: held-out prompts, "
                               f"{study['eval']['sampler']} {study['eval']['steps']} steps, cfg {study['eval']['cfg']:g}"),
             path)
    return str(path)


def build_stages(study: dict) -> list[Stage]:
    keyed = {k: v for k, v in study.items() if k not in LAYOUT_KEYS}
    training = {k: keyed[k] for k in ("out_dir", "train")}
    stages = [Stage("train", "pf.experiments.t2i:train_stage", {"study": training}),
              Stage("classifier", "pf.experiments.t2i:classifier_stage",
                    {"study": {k: keyed[k] for k in ("out_dir", "classifier")}})]
    for seed in study["eval"]["seeds"]:
        stages.append(Stage(f"recognition seed {seed}", "pf.experiments.t2i:recognition_stage",
                            {"study": {**{k: keyed[k] for k in ("out_dir", "train", "eval", "classifier")},
                                       "figures": study["figures"]}, "seed": int(seed)},
                            deps=("train", "classifier")))
    return stages


#################################################################################
#                                    Report                                     #
#################################################################################


def render(study: dict, command_line: str) -> str:
    """docs/t2i.md from the stage records: the setup, the recognition rates, the sample grid."""
    recs = {s.name: stage_result(study["records_dir"], s) for s in build_stages(study)}
    ec = study["eval"]
    lines = ["# Text-to-image Patch Forcing on a CPU: do the samples follow their prompts?", "",
             "Generated by `pf/experiments/t2i.py`; regenerate (or continue) with:", "", "```", command_line, "```",
             ""]
    lines += setup_section(study, recs)
    done = [recs[f"recognition seed {s}"]["result"] for s in ec["seeds"] if recs.get(f"recognition seed {s}")]
    if done:
        lines += recognition_section(done)
    if done and done[0].get("grid"):
        lines += samples_section(study, done[0]["grid"])
    lines += stage_table([(n, rec["seconds"] if rec else None) for n, rec in recs.items()])
    return "\n".join(lines) + "\n"


def setup_section(study: dict, recs: dict) -> list[str]:
    ec, tc = study["eval"], study["train"]
    tr, cl = recs["train"], recs["classifier"]
    lines = ["## Setup", "",
             "- Model and data: `python -m pf.train experiment=t2i_demo` (PFT2I-Tiny, the T2I model of SPEC.md "
             "section 11 at width 128, depth 4; the 1,797 scikit-learn digits at 16x16 with captions such as "
             "\"a handwritten seven\"; the frozen all-MiniLM-L6-v2 text encoder from its PyPI package; LTG with "
             f"loc 0.5; caption dropout 0.1), {tc['steps']} steps" + (f", overrides {tc['overrides']}" if tc["overrides"] else "") + "."]
    if tr:
        r = tr["result"]
        lines.append(f"- Training: {r['params'] / 1e6:.2f}M parameters; loss {r['first_loss']:.3f} at step 1, "
                     f"{r['final_loss']:.3f} at step {r['steps']}" + (f" (validation MSE {r['val_loss']:.3f})"
                                                                        if r["val_loss"] is not None else "")
                     + f"; {r['train_seconds'] / 60:.1f} min of training here ({r['seconds_per_step']:.2f} s per step, "
                     "on this project's 2-core CPU while other work shared it).")
    if cl:
        lines.append(f"- Judge: this project's digits classifier (a small CNN trained on real digits only), "
                     f"{cl['result']['test_accuracy']:.1%} accurate on {cl['result']['test_size']} held-out real digits.")
    lines.append(f"- Sampling: {ec['sampler']}, {ec['steps']} steps, guidance {ec['cfg']:g} against the empty prompt; "
                 f"{ec['per_prompt']} images per prompt and sampling seed; seeds {list(ec['seeds'])}.")
    return lines


def recognition_section(done: list[dict]) -> list[str]:
    """The recognition rate of each prompt set over the sampling seeds, per digit, and the empty prompt's."""
    lines = ["", "## Recognition", "",
             "The fraction of samples the classifier reads as the prompted digit (mean ± std over the sampling "
             "seeds; chance is 10%):", "", "| prompts | prompts x images | recognised as the prompted digit |",
             "|---|---|---|"]
    for name in done[0]["sets"]:
        rates = [d["sets"][name]["rate"] for d in done]
        n = done[0]["sets"][name]
        label = name if name != "empty prompt" else "empty prompt (control: digit i of 10 'prompted' by nothing)"
        lines.append(f"| {label} | {n['prompts']} x {n['images'] // n['prompts']} | {fmt([100 * r for r in rates])}% |")
    held = done[0]["sets"]["held-out prompts"]
    per_digit = [sum(d["sets"]["held-out prompts"]["per_digit"][c] for d in done) / len(done) for c in range(10)]
    lines += ["", "Per digit, held-out prompts: " + ", ".join(f"{c}: {100 * r:.0f}%" for c, r in enumerate(per_digit))
              + f". NFE {held['nfe']} per image (guided: a doubled batch).", ""]
    empty = [d["sets"]["empty prompt"]["predicted_counts"] for d in done]
    top = max(range(10), key=lambda c: sum(e[c] for e in empty))
    lines.append(f"With the empty prompt the classifier's most frequent answer is {top} "
                 f"({100 * sum(e[top] for e in empty) / sum(sum(e) for e in empty):.0f}% of those samples): "
                 "the model's unconditional digits, the rate a prompt-blind model would reach at best on one digit.")
    return lines


def samples_section(study: dict, grid: str) -> list[str]:
    page_dir = Path(study["page"]).resolve().parent
    link = Path(grid).resolve().relative_to(page_dir) if Path(grid).resolve().is_relative_to(page_dir) else grid
    return ["", "## Samples", "", f"The first image of every held-out prompt (sampling seed {study['eval']['seeds'][0]}); "
            "column j was prompted with digit j:", "", f"![held-out prompts]({Path(link).as_posix()})"]


def write_report(study: dict, command_line: str) -> None:
    Path(study["page"]).parent.mkdir(parents=True, exist_ok=True)
    Path(study["page"]).write_text(render(study, command_line))


def main(cfg, argv: list[str] | None = None) -> None:
    command.run_study(cfg, argv, build_stages, write_report, DOC_COMMAND, "page")


if __name__ == "__main__":
    sys.exit(command.main(main, DEFAULTS, __doc__, toy=TOY))
