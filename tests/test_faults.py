"""Faults a user's second command can cause, each guarded (issue 27's findings, numbered as there):
a run folder re-used without ``resume=`` (1), two trainings in one folder (2), an export over its
own input (5), a torn last line of ``metrics.jsonl`` (6), a disk filling up during training (7),
and a study killed (-9) inside a stage. Elsewhere: the encode's faults (a rerun with other
settings, a full disk, kill -9) in test_encode.py; read-only output folders on every write path
and every command's one-line errors in test_cli_errors.py; silent nonsense in test_bad_values.py."""

from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pf.train as pf_train
from train_helpers import FAST, make_cfg
from child_env import child_env
from pf.errors import is_expected, one_line
from pf.models.checkpoint import read_checkpoint_file
from pf.training.run_folder import LOCK_NAME, RunFolderError, RunLock, check_before_hydra, held_run

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def train_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pf.train", *FAST, *args]


# ------------------------------------------------------------ 1: a folder holding a run
def test_a_folder_holding_a_run_is_refused_without_resume_and_moved_aside_with_overwrite(tmp_path):
    """Finding 1: re-running pf.train into a run folder without resume= (or with resume= empty)
    replaced last.pt, truncated metrics.jsonl and mixed old step files with new ones. Now it is
    refused naming resume= and overwrite=true, and overwrite=true moves the old run aside whole."""
    run = tmp_path / "run"
    pf_train.train(make_cfg("trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.keep_every=2"), run)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert set(before) == {"last.pt", "step_000002.pt", "step_000004.pt"} and steps_logged(run) == [1, 2, 3, 4]
    for resume in ([], ["resume="], ["resume=null"]):
        with pytest.raises(RunFolderError, match=rf"{run} already holds a run \(checkpoints/last.pt, 2 step "
                                                 r"checkpoint\(s\), 1 sample picture\(s\), metrics.jsonl\): "
                                                 rf"use resume={run} to continue it, or overwrite=true to start over"):
            pf_train.train(make_cfg("trainer.max_steps=1", *resume), run)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before  # nothing touched
    assert steps_logged(run) == [1, 2, 3, 4] and not (run / LOCK_NAME).exists()

    pf_train.train(make_cfg("trainer.max_steps=1", "trainer.keep_every=1", "overwrite=true"), run)
    (old,) = run.glob("previous-*")
    assert {p.name: p.read_bytes() for p in (old / "checkpoints").iterdir()} == before  # moved, not deleted
    assert steps_logged(old) == [1, 2, 3, 4] and (old / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt", "step_000001.pt"]  # no old files
    assert steps_logged(run) == [1] and read_checkpoint_file(run / "checkpoints" / "last.pt")["step"] == 1
    # the old run still continues from where it was moved
    pf_train.train(make_cfg("trainer.max_steps=5", f"resume={old}"), old)
    assert steps_logged(old) == [1, 2, 3, 4, 5]


def test_what_counts_as_a_run(tmp_path):
    """Finding 1: hydra's own files (.hydra/, the job's log), an empty metrics.jsonl and a lock
    are not a run, so the default command (a new runs/<date>/<time>/ hydra has just filled) trains."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "train.log").write_text("[2026-12-05 10:00:00] starting\n")
    (run / "metrics.jsonl").write_text("")
    assert held_run(run) == []
    (run / "samples").mkdir()
    (run / "samples" / "step_000010.png").write_bytes(b"png")
    assert held_run(run) == ["1 sample picture(s)"]
    with pytest.raises(RunFolderError, match=r"it has no checkpoints/last.pt to continue from: use overwrite=true"):
        pf_train.train(make_cfg("trainer.max_steps=1"), run)
    # resume= from another folder into one that holds a run, and resume= with overwrite=true, are refused too
    (tmp_path / "other.pt").write_bytes(b"another run's checkpoint")
    with pytest.raises(RunFolderError, match=r"holds another run .* than resume="):
        pf_train.train(make_cfg("trainer.max_steps=1", f"resume={tmp_path / 'other.pt'}"), run)
    with pytest.raises(RunFolderError, match=r"overwrite=true would move it aside: give one of the two"):
        pf_train.train(make_cfg("trainer.max_steps=1", f"resume={run / 'samples' / 'step_000010.png'}",
                                "overwrite=true"), run)


def test_the_command_refuses_in_one_line(tmp_path):
    """Finding 1: the README's ``hydra.run.dir=...`` commands, run twice, stop with one line and exit 2,
    before hydra writes its own files into the run's folder."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"a run's checkpoint")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- the run's own overrides\n")
    proc = subprocess.run(train_cli("trainer.max_steps=1", f"hydra.run.dir={run}"), cwd=ROOT, capture_output=True,
                          text=True, env=child_env(OMP_NUM_THREADS="1"), timeout=300)
    line = one_error_line(proc)
    assert f"use resume={run} to continue it, or overwrite=true to start over" in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"a run's checkpoint"
    # refused before hydra wrote its files there: the run's .hydra/ is its own, no log was added
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- the run's own overrides\n"
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints"]


