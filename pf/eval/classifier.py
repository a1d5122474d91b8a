"""The classifier's features as a torch-fidelity feature extractor (FID, KID, precision/recall).

Inception features mean little for 16x16 grey digits (and its weights need a download),
so "FID in classifier features" uses the network of :mod:`pf.encoders.classifier`, trained
on the same data: the metrics are computed on its penultimate layer (``"penultimate"``,
``width * 4`` wide). The extractor class is built on first use, so ``import pf.eval`` works
without torch-fidelity installed.
"""

from __future__ import annotations

import torch

from pf.encoders.classifier import default_classifier_path, load_classifier, prepare

EXTRACTOR_NAME = "pf-classifier"


#################################################################################
#                        torch-fidelity feature extractor                       #
#################################################################################


def _make_extractor_class():
    from torch_fidelity import FeatureExtractorBase as base  # optional (the eval extra): imported on first use

    class ClassifierFeatureExtractor(base):
        """torch-fidelity extractor over :class:`SmallCNN`: features ``penultimate`` and ``logits``.

        ``feature_extractor_weights_path`` is the classifier file (default:
        :func:`default_classifier_path`). Input: uint8 (B, 3, H, W), as for Inception.
        """

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            path = feature_extractor_weights_path or default_classifier_path()
            self.net, self.info = load_classifier(path)
            self.weights_path = str(path)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return "penultimate", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4):
                raise ValueError(f"expected uint8 images (B, 3, H, W), got {getattr(x, 'dtype', type(x))} "
                                 f"{tuple(getattr(x, 'shape', ()))}")
            h = prepare(x, self.net.in_channels, self.net.image_size)  # (B, C, S, S)
            feats = self.net.features(h)  # (B, 4w)
            out = {"penultimate": feats, "logits": self.net.head(feats)}  # (B, 4w), (B, K)
            return tuple(out[name].float() for name in self.features_list)

    return ClassifierFeatureExtractor


_EXTRACTOR_CLASS = None


def classifier_extractor_class():
    """The torch-fidelity extractor class (built on first use)."""
    global _EXTRACTOR_CLASS
    if _EXTRACTOR_CLASS is None:
        _EXTRACTOR_CLASS = _make_extractor_class()
    return _EXTRACTOR_CLASS


def register_classifier_extractor(name: str = EXTRACTOR_NAME) -> str:
    """Register the extractor with torch-fidelity under ``name`` (once; later calls are no-ops)."""
    import torch_fidelity  # optional (the eval extra)
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY  # optional (the eval extra)

    cls = classifier_extractor_class()
    if name in FEATURE_EXTRACTORS_REGISTRY:
        if FEATURE_EXTRACTORS_REGISTRY[name] is not cls:
            raise ValueError(f"a different torch-fidelity feature extractor is already registered as {name!r}")
        return name
    torch_fidelity.register_feature_extractor(name, cls)
    return name
