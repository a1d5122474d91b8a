"""Pieces of the training loop in ``pf/train.py``: the objective's terms (``objective``, a layer
lower: the path's losses, which evaluation reads too), the config schema, EMA, training
checkpoints and resume, DDP set-up, metrics and the progress bar, and the sample pictures;
the parts of a step (``step``: micro-batches and the update, ``precision``: autocast and fp16
loss scaling, ``lr_schedule``, ``memory``: activation checkpointing), how ranks share the model
(``strategy``: DDP or FSDP2), warm starts (``warm_start``), where the numbers go (``loggers``,
``throughput``) and the in-loop FID (``fid``).
This ``__init__`` imports nothing, so ``pf.training.objective`` pulls in no part of the loop."""
