"""One optimizer step, assembled from its parts: micro-batches, precision, clipping, the update.

::

    optimizer.zero_grad()
    for each of the grad_accum micro-batches (equal row slices of the step's batch):
        [no gradient sync unless it is the last]  (DDP ``no_sync``; FSDP ``set_requires_gradient_sync``)
        loss_i = objective(model, micro-batch)    under precision.autocast()
        backward(loss_i / grad_accum)             scaled by the fp16 GradScaler
    unscale, clip the gradient norm to grad_clip
    optimizer step (skipped by the scaler when fp16 gradients overflowed)

The step's batch (data, times, noise, conditions) is drawn whole and then sliced, so with
``grad_accum=N`` the rows, their LTG times and their noise are those of the one big batch. Every
term is a mean over its micro-batch's rows and the micro-batches have equal size, so the
accumulated gradient is the big batch's. What is drawn inside the forward (class dropout from
the global torch generator) is drawn per micro-batch: the same numbers on the CPU (its generator
yields a sequence, cut anywhere), other numbers on CUDA (Philox offsets advance per call).
"""

from __future__ import annotations

import contextlib

import torch

from pf import conditioning as conds
from pf.training.objective import FlowBatch


def micro_batches(batch: FlowBatch, n: int) -> list[FlowBatch]:
    """``batch`` cut into ``n`` equal row slices."""
    b = batch.x1.shape[0]
    if n < 1 or b % n:
        raise ValueError(f"trainer.batch_size={b} does not split into trainer.grad_accum={n} equal micro-batches")
    if n == 1:
        return [batch]
    m = b // n
    parts = []
    for i in range(n):
        rows = slice(i * m, (i + 1) * m)
        parts.append(FlowBatch(batch.x1[rows], conds.rows(batch.cond, rows), batch.t[rows], batch.x0[rows],
                               None if batch.pixels is None else batch.pixels[rows]))
    return parts


class TrainStep:
    """``accumulate(batch)`` -> the terms' means; ``clip()`` -> the gradient norm; ``apply(finite)``.

    ``skip_sync``: a context-manager factory that keeps the gradients of a backward on this rank
    (all but the last micro-batch), or None on a single process.
    """

    def __init__(self, forward, objective, params, optimizer, precision, grad_accum: int, grad_clip: float,
                 skip_sync=None):
        self.forward, self.objective, self.optimizer, self.precision = forward, objective, optimizer, precision
        self.params = [p for p in params if p.requires_grad]
        self.grad_accum, self.grad_clip, self.skip_sync = int(grad_accum), float(grad_clip), skip_sync

    def accumulate(self, batch: FlowBatch) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        parts = micro_batches(batch, self.grad_accum)
        totals: dict[str, torch.Tensor] = {}
        for i, micro in enumerate(parts):
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or self.skip_sync is None else self.skip_sync():
                with self.precision.autocast():
                    out = self.objective(self.forward, micro)
                self.precision.backward(out["loss"] / len(parts) if len(parts) > 1 else out["loss"])
            for name, value in out.items():
                value = value.detach().float() / len(parts)
                totals[name] = value if name not in totals else totals[name] + value
        return totals

    def clip(self) -> torch.Tensor:
        """The gradient norm in true units (fp16: unscaled first), then clipped."""
        self.precision.unscale(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor

    def apply(self, finite: bool) -> bool:
        """The optimizer update; False when fp16 loss scaling skipped it (overflowed gradients)."""
        return self.precision.step(self.optimizer, finite)
