"""The study in one device call (scripts/gpu_study.sh, pf.experiments.device_call), rehearsed on
the CPU: the plan, a deadline that cuts a stage cleanly and a second call that continues, the
returned tar and its merge (refusing a record that differs), and the toy study end to end.

This module is also a study (it names its stages: DEFAULTS, FREE, TOY, build_stages), whose
stages the worker processes import by this module's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pf.experiments import device_call
from pf.experiments.records import cached
from pf.experiments.stages import Stage

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_study.sh"

#################################################################################
#            A study of three stages, one of them as slow as asked              #
#################################################################################

DEFAULTS = {"records_dir": "unset", "out_dir": "unset", "device": "cpu", "jobs": 2, "threads": 1, "model": "tiny",
            "toy": False}
FREE = ()
TOY: list[str] = []
SLOW_ENV = "PF_TEST_SLOW_STAGE_S"  # outside the stage's arguments, so its key stays the same


def quick_stage(records: str, name: str) -> dict:
    return {"name": name}


def slow_stage(records: str) -> dict:
    """Writes one cached point of 20 kB every 0.1 s for $PF_TEST_SLOW_STAGE_S seconds: a cut
    lands in a write or between two."""
    end = time.time() + float(os.environ.get(SLOW_ENV, "0"))
    i = 0
    while True:
        cached(records, "points", {"i": i}, lambda: {"i": i, "blob": "x" * 20_000})
        i += 1
        if time.time() >= end:
            return {"points": i}
        time.sleep(0.1)


def build_stages(study: dict) -> list[Stage]:
    rec = study["records_dir"]
    return [Stage("quick a", f"{__name__}:quick_stage", {"records": rec, "name": "a"}),
            Stage("slow b", f"{__name__}:slow_stage", {"records": rec}),
            Stage("after a", f"{__name__}:quick_stage", {"records": rec, "name": "after"}, deps=("quick a",))]


def read_tars(out: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(out.glob("study-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                files[m.name] = tar.extractfile(m).read()
    return files


#################################################################################
#                                     Tests                                      #
#################################################################################


def test_jobs_follow_gpu_memory_and_cores():
    assert device_call.choose_jobs("tiny", 80.0, 16) == (8, 2)   # H100: the cap, two cores a worker
    assert device_call.choose_jobs("tiny", 10.0, 16) == (4, 4)   # 80% of 10 GiB at 2 GiB a worker
    assert device_call.choose_jobs("pf-xl2", 80.0, 16) == (8, 2)
    assert device_call.choose_jobs("pf-xl2", 24.0, 16) == (2, 8)
    assert device_call.choose_jobs("tiny", 80.0, 2) == (1, 2)


def test_dry_run_prints_the_plan():
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "device=cuda jobs=8" in out.stdout and "budget 540 s" in out.stdout
    assert "  classifier" in out.stdout and "  train pf_ltg seed 0" in out.stdout


def test_point_key_names_the_device():
    """A GPU-measured point is another point than a CPU-measured one (device is in its key)."""
    from pf.experiments.curves import point_key

    _, cpu = device_call.load_study("pf.experiments.reproduce", ["device=cpu"], device_defaults=False)
    _, gpu = device_call.load_study("pf.experiments.reproduce", ["device=cuda"], device_defaults=True)
    train = {"trajectory": "t", "steps": 3000}
    a, b = (point_key(s, train, "euler", {}, 10, 0) for s in (cpu, gpu))
    assert (a["device"], b["device"]) == ("cpu", "cuda")
    assert gpu["eval"]["compile"] is False and cpu["eval"]["compile"] is True  # the device call's default


def test_deadline_cuts_a_stage_cleanly_and_the_next_call_continues(tmp_path, monkeypatch):
    rec, out1, out2 = tmp_path / "rec", tmp_path / "out1", tmp_path / "out2"
    out1.mkdir()
    out2.mkdir()
    args = [f"records_dir={rec}", f"out_dir={tmp_path / 'runs'}"]
    snap = tmp_path / "snap.json"
    device_call.main(["snapshot", str(rec), str(snap)])

    # call 1: the slow stage runs past the deadline (the workers inherit the environment)
    monkeypatch.setenv(SLOW_ENV, "1000")
    t0 = time.time()
    rc = device_call.run(__name__, args, deadline=t0 + 30, summary=out1 / "summary.json")
    took = time.time() - t0
    summary = json.loads((out1 / "summary.json").read_text())
    assert rc == 1 and summary["left"] == ["slow b"], summary
    assert sorted(summary["done_now"]) == ["after a", "quick a"]
    assert took < 45, f"the cut took {took:.0f} s after a 30 s deadline"
    points = sorted((rec / "points").iterdir())
    assert len(points) > 10
    for p in points:  # whole files only: the cut left no half-written point (temporary files are hidden)
        if not p.name.startswith("."):
            assert len(json.loads(p.read_text())["result"]["blob"]) == 20_000

    device_call.main(["pack", str(rec), str(snap), str(out1), "--summary", str(out1 / "summary.json")])
    returned = read_tars(out1)
    assert not any(Path(n).name.startswith(".") for n in returned)
    stage_files = [n for n in returned if n.startswith("stages/")]
    assert len(stage_files) == 2  # the two finished stages; none for the cut one
    assert {json.loads(returned[n])["name"] for n in stage_files} == {"quick a", "after a"}
    assert sum(n.startswith("device_calls/") for n in returned) == 1
    assert json.loads((out1 / "summary.json").read_text())["returned"]["changed_files"] == len(returned)

    # call 2: the same stage (same key), now quick; the finished ones are not run again
    device_call.main(["snapshot", str(rec), str(snap)])
    monkeypatch.setenv(SLOW_ENV, "0")
    time.sleep(1.1)  # the next device_calls file has another second in its name
    rc = device_call.run(__name__, args, deadline=time.time() + 120, summary=out2 / "summary.json")
    summary = json.loads((out2 / "summary.json").read_text())
    assert rc == 0 and summary["done_before"] == 2 and summary["done_now"] == ["slow b"] and summary["left"] == []
    device_call.main(["pack", str(rec), str(snap), str(out2), "--summary", str(out2 / "summary.json")])
    second = read_tars(out2)
    assert [n for n in second if n.startswith("stages/")] != [] and not set(second) & set(stage_files)

    # merged at home: both calls' files land; merging again changes nothing
    home = tmp_path / "home"
    tars = sorted(map(str, [*out1.glob("study-*.tar"), *out2.glob("study-*.tar")]))
    assert device_call.main(["unpack", str(home), *tars]) == 0
    for name, data in {**returned, **second}.items():
        assert (home / name).read_bytes() == data
    assert device_call.main(["unpack", str(home), *tars]) == 0

    # a record that differs from the one at home is refused, and nothing of that merge is written
    changed = home / stage_files[0]
    changed.write_text(changed.read_text().replace('"name"', '"name" ', 1))
    fresh = next(n for n in second if n.startswith("stages/"))
    (home / fresh).unlink()
    assert device_call.main(["unpack", str(home), *tars]) == 2
    assert not (home / fresh).exists()


def test_toy_study_in_one_call_end_to_end(tmp_path):
    """The real script and study (device=cpu, toy sizes, one arm and seed): every stage done
    within the budget, the tar holds the records with the device that measured them, and the
    merge at home reproduces them."""
    out, rec = tmp_path / "out", tmp_path / "rec"
    args = [f"out_dir={tmp_path / 'runs'}", f"records_dir={rec}", f"results={tmp_path / 'R.md'}",
            f"figures={tmp_path / 'fig'}", "arms=[pf_ltg]", "train.seeds=[0]", "eval.samplers={pf_ltg:[euler_pf]}",
            "eval.trend_arms=[]", "eval.seeds=[0]"]
    env = {**os.environ, "PF_STUDY_FAKE": "1", "PF_STUDY_BUDGET_S": "300", "PF_STUDY_RESERVE_S": "10",
           "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["left"] == [] and len(summary["done_now"]) == 5 and summary["device"] == "cpu"
    assert "left: 0 of 5" in res.stdout and (out / "study.log").read_text().strip()
    returned = read_tars(out)
    kinds = {n.split("/")[0] for n in returned}
    assert kinds == {"stages", "points", "weights", "device_calls"}, kinds
    points = [json.loads(returned[n]) for n in returned if n.startswith("points/")]
    assert points and all(p["key"]["device"] == "cpu" for p in points)
    home = tmp_path / "home"
    assert device_call.main(["unpack", str(home), *map(str, sorted(out.glob("study-*.tar")))]) == 0
    assert device_call.file_hashes(home) == device_call.file_hashes(rec)


@pytest.mark.parametrize("bad", ["../escape.json", ".lock"])
def test_unpack_refuses_a_path_outside_the_records(tmp_path, bad):
    src = tmp_path / "f.json"
    src.write_text("{}")
    tar_path = tmp_path / "bad.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(src, arcname=bad)
    with pytest.raises(SystemExit, match="not a record file"):
        device_call.unpack(tmp_path / "home", [tar_path])
    assert not (tmp_path / "home").exists()


def test_pack_keeps_to_what_comes_back(tmp_path, monkeypatch):
    """At most MAX_TARS tars of TAR_BYTES: what does not fit is listed, not returned."""
    monkeypatch.setattr(device_call, "TAR_BYTES", 10_000)
    monkeypatch.setattr(device_call, "MAX_TARS", 2)
    rec, out = tmp_path / "rec", tmp_path / "out"
    out.mkdir()
    for i in range(5):
        (rec / "points").mkdir(parents=True, exist_ok=True)
        (rec / "points" / f"{i}.json").write_text("x" * 3000)  # 4 kB a file with its tar header
    (rec / "points" / ".half.json.123.tmp").write_text("{")  # an atomic write in progress: never packed
    result = device_call.pack(rec, tmp_path / "none.json", out, None)
    assert [t["files"] for t in result["tars"]] == [2, 2] and result["left_out"] == ["points/4.json"]
    assert sorted(read_tars(out)) == [f"points/{i}.json" for i in range(4)]


def test_deadline_in_process(tmp_path, monkeypatch):
    """jobs=1 (the stages run in this process): the running stage is cut by the same timer, and
    nothing starts after it; the timer is off again afterwards."""
    import signal

    from pf.experiments.stages import run_stages

    monkeypatch.setenv(SLOW_ENV, "1000")
    rec = tmp_path / "rec"
    t0 = time.time()
    done = run_stages(build_stages({"records_dir": str(rec)}), rec, jobs=1, deadline=t0 + 2, log=lambda *a: None)
    assert sorted(done) == ["quick a"] and time.time() - t0 < 10
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert [p.name for p in (rec / "stages").iterdir()] and len(list((rec / "stages").iterdir())) == 1
