"""FID, KID and precision/recall between two image sets, through torch-fidelity, offline.

Feature extractors:

    classifier   the dataset's own small CNN (pf.encoders.classifier), penultimate features;
                 ``weights`` = its file (default: the cached digits classifier)
    inception    torch-fidelity's InceptionV3 (``inception-v3-compat``, 2048-d pool features);
                 ``weights`` = a local copy of weights-inception-2015-12-05-6726825d.pth:
                 nothing is ever downloaded.

``input1`` is the generated set and ``input2`` the reference (precision: how many
generated samples fall in the reference manifold; recall: the other way round).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pf.encoders.classifier import default_classifier_path, load_classifier
from pf.eval.classifier import EXTRACTOR_NAME, register_classifier_extractor
from pf.eval.inputs import ImageSet

INCEPTION_NAME = "inception-v3-compat"
EXTRACTORS = ("classifier", "inception")


class MissingWeights(FileNotFoundError):
    """A feature extractor's weights file is not there (nothing is downloaded)."""


def resolve_extractor(extractor: str, weights: str | Path | None, data: tuple[str, int] = ("digits", 16)
                      ) -> tuple[str, str]:
    """(torch-fidelity name, weights path) for ``extractor``, with a clear error if weights are missing.

    ``data`` = (dataset name, image size) picks the default classifier file.
    """
    if extractor == "classifier":
        path = Path(weights) if weights else default_classifier_path(*data)
        if not path.is_file():
            raise MissingWeights(
                f"classifier weights not found: {path}. Train them once with `python -m pf.eval.train_classifier "
                f"data.name={data[0]} data.image_size={data[1]}` (writes {default_classifier_path(*data)}), "
                f"or set feature_extractor_weights_path=<classifier file>")
        return register_classifier_extractor(), str(path)
    if extractor == "inception":
        if not weights:
            raise MissingWeights(
                "extractor=inception needs its weights file locally (there is no network): set "
                "feature_extractor_weights_path=/path/to/weights-inception-2015-12-05-6726825d.pth")
        if not Path(weights).is_file():
            raise MissingWeights(f"Inception weights not found: {weights}; set feature_extractor_weights_path to "
                                 f"an existing weights-inception-2015-12-05-6726825d.pth")
        return INCEPTION_NAME, str(weights)
    raise ValueError(f"unknown feature extractor {extractor!r}; choose one of {EXTRACTORS}")


def _as_set(x, name: str) -> ImageSet:
    return x if isinstance(x, ImageSet) else ImageSet(x, name)


def compute_metrics(generated, reference, *, extractor: str = "classifier", weights: str | Path | None = None,
                    fid: bool = True, kid: bool = True, prc: bool = True, kid_subset_size: int = 1000,
                    kid_subsets: int = 100, batch_size: int = 256, device: str = "auto", seed: int = 2020,
                    data: tuple[str, int] = ("digits", 16), verbose: bool = False) -> dict:
    """Metrics of ``generated`` against ``reference`` (each an :class:`ImageSet` or uint8 (M, C, H, W)).

    Returns ``{"fid", "kid", "kid_std", "precision", "recall", "f_score", "num_generated",
    "num_reference", "extractor"}`` (only the metrics asked for). KID uses subsets of
    ``min(kid_subset_size, len(generated), len(reference))`` samples.
    """
    import torch_fidelity  # optional (the eval extra): ``import pf.eval`` works without it

    gen, ref = _as_set(generated, "generated"), _as_set(reference, "reference")
    if not (fid or kid or prc):
        raise ValueError("ask for at least one of fid, kid, prc")
    name, path = resolve_extractor(extractor, weights, data)
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    out = torch_fidelity.calculate_metrics(
        input1=gen, input2=ref, fid=fid, kid=kid, prc=prc, feature_extractor=name,
        feature_extractor_weights_path=path, cuda=cuda, batch_size=batch_size,
        kid_subset_size=min(kid_subset_size, len(gen), len(ref)), kid_subsets=kid_subsets,
        save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory
        cache=False, rng_seed=seed, verbose=verbose, datasets_download=False,
    )
    result = {"extractor": extractor, "num_generated": len(gen), "num_reference": len(ref)}
    keys = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid",
            "kernel_inception_distance_std": "kid_std", "precision": "precision", "recall": "recall",
            "f_score": "f_score"}
    result.update({short: float(out[k]) for k, short in keys.items() if k in out})
    return result


def classifier_feature_dim(weights: str | Path | None = None) -> int:
    """Width of the classifier's penultimate features (for reports)."""
    net, _ = load_classifier(weights or default_classifier_path())
    return net.fc.out_features


__all__ = ["compute_metrics", "resolve_extractor", "MissingWeights", "EXTRACTOR_NAME", "INCEPTION_NAME",
           "classifier_feature_dim"]

