"""The training objective as a sum of named parts, and the validation loss (SPEC.md sections 3 and 9).

Every loss term lives here; the path they are computed on (``x_t``, ``u``) is :mod:`pf.flow`.

One forward of the network per step gives a :class:`Prediction`; each :class:`Term` turns it
into a scalar, and the loss is ``sum(weight * term)``::

    FlowMSE        mse        mean (v - (x1 - x0))^2                               weight 1
    DifficultyNLL  nll        Gaussian NLL of the target under (sg(v), exp(logvar))  weight nll_weight (0.01)
    Alignment      repa_loss  -mean cos(projector(h_l), encoder(pixels))            weight lambda (0.5)

The loop logs every term under its name. A new objective part (or a new conditioning, such
as text) is one more term, not one more branch in the loop. :func:`training_loss` is the
same sum for one call outside the loop; :func:`validation_loss` is SPEC section 3's MSE at
fixed times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pf.encoders import resample_tokens
from pf.flow import interpolate

NLL_WEIGHT = 0.01
LOGVAR_CLAMP = (-30.0, 20.0)
NUM_VAL_SEGMENTS = 8


def gaussian_nll(u: torch.Tensor, v: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-element ``0.5*(ln 2pi + lv + (u - sg(v))^2 / exp(lv))``, lv clamped, over channels."""
    lv = logvar.clamp(*LOGVAR_CLAMP)  # (B, 1, H, W), broadcast over C
    return 0.5 * (math.log(2 * math.pi) + lv + (u - v.detach()) ** 2 / torch.exp(lv))


@dataclass
class FlowBatch:
    """One step's inputs: clean data, the model's condition, per-patch (B, N) or per-sample
    (B,) times, noise, and (for alignment) the images in [-1, 1] behind ``x1``."""

    x1: torch.Tensor            # (B, C, H, W)
    cond: torch.Tensor          # what model(x, t, cond) takes: class ids (B,) now
    t: torch.Tensor             # (B, N) or (B,)
    x0: torch.Tensor            # (B, C, H, W) noise
    pixels: torch.Tensor | None = None  # (B, C_img, H_img, W_img); x1 itself for pixel-space data


@dataclass
class Prediction:
    """What one forward gave: velocity, and the heads the terms asked for."""

    v: torch.Tensor                      # (B, C, H, W)
    logvar: torch.Tensor | None = None   # (B, 1, H, W)
    z: torch.Tensor | None = None        # (B, N, z_dim), the REPA projection


class Term:
    """One named part of the loss. ``needs``: the heads it reads ("logvar", "z")."""

    name: str = ""
    needs: frozenset = frozenset()

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    def __call__(self, batch: FlowBatch, u: torch.Tensor, pred: Prediction) -> torch.Tensor:
        raise NotImplementedError


class FlowMSE(Term):
    """The velocity regression of flow matching (SPEC section 3)."""

    name = "mse"

    def __call__(self, batch, u, pred):
        return ((pred.v.float() - u.float()) ** 2).mean()


class DifficultyNLL(Term):
    """The difficulty head: NLL of the target under N(sg(v), exp(logvar)) (SPEC section 3)."""

    name = "nll"
    needs = frozenset({"logvar"})

    def __init__(self, weight: float = NLL_WEIGHT):
        super().__init__(weight)

    def __call__(self, batch, u, pred):
        return gaussian_nll(u.float(), pred.v.float(), pred.logvar.float()).mean()


class Alignment(Term):
    """REPA (SPEC section 9): negative cosine similarity between the projected hidden tokens
    and a frozen encoder's patch tokens of the clean image, resampled to the DiT grid."""

    name = "repa_loss"
    needs = frozenset({"z"})

    def __init__(self, encoder, grid: int, weight: float = 0.5):
        super().__init__(weight)
        self.encoder, self.grid = encoder, int(grid)

    def target(self, pixels: torch.Tensor) -> torch.Tensor:
        return resample_tokens(self.encoder(pixels), self.grid)  # (B, N, z_dim), no gradient

    def __call__(self, batch, u, pred):
        if batch.pixels is None:
            raise ValueError("the alignment term needs the images behind the batch (FlowBatch.pixels)")
        h = self.target(batch.pixels)
        if h.shape != pred.z.shape:
            raise ValueError(f"encoder tokens {tuple(h.shape)} and the projector's output {tuple(pred.z.shape)} "
                             f"differ: the model's z_dim must be the encoder's token width")
        return -F.cosine_similarity(pred.z.float(), h.float(), dim=-1).mean()


