"""``trainer.activation_checkpointing``: each transformer block's activations are recomputed in
the backward instead of kept (``torch.utils.checkpoint``, non-reentrant).

The blocks' ``forward`` is rebound on the live modules, so parameter names, state dicts and
checkpoints are unchanged; the gradients are the same (the recomputation replays the forward,
with the random state preserved). Costs about one more forward of the blocks per step.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


class _Recomputed:
    """A block's forward whose activations are recomputed in the backward."""

    def __init__(self, forward):
        self.inner = forward

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # sampling and validation: nothing to save
            return self.inner(*args, **kwargs)
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: torch.nn.Module) -> int:
    """Recompute each of ``model.blocks`` in the backward; the number of blocks wrapped."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"trainer.activation_checkpointing: {type(model).__name__} has no .blocks to checkpoint")
    for block in blocks:
        if not isinstance(block.forward, _Recomputed):
            block.forward = _Recomputed(block.forward)
    return len(blocks)
