"""``init_from=PATH``: a new run that starts from a model's weights (fine-tuning, warm starts).

PATH is a released PFT file, a ``pf.export`` output (released format or safetensors) or a run's
checkpoint (``init_from_ema``: its EMA weights, the default, or its raw weights). Only weights
are taken: the optimizer, schedule, step and random streams start fresh (``resume=`` continues a
run exactly instead). Loading is ``weights_only=True`` (``pf.models.checkpoint``).

Where the source and the run's model differ:

- a different number of classes: the label table (``y_embedder.embedding_table.weight``) keeps
  its fresh initialisation, with one warning line naming it;
- keys only one side has (a REPA projector, say): listed in one warning line, the rest loads;
- any other tensor whose shape differs (another width, depth or patch size): one error line
  naming the keys and shapes, nothing loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pf.models.checkpoint import read_checkpoint_file, unwrapped_keys

log = logging.getLogger("pf.train")

LABEL_TABLE = "y_embedder.embedding_table.weight"


def _weights(ckpt: dict, use_ema: bool, source: str) -> tuple[dict, str]:
    """The state dict to start from, and its key (a released file and an export hold one set of
    weights, ``state_dict``; a run's checkpoint holds ``ema`` beside its raw ``state_dict``)."""
    if use_ema and isinstance(ckpt.get("ema"), dict):
        return ckpt["ema"], "ema"
    if isinstance(ckpt.get("state_dict"), dict):
        return ckpt["state_dict"], "state_dict"
    raise ValueError(f"init_from={source}: no weights in the file (expected a 'state_dict' or 'ema' key, found "
                     f"{sorted(ckpt)})")


def warm_start(model: torch.nn.Module, path: str | Path, use_ema: bool = True) -> dict:
    """Load ``path``'s weights into ``model`` as described above; what was loaded and left out."""
    source = str(path)
    ckpt = read_checkpoint_file(Path(path).expanduser())
    state, which = _weights(ckpt, use_ema, source)
    state = unwrapped_keys(state)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    mismatched = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in set(own) & set(state)
                  if state[k].shape != own[k].shape}
    reinit = []
    if LABEL_TABLE in mismatched:
        mismatched.pop(LABEL_TABLE)
        reinit.append(LABEL_TABLE)
    if mismatched:
        raise ValueError(f"init_from={source}: tensor shapes differ from this run's model (choose the source's model "
                         "size and patch): " + ", ".join(
                             f"{k} {s} vs {o}" for k, (s, o) in sorted(mismatched.items())))
    loadable = {k: v for k, v in state.items() if k in own and k not in reinit}
    model.load_state_dict(loadable, strict=False)
    if reinit:
        log.warning("init_from: the label table %s is re-initialised (source %d rows, this model %d: a different "
                    "class count)", LABEL_TABLE, state[LABEL_TABLE].shape[0], own[LABEL_TABLE].shape[0])
    if missing or unexpected:
        log.warning("init_from: keys left at their initialisation (not in %s): %s; keys of the source not in this "
                    "model: %s", source, missing or "none", unexpected or "none")
    log.info("init_from: %d tensors (its %s) from %s", len(loadable), which, source)
    return {"loaded": sorted(loadable), "reinitialised": reinit, "missing": missing, "unexpected": unexpected,
            "weights": which}
