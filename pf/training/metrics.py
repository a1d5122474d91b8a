"""``metrics.jsonl`` (one JSON object per logged step) and the tqdm progress bar."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path

from tqdm.auto import tqdm

from pf.models.checkpoint import write_atomically

log = logging.getLogger("pf.train")


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a line that is not one (e.g. the torn last line of an
    append cut short by a full disk) is skipped."""
    return [record for _, record in _read_lines(path)[0]]


def _read_lines(path: Path) -> tuple[list[tuple[str, dict]], list[int]]:
    """Each record with its line as written, and the numbers of the lines that are not a record."""
    lines, bad = [], []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step", 0), int):
            lines.append((line, record))
        else:
            bad.append(number)
    return lines, bad


class MetricsWriter:
    """Appends JSON lines, each whole or not at all. On resume, records after the resumed step
    are dropped first, so the file reads as one uninterrupted run; a line that is not a record
    (a torn append) is dropped with one warning naming the file."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            lines, bad = _read_lines(self.path)
            if bad:
                log.warning("%s: dropped %d line(s) that are not whole records (line %s; a write cut short)",
                            self.path, len(bad), ", ".join(map(str, bad)))
            kept = "".join(line + "\n" for line, record in lines if record.get("step", 0) <= resume_step)
            write_atomically(self.path, lambda tmp: Path(tmp).write_text(kept))

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = (json.dumps(clean) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, line)
                if written != len(line):  # a regular file takes a short write only when the disk is full
                    raise OSError(errno.ENOSPC, f"wrote {written} of {len(line)} bytes (no space left on the "
                                                f"device?); the line was taken back", str(self.path))
            except OSError as err:
                os.ftruncate(fd, size)  # a torn line is taken back: the file stays whole records
                if err.filename is None:  # os.write names no file: the one-line error should
                    raise OSError(err.errno, err.strerror, str(self.path)) from err
                raise
        finally:
            os.close(fd)


def progress_bar(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True,
                mininterval=1.0, unit="step")
