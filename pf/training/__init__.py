"""Pieces of the training loop in ``pf/train.py``: EMA, training checkpoints and resume,
DDP set-up, metrics and the progress bar, and the sample pictures."""
