"""Networks: the Patch Forcing DiT, the global-time SiT baseline, their REPA variants, presets and checkpoints."""

from pf.models.checkpoint import load_checkpoint, save_checkpoint
from pf.models.dit import GlobalTimeDiT, PatchForcingDiT, PF_models, build_model, num_params
from pf.models.repa import REPAGlobalTimeDiT, REPAPatchForcingDiT

__all__ = [
    "PatchForcingDiT",
    "GlobalTimeDiT",
    "REPAPatchForcingDiT",
    "REPAGlobalTimeDiT",
    "PF_models",
    "build_model",
    "num_params",
    "load_checkpoint",
    "save_checkpoint",
]
