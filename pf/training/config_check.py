"""Unknown config keys stop the run with a clear message.

Hydra's struct mode already refuses ``trainer.bogus=1``; this also catches keys appended
with ``+`` and keys added by a user's own group option (a typo there would otherwise be
ignored silently). The known keys are those of the shipped options.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TOP_LEVEL = {"model", "trainer", "data", "sampler", "seed", "device", "resume"}
# group -> the shipped option whose keys every option of that group must use
REFERENCE = {"model": "tiny", "trainer": "pf", "sampler": "euler_pf", "data": "folder"}


def _known(group: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{REFERENCE[group]}.yaml"), resolve=False)


def _unknown(cfg: dict, ref: dict, prefix: str) -> list[str]:
    bad = []
    for key, value in cfg.items():
        if key not in ref:
            bad.append(f"{prefix}{key}")
        elif isinstance(ref[key], dict) and ref[key] and isinstance(value, dict):  # {} (sampler params): free
            bad += _unknown(value, ref[key], f"{prefix}{key}.")
    return bad


def check_config_keys(cfg: DictConfig) -> None:
    bad = [k for k in cfg.keys() if k not in TOP_LEVEL and k != "hydra"]
    for group in REFERENCE:
        if group not in cfg:
            raise KeyError(f"config has no '{group}' section")
        bad += _unknown(OmegaConf.to_container(cfg[group], resolve=False), _known(group), f"{group}.")
    if bad:
        raise KeyError(f"unknown config key(s): {', '.join(sorted(bad))}. "
                       f"See pf/configs/ for the keys each group takes (python -m pf.train --cfg job prints them)")
