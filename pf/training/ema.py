"""Exponential moving average of the weights: ``ema = decay*ema + (1-decay)*w`` every step.

With ``warmup`` the decay used at update ``n`` is ``min(decay, (1 + n)/(10 + n))``, so a
short run's EMA is not stuck near the random initialisation (the reference recipe uses a
fixed 0.9999 over 400K steps).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        self.updates += 1

    def whole(self) -> nn.Module:
        """The averaged model, whole (a sharded EMA gathers it: pf.training.strategy)."""
        return self.model

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.model.load_state_dict(state)
        self.updates = int(updates)
