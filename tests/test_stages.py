"""The experiment machinery: stage keys, dependency order, caching, worker processes, failures,
and training trajectories (a longer run resumed from a shorter one is the same run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pf.experiments.records import cached, config_key, directory_lock
from pf.experiments.stages import Stage, run_stages
from pf.experiments.trajectories import ensure_trained, logged_records, trajectory_dir

CONFIG_DIR = Path(__file__).resolve().parent.parent / "pf" / "configs"


# ------------------------------------------------------------- stage functions
def record_call(log: str, name: str, value: int = 0) -> dict:
    """A stage: appends its name to ``log`` (so a test sees what ran, in which process)."""
    with open(log, "a") as f:
        f.write(f"{name} {os.getpid()}\n")
    return {"value": value * 2}


def failing(message: str) -> dict:
    raise RuntimeError(message)


def _calls(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.is_file() else []


def test_config_key_is_order_free_and_sensitive_to_values():
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2}) and len(config_key({})) == 12


def test_stages_run_after_their_dependencies_and_are_cached(tmp_path):
    log = str(tmp_path / "calls.txt")
    stages = [Stage("c", f"{__name__}:record_call", {"log": log, "name": "c", "value": 3}, deps=("a", "b")),
              Stage("b", f"{__name__}:record_call", {"log": log, "name": "b"}, deps=("a",)),
              Stage("a", f"{__name__}:record_call", {"log": log, "name": "a", "value": 1})]
    seen = []
    records = run_stages(stages, tmp_path / "out", log=lambda *_: None, on_finish=lambda s, r: seen.append(s.name))
    assert _calls(tmp_path / "calls.txt") == ["a", "b", "c"] and seen == ["a", "b", "c"]
    assert records["c"]["result"] == {"value": 6} and records["a"]["seconds"] >= 0
    again = run_stages(stages, tmp_path / "out", log=lambda *_: None)
    assert _calls(tmp_path / "calls.txt") == ["a", "b", "c"]  # nothing ran twice
    assert again["c"]["result"] == records["c"]["result"]
    changed = [Stage("a", f"{__name__}:record_call", {"log": log, "name": "a", "value": 2})]
    run_stages(changed, tmp_path / "out", log=lambda *_: None)  # new arguments: a new stage
    assert _calls(tmp_path / "calls.txt") == ["a", "b", "c", "a"]


def test_a_record_stored_under_main_is_found_by_the_functions_module_name(tmp_path):
    """``python -m study`` once keyed its records ``__main__:fn``; the same function and arguments
    named by module (as ``device_call`` imports it) find them and run nothing, and only them."""
    log = str(tmp_path / "calls.txt")
    args = {"log": log, "name": "a", "value": 1}
    legacy = {"fn": "__main__:record_call", "args": args}
    stored = tmp_path / "out" / "stages" / f"{config_key(legacy)}.json"
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps({"name": "a", **legacy, "result": {"value": 99}, "seconds": 1.0}))
    stages = [Stage("a", f"{__name__}:record_call", args),
              Stage("b", f"{__name__}:record_call", {**args, "name": "b"}),  # other arguments
              Stage("c", f"{__name__}:failing", {"message": "not this one"})]  # another function
    with pytest.raises(RuntimeError, match="not this one"):
        run_stages(stages, tmp_path / "out", log=lambda *_: None)
    assert _calls(tmp_path / "calls.txt") == ["b"]  # a came from the record under __main__
    assert run_stages(stages[:1], tmp_path / "out", log=lambda *_: None)["a"]["result"] == {"value": 99}


def test_worker_processes_run_stages_in_parallel(tmp_path):
    log = str(tmp_path / "calls.txt")
    stages = [Stage(f"s{i}", f"{__name__}:record_call", {"log": log, "name": f"s{i}", "value": i}) for i in range(4)]
    stages.append(Stage("last", f"{__name__}:record_call", {"log": log, "name": "last"},
                        deps=tuple(f"s{i}" for i in range(4))))
    records = run_stages(stages, tmp_path / "out", jobs=2, log=lambda *_: None)
    lines = (tmp_path / "calls.txt").read_text().splitlines()
    assert sorted(r["result"]["value"] for n, r in records.items() if n != "last") == [0, 2, 4, 6]
    assert lines[-1].startswith("last") and all(int(line.split()[1]) != os.getpid() for line in lines)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_stage_stops_the_run_and_is_not_cached(tmp_path, jobs):
    stages = [Stage("bad", f"{__name__}:failing", {"message": "broken on purpose"}),
              Stage("after", f"{__name__}:record_call", {"log": str(tmp_path / "c.txt"), "name": "after"},
                    deps=("bad",))]
    with pytest.raises(RuntimeError, match="broken on purpose"):
        run_stages(stages, tmp_path / "out", jobs=jobs, log=lambda *_: None)
    assert not (tmp_path / "c.txt").exists() and not list((tmp_path / "out").glob("stages/*.json"))


def fails_once(log: str, name: str, flag: str) -> dict:
    """A stage killed the first time it runs (the ``flag`` file does not exist yet)."""
    record_call(log, name)
    if not Path(flag).exists():
        Path(flag).touch()
        raise KeyboardInterrupt("killed")  # what an interrupted study raises
    return {"value": 1}


def test_an_interrupted_study_resumes_at_the_stage_it_stopped_in(tmp_path):
    """Killed in its second stage, the study reruns that stage and the ones after it; the
    finished first stage is read back from its record, not run again."""
    log, flag = str(tmp_path / "calls.txt"), str(tmp_path / "flag")
    stages = [Stage("first", f"{__name__}:record_call", {"log": log, "name": "first", "value": 1}),
              Stage("second", f"{__name__}:fails_once", {"log": log, "name": "second", "flag": flag}, deps=("first",)),
              Stage("third", f"{__name__}:record_call", {"log": log, "name": "third"}, deps=("second",))]
    with pytest.raises(KeyboardInterrupt):
        run_stages(stages, tmp_path / "out", log=lambda *_: None)
    assert _calls(tmp_path / "calls.txt") == ["first", "second"]
    assert len(list((tmp_path / "out" / "stages").glob("*.json"))) == 1  # only the finished stage is recorded
    records = run_stages(stages, tmp_path / "out", log=lambda *_: None)
    assert _calls(tmp_path / "calls.txt") == ["first", "second", "second", "third"]
    assert records["first"]["result"] == {"value": 2} and records["second"]["result"] == {"value": 1}
    assert set(records) == {"first", "second", "third"}


def test_bad_stage_lists():
    with pytest.raises(ValueError, match="unique"):
        run_stages([Stage("a", "m:f", {}), Stage("a", "m:f", {"x": 1})], "/tmp/unused", log=lambda *_: None)
    with pytest.raises(ValueError, match="unknown stage"):
        run_stages([Stage("a", "m:f", {}, deps=("zzz",))], "/tmp/unused", log=lambda *_: None)


def test_cached_computes_once(tmp_path):
    calls = []
    out = [cached(tmp_path, "points", {"k": 1}, lambda: calls.append(1) or {"v": len(calls)}) for _ in range(2)]
    assert out == [{"v": 1}, {"v": 1}] and calls == [1]
    stored = json.loads(next((tmp_path / "points").glob("*.json")).read_text())
    assert stored["key"] == {"k": 1} and stored["result"] == {"v": 1}


def test_a_dead_owner_lock_is_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("999999999")  # no such process
    with directory_lock(tmp_path / "run", poll_s=0.01, log=lambda *_: None):
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / "run" / ".lock").exists()


# ------------------------------------------------------------------ trajectories
def _train_cfg(*overrides):
    fast = ["trainer.batch_size=8", "trainer.progress=false", "data.val_size=16", "sampler.steps=2",
            "sampler.num_images=10", "trainer.warmup_steps=2", "trainer.keep_every=2", "trainer.ckpt_every=2",
            "trainer.val_every=2", "trainer.sample_every=100", "device=cpu", "data.image_size=8"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*fast, *overrides])


def _weights(path) -> dict:
    from pf.models.checkpoint import read_checkpoint_file

    ckpt = read_checkpoint_file(path)
    return {**ckpt["state_dict"], **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}


def test_a_trajectory_resumed_in_pieces_is_the_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    cfg = _train_cfg()
    whole = ensure_trained(cfg, tmp_path / "a", 4, log=lambda *_: None)
    part = ensure_trained(cfg, tmp_path / "b", 2, log=lambda *_: None)
    more = ensure_trained(cfg, tmp_path / "b", 4, log=lambda *_: None)
    assert part["steps"] == 2 and more["steps"] == 4 and Path(more["checkpoint"]).name == "step_000004.pt"
    a, b = _weights(whole["checkpoint"]), _weights(more["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the step-2 checkpoint of the long run is the short run
    a2, b2 = _weights(Path(whole["run_dir"]) / "checkpoints" / "step_000002.pt"), _weights(part["checkpoint"])
    assert all(torch.equal(a2[k], b2[k]) for k in a2)
    assert more["train_seconds"] > 0 and json.loads((Path(more["run_dir"]) / "segments.json").read_text())[1]["from"] == 2
    # a run's logged records stop at its steps (its trajectory went on); a torn last line is skipped
    with open(Path(more["run_dir"]) / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert max(r["step"] for r in logged_records(part)) == 2 and max(r["step"] for r in logged_records(more)) == 4
    # asking again trains nothing
    mtime = Path(more["checkpoint"]).stat().st_mtime_ns
    ensure_trained(cfg, tmp_path / "b", 4, log=lambda *_: None)
    assert Path(more["checkpoint"]).stat().st_mtime_ns == mtime


def test_trajectory_keys_ignore_logging_but_not_the_recipe(tmp_path):
    base = trajectory_dir(tmp_path, _train_cfg())
    assert trajectory_dir(tmp_path, _train_cfg("trainer.log_every=7", "trainer.max_steps=9", "sampler.steps=5")) == base
    assert trajectory_dir(tmp_path, _train_cfg("trainer.lr=2e-3")) != base
    assert trajectory_dir(tmp_path, _train_cfg("seed=1")) != base
    assert trajectory_dir(tmp_path, _train_cfg("trainer=fm")) != base
    # options a class model does not use (the text encoder's keys) leave its trajectories alone
    assert trajectory_dir(tmp_path, _train_cfg("text.dropout=0.3", "text.name=t5")) == base


def test_the_studys_trajectories_keep_their_keys():
    """The study's stored records (results/study) point at these runs: a change to the training
    config's keys or defaults that moves them orphans every stored point of the study. If the
    change is meant to alter what the arms train, update the keys here (and rerun the study)."""
    from pf import cli
    from pf.experiments import common, reproduce
    from pf.experiments.command import study_config
    from pf.experiments.comparison import ARMS
    from pf.experiments.trajectories import trajectory_config

    study = study_config(cli.parse(reproduce.DEFAULTS, []))
    keys = {arm: config_key(trajectory_config(common.compose_train_config(study, ARMS[arm]["overrides"], 0)))
            for arm in ("pf_ltg", "sit_uniform", "pf_logit_normal")}
    assert keys == {"pf_ltg": "ea3cfc1ccd38", "sit_uniform": "4e9c5e4b162a", "pf_logit_normal": "9958c40624d5"}
