"""What a study stores and reads back: short keys of configs, atomic JSON files, results cached
by their key, and a lock on a directory that one process at a time may write.

A result is cached in ``<out_dir>/<kind>/<key>.json`` as ``{"key", "result", "seconds",
"finished"}``, where ``<key>`` is :func:`config_key` of everything that decides the result: a
result whose inputs change is a new file, and a stored one is never recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from pf.models.checkpoint import write_atomically


def config_key(obj) -> str:
    """A short stable hash of a JSON-able object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def write_json(path: Path, obj) -> None:
    """Write atomically (:func:`pf.models.checkpoint.write_atomically`): a reader never sees half a file."""
    text = json.dumps(obj, indent=1, default=str)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def cached_result(out_dir: str | Path, kind: str, key_obj) -> dict | None:
    """What :func:`cached` stored for ``key_obj``, or None (nothing is computed)."""
    path = Path(out_dir) / kind / f"{config_key(key_obj)}.json"
    return json.loads(path.read_text())["result"] if path.is_file() else None


def cached(out_dir: str | Path, kind: str, key_obj, compute: Callable[[], dict]) -> dict:
    """``compute()`` once per ``key_obj``: stored in ``<out_dir>/<kind>/<hash>.json`` with its key."""
    path = Path(out_dir) / kind / f"{config_key(key_obj)}.json"
    if path.is_file():
        return json.loads(path.read_text())["result"]
    t0 = time.perf_counter()
    result = compute()
    write_json(path, {"key": key_obj, "result": result, "seconds": time.perf_counter() - t0,
                      "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def directory_lock(path: Path, poll_s: float = 10.0, log=print):
    """One process at a time in ``path`` (a ``.lock`` file holding the owner's pid; a dead
    owner's lock is taken over)."""
    path.mkdir(parents=True, exist_ok=True)
    lock = path / ".lock"
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            try:
                owner = int(lock.read_text() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and not _alive(owner):
                lock.unlink(missing_ok=True)
                continue
            if not waited:
                log(f"{path} is in use by process {owner}; waiting")
                waited = True
            time.sleep(poll_s)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
