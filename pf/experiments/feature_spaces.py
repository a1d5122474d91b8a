"""The studies' feature spaces, trained once and committed: ``python -m pf.experiments.feature_spaces``.

A feature classifier retrained on another machine is another classifier (floating-point
rounding differs; FID moved by up to 1.3 on the same images), so the evidence study measures
every point in classifiers kept in the repository: one per seed of ``seeds``, each trained on
the train split only (``epochs``, ``width``, ``lr`` as the first study's), written as
``<dest>/<data><size>_seed<s>.safetensors`` (float32, a few hundred kB) with its accuracy on
the whole test split and its fingerprint, all listed in ``<dest>/classifiers.json``. A file
already there is never replaced: delete it by hand to make a new feature space (and re-measure
every point of the old one).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pf import cli
from pf.encoders.classifier import load_classifier, save_classifier_safetensors
from pf.experiments import command
from pf.experiments.common import classifier_accuracy, data_config, state_fingerprint
from pf.experiments.records import write_json
from pf.eval.train_classifier import ensure_classifier

DEFAULTS = {
    "data": "fashion_mnist",
    "data_overrides": [],
    "image_size": 16,
    "model": "tiny",
    "device": "cpu",
    "train": {"steps": 1, "batch_size": 64, "lr": 1e-3, "warmup_steps": 1, "keep_every": 1, "overrides": []},
    "eval": {"reference_size": None},
    "seeds": [0, 1],
    "epochs": 10,
    "width": 32,
    "lr": 3.0e-3,
    "out_dir": "runs/clf",               # the trained .pt files (cached; large only in number)
    "dest": "results/classifiers",       # the committed files
}


def main(cfg) -> None:
    study = command.study_config(cfg)
    dest = Path(study["dest"])
    listing = dest / "classifiers.json"
    known = json.loads(listing.read_text())["classifiers"] if listing.is_file() else []
    for seed in study["seeds"]:
        out = dest / f"{study['data']}{study['image_size']}_seed{seed}.safetensors"
        if out.is_file():
            print(f"{out}: kept (never replaced)")
            continue
        t0 = time.perf_counter()
        pt, info = ensure_classifier(data_config(study, "train"), Path(study["out_dir"]) / f"classifier_seed{seed}.pt",
                                     epochs=int(study["epochs"]), width=int(study["width"]), lr=float(study["lr"]),
                                     test_frac=0.0, seed=int(seed))
        model, info = load_classifier(pt)
        acc, size = classifier_accuracy(study, pt)
        info = {**{k: v for k, v in info.items() if k not in ("test_accuracy", "test_size", "data")}, "seed": int(seed),
                "test_accuracy": acc, "test_size": size, "epochs": int(study["epochs"]), "width": int(study["width"]),
                "lr": float(study["lr"])}
        save_classifier_safetensors(out, model, info, data=f"{study['data']}@{study['image_size']}")
        back, _ = load_classifier(out)
        fp = state_fingerprint(back.state_dict())
        known = [c for c in known if c["file"] != out.name] + [
            {"file": out.name, "seed": int(seed), "fingerprint": fp, "test_accuracy": acc, "test_size": size,
             "train_seconds": info.get("seconds"), "made": time.strftime("%Y-%m-%d %H:%M:%S"),
             "command": "python -m pf.experiments.feature_spaces"}]
        write_json(listing, {"classifiers": sorted(known, key=lambda c: c["seed"])})
        print(f"{out}: seed {seed}, test accuracy {acc:.4f}, fingerprint {fp} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(cli.run(main, DEFAULTS, __doc__))
