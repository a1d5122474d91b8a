"""Where a run's numbers and pictures go: ``metrics.jsonl`` always, TensorBoard and wandb when asked.

``trainer.log`` names the targets, comma-separated (``jsonl`` is always on)::

    trainer.log=tensorboard                 runs/<run>/tensorboard/ (scalars, samples, difficulty map)
    trainer.log=[tensorboard,wandb]         also wandb, offline in runs/<run>/wandb/ unless WANDB_MODE
                                            says otherwise (``WANDB_MODE=online`` uploads)

TensorBoard is written with its own ``SummaryWriter`` (``torch.utils.tensorboard``); on resume its
events after the resumed step are purged, so the curves read as one run. Both are optional
packages (``pip install -e .[log]``), imported only when asked for. Rank 0 writes.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from pf.sampling.grid import tile_grid
from pf.training.metrics import MetricsWriter
from pf.training.pictures import heat_rgb, images_rgb
from pf.training.schema import parse_log_targets as parse_targets


def _missing(package: str, target: str) -> ImportError:
    return ImportError(f"trainer.log={target} needs the {package} package: pip install {package} "
                       f"(or pip install -e .[log])")


class RunLog:
    """``write(record)``: one logged step; ``pictures(step, samples, difficulty)``: the EMA grid."""

    def __init__(self, targets, run_dir: Path, resume_step: int | None, config: dict, nrow: int = 8):
        self.targets, self.nrow = parse_targets(targets), int(nrow)
        run_dir = Path(run_dir)
        self.metrics = MetricsWriter(run_dir / "metrics.jsonl", resume_step=resume_step)
        if resume_step is None:
            (run_dir / "metrics.jsonl").write_text("")
        self.tb = self.wandb = None
        if "tensorboard" in self.targets:
            try:  # optional dependency: only runs that log to TensorBoard need it
                from torch.utils.tensorboard import SummaryWriter  # imports the optional tensorboard package
            except ImportError:
                raise _missing("tensorboard", "tensorboard") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in self.targets:
            try:  # optional dependency: only runs that log to wandb need it
                import wandb
            except ImportError:
                raise _missing("wandb", "wandb") from None
            id_file = run_dir / "wandb-id.txt"  # the same wandb run across resumes
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb = wandb.init(dir=str(run_dir), id=run_id, resume="allow", config=config,
                                    mode=os.environ.get("WANDB_MODE", "offline"), name=run_dir.name,
                                    project=os.environ.get("WANDB_PROJECT", "patch-forcing"))

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for i, value in enumerate(record.get("segments") or []):  # validation MSE at fixed times
            scalars[f"val_segment_{i}"] = float(value)
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"train/{key}", value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def pictures(self, step: int, samples, difficulty) -> None:
        """The samples grid and the difficulty map grid as two images of this step."""
        if self.tb is None and self.wandb is None:
            return
        grids = {"samples": tile_grid(images_rgb(samples), self.nrow)}
        if difficulty is not None:
            grids["difficulty"] = tile_grid(heat_rgb(difficulty), self.nrow)
        for name, grid in grids.items():
            grid = np.ascontiguousarray(grid)  # (H, W, 3) uint8
            if self.tb is not None:
                self.tb.add_image(name, grid, step, dataformats="HWC")
            if self.wandb is not None:
                import wandb  # optional dependency, imported above when this target was set up

                self.wandb.log({name: wandb.Image(grid)}, step=step)
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
