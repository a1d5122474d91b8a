"""Samplers (SPEC.md section 6), each called as
``sampler(model, x, timesteps, *, y=None, cfg_scale=1.0, uc_cond=None, guidance_interval=None, progress=False)``.

``guidance_interval=(lo, hi)`` guides only the outer steps with ``lo <= s_k <= hi`` (SPEC
section 10); ``sampler.nfe`` counts model calls and ``sampler.guided_nfe`` the guided ones."""

from pf.samplers.base import Sampler, certain_patches, outer_schedule
from pf.samplers.dual_loop import DualLoop
from pf.samplers.euler import Euler, EulerPF
from pf.samplers.heun import Heun
from pf.samplers.look_ahead import LookAhead
from pf.samplers.scheduled import Scheduled
from pf.samplers.sde import SDE

SAMPLERS = {cls.name: cls for cls in (Euler, EulerPF, DualLoop, LookAhead, Scheduled, Heun, SDE)}


def make(name: str, **params) -> Sampler:
    """Build a sampler by name: ``euler``, ``euler_pf``, ``dual_loop``, ``look_ahead``,
    ``heun``, ``sde`` (the last two for global-time models, SPEC section 13)."""
    key = name.lower().replace("-", "_")
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[key](**params)


__all__ = ["Sampler", "Euler", "EulerPF", "DualLoop", "LookAhead", "Scheduled", "Heun", "SDE", "make", "certain_patches", "outer_schedule", "SAMPLERS"]
