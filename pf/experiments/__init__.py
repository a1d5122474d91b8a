"""Experiments that regenerate the reports (RESULTS.md): ``python -m pf.experiments.reproduce``."""
