"""Evaluation, offline: FID / KID / precision-recall through torch-fidelity, and ADM's suite
(FID, sFID, Inception Score, precision/recall against an ADM reference batch: ``pf.eval.adm``).

``python -m pf.eval`` compares generated images (a folder, an ``.npz`` or a checkpoint plus
a sampler) with a reference set; ``python -m pf.eval.train_classifier`` trains the small
classifier whose features give a meaningful FID on the embedded digits.
"""

from pf.autoencoder import to_uint8
from pf.encoders.classifier import SmallCNN, default_classifier_path, load_classifier
from pf.eval.classifier import register_classifier_extractor
from pf.eval.inputs import ImageSet, InputError, load_folder, load_npz, save_folder, save_npz
from pf.eval.metrics import MissingWeights, compute_metrics
from pf.pipeline import generate

__all__ = [
    "ImageSet",
    "InputError",
    "MissingWeights",
    "SmallCNN",
    "compute_metrics",
    "default_classifier_path",
    "generate",
    "load_classifier",
    "load_folder",
    "load_npz",
    "register_classifier_extractor",
    "save_folder",
    "save_npz",
    "to_uint8",
]
