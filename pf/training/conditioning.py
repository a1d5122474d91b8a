"""What the network is conditioned on, as a part of the training step of its own.

The loop hands each batch's condition column to a conditioning part and passes the result
to ``model(x, t, cond)`` unchanged; samplers call the model the same way. Class labels are
the condition today (the model's label embedder replaces a label by the null class with
probability ``class_dropout_prob``, which classifier-free guidance needs); a text
conditioning (prompts -> encoder tokens and mask) plugs in at the same place.
"""

from __future__ import annotations

import torch


class ClassConditioning:
    """Class ids (B,) in ``[0, num_classes)``; ``num_classes`` is the null class."""

    kind = "class"

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)

    def __call__(self, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
        return labels.to(device, non_blocking=True)  # (B,)

    def for_pictures(self, classes: list[int] | None, count: int, device: torch.device) -> torch.Tensor:
        """The conditions of the training pictures: ``classes`` cycled (default: every class)."""
        classes = list(classes) if classes else list(range(self.num_classes))
        return torch.as_tensor([classes[i % len(classes)] for i in range(count)], device=device)  # (count,)
