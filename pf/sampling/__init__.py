"""Sampling helpers around ``pf.samplers``: CUDA graphs and compile (``graphs``), image
grids and first-stage decoding (``grid``), and the adaptive-sampling picture (``viz``)."""
