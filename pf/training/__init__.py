"""Pieces of the training loop in ``pf/train.py``: the objective's terms (``objective``, a layer
lower: the path's losses, which evaluation reads too), the config schema, EMA, training
checkpoints and resume, DDP set-up, metrics and the progress bar, and the sample pictures.
This ``__init__`` imports nothing, so ``pf.training.objective`` pulls in no part of the loop."""
