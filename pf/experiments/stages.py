"""A study's cached, resumable stages, run one after another or on several worker processes.

A :class:`Stage` is a function (``"module:function"``, importable in a fresh process) and its
JSON arguments; its key is a hash of both, so a stage whose inputs change is a new stage and
a finished one is never recomputed. A finished stage writes ``<out>/stages/<key>.json``
(its name, function, arguments, result, wall time and finish date). ``run_stages`` runs every
unfinished stage whose dependencies are finished, on ``jobs`` worker processes (``jobs=1``: in
this process), and returns the records by stage name. A killed study restarts where it
stopped: finished stages are read back, training resumes from its last checkpoint
(:mod:`pf.experiments.trajectories`), and stages cache their own smaller pieces
(:func:`pf.experiments.records.cached`).

A ``deadline`` (``time.time()`` seconds) cuts a run cleanly: no stage starts after it, and a
stage still running at it is interrupted (:class:`StageCut`, raised in the worker by a timer)
and left unfinished; every file a study writes is written whole or not at all
(:func:`pf.experiments.records.write_json`), so a cut leaves no half-written record.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pf.experiments.records import config_key, write_json


@dataclass
class Stage:
    """One stage. Its key hashes the function's address with the arguments, so a stage function
    stays at its address: moved to another module it would be a new stage, and the records of
    the finished one would no longer be found."""

    name: str                       # what a reader sees in the log: "train PF (LTG) seed 0"
    fn: str                         # "package.module:function", called as function(**args)
    args: dict                      # JSON-able
    deps: Sequence[str] = ()        # names of stages that must finish first
    key: str = field(init=False)

    def __post_init__(self):
        self.key = config_key({"fn": self.fn, "args": self.args})


class StageCut(BaseException):
    """A stage interrupted at the run's deadline. A BaseException, like KeyboardInterrupt, so
    that a stage's ``except Exception`` does not swallow it."""


def _cut(signum, frame):
    raise StageCut("the run's deadline passed")


def _call(fn: str, args: dict, threads: int, deadline: float | None = None) -> tuple[dict, float]:
    if threads:
        torch.set_num_threads(int(threads))
    module, name = fn.split(":")
    timed = deadline is not None and threading.current_thread() is threading.main_thread()
    if timed:  # a worker process runs its calls in its main thread, where signals arrive
        previous = signal.signal(signal.SIGALRM, _cut)
        signal.setitimer(signal.ITIMER_REAL, max(deadline - time.time(), 1e-3))
    t0 = time.perf_counter()
    try:
        result = getattr(importlib.import_module(module), name)(**args)
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return result, time.perf_counter() - t0


def stage_file(out_dir: str | Path, stage: Stage) -> Path:
    return Path(out_dir) / "stages" / f"{stage.key}.json"


# Until 2026-12-05 the evidence and diagnostics studies named their stage functions by
# ``__name__``, which is ``__main__`` under ``python -m``: their records are keyed so.
LEGACY_MODULE = "__main__"


def _legacy_file(out_dir: str | Path, stage: Stage) -> Path:
    """Where ``python -m`` stored this stage's record before functions were named by module."""
    key = config_key({"fn": f"{LEGACY_MODULE}:{stage.fn.split(':')[1]}", "args": stage.args})
    return Path(out_dir) / "stages" / f"{key}.json"


def stored_stage_file(out_dir: str | Path, stage: Stage) -> Path | None:
    """The file of a finished stage's record, or None; a record stored under the ``__main__``
    name of its function counts (the same function and arguments)."""
    for path in (stage_file(out_dir, stage), _legacy_file(out_dir, stage)):
        if path.is_file():
            return path
    return None


def stage_result(out_dir: str | Path, stage: Stage) -> dict | None:
    """The stored record of a finished stage (``result``, ``seconds``, ...), or None."""
    path = stored_stage_file(out_dir, stage)
    return None if path is None else json.loads(path.read_text())


def run_stages(stages: Sequence[Stage], out_dir: str | Path, *, jobs: int = 1, threads: int = 1, log=print,
               on_finish: Callable[[Stage, dict], None] | None = None,
               deadline: float | None = None) -> dict[str, dict]:
    """Run every unfinished stage once its dependencies are done; records by stage name.

    ``jobs > 1`` runs stages on that many fresh processes (``spawn``), each with ``threads``
    torch threads; ``on_finish(stage, record)`` runs in this process after each stage (e.g. to
    rewrite a report as results come in). A failing stage stops the run with its error after
    the stages already running have finished. ``deadline`` (``time.time()`` seconds): no stage
    starts after it and the running ones are cut at it (logged ``cut``); the records returned
    are then those finished, the others are left for the next run.
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {sorted(n for n in names if names.count(n) > 1)}")
    by_name = {s.name: s for s in stages}
    for s in stages:
        unknown = [d for d in s.deps if d not in by_name]
        if unknown:
            raise ValueError(f"stage {s.name!r} depends on unknown stage(s) {unknown}")
    records: dict[str, dict] = {}
    for s in stages:
        rec = stage_result(out_dir, s)
        if rec is not None:
            records[s.name] = rec
    pending = [s for s in stages if s.name not in records]
    if records:
        log(f"{len(records)} of {len(stages)} stages already done (cached in {Path(out_dir) / 'stages'})")

    def finish(stage: Stage, result: dict, seconds: float) -> None:
        rec = {"name": stage.name, "fn": stage.fn, "args": stage.args, "result": result, "seconds": seconds,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(stage_file(out_dir, stage), rec)
        records[stage.name] = rec
        log(f"[{len(records)}/{len(stages)}] {stage.name}: {seconds / 60:.1f} min")
        if on_finish is not None:
            on_finish(stage, rec)

    def ready(s: Stage) -> bool:
        return all(d in records for d in s.deps)

    def out_of_time() -> bool:
        if deadline is not None and time.time() >= deadline:
            log(f"deadline reached: {len(pending)} stage(s) not started")
            return True
        return False

    if jobs <= 1:
        while pending and not out_of_time():
            s = next((s for s in pending if ready(s)), None)
            if s is None:
                raise RuntimeError(f"stages wait on each other: {[p.name for p in pending]}")
            pending.remove(s)
            log(f"start {s.name}")
            try:
                result = _call(s.fn, s.args, threads, deadline)
            except StageCut:
                log(f"cut {s.name} at the deadline (no record written; it runs again next time)")
                break
            finish(s, *result)
        return records

    running: dict = {}
    error = None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        stopped = False  # the deadline passed: start nothing more
        while pending or running:
            stopped = stopped or (error is None and bool(pending) and out_of_time())
            while error is None and not stopped and len(running) < jobs:
                s = next((s for s in pending if ready(s)), None)
                if s is None:
                    break
                pending.remove(s)
                log(f"start {s.name}")
                running[pool.submit(_call, s.fn, s.args, threads, deadline)] = s
            if not running:
                if error is None and not stopped:
                    raise RuntimeError(f"stages wait on each other: {[p.name for p in pending]}")
                break
            timeout = None if deadline is None or stopped else max(deadline - time.time(), 0) + 0.1
            done, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
            for fut in done:
                s = running.pop(fut)
                try:
                    finish(s, *fut.result())
                except StageCut:
                    log(f"cut {s.name} at the deadline (no record written; it runs again next time)")
                except Exception as err:  # the others finish; then the first error is raised
                    log(f"stage {s.name} failed: {type(err).__name__}: {err}")
                    error = error or err
    if error is not None:
        raise error
    return records
