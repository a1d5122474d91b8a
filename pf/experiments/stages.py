"""Cached, resumable pieces of an experiment, run one after another or on several processes.

A :class:`Stage` is a function (``"module:function"``, importable in a fresh process) and its
JSON arguments; its key is a hash of both, so a stage whose inputs change is a new stage and
a finished one is never recomputed. A finished stage writes ``<out>/stages/<key>.json``
(its result, wall time and finish date). ``run_stages`` runs every unfinished stage whose
dependencies are finished, on ``jobs`` worker processes (``jobs=1``: in this process), and
returns the results by stage name. A killed study restarts where it stopped: finished stages
are read back, training resumes from its last checkpoint (:func:`ensure_trained`), and
stages cache their own smaller pieces with :func:`cached`.

Training runs are *trajectories*: with a constant learning rate after warm-up nothing a run
computes depends on ``trainer.max_steps``, so the checkpoint of step S of a longer run is the
run of S steps. A trajectory is keyed by its whole resolved config except the step count and
the logging intervals, keeps ``step_XXXXXX.pt`` every ``keep_every`` steps, and a request for
more steps resumes it exactly.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def config_key(obj) -> str:
    """A short stable hash of a JSON-able object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def write_json(path: Path, obj) -> None:
    """Write atomically (temp file, then rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


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


#################################################################################
#                                    Stages                                     #
#################################################################################


@dataclass
class Stage:
    name: str                       # what a reader sees in the log: "train PF (LTG) seed 0"
    fn: str                         # "package.module:function", called as function(**args)
    args: dict                      # JSON-able
    deps: Sequence[str] = ()        # names of stages that must finish first
    key: str = field(init=False)

    def __post_init__(self):
        self.key = config_key({"fn": self.fn, "args": self.args})


def _call(fn: str, args: dict, threads: int) -> tuple[dict, float]:
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    module, name = fn.split(":")
    t0 = time.perf_counter()
    result = getattr(importlib.import_module(module), name)(**args)
    return result, time.perf_counter() - t0


def stage_file(out_dir: str | Path, stage: Stage) -> Path:
    return Path(out_dir) / "stages" / f"{stage.key}.json"


def stage_result(out_dir: str | Path, stage: Stage) -> dict | None:
    """The stored record of a finished stage (``result``, ``seconds``, ...), or None."""
    path = stage_file(out_dir, stage)
    return json.loads(path.read_text()) if path.is_file() else None


def run_stages(stages: Sequence[Stage], out_dir: str | Path, *, jobs: int = 1, threads: int = 1, log=print,
               on_finish: Callable[[Stage, dict], None] | None = None) -> dict[str, dict]:
    """Run every unfinished stage once its dependencies are done; records by stage name.

    ``jobs > 1`` runs stages on that many fresh processes (``spawn``), each with ``threads``
    torch threads; ``on_finish(stage, record)`` runs in this process after each stage (e.g. to
    rewrite a report as results come in). A failing stage stops the run with its error after
    the stages already running have finished.
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

    if jobs <= 1:
        while pending:
            s = next((s for s in pending if ready(s)), None)
            if s is None:
                raise RuntimeError(f"stages wait on each other: {[p.name for p in pending]}")
            pending.remove(s)
            log(f"start {s.name}")
            finish(s, *_call(s.fn, s.args, threads))
        return records

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    running: dict = {}
    error = None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        while pending or running:
            while error is None and len(running) < jobs:
                s = next((s for s in pending if ready(s)), None)
                if s is None:
                    break
                pending.remove(s)
                log(f"start {s.name}")
                running[pool.submit(_call, s.fn, s.args, threads)] = s
            if not running:
                if error is None:
                    raise RuntimeError(f"stages wait on each other: {[p.name for p in pending]}")
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                s = running.pop(fut)
                try:
                    finish(s, *fut.result())
                except Exception as err:  # the others finish; then the first error is raised
                    log(f"stage {s.name} failed: {type(err).__name__}: {err}")
                    error = error or err
    if error is not None:
        raise error
    return records


#################################################################################
#                              Training trajectories                            #
#################################################################################

# Keys that change what a run logs or how often it writes, not what it computes.
FREE_TRAINER_KEYS = ("max_steps", "progress", "log_every", "val_every", "ckpt_every", "keep_every", "sample_every")
FREE_TOP_KEYS = ("resume", "sampler", "hydra")


def trajectory_config(train_cfg) -> dict:
    """The resolved config that decides a training trajectory (what its key hashes)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(train_cfg, resolve=True)
    for key in FREE_TOP_KEYS:
        cfg.pop(key, None)
    for key in FREE_TRAINER_KEYS:
        cfg["trainer"].pop(key, None)
    cfg["data"].pop("num_workers", None)
    # Options that are off compute nothing: runs from before them keep their key.
    if not cfg["trainer"].get("repa", {}).get("enabled", False):
        cfg["trainer"].pop("repa", None)
    if cfg["model"].get("family", "dit") == "dit":
        cfg["model"].pop("family", None)
        cfg.pop("text", None)  # a class model has no text encoder
    return cfg


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


def trajectory_dir(root: str | Path, train_cfg) -> Path:
    return Path(root) / "train" / config_key(trajectory_config(train_cfg))


def ensure_trained(train_cfg, root: str | Path, steps: int, log=print) -> dict:
    """The checkpoint of ``train_cfg``'s trajectory at ``steps`` (trained or resumed as needed).

    Returns ``{"checkpoint", "run_dir", "steps", "train_seconds", "seconds_per_step"}``: the
    wall time per step measured over the trained segments (a killed segment is not counted),
    times ``steps``.
    """
    from omegaconf import OmegaConf

    from pf.models.checkpoint import read_checkpoint_file

    run_dir = trajectory_dir(root, train_cfg)
    ckpt_dir = run_dir / "checkpoints"
    target = ckpt_dir / f"step_{int(steps):06d}.pt"
    segments_file = run_dir / "segments.json"
    with directory_lock(run_dir, log=log):
        if not target.is_file():
            last = ckpt_dir / "last.pt"
            start = int(read_checkpoint_file(last)["step"]) if last.is_file() else 0
            if start > steps:
                raise RuntimeError(f"{run_dir} went past step {steps} without keeping it (keep_every "
                                   f"{train_cfg.trainer.keep_every}); ask for a multiple of keep_every")
            cfg = OmegaConf.merge(train_cfg, {"trainer": {"max_steps": int(steps)},
                                              "resume": str(last) if start > 0 else None})
            write_json(run_dir / "trajectory.json", trajectory_config(train_cfg))
            log(f"training {run_dir.name}: steps {start} -> {steps}")
            from pf.train import train

            t0 = time.perf_counter()
            train(cfg, run_dir)
            segments = json.loads(segments_file.read_text()) if segments_file.is_file() else []
            segments = [s for s in segments if s["to"] <= start]  # a killed segment left no record
            segments.append({"from": start, "to": int(steps), "seconds": time.perf_counter() - t0})
            write_json(segments_file, segments)
    segments = json.loads(segments_file.read_text()) if segments_file.is_file() else []
    covered = sum(s["to"] - s["from"] for s in segments)
    per_step = sum(s["seconds"] for s in segments) / covered if covered else float("nan")
    return {"checkpoint": str(target), "run_dir": str(run_dir), "steps": int(steps),
            "train_seconds": per_step * int(steps), "seconds_per_step": per_step}
