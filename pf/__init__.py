"""Patch Forcing: per-patch-timestep flow matching with adaptive samplers."""

__version__ = "0.1.0"
