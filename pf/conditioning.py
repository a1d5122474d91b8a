"""What a model is conditioned on: the condition values, and the parts that make them in training.

The one home of conditioning. Two layers of it:

1. Condition values, as samplers and guidance see them. Samplers call ``model(x, t, cond)``
and never look inside ``cond``; guidance only needs to put an unconditional and a
conditional batch side by side. Two kinds of condition exist:

- class ids: a (B,) integer tensor; the null condition is the class ``model.num_classes``;
- text: a :class:`TextCond` (encoder tokens (B, L, C) and a (B, L) key-padding mask); the
  null condition is the empty prompt's encoding, which the caller passes as ``uc_cond``
  (the model knows nothing of text encoders).

The helpers :func:`batch_size`, :func:`cat`, :func:`expand`, :func:`null`, :func:`to` and
:func:`rows` are the whole interface: concatenation along the batch (text conditions of
different lengths are padded, the padding masked out), the null condition of a batch,
moving to a device and taking rows.

2. Conditioning parts, which the training loop (and sampling from a text checkpoint) hands
each batch's condition column to; the result goes to ``model(x, t, cond)`` unchanged:

- :class:`ClassConditioning`: class ids (B,). The model's label embedder replaces a label by
  the null class with probability ``class_dropout_prob`` (classifier-free guidance needs it).
- :class:`TextConditioning`: captions (B strings) -> a frozen text encoder's tokens and mask
  (:class:`TextCond`). A caption is replaced by the empty prompt with probability
  ``dropout`` (0.1, SPEC section 11) from the global torch RNG, as label dropout draws it,
  so a resumed run drops the same captions.

Both give the conditions of the training pictures and validation (no dropout) and the null
condition guidance compares against.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch


class TextCond(NamedTuple):
    """A batch of encoded prompts: ``tokens`` (B, L, C) and ``mask`` (B, L) bool, True on a
    real token and False on padding. A NamedTuple of tensors: ``torch.compile`` and CUDA
    graphs take it as it is."""

    tokens: torch.Tensor  # (B, L, C)
    mask: torch.Tensor    # (B, L) bool

    def to(self, device=None, dtype=None) -> TextCond:
        """Tokens moved (and cast to ``dtype`` when given); the mask stays bool."""
        return TextCond(self.tokens.to(device=device, dtype=dtype), self.mask.to(device=device))

    def rows(self, index) -> TextCond:
        """Rows ``index`` (an int range, slice, tensor of ids or bool mask) of both fields."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextCond(self.tokens[index], self.mask[index])


Cond = Union[torch.Tensor, TextCond]


def check_text_cond(cond: TextCond, batch: int | None = None) -> None:
    """Shapes and dtypes of a text condition, with one line naming what is wrong."""
    tokens, mask = cond.tokens, cond.mask
    if tokens.dim() != 3:
        raise ValueError(f"text tokens must be (B, L, C), got shape {tuple(tokens.shape)}")
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"text mask must be (B, L) = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"text mask must be bool (True = real token), got {mask.dtype}")
    if not tokens.is_floating_point():
        raise TypeError(f"text tokens must be floating point, got {tokens.dtype}")
    if batch is not None and tokens.shape[0] != batch:
        raise ValueError(f"the text condition has {tokens.shape[0]} rows for a batch of {batch}")


def batch_size(cond: Cond) -> int:
    return int(cond.tokens.shape[0] if isinstance(cond, TextCond) else cond.shape[0])


def pad_text(cond: TextCond, length: int) -> TextCond:
    """Pad a text condition with masked zero tokens to ``length``."""
    b, n, c = cond.tokens.shape
    if n >= length:
        return cond
    tokens = torch.cat([cond.tokens, cond.tokens.new_zeros(b, length - n, c)], dim=1)
    mask = torch.cat([cond.mask, cond.mask.new_zeros(b, length - n)], dim=1)
    return TextCond(tokens, mask)


def cat(conds: list[Cond]) -> Cond:
    """Concatenate conditions along the batch (text: padded to the longest, padding masked)."""
    if all(isinstance(c, TextCond) for c in conds):
        length = max(c.tokens.shape[1] for c in conds)
        padded = [pad_text(c, length) for c in conds]
        return TextCond(torch.cat([c.tokens for c in padded]), torch.cat([c.mask for c in padded]))
    if any(isinstance(c, TextCond) for c in conds):
        raise TypeError("cannot put class labels and text conditions in one batch")
    return torch.cat(conds)


def expand(cond: Cond, batch: int) -> Cond:
    """A condition of batch 1 (or ``batch``) as ``batch`` rows."""
    n = batch_size(cond)
    if n == batch:
        return cond
    if n != 1:
        raise ValueError(f"an unconditional condition must have 1 or {batch} rows, got {n}")
    if isinstance(cond, TextCond):
        return TextCond(cond.tokens.expand(batch, -1, -1), cond.mask.expand(batch, -1))
    return cond.expand(batch)


def null(model, cond: Cond, uc_cond=None) -> Cond:
    """The unconditional counterpart of ``cond`` for guidance: ``uc_cond`` when given (an int
    or a tensor for class models, a :class:`TextCond` of 1 or B rows for text models), else
    the null class ``model.num_classes``."""
    if isinstance(cond, TextCond):
        if not isinstance(uc_cond, TextCond):
            raise ValueError("guidance on a text model needs uc_cond: the empty prompt's encoding (a TextCond)")
        uc = expand(uc_cond.to(cond.tokens.device, cond.tokens.dtype), batch_size(cond))
        return uc
    if uc_cond is None:
        return torch.full_like(cond, model.num_classes)
    if isinstance(uc_cond, int):
        return torch.full_like(cond, uc_cond)
    if isinstance(uc_cond, TextCond):
        raise TypeError("uc_cond is a text condition but the labels are class ids")
    return uc_cond.to(device=cond.device, dtype=cond.dtype).expand_as(cond)


def to(cond: Cond, device) -> Cond:
    return cond.to(device) if isinstance(cond, TextCond) else cond.to(device, non_blocking=True)


def rows(cond: Cond, index) -> Cond:
    """Rows of a condition (slice, index tensor or bool mask)."""
    return cond.rows(index) if isinstance(cond, TextCond) else cond[index]


#################################################################################
#                 Conditioning parts: labels or captions -> condition            #
#################################################################################


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
