"""Networks: the Patch Forcing DiT, the global-time SiT baseline, their REPA variants, the
text-to-image model, presets and checkpoints."""

from pf.models.checkpoint import load_checkpoint, save_checkpoint
from pf.models.dit import GlobalTimeDiT, PatchForcingDiT
from pf.models.presets import PF_T2I_models, PF_models, build_model, build_t2i, num_params
from pf.models.repa import REPAGlobalTimeDiT, REPAPatchForcingDiT
from pf.models.t2i import PatchForcingT2I

__all__ = [
    "PatchForcingDiT",
    "GlobalTimeDiT",
    "REPAPatchForcingDiT",
    "REPAGlobalTimeDiT",
    "PF_models",
    "PatchForcingT2I",
    "PF_T2I_models",
    "build_t2i",
    "build_model",
    "num_params",
    "load_checkpoint",
    "save_checkpoint",
]
