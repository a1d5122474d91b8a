"""``trainer.precision``: the autocast of the forward and, for fp16, the loss scaling.

    bf16   autocast to bfloat16 on CUDA; no scaling (bf16 has fp32's range)
    fp16   autocast to float16 on CUDA, the loss scaled by ``torch.amp.GradScaler``: a step whose
           gradients overflow is skipped (the weights keep their values, the scale halves)
    fp32   no autocast

The CPU always computes in fp32 (as before this option); fp16 still scales the loss there, so
the skipping is the same code on every device. The scaler's state travels in the checkpoint.
"""

from __future__ import annotations

import contextlib

import torch


class Precision:
    def __init__(self, precision: str, device: torch.device):
        if precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"trainer.precision={precision!r}: expected bf16, fp16 or fp32")
        self.name = precision
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device.type == "cuda" else None
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.skipped = 0  # optimizer steps skipped for overflowing gradients (fp16)

    @property
    def may_skip(self) -> bool:
        """Whether a non-finite gradient is an overflow to skip rather than an error."""
        return self.scaler is not None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients in their true units (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, finite: bool) -> bool:
        """The optimizer step (the scaler skips it when the gradients overflowed); whether it ran."""
        if self.scaler is None:
            optimizer.step()
            return True
        self.scaler.step(optimizer)  # skips the update when unscale_ found inf/NaN
        self.scaler.update()
        self.skipped += not finite
        return finite

    def stats(self) -> dict:
        if self.scaler is None:
            return {}
        return {"loss_scale": float(self.scaler.get_scale()), "skipped_steps": self.skipped}

    def state_dict(self) -> dict:
        if self.scaler is None:
            return {}
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state["scaler"])
            self.skipped = int(state["skipped"])
