"""A run folder holds one run: a second command can neither clobber it nor write into it at the same time.

Two guards, both taken by ``pf.train`` (rank 0) before anything is written:

* :func:`prepare_run_folder`: a folder that already holds a run (``checkpoints/last.pt``, step
  files, sample pictures or a non-empty ``metrics.jsonl``) is only continued with ``resume=`` or
  started over with ``overwrite=true``, which moves the old run's entries into
  ``previous-<UTC time>/`` inside the folder (nothing is deleted). Hydra's own ``.hydra/`` and
  log belong to the command that is starting, so they are not a run.
* :class:`RunLock`: ``run.lock`` (JSON: the holder's pid, host, process start time) exists for
  the run's life. A second process is refused naming the holder; a lock whose process is gone
  (same host, pid dead or reused) is stale and taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("pf.train")

LOCK_NAME = "run.lock"
# What a run writes into its folder (pf.train's docstring); only these are moved by overwrite=true,
# so a folder that also holds the user's own files never loses them.
RUN_ENTRIES = ("checkpoints", "samples", "metrics.jsonl", "config.yaml")


class RunFolderError(ValueError):
    """The run folder holds another run, or another process is training in it (one line, exit 2)."""


def held_run(run_dir: Path) -> list[str]:
    """What in ``run_dir`` shows that a run was trained there (empty: nothing)."""
    run_dir = Path(run_dir)
    found = []
    ckpt_dir, samples, metrics = run_dir / "checkpoints", run_dir / "samples", run_dir / "metrics.jsonl"
    if (ckpt_dir / "last.pt").is_file():
        found.append("checkpoints/last.pt")
    steps = sorted(ckpt_dir.glob("step_*.pt")) if ckpt_dir.is_dir() else []
    if steps:
        found.append(f"{len(steps)} step checkpoint(s)")
    pictures = sorted(samples.glob("step_*.png")) if samples.is_dir() else []
    if pictures:
        found.append(f"{len(pictures)} sample picture(s)")
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def prepare_run_folder(run_dir: Path, resume: str | None, overwrite: bool,
                       resume_ckpt: Path | None = None) -> Path | None:
    """Refuse to train into a folder holding a run unless ``resume`` continues that run (its
    checkpoint lies in the folder) or ``overwrite`` moves it aside. Returns where it was moved."""
    run_dir = Path(run_dir)
    found = held_run(run_dir)
    if not found:
        return None
    if resume and overwrite and (resume_ckpt is None or _inside(resume_ckpt, run_dir)):
        raise RunFolderError(f"resume={resume} continues the run in {run_dir} and overwrite=true would move it "
                             f"aside: give one of the two")
    if resume and not overwrite:
        if resume_ckpt is None or _inside(resume_ckpt, run_dir):
            return None
        raise RunFolderError(f"{run_dir} holds another run ({', '.join(found)}) than resume={resume}: continue it in "
                             f"its own folder (hydra.run.dir=<its folder>), pick a new folder, or add overwrite=true "
                             f"to move this folder's run aside")
    if not overwrite:
        hint = (f"use resume={run_dir} to continue it, or" if (run_dir / "checkpoints" / "last.pt").is_file()
                else "it has no checkpoints/last.pt to continue from: use")
        raise RunFolderError(f"{run_dir} already holds a run ({', '.join(found)}): {hint} overwrite=true to start "
                             f"over (the old run is moved to {run_dir}/previous-<time>/, not deleted)")
    return _move_aside(run_dir)


def _move_aside(run_dir: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = run_dir / f"previous-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = run_dir / f"previous-{stamp}-{n}"
    target.mkdir()
    for name in RUN_ENTRIES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, target / name)  # same file system: a rename, nothing copied
    log.warning("overwrite=true: the run that was in %s is now in %s", run_dir, target)
    return target


#################################################################################
#                                   The lock                                    #
#################################################################################


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), telling a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name (field 2) may hold spaces


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    now = _start_time(pid)
    return start is None or now is None or now == start


def _who(holder: dict) -> str:
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('since', '?')}"


class RunLock:
    """``run_dir/run.lock`` held from :meth:`acquire` to :meth:`release` (use as a ``with`` block)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
                   "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        self.held = False

    def _create(self) -> bool:
        """Write the whole lock file, then link it into place: it appears complete or not at all."""
        tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.me) + "\n")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def check(self) -> dict | None:
        """Refuse if another live process holds the lock; its (stale) holder, or None when free."""
        holder = self._holder()
        if holder == {}:
            return None
        if holder is None:
            raise RunFolderError(f"{self.path} exists but is unreadable: if no training uses {self.path.parent}, "
                                 f"delete the file and run again")
        if holder.get("host") != self.me["host"]:  # its pid cannot be checked from here
            raise RunFolderError(f"{self.path.parent} is in use by another training ({_who(holder)}; lock "
                                 f"{self.path}): wait for it or pick another folder; if it is no longer running, "
                                 f"delete the lock")
        if _alive(holder["pid"], holder.get("start")):
            raise RunFolderError(f"{self.path.parent} is in use by another training ({_who(holder)}; lock "
                                 f"{self.path}): wait for it, or pick another folder")
        return holder

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race with another taker: look again
            if self._create():
                self.held = True
                return self
            holder = self.check()
            if holder is None:
                continue  # released between our two looks
            who = _who(holder)
            # stale: the holder died on this host. Rename it away (atomic: one taker wins), then create ours.
            stale = self.path.with_name(f".{LOCK_NAME}.stale.{os.getpid()}.{time.time_ns()}")
            try:
                os.replace(self.path, stale)
            except FileNotFoundError:
                continue
            try:
                if json.loads(stale.read_text()) != holder:  # another taker's fresh lock: give it back
                    os.link(stale, self.path)
                    continue
            except (OSError, ValueError):
                continue
            finally:
                stale.unlink(missing_ok=True)
            log.warning("%s: took over a stale lock (%s is no longer running)", self.path, who)
        raise RunFolderError(f"{self.path}: another process keeps taking this folder's lock; pick another folder")

    def release(self) -> None:
        """Remove the lock if it is still ours (a taker's lock is left alone)."""
        if self.held and self._holder() == self.me:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_before_hydra(argv: list[str]) -> None:
    """The command line's checks of an explicit ``hydra.run.dir``, before hydra writes its
    ``.hydra/`` and log there: a folder in use, or holding a run that neither ``resume=`` nor
    ``overwrite=true`` asks for, is refused with the job's own line (the job checks again, locked)."""
    values = {}
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if eq:
            values[key] = value.strip().strip("'\"")
    run_dir = values.get("hydra.run.dir")
    if not run_dir or "${" in run_dir:
        return
    RunLock(Path(run_dir)).check()
    resume = values.get("resume", "")
    if values.get("overwrite", "false").lower() != "true" and resume.lower() in ("", "null", "none"):
        prepare_run_folder(Path(run_dir), None, overwrite=False)
