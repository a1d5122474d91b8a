"""pf.train configs for the CPU tests: the defaults with a small batch, few pictures and no
progress bar (validation and pictures far apart, so only what a test asks for runs)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

CONFIG_DIR = Path(__file__).resolve().parent.parent / "pf" / "configs"
# small batch, few pictures, no progress bar (test_train.py runs with these and the default intervals)
BASE = ["trainer.batch_size=8", "trainer.log_every=1", "trainer.progress=false", "data.val_size=16",
        "sampler.steps=2", "sampler.num_images=10"]
FAST = [*BASE, "trainer.val_every=100", "trainer.sample_every=100"]


def make_cfg(*overrides: str, base: list[str] = FAST):
    """The composed config (hydra, no run folder): ``base``, then ``overrides``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])