class Objective:
    """``objective(model, batch) -> {"loss": sum(weight * term), term.name: term, ...}``."""

    def __init__(self, terms: list[Term]):
        names = [t.name for t in terms]
        if not terms or len(set(names)) != len(names):
            raise ValueError(f"an objective needs terms with distinct names, got {names}")
        self.terms = list(terms)
        self.needs = frozenset().union(*(t.needs for t in terms))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def predict(self, model, xt: torch.Tensor, t: torch.Tensor, cond) -> Prediction:
        """One forward asking for exactly the heads the terms read."""
        kwargs = {}
        if "logvar" in self.needs:
            kwargs["return_uncertainty"] = True
        if "z" in self.needs:
            kwargs["return_repa"] = True
        out = model(xt, t, cond, **kwargs)
        if not kwargs:
            return Prediction(out)
        out = list(out)
        v = out.pop(0)
        logvar = out.pop(0) if "logvar" in self.needs else None
        z = out.pop(0) if "z" in self.needs else None
        return Prediction(v, logvar, z)

    def __call__(self, model, batch: FlowBatch) -> dict[str, torch.Tensor]:
        xt, u = interpolate(batch.x1, batch.x0, batch.t, model.patch_size)
        pred = self.predict(model, xt, batch.t, batch.cond)
        values = {term.name: term(batch, u, pred) for term in self.terms}
        loss = sum(term.weight * values[term.name] for term in self.terms)
        return {"loss": loss, **values}


def flow_objective(model, nll_weight: float = NLL_WEIGHT) -> Objective:
    """MSE, plus the difficulty NLL when the model has the head (SPEC section 3)."""
    terms: list[Term] = [FlowMSE()]
    if getattr(model, "predict_uncertainty", False):
        terms.append(DifficultyNLL(nll_weight))
    return Objective(terms)


def training_loss(model, x1: torch.Tensor, y: torch.Tensor, t: torch.Tensor, x0: torch.Tensor | None = None,
                  nll_weight: float = NLL_WEIGHT) -> dict[str, torch.Tensor]:
    """MSE of the velocity plus ``nll_weight`` times the difficulty head's NLL.

    Works for global-time models (t of shape (B,), no uncertainty head: MSE only).
    Returns ``{"loss", "mse", "nll"}`` (nll is 0 without an uncertainty head): the
    :func:`flow_objective` the training loop builds, for one call.
    """
    if x0 is None:
        x0 = torch.randn_like(x1)
    out = flow_objective(model, nll_weight)(model, FlowBatch(x1, y, t, x0))
    out.setdefault("nll", torch.zeros((), device=x1.device))
    return out


@torch.no_grad()
def validation_loss(model, x1: torch.Tensor, y: torch.Tensor, x0: torch.Tensor,
                    num_segments: int = NUM_VAL_SEGMENTS) -> dict[str, object]:
    """MSE at fixed global times ``t = (k + 0.5)/num_segments`` with the given fixed noise.

    Returns ``{"val_loss": mean over segments, "segments": [per-segment MSE]}`` (SD3 practice).
    """
    b = x1.shape[0]
    n = (x1.shape[-2] // model.patch_size) * (x1.shape[-1] // model.patch_size)
    segments = []
    for k in range(num_segments):
        tk = (k + 0.5) / num_segments
        t = torch.full((b,) if not getattr(model, "per_token", True) else (b, n), tk, device=x1.device)
        xt, u = interpolate(x1, x0, t, model.patch_size)
        v = model(xt, t, y)
        segments.append(((v.float() - u.float()) ** 2).mean().item())
    return {"val_loss": sum(segments) / num_segments, "segments": segments}
