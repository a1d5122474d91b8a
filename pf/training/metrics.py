"""``metrics.jsonl`` (one JSON object per logged step) and the tqdm progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm


class MetricsWriter:
    """Appends JSON lines. On resume, records after the resumed step are dropped first, so
    the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True,
                mininterval=1.0, unit="step")
