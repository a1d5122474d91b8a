"""One model per run: a study's numbers for a run all come from one realization of it.

A run's EMA weights are kept with the records (:func:`pf.experiments.common.keep_weights`) so a
study continued elsewhere measures the very model its stored numbers came from. Where the kept
weights are gone (a fresh clone: they are not in git), the run is trained again, and the same
config trained on another machine rounds differently and ends another model. Its new numbers
beside the stored ones would mix two models, so a report refuses that
(:func:`check_one_realization`), and :func:`supersede` moves the records measured on the old
realization to ``<records_dir>/superseded/`` (nothing is deleted), for the study to measure
them again on the kept weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

SUPERSEDED = "superseded"


def recorded_weights(result: dict) -> set:
    """The weights fingerprints a record's result names: a training's kept copy (else its
    checkpoint's), a stage's points', or a point's (or profile's) own."""
    if "kept_weights" in result:
        return {result["kept_weights"]}
    if "points" in result:
        return {p.get("weights") for p in result["points"]}
    return {result.get("weights")}


def check_one_realization(points: list[dict], trained: dict) -> None:
    """Every point of a run was measured on the weights its training recorded (``trained``:
    (arm, training seed) -> the train stage's result); a point of a run trained again to
    another model is refused, never averaged in."""
    for p in points:
        run = trained.get((p.get("arm"), p.get("train_seed")))
        if run is None:
            continue
        (recorded,) = recorded_weights(run)
        if p.get("weights") != recorded:
            raise ValueError(f"a point of {p.get('arm')} (training seed {p.get('train_seed')}, K={p.get('steps')}) "
                             f"was measured on weights {p.get('weights')}, not the {recorded} its training "
                             f"recorded (the run was retrained to another model): run the study with "
                             f"supersede=[{p.get('arm')}:{p.get('train_seed')}] to measure the run again on one model")


def run_point_files(records_dir: str | Path, trajectory: str, steps: int) -> list[Path]:
    """The stored points (``<records_dir>/points``) of one run: its trajectory at ``steps``."""
    out = []
    for path in sorted((Path(records_dir) / "points").glob("*.json")):
        key = json.loads(path.read_text())["key"]
        if key.get("trajectory") == trajectory and int(key.get("train_steps", -1)) == int(steps):
            out.append(path)
    return out


def supersede(records_dir: str | Path, files: Iterable[Path], current: str) -> list[tuple[Path, Path]]:
    """Move each record of ``files`` whose result names other weights than ``current`` (the run's
    kept weights now) to ``<records_dir>/superseded/<kind>/<name>.<its weights>.json``, where no
    study reads it; returns (from, to) of each move. A record that names ``current`` stays."""
    root = Path(records_dir)
    moves = []
    for path in files:
        weights = recorded_weights(json.loads(path.read_text())["result"])
        if weights == {current}:
            continue
        dest = root / SUPERSEDED / path.parent.name / f"{path.stem}.{'-'.join(sorted(map(str, weights)))}.json"
        if dest.exists():
            raise FileExistsError(f"{dest} exists: a record of the same realization was superseded before; "
                                  f"{path} is left in place")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        moves.append((path, dest))
    return moves
