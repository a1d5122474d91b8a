"""The small classifier network of this project: trained on a dataset itself, read back from its file.

Two users, both frozen: the FID feature extractor of :mod:`pf.eval.classifier` (features of
its penultimate layer, ``"penultimate"``, ``width * 4`` wide) and the REPA encoder
``"classifier"`` (:class:`pf.encoders.image.ClassifierEncoder`, its last conv feature map).
Trained once by ``python -m pf.eval.train_classifier`` and cached to a file, which stores its
config and its accuracy on a held-out test split.

    x uint8 (B, 3, H, W)  ->  grey (mean of RGB) if the classifier is 1-channel, resized to
    its input size, scaled to [-1, 1]  ->  conv stack  ->  "penultimate" (B, 4w)  ->  "logits" (B, K)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors import safe_open
from safetensors.torch import save_file

from pf.models.checkpoint import save_checkpoint, write_atomically

FORMAT = "pf-classifier"
DEFAULT_CACHE = Path(os.environ.get("PF_CACHE", Path.home() / ".cache" / "patch-forcing"))


def default_classifier_path(dataset: str = "digits", image_size: int = 16) -> Path:
    """Where ``train_classifier`` writes and the extractor looks by default."""
    return DEFAULT_CACHE / f"classifier_{dataset}_{image_size}.pt"


class ClassifierMissing(FileNotFoundError):
    """No classifier file at the path the extractor was given."""


#################################################################################
#                                   Network                                     #
#################################################################################


class SmallCNN(nn.Module):
    """Two conv stages (w, 2w channels), global pooling to 2x2, an MLP head."""

    def __init__(self, in_channels: int = 1, image_size: int = 16, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.in_channels, self.image_size, self.num_classes, self.width = in_channels, image_size, num_classes, width
        w = width
        self.stage1 = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.fc = nn.Linear(2 * w * 4, 4 * w)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(4 * w, num_classes)

    def config(self) -> dict:
        return {"in_channels": self.in_channels, "image_size": self.image_size, "num_classes": self.num_classes,
                "width": self.width}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, S, S) in [-1, 1] -> penultimate features (B, 4w)."""
        h = self.stage2(self.stage1(x)).flatten(1)  # (B, 8w)
        return F.relu(self.fc(h))  # (B, 4w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # (B, K)


def prepare(x: torch.Tensor, in_channels: int, image_size: int) -> torch.Tensor:
    """uint8 (B, 3|1, H, W) -> float (B, in_channels, S, S) in [-1, 1]."""
    x = x.float() / 127.5 - 1.0
    if in_channels == 1 and x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)  # grey images repeated over RGB come back exactly
    elif in_channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return x


#################################################################################
#                              Training and files                               #
#################################################################################


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (one per batch), background -1."""
    if max_shift == 0:
        return x
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    s = x.shape[-1]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    return padded[..., max_shift + dy:max_shift + dy + s, max_shift + dx:max_shift + dx + s]


def check_training(epochs, batch_size, lr, test_frac) -> None:
    """One line for settings that would train nothing (epochs < 1) or on nothing (test_frac
    of 1 or more holds out every image)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(epochs) or epochs < 1:
        raise ValueError(f"epochs={epochs!r}: expected an integer >= 1 (0 would save an untrained classifier)")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr={lr!r}: expected a finite number > 0")
    # 0 holds out nothing: the studies train on the whole train split and measure on the test split
    if isinstance(test_frac, bool) or not isinstance(test_frac, (int, float)) or not 0 <= test_frac < 1:
        raise ValueError(f"test_frac={test_frac!r}: expected a number in [0, 1), the share of images held out "
                         f"to measure the accuracy (0: none, measured on another split)")


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 40,
                     batch_size: int = 64, lr: float = 3e-3, width: int = 32, test_frac: float = 0.2,
                     seed: int = 0, log=print) -> tuple[SmallCNN, dict]:
    """Train on ``images`` float (M, C, S, S) in [-1, 1]; a fixed ``test_frac`` is held out.

    Returns the model (eval mode) and ``{"test_accuracy", "train_size", "test_size", "epochs", "seconds"}``.
    """
    check_training(epochs, batch_size, lr, test_frac)
    g = torch.Generator().manual_seed(seed)
    m = images.shape[0]
    perm = torch.randperm(m, generator=g)
    n_test = max(1, int(round(m * test_frac))) if test_frac > 0 else 0
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    if len(train_idx) == 0:
        raise ValueError(f"{m} image(s) with test_frac={test_frac} leave none to train on")
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[1], images.shape[-1], num_classes, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, (len(train_idx) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(_shift(images[idx], g)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{epochs}: train loss {total / max(len(order), 1):.4f}")
    model.eval()
    acc = accuracy(model, images[test_idx], labels[test_idx]) if n_test else float("nan")
    info = {"test_accuracy": acc, "train_size": len(train_idx), "test_size": n_test, "epochs": epochs,
            "seconds": time.perf_counter() - t0, "seed": seed}
    return model, info


@torch.no_grad()
def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def save_classifier(path: str | os.PathLike, model: SmallCNN, info: dict, data: str) -> Path:
    path = Path(path)
    save_checkpoint({"format": FORMAT, "config": model.config(), "state_dict": model.state_dict(), "info": info,
                     "data": data}, path)
    return path


def save_classifier_safetensors(path: str | os.PathLike, model: SmallCNN, info: dict, data: str) -> Path:
    """The classifier as a safetensors file (float32 weights; config, info and data in its
    metadata as JSON): a few hundred kB that a repository can keep, read by :func:`load_classifier`."""
    path = Path(path)
    meta = {"format": FORMAT, "config": json.dumps(model.config()), "info": json.dumps(info, default=str),
            "data": data}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return path


def _read_safetensors(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pf classifier file (written by save_classifier_safetensors)")
    return {"format": FORMAT, "config": json.loads(meta["config"]), "state_dict": state,
            "info": json.loads(meta.get("info", "{}")), "data": meta.get("data")}


def load_classifier(path: str | os.PathLike) -> tuple[SmallCNN, dict]:
    """The classifier in ``path`` (eval mode; a ``.pt`` checkpoint or a ``.safetensors`` file)
    and its file's ``info`` (test accuracy, ...)."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierMissing(
            f"classifier weights not found: {path}. Train them once with `python -m pf.eval.train_classifier "
            f"out={path}` (or set feature_extractor_weights_path=<file> to a trained one)")
    if path.suffix == ".safetensors":
        ckpt = _read_safetensors(path)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pf classifier file (written by python -m pf.eval.train_classifier)")
    model = SmallCNN(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), {**ckpt.get("info", {}), "data": ckpt.get("data")}
