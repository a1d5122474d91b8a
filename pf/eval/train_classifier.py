"""Train the feature classifier once, then find it cached: ``python -m pf.eval.train_classifier [key=value ...]``.

    python -m pf.eval.train_classifier                      # digits at 16x16 -> the default cache file
    python -m pf.eval.train_classifier data.image_size=8 out=/tmp/clf8.pt
    python -m pf.eval.train_classifier data.name=fashion_mnist     # its train split only
    python -m pf.eval.train_classifier data.name=folder data.path=/data/imgs data.channels=3 data.num_classes=null

Writes the classifier (config, weights, held-out test accuracy) to ``out`` (default
``$PF_CACHE/classifier_<data>_<size>.pt``, ``PF_CACHE`` = ``~/.cache/patch-forcing``)
and prints the test accuracy. Use that file as ``feature_extractor_weights_path``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pf import cli
from pf.autoencoder import from_uint8
from pf.encoders.classifier import (check_training, default_classifier_path, load_classifier, save_classifier,
                                   train_classifier)
from pf.eval.inputs import load_dataset_images
from pf.models.checkpoint import check_writable

DEFAULTS = {
    "data": {"name": "digits", "path": None, "labels_path": None, "split": "train", "image_size": 16, "channels": 1,
             "num_classes": 10, "scale_factor": 1.0},
    "out": None,
    "epochs": 40,
    "batch_size": 64,
    "lr": 3.0e-3,
    "width": 32,
    "test_frac": 0.2,
    "seed": 0,
    "force": False,       # retrain even if ``out`` exists
    "threads": 0,         # torch CPU threads (0: torch's default)
}


def ensure_classifier(data_cfg, out=None, *, epochs: int = 40, batch_size: int = 64, lr: float = 3e-3,
                      width: int = 32, test_frac: float = 0.2, seed: int = 0, force: bool = False, log=print):
    """Path to a trained classifier for ``data_cfg``: the cached file, or trained now and saved."""
    path = Path(out) if out else default_classifier_path(data_cfg.name, data_cfg.image_size)
    if path.is_file() and not force:
        _, info = load_classifier(path)
        if log:
            log(f"classifier: {path} (cached; test accuracy {info.get('test_accuracy', float('nan')):.4f})")
        return path, info
    check_training(epochs, batch_size, lr, test_frac)
    if path.is_dir():
        raise ValueError(f"out={path} is a folder: name the classifier file to write (e.g. {path / 'classifier.pt'})")
    check_writable(path.parent)  # before training: the weights must have a place to go
    images, labels = load_dataset_images(data_cfg)
    num_classes = int(labels.max()) + 1 if data_cfg.get("num_classes") is None else int(data_cfg.num_classes)
    torch.manual_seed(seed)
    model, info = train_classifier(from_uint8(images), labels, num_classes, epochs=epochs, batch_size=batch_size,
                                   lr=lr, width=width, test_frac=test_frac, seed=seed, log=log)
    save_classifier(path, model, info, data=f"{data_cfg.name}:{data_cfg.get('path') or ''}@{data_cfg.image_size}")
    if log:
        log(f"classifier: wrote {path}; test accuracy {info['test_accuracy']:.4f} on {info['test_size']} "
            f"held-out images ({info['seconds']:.0f} s)")
    return path, info


def main(cfg) -> None:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    path, info = ensure_classifier(cfg.data, cfg.out, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                   width=cfg.width, test_frac=cfg.test_frac, seed=cfg.seed, force=cfg.force)
    print(json.dumps({"path": str(path), **info}))


if __name__ == "__main__":
    sys.exit(cli.run(main, DEFAULTS, __doc__))
