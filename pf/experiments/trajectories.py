"""Training runs as trajectories: the checkpoint of a config at a step count, trained or resumed.

With a constant learning rate after warm-up nothing a run computes depends on
``trainer.max_steps``, so the checkpoint of step S of a longer run is the run of S steps; a
decaying schedule (``trainer.lr_schedule``) ends at ``max_steps``, which then is part of the
key (``decay_horizon``), and its run is resumed only towards that horizon. A
trajectory is keyed by its whole resolved config except the step count and the logging
intervals, lives in ``<root>/train/<key>``, keeps ``step_XXXXXX.pt`` every ``keep_every``
steps, and a request for more steps resumes it exactly (one process at a time).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from pf.experiments.records import config_key, directory_lock, write_json
from pf.models.checkpoint import read_checkpoint_file
from pf.train import train
from pf.training.metrics import read_records

# Keys that change what a run logs or how often it writes, not what it computes.
FREE_TRAINER_KEYS = ("max_steps", "progress", "log_every", "val_every", "ckpt_every", "keep_every", "sample_every")
FREE_TOP_KEYS = ("resume", "overwrite", "sampler", "hydra")


def trajectory_config(train_cfg) -> dict:
    """The resolved config that decides a training trajectory (what its key hashes)."""
    cfg = OmegaConf.to_container(train_cfg, resolve=True)
    for key in FREE_TOP_KEYS:
        cfg.pop(key, None)
    tr = cfg["trainer"]
    schedule = tr.get("lr_schedule", "constant")
    if schedule == "constant":  # as before the schedules: older runs keep their key
        for key in ("lr_schedule", "min_lr", "decay_fraction"):
            tr.pop(key, None)
    else:  # the decay ends at max_steps: the horizon decides the run, not only where it stops
        tr["decay_horizon"] = tr["max_steps"]
        if schedule != "wsd":
            tr.pop("decay_fraction", None)
    for key, off in (("grad_accum", 1), ("activation_checkpointing", False), ("fid_every", 0), ("strategy", "ddp")):
        if tr.get(key, off) == off:  # off: computes what a run from before the option computed
            tr.pop(key, None)
            if key == "fid_every":
                for k in ("fid_reference", "fid_samples", "fid_weights", "fid_extractor", "fid_reference_stats"):
                    tr.pop(k, None)
            else:  # the defaults of options newer than fid_every: as before them
                if tr.get("fid_extractor", "classifier") == "classifier":
                    tr.pop("fid_extractor", None)
                if tr.get("fid_reference_stats") is None:
                    tr.pop("fid_reference_stats", None)
    tr.pop("log", None)  # where the metrics go, not what the run computes
    if cfg.get("init_from") is None:
        cfg.pop("init_from", None)
        cfg.pop("init_from_ema", None)
    for key in FREE_TRAINER_KEYS:
        tr.pop(key, None)
    cfg["data"].pop("num_workers", None)
    # Options that are off compute nothing: runs from before them keep their key.
    if not cfg["trainer"].get("repa", {}).get("enabled", False):
        cfg["trainer"].pop("repa", None)
    if cfg["model"].get("family", "dit") == "dit":
        cfg["model"].pop("family", None)
        cfg.pop("text", None)  # a class model has no text encoder
    return cfg


def trajectory_dir(root: str | Path, train_cfg) -> Path:
    return Path(root) / "train" / config_key(trajectory_config(train_cfg))


def ensure_trained(train_cfg, root: str | Path, steps: int, log=print) -> dict:
    """The checkpoint of ``train_cfg``'s trajectory at ``steps`` (trained or resumed as needed).

    Returns ``{"checkpoint", "run_dir", "steps", "train_seconds", "seconds_per_step"}``: the
    wall time per step measured over the trained segments (a killed segment is not counted),
    times ``steps``.
    """
    if train_cfg.trainer.get("lr_schedule", "constant") != "constant" and int(steps) != int(train_cfg.trainer.max_steps):
        raise ValueError(f"a run with lr_schedule={train_cfg.trainer.lr_schedule} decays over trainer.max_steps="
                         f"{train_cfg.trainer.max_steps}: ask for exactly that many steps, not {steps}")
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
            # no checkpoint yet: a segment killed before its first one left only metrics; start over
            cfg = OmegaConf.merge(train_cfg, {"trainer": {"max_steps": int(steps)},
                                              "resume": str(last) if start > 0 else None, "overwrite": start == 0})
            write_json(run_dir / "trajectory.json", trajectory_config(train_cfg))
            log(f"training {run_dir.name}: steps {start} -> {steps}")
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


def logged_records(run: dict) -> list[dict]:
    """The ``metrics.jsonl`` records of a run :func:`ensure_trained` returned, up to its steps
    (a trajectory trained further holds the records of later steps too)."""
    return [r for r in read_records(Path(run["run_dir"]) / "metrics.jsonl") if r["step"] <= run["steps"]]