def test_the_check_before_hydra_reads_the_command_line_as_the_job_does(tmp_path):
    """Findings 1 and 2: what the command line checks before hydra starts, and what it leaves to the job."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"ckpt")
    for argv in ([f"hydra.run.dir={run}"], [f"hydra.run.dir='{run}'", "resume="],
                 [f"hydra.run.dir={run}", "resume=null"], [f"hydra.run.dir={run}", "overwrite=false"]):
        with pytest.raises(RunFolderError, match="already holds a run"):
            check_before_hydra(argv)
    for argv in ([f"hydra.run.dir={run}", f"resume={run}"], [f"hydra.run.dir={run}", "overwrite=true"],
                 [f"hydra.run.dir={run}", "overwrite=True"], ["hydra.run.dir=runs/${now:%H-%M-%S}"], []):
        check_before_hydra(argv)  # the job decides (resume, overwrite) or the folder is new
    with RunLock(run):
        with pytest.raises(RunFolderError, match=rf"in use by another training \(pid {os.getpid()} "):
            check_before_hydra([f"hydra.run.dir={run}", f"resume={run}"])


# --------------------------------------------------------------- 2: one process per folder
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_process_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    """Finding 2: two trainings in one folder both ran (metrics interleaved, step files from either).
    A training holds run.lock for its life; a second process in the folder is refused in one line
    naming the holder; after the holder is killed (-9) its stale lock is taken over with a warning."""
    run = tmp_path / "run"
    first = subprocess.Popen(train_cli("trainer.max_steps=100000", "trainer.ckpt_every=5", f"hydra.run.dir={run}"),
                             cwd=ROOT, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():  # training
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first training did not start"
            time.sleep(0.5)
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = subprocess.run(train_cli("trainer.max_steps=1", f"resume={run}", f"hydra.run.dir={run}"), cwd=ROOT,
                                env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
        line = one_error_line(second)
        assert f"{run} is in use by another training (pid {first.pid} on {socket.gethostname()} since " in line
        assert first.poll() is None  # the first run goes on
        assert "trainer.max_steps=100000" in (run / ".hydra" / "overrides.yaml").read_text()  # its hydra files too
    finally:
        first.kill()
        first.wait()
    assert (run / LOCK_NAME).is_file()  # killed: the lock stays behind, stale
    caplog.set_level("WARNING", logger="pf.train")
    pf_train.train(make_cfg("trainer.max_steps=1", "overwrite=true"), run)
    assert f"took over a stale lock (pid {first.pid} on {socket.gethostname()}" in caplog.text
    assert not (run / LOCK_NAME).exists() and steps_logged(run) == [1]


def test_stale_live_and_foreign_locks(tmp_path, caplog):
    """Finding 2: a lock whose pid is dead on this host is stale (taken over, one warning); a live
    holder, a holder on another host (its pid cannot be checked) and an unreadable lock are refused."""
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": "then"}))
    caplog.set_level("WARNING", logger="pf.train")
    with RunLock(run) as held:
        assert json.loads(lock.read_text())["pid"] == os.getpid() and held.held
        with pytest.raises(RunFolderError, match=rf"in use by another training \(pid {os.getpid()} on "):
            RunLock(run).acquire()  # a live holder (this very process)
    assert "took over a stale lock" in caplog.text and not lock.exists()
    if Path("/proc/self/stat").is_file():  # a live pid that is another process now (reused): stale too
        lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": "1", "since": "boot"}))
        with RunLock(run):
            assert json.loads(lock.read_text())["start"] != "1"
        assert f"(pid {os.getpid()} on {socket.gethostname()} since boot is no longer running)" in caplog.text
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "since": "then"}))
    with pytest.raises(RunFolderError, match=r"in use by another training \(pid \d+ on elsewhere since then; .*if it "
                                             r"is no longer running, delete the lock"):
        pf_train.train(make_cfg("trainer.max_steps=1"), run)
    lock.write_text("{\"pid\": ")
    with pytest.raises(RunFolderError, match=r"run.lock exists but is unreadable"):
        RunLock(run).acquire()
    assert lock.read_text() == "{\"pid\": "  # refused locks are left as they were


# ------------------------------------------------------------ 6: a torn line of metrics.jsonl
def test_a_torn_last_metrics_line_is_dropped_on_resume_with_one_warning(tmp_path, caplog):
    """Finding 6: a torn last line in metrics.jsonl (an append cut short by a full disk) blocked
    resume= with 'error: Expecting ',' delimiter: line 1 column 25' naming no file. It is now
    dropped with one warning naming the file, and the run continues."""
    run = tmp_path / "run"
    pf_train.train(make_cfg("trainer.max_steps=3", "trainer.ckpt_every=3"), run)
    metrics = run / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 4, "loss": 0.25 "mse')  # the torn append
    caplog.set_level("WARNING", logger="pf.train")
    out = pf_train.train(make_cfg("trainer.max_steps=5", f"resume={run}"), run)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{metrics}: dropped 1 line(s) that are not whole records (line 4; a write cut short)"]
    assert steps_logged(run) == [1, 2, 3, 4, 5] and metrics.read_text().startswith(whole)
    assert out["summary"]["steps"] == 5 and out["summary"]["final_loss"] == json.loads(
        metrics.read_text().splitlines()[-1])["loss"]


def test_an_append_is_a_whole_line_or_nothing(tmp_path, monkeypatch):
    """Finding 6: an append the disk cuts short is taken back, so the file holds whole records only."""
    from pf.training import metrics as metrics_module

    path = tmp_path / "metrics.jsonl"
    writer = metrics_module.MetricsWriter(path)
    writer.write({"step": 1, "loss": 0.5})
    real_write = os.write

    def disk_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics_module.os, "write", disk_full)
    with pytest.raises(OSError, match="No space left") as err:
        writer.write({"step": 2, "loss": 0.25})
    assert one_line(err.value) == f"error: {path}: No space left on device"  # one line naming the file
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'
    monkeypatch.setattr(metrics_module.os, "write", lambda fd, data: real_write(fd, data[:3]))  # a short write
    with pytest.raises(OSError, match=r"wrote 3 of .* bytes \(no space left on the device\?\)") as err:
        writer.write({"step": 2, "loss": 0.25})
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'
    assert one_line(err.value).startswith(f"error: {path}: wrote 3 of") and is_expected(err.value)


# ------------------------------------------------------------------- 1 and 2 under DDP
def _ddp_refused_worker(rank: int, world: int, port: int, cfg_yaml: str, out_dir: str) -> None:
    from omegaconf import OmegaConf

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        pf_train.train(OmegaConf.create(cfg_yaml), Path(out_dir) / "run")
        message = "trained"
    except RunFolderError as err:
        message = str(err)
    (Path(out_dir) / f"rank{rank}.txt").write_text(message)


def test_every_rank_stops_on_rank_zeros_refusal(tmp_path):
    """Findings 1 and 2 under DDP: rank 0 alone holds the lock and checks the folder; every rank
    raises its refusal (none waits for the others), and the folder is left as it was."""
    import torch.multiprocessing as mp
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"a run's checkpoint")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = OmegaConf.to_yaml(make_cfg("trainer.max_steps=1"))
    mp.spawn(_ddp_refused_worker, args=(2, port, cfg, str(tmp_path)), nprocs=2, join=True)
    messages = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert len(messages) == 1 and f"{run} already holds a run (checkpoints/last.pt)" in messages.pop()
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # no lock left behind


# ------------------------------------------------------------------- 7: a full disk
def _no_temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp"))


def test_training_on_a_full_disk_stops_in_one_line_with_nothing_half_written(tmp_path, capsys):
    """Finding 7: a disk filling up during training was a traceback. Now the checkpoint write
    that runs out of space is one line naming the file, and no temp or partial file is left."""
    from mounts import small_disk

    from pf.errors import run_command

    with small_disk(tmp_path / "disk", "1m") as disk:  # the metrics and config fit, a checkpoint (~20 MB) not
        if disk is None:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        run = disk / "run"
        code = run_command(lambda: pf_train.train(make_cfg("trainer.max_steps=1", "data.val_size=0"), run))
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert re.fullmatch(rf"error: {run}/checkpoints/(last|step_000001)\.pt: No space left on device "
                            r"\(nothing written\)", lines[0]), lines
        assert _no_temp_files(disk) == [] and not list((run / "checkpoints").glob("*.pt"))
        assert steps_logged(run) == [1] and not (run / LOCK_NAME).exists()  # whole records; the lock released


def test_a_checkpoint_write_cut_by_a_full_disk_leaves_the_previous_file(tmp_path, monkeypatch):
    """Finding 7 where no tmpfs can be mounted: the write itself reports ENOSPC (as np.save and
    Python's file writes do); the previous last.pt stays, no temp file is left."""
    import errno

    import torch

    from pf.training.checkpointing import write_checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    write_checkpoint({"step": 1}, ckpt_dir, 1, keep=True)
    before = (ckpt_dir / "last.pt").read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as err:
        write_checkpoint({"step": 2}, ckpt_dir, 2, keep=True)
    assert one_line(err.value) == f"error: {ckpt_dir / 'last.pt'}: No space left on device (nothing written)"
    assert (ckpt_dir / "last.pt").read_bytes() == before and _no_temp_files(tmp_path) == []
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt", "step_000001.pt"]


# ------------------------------------------------------------------- kill -9 during a study's stages
def toy_stage(log: str, name: str) -> dict:
    """A study stage: records that it ran (which process) and returns its name."""
    with open(log, "a") as f:
        f.write(f"{name} {os.getpid()}\n")
    return {"name": name}


STALL_AT_PIECE = 1_000_000  # set in a forked child only: it waits to be killed at that piece


def toy_pieces(out: str, log: str, n: int) -> dict:
    """A stage made of cached pieces (as the studies' evaluations are), each a little slow."""
    from pf.experiments.records import cached

    def piece(i: int) -> dict:
        time.sleep(600 if i >= STALL_AT_PIECE else 0.05)  # the killed child stalls here, never past it
        with open(log, "a") as f:
            f.write(f"piece{i} {os.getpid()}\n")
        return {"value": i * i}

    return {"sum": sum(cached(out, "pieces", {"i": i}, lambda i=i: piece(i))["value"] for i in range(n))}


def _toy_study(root: Path) -> list:
    from pf.experiments.stages import Stage

    root.mkdir(parents=True, exist_ok=True)
    log = str(root / "calls.txt")
    return [Stage("first", f"{__name__}:toy_stage", {"log": log, "name": "first"}),
            Stage("pieces", f"{__name__}:toy_pieces", {"out": str(root / "cache"), "log": log, "n": 5},
                  deps=("first",)),
            Stage("last", f"{__name__}:toy_stage", {"log": log, "name": "last"}, deps=("pieces",))]


def test_a_kill_9_during_a_study_stage_continues_to_the_uninterrupted_result(tmp_path):
    """A study killed (-9) inside a stage restarts there: finished stages and pieces are read
    back, not recomputed, no half-written record is left, and the records equal a run that was
    never interrupted."""
    import signal

    from pf.experiments.stages import run_stages

    quiet = lambda *_: None  # noqa: E731
    ref = tmp_path / "ref"
    want = run_stages(_toy_study(ref), ref / "records", log=quiet)
    run = tmp_path / "run"
    pid = os.fork()
    if pid == 0:  # the study, killed below (a fork: no interpreter start-up to wait for)
        try:
            global STALL_AT_PIECE
            STALL_AT_PIECE = 2  # killed while computing piece 2, however loaded the machine is
            run_stages(_toy_study(run), run / "records", log=quiet)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while len(list((run / "cache" / "pieces").glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    killed_calls = (run / "calls.txt").read_text().split()[::2]
    assert killed_calls[0] == "first" and "last" not in killed_calls  # killed inside "pieces"

    got = run_stages(_toy_study(run), run / "records", log=quiet)
    assert {k: v["result"] for k, v in got.items()} == {k: v["result"] for k, v in want.items()}
    calls = (run / "calls.txt").read_text().split()[::2]
    assert calls.count("first") == 1 and all(calls.count(f"piece{i}") == 1 for i in range(5)), calls
    assert _no_temp_files(run) == [] and len(list((run / "records" / "stages").glob("*.json"))) == 3


def test_a_kill_9_during_training_then_resume_is_the_uninterrupted_run(tmp_path):
    """kill -9 mid-run (after its first checkpoint), then resume=: the same weights, EMA and
    metrics as a run never interrupted; the dead process's lock is taken over."""
    import signal

    import torch

    steps = ["trainer.max_steps=4", "trainer.ckpt_every=2", "data.val_size=0"]
    whole = pf_train.train(make_cfg(*steps), tmp_path / "whole")
    run = tmp_path / "killed"
    # The training in a child interpreter (not a fork: a fork of this test process can inherit its
    # torch/compile state and fail at once), stalled after its first checkpoint until killed.
    child = ("import sys, time\nimport pf.train as t\nfrom train_helpers import make_cfg\n"
             "write = t.write_checkpoint\n"
             "def write_then_wait(*a, **k):\n    path = write(*a, **k)\n    time.sleep(600)\n    return path\n"
             "t.write_checkpoint = write_then_wait\n"
             f"t.train(make_cfg(*{steps!r}), {str(run)!r})\n")
    tests_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=child_env(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{tests_dir}"))
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the training ended before it was killed: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and (run / "checkpoints" / "last.pt").exists()
    assert (run / LOCK_NAME).exists()  # killed with its lock held
    resumed = pf_train.train(make_cfg(*steps, f"resume={run}"), run)
    for a, b in zip(whole["ema"].state_dict().values(), resumed["ema"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(whole["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    logged = [[(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (run, tmp_path / "whole")]
    assert logged[0] == logged[1] and _no_temp_files(run) == []
