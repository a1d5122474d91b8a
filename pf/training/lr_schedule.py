"""The learning-rate schedule: a factor of ``trainer.lr`` for each optimizer step, in closed form.

``s`` is the 0-based optimizer step, ``W`` ``trainer.warmup_steps``, ``T`` ``trainer.max_steps``,
``m = trainer.min_lr / trainer.lr``. Every schedule starts with the linear warm-up
``(s + 1) / W`` for ``s < W``; after it::

    constant   1
    cosine     m + (1 - m) * (1 + cos(pi * p)) / 2,  p = (s - W) / (T - W)   (1 at p = 0, m at p = 1)
    wsd        1 while s < T - D, then 1 - (1 - m) * (s - (T - D) + 1) / D: linear down to m at the
               last step T - 1 over the last D = round(f * T) steps (warm-up, stable, decay:
               f is trainer.decay_fraction, the stable part the rest)

The factor is a function of the step alone, so the scheduler's saved ``last_epoch`` is all a
resumed run needs to continue exactly.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine", "wsd")


def lr_factor(step: int, schedule: str, warmup: int, total: int, min_ratio: float = 0.0,
              decay_fraction: float = 0.2) -> float:
    """The factor of the base learning rate at 0-based optimizer step ``step``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    decay = max(1, round(decay_fraction * total))
    start = total - decay  # the last step (T - 1) reaches m
    if step < start:
        return 1.0
    p = min(1.0, (step - start + 1) / decay)
    return 1.0 - (1.0 - min_ratio) * p


def build_scheduler(optimizer: torch.optim.Optimizer, tc) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``LambdaLR`` of ``trainer.lr_schedule`` (config keys of :class:`TrainerConfig`)."""
    schedule, warmup, total = str(tc.lr_schedule), int(tc.warmup_steps), int(tc.max_steps)
    min_ratio, fraction = float(tc.min_lr) / float(tc.lr), float(tc.decay_fraction)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, warmup, total, min_ratio, fraction))
