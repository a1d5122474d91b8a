"""pf.train configs for the CPU tests: the defaults with a small batch, few pictures and no
progress bar (validation and pictures far apart, so only what a test asks for runs)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

CONFIG_DIR = Path(__file__).resolve().parent.parent / "pf" / "configs"
FAST = ["trainer.batch_size=8", "trainer.log_every=1", "trainer.progress=false", "data.val_size=16",
        "sampler.steps=2", "sampler.num_images=10", "trainer.val_every=100", "trainer.sample_every=100"]


def make_cfg(*overrides: str):
    """The composed config (hydra, no run folder): FAST, then ``overrides``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*FAST, *overrides])
