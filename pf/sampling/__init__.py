"""Helpers around drawing: fast sampling with CUDA graphs and compile (``graphs``), picture
grids and PNG files (``grid``), and the picture of adaptive sampling at work (``viz``). The
decoding into pictures is ``pf.autoencoder``'s; checkpoint to pictures is ``pf.pipeline``."""
