"""Inception features as ADM's evaluator reads them, from a local weights file (nothing downloaded).

The network is torch-fidelity's ``FeatureExtractorInceptionV3``: the 2015-12-05 TensorFlow
Inception graph (the one ADM's ``classify_image_graph_def.pb`` holds) ported to PyTorch, with
TF1's bilinear resize to 299x299 and ``(x - 128) / 128`` in front. One pass gives

    pool      (M, 2048)  ``pool_3``: FID, precision / recall
    logits    (M, 1008)  pool @ softmax weights, no bias (ADM's softmax input): Inception Score
    spatial   (M, 2023)  the first 7 channels of ``mixed_6/conv`` (17x17), flattened in TF's
                         (h, w, c) order: sFID

``mixed_6/conv`` is the 1x1 branch of the third 17x17 block, torch-fidelity's
``Mixed_6d.branch1x1`` (conv, batch norm, ReLU), read with a forward hook.

The weights are read with ``torch.load(weights_only=True)`` (no pickled code runs) and handed
to torch-fidelity through a temporary file holding only those tensors, since its constructor
takes a path and reads it with ``weights_only=False``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

SPATIAL_LAYER = "Mixed_6d.branch1x1"  # TF graph name mixed_6/conv
SPATIAL_CHANNELS = 7  # ADM keeps [..., :7] of the NHWC tensor: 7 * 17 * 17 = 2023 dims
PORT = "torch-fidelity FeatureExtractorInceptionV3 (TF 2015-12-05 graph, TF1 bilinear resize)"


class Features(NamedTuple):
    pool: torch.Tensor  # (M, 2048) float64
    logits: torch.Tensor  # (M, 1008) float64
    spatial: torch.Tensor  # (M, 2023) float64


def read_weights(path: str | Path) -> dict:
    """The Inception state dict of a local file, read without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}; set feature_extractor_weights_path to a "
                                "local weights-inception-2015-12-05-6726825d.pth")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own reason, in one line
        raise ValueError(f"{path}: not a readable Inception weights file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict) or "Mixed_6d.branch1x1.conv.weight" not in state:
        raise ValueError(f"{path}: not torch-fidelity's InceptionV3 state dict (no Mixed_6d weights)")
    return state


class InceptionFeatures:
    """``InceptionFeatures(weights_path, device)(images)`` -> :class:`Features` of uint8 images
    (M, 1|3, H, W), ``batch_size`` at a time."""

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu", batch_size: int = 100):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # optional (eval extra)

        state = read_weights(weights_path)
        with tempfile.TemporaryDirectory() as tmp:
            clean = Path(tmp) / "inception.pth"
            torch.save(state, clean)  # only tensors we just read: safe for torch-fidelity's loader
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(clean))
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.net.to(self.device)
        self._spatial: torch.Tensor | None = None
        self.net.get_submodule(SPATIAL_LAYER).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output  # (B, 192, 17, 17)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, progress: bool = False) -> Features:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (M, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        pools, logits, spatials = [], [], []
        starts = range(0, images.shape[0], self.batch_size)
        for s in tqdm(starts, desc="inception", disable=not progress, leave=False):
            x = images[s:s + self.batch_size].expand(-1, 3, -1, -1).to(self.device)  # grey -> RGB
            pool, logit = self.net(x)
            sp = self._spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (B, 17, 17, 7): TF's NHWC
            pools.append(pool.double().cpu())
            logits.append(logit.double().cpu())
            spatials.append(sp.reshape(sp.shape[0], -1).double().cpu())
        return Features(torch.cat(pools), torch.cat(logits), torch.cat(spatials))


def random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """A randomly initialised Inception state dict saved to ``path`` (offline tests and dry runs):
    meaningless features, but of the real shapes and scales."""
    from unittest import mock  # only here: the constructor would load (or download) weights we do not have

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # optional (eval extra)

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({}, Path(tmp) / "empty.pth")
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=str(Path(tmp) / "empty.pth"))
    for m in net.modules():  # variance-keeping init, so features and logits are O(1), not vanishing
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=2.0 / net.fc.in_features**0.5)
    torch.save(net.state_dict(), path)
    return Path(path)
