"""Frozen image encoders behind one interface: images in [-1, 1] -> patch tokens (B, T, C).

REPA (SPEC.md section 9) aligns the DiT's hidden tokens to such tokens of the clean image.
Each encoder owns its resize and normalisation, so callers hand over what the data loader
gives (``(B, C, H, W)`` in ``[-1, 1]``, one or three channels)::

    build_image_encoder("classifier", weights="clf.pt")                 # this project's CNN (offline default)
    build_image_encoder("dinov2", weights="dinov2_vitb14.pth", repo="/src/dinov2")   # torch.hub, local only
    build_image_encoder("timm", weights="vit.safetensors", model="vit_small_patch16_224")
    register_image_encoder("mine", lambda weights=None, **kw: MyEncoder(weights))    # then "mine"
    build_image_encoder("my_pkg.encoders:make", weights=...)                         # or an import path

Nothing is downloaded: weights always come from a local file, and a missing one is an error
that names the config key to set (``trainer.repa.weights``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from pf.encoders.classifier import load_classifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_KEY = "trainer.repa.weights"


class ImageEncoder(nn.Module):
    """A frozen encoder: ``forward(x)`` with x (B, C, H, W) in [-1, 1] -> tokens (B, T, z_dim),
    ``T`` a square grid of patches in raster order. Subclasses define ``preprocess`` and
    ``tokens``; the module never trains (``train()`` keeps it in eval mode) and has no
    gradients."""

    z_dim: int

    def freeze(self) -> "ImageEncoder":
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "ImageEncoder":
        return super().train(False)  # dropout and norms stay in inference mode inside a training model

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} takes images (B, C, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        return self.tokens(self.preprocess(x.float()))


def _channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if channels == 1 and x.shape[1] == 3:
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"the encoder takes {channels}-channel images, got {x.shape[1]} channels")


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _imagenet(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """[-1, 1] -> [0, 1] -> (x - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x + 1) / 2 - m) / s


def _weights_file(weights, what: str) -> Path:
    if weights is None:
        raise FileNotFoundError(f"the {what} encoder needs its weights: set {WEIGHTS_KEY}=<file>")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} encoder weights not found: {path} (set {WEIGHTS_KEY}=<file>)")
    return path


