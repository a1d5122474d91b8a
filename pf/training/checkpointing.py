"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A training checkpoint is this project's model checkpoint (``pf.models.checkpoint``, so
``pf.models.load_checkpoint`` reads it and picks the EMA weights) plus::

    optimizer, scheduler   state dicts
    step, ema_updates      ints
    rng                    one dict per DDP rank: torch CPU / CUDA RNG states, the noise
                           and timestep generators' states, the timestep sampler's own
                           state (the compiled LTG's Philox seed and running offset)
    world_size, train_config

All plain tensors, numbers, lists and dicts: it loads with ``weights_only=True``.
``last.pt`` is written to a temp file and renamed (``save_checkpoint``); step files are
hard links to the same bytes (a copy where links are not supported).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from pf.models.checkpoint import model_checkpoint, read_checkpoint_file, save_checkpoint, write_atomically


def resolve_resume(path: str | os.PathLike) -> Path:
    """``resume=`` accepts a checkpoint file or a run directory (its ``checkpoints/last.pt``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.pt", p / "last.pt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"resume={path}: no checkpoints/last.pt in that run directory")
    if not p.is_file():
        raise FileNotFoundError(f"resume={path}: no such checkpoint file or run directory")
    return p


def rng_state(generators: dict[str, torch.Generator], timestep_sampler, device: torch.device) -> dict:
    """This rank's random state, as tensors and ints."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    for name, gen in generators.items():
        state[name] = gen.get_state()
    if hasattr(timestep_sampler, "state_dict"):
        state["timestep_sampler"] = dict(timestep_sampler.state_dict())  # e.g. LTG {"seed", "offset"}
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator], timestep_sampler, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    for name, gen in generators.items():
        gen.set_state(state[name].cpu())
    if "timestep_sampler" in state and hasattr(timestep_sampler, "load_state_dict"):
        timestep_sampler.load_state_dict(state["timestep_sampler"])


def training_state(optimizer_state: dict, ema, scheduler, step: int, rng: list[dict], train_config: dict) -> dict:
    """The keys a training checkpoint holds beside the model's (``model_checkpoint``'s)."""
    return {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "step": int(step),
            "ema_updates": int(ema.updates), "rng": rng, "world_size": len(rng), "train_config": train_config}


def training_checkpoint(model, ema, optimizer, scheduler, step: int, rng: list[dict], train_config: dict) -> dict:
    return model_checkpoint(model, ema.state_dict(),
                            **training_state(optimizer.state_dict(), ema, scheduler, step, rng, train_config))


def write_checkpoint(ckpt: dict, ckpt_dir: Path, step: int, keep: bool) -> Path:
    """Write ``last.pt`` atomically; with ``keep`` also ``step_XXXXXX.pt`` (same bytes)."""
    last = ckpt_dir / "last.pt"
    save_checkpoint(ckpt, last)
    if keep:
        target = ckpt_dir / f"step_{step:06d}.pt"
        write_atomically(target, lambda tmp: _link_or_copy(last, tmp))  # no temp file left by a full disk
    return last


def _link_or_copy(src: Path, tmp: str) -> None:
    os.remove(tmp)  # write_atomically's empty temp file: the link takes its name
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)


def load_training_checkpoint(path: Path) -> dict:
    ckpt = read_checkpoint_file(path)
    missing = [k for k in ("state_dict", "ema", "optimizer", "scheduler", "step", "rng") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint (missing {missing}); "
                         f"use it with pf.models.load_checkpoint or start a new run")
    return ckpt
