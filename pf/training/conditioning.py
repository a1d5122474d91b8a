"""What the network is conditioned on, as a part of the training step of its own.

The loop hands each batch's condition column to a conditioning part and passes the result
to ``model(x, t, cond)`` unchanged; samplers call the model the same way. Two parts:

- :class:`ClassConditioning`: class ids (B,). The model's label embedder replaces a label by
  the null class with probability ``class_dropout_prob`` (classifier-free guidance needs it).
- :class:`TextConditioning`: captions (B strings) -> a frozen text encoder's tokens and mask
  (:class:`pf.conditioning.TextCond`). A caption is replaced by the empty prompt with
  probability ``dropout`` (0.1, SPEC section 11) from the global torch RNG, as label dropout
  draws it, so a resumed run drops the same captions.

Both give the conditions of the training pictures and validation (no dropout) and the null
condition guidance compares against.
"""

from __future__ import annotations

import torch

from pf.conditioning import TextCond


class ClassConditioning:
    """Class ids (B,) in ``[0, num_classes)``; ``num_classes`` is the null class."""

    kind = "class"

    def __init__(self, num_classes: int, names: list[str] | None = None):
        self.num_classes = int(num_classes)
        self.names = list(names) if names else [f"class {i}" for i in range(self.num_classes)]

    def __call__(self, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
        return labels.to(device, non_blocking=True)  # (B,)

    def fixed(self, labels, device: torch.device) -> torch.Tensor:
        """The conditions of a fixed set (validation): the labels as a tensor."""
        return torch.as_tensor(labels, dtype=torch.long).to(device)

    def null(self, device: torch.device):
        return None  # guidance uses the model's null class

    def for_pictures(self, classes: list[int] | None, count: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
        """The conditions of the training pictures, ``classes`` cycled (default: every class), and their names."""
        classes = list(classes) if classes else list(range(self.num_classes))
        ids = [classes[i % len(classes)] for i in range(count)]
        names = self.names + ["(no class)"]
        return torch.as_tensor(ids, device=device), [names[int(c)] for c in ids]  # (count,)


class TextConditioning:
    """Captions -> :class:`TextCond` through a frozen encoder (``encoder(prompts) -> TextCond``),
    with caption dropout in training."""

    kind = "text"

    def __init__(self, encoder, dropout: float = 0.1, prompts: list[str] | None = None):
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"text.dropout must lie in [0, 1), got {dropout}")
        self.encoder, self.dropout = encoder, float(dropout)
        self.prompts = list(prompts or [])  # the training pictures' prompts

    def __call__(self, captions, device: torch.device) -> TextCond:
        captions = list(captions)
        if self.dropout > 0:
            drop = (torch.rand(len(captions)) < self.dropout).tolist()  # the global RNG, as label dropout
            captions = ["" if d else c for c, d in zip(captions, drop)]
        return self.fixed(captions, device)

    def fixed(self, captions, device: torch.device) -> TextCond:
        """The encoding of ``captions`` as they are (validation, pictures, sampling)."""
        with torch.no_grad():
            return self.encoder(list(captions)).to(device)

    def null(self, device: torch.device) -> TextCond:
        """The empty prompt's encoding (1 row): what guidance compares against."""
        return self.fixed([""], device)

    def for_pictures(self, prompts: list[str] | None, count: int, device: torch.device) -> tuple[TextCond, list[str]]:
        """The training pictures' prompts cycled to ``count`` (default: this part's ``prompts``), encoded."""
        prompts = list(prompts) if prompts else self.prompts
        if not prompts:
            raise ValueError("no prompts for the training pictures: set sampler.prompts=[...]")
        chosen = [prompts[i % len(prompts)] for i in range(count)]
        return self.fixed(chosen, device), chosen