def _load_state(path: Path) -> dict:
    """A state dict from a .safetensors file or a torch file (weights_only: no pickled code)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):  # common wrappers of released checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


#################################################################################
#                                  Encoders                                     #
#################################################################################


class ClassifierEncoder(ImageEncoder):
    """This project's feature classifier (``pf.encoders.classifier.SmallCNN``) as an encoder: the
    last conv stage before pooling, ``(S/2)^2`` tokens of ``2 * width`` features. Trained on
    the same data in seconds to minutes, it is the offline default for tests and small runs."""

    def __init__(self, weights):
        super().__init__()
        path = Path(weights) if weights is not None else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"classifier encoder weights not found: {path} (set {WEIGHTS_KEY}=<file>, "
                                    f"or train one with `python -m pf.eval.train_classifier out=<file>`)")
        self.net, self.info = load_classifier(path)
        self.z_dim = 2 * self.net.width
        self.freeze()

    def preprocess(self, x):
        x = _channels(x, self.net.in_channels)
        return _resize(x, (self.net.image_size, self.net.image_size), mode="bilinear")

    def tokens(self, x):
        stage2 = self.net.stage2[:-1]  # its convs, without the pooling to 2x2
        h = stage2(self.net.stage1(x))  # (B, 2w, S/2, S/2)
        return h.flatten(2).transpose(1, 2)  # (B, (S/2)^2, 2w)


class DINOv2Encoder(ImageEncoder):
    """DINOv2 (the REPA paper's encoder) through ``torch.hub`` from a local clone of
    facebookresearch/dinov2 (``repo``) and a local weights file: ``x_norm_patchtokens`` at
    ``resolution`` (224: 16x16 tokens of ViT-B/14), ImageNet normalisation."""

    def __init__(self, weights, repo=None, model: str = "dinov2_vitb14", resolution: int = 224):
        super().__init__()
        if repo is None or not (Path(repo) / "hubconf.py").is_file():
            raise FileNotFoundError(f"dinov2 needs a local clone of facebookresearch/dinov2 with hubconf.py: "
                                    f"set trainer.repa.repo=<dir> (got {repo})")
        path = _weights_file(weights, "dinov2")
        self.net = torch.hub.load(str(repo), model, source="local", pretrained=False)
        self.net.load_state_dict(_load_state(path))
        self.resolution = int(resolution)
        self.z_dim = int(self.net.embed_dim)
        self.freeze()

    def preprocess(self, x):
        return _imagenet(_resize(_channels(x, 3), (self.resolution, self.resolution)))

    def tokens(self, x):
        return self.net.forward_features(x)["x_norm_patchtokens"]  # (B, (R/14)^2, C)


class TimmEncoder(ImageEncoder):
    """Any ``timm`` model from a local checkpoint (``model``: its timm name): the final
    features without the classifier head, prefix tokens (class, registers) dropped, CNN maps
    flattened; input size and normalisation from the model's pretrained config."""

    def __init__(self, weights, model: str | None = None, resolution: int | None = None):
        super().__init__()
        try:
            import timm  # optional (the repa extra): imported when this encoder is built
        except ImportError as err:
            raise ImportError("the timm encoder needs the 'timm' package: pip install 'patch-forcing[repa]'") from err
        if not model:
            raise ValueError("the timm encoder needs its model name: set trainer.repa.model=<timm name>")
        path = _weights_file(weights, "timm")
        try:  # a ViT is built at the resolution its checkpoint was trained for (its position table)
            kwargs = {"img_size": int(resolution)} if resolution else {}
            self.net = timm.create_model(str(model), pretrained=False, num_classes=0, **kwargs)
        except TypeError:  # a CNN takes any size
            self.net = timm.create_model(str(model), pretrained=False, num_classes=0)
        state = _load_state(path)
        missing, _ = self.net.load_state_dict(state, strict=False)  # the checkpoint's head is not used
        if missing:
            raise ValueError(f"{path} does not match timm model {model!r}: missing keys {sorted(missing)[:8]}")
        cfg = getattr(self.net, "pretrained_cfg", None) or {}
        size = int(resolution) if resolution else int(cfg.get("input_size", (3, 224, 224))[-1])
        self.size = (size, size)
        self.mean, self.std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        self.in_chans = int(cfg.get("input_size", (3,))[0])
        self.prefix = int(getattr(self.net, "num_prefix_tokens", 0))
        self.z_dim = int(self.net.num_features)
        self.freeze()

    def preprocess(self, x):
        return _imagenet(_resize(_channels(x, self.in_chans), self.size), self.mean, self.std)

    def tokens(self, x):
        h = self.net.forward_features(x)
        if h.dim() == 4:  # a CNN: (B, C, H, W)
            return h.flatten(2).transpose(1, 2)
        return h[:, self.prefix:]  # (B, T, C)


class ModuleEncoder(ImageEncoder):
    """Wraps any module mapping [-1, 1] images to (B, T, C) tokens (``z_dim`` inferred)."""

    def __init__(self, module: nn.Module, z_dim: int | None = None):
        super().__init__()
        self.net = module
        self.z_dim = int(z_dim if z_dim is not None else getattr(module, "z_dim", 0))
        if self.z_dim < 1:
            raise ValueError("a registered encoder module must say its token width (a z_dim attribute)")
        self.freeze()

    def tokens(self, x):
        return self.net(x)


#################################################################################
#                                   Registry                                    #
#################################################################################

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "classifier": ClassifierEncoder,
    "dinov2": DINOv2Encoder,
    "timm": TimmEncoder,
}


def register_image_encoder(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``build_image_encoder(name, weights=..., **options)`` call ``factory(weights=..., **options)``."""
    if not name or ":" in name:
        raise ValueError(f"an encoder name must be non-empty and have no ':', got {name!r}")
    _REGISTRY[name] = factory


def image_encoder_names() -> list[str]:
    return sorted(_REGISTRY)


def build_image_encoder(name: str, weights=None, **options) -> ImageEncoder:
    """The frozen encoder ``name`` (a registered name or ``"package.module:function"``)."""
    if ":" in str(name):
        module, attr = str(name).split(":", 1)
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"trainer.repa.encoder={name!r}: cannot import {attr!r} from {module!r} ({err})") from None
    elif name in _REGISTRY:
        factory = _REGISTRY[name]
    else:
        raise ValueError(f"unknown image encoder {name!r}; choose one of {image_encoder_names()} or give "
                         f"'package.module:function'")
    options = {k: v for k, v in options.items() if v is not None}
    encoder = factory(weights=weights, **options)
    return encoder if isinstance(encoder, ImageEncoder) else ModuleEncoder(encoder)


def resample_tokens(h: torch.Tensor, grid: int) -> torch.Tensor:
    """Encoder tokens (B, T, C) on a square ``sqrt(T)`` grid -> (B, grid^2, C) on the DiT's grid
    (bilinear; area-weighted when shrinking), raster order kept."""
    b, t, c = h.shape
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"encoder tokens must form a square grid to be resampled, got {t} tokens")
    if side == grid:
        return h
    maps = h.transpose(1, 2).reshape(b, c, side, side)  # (B, C, s, s)
    work = maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps  # half: resample in fp32
    maps = F.interpolate(work, size=(grid, grid), mode="bilinear", align_corners=False, antialias=grid < side)
    return maps.flatten(2).transpose(1, 2).to(h.dtype)  # (B, grid^2, C)
