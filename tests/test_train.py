"""The training job: config composition, artifacts, falling loss, exact resume, atomic
checkpoints, non-finite losses, the fm baseline and two-rank DDP on the CPU (gloo).

Everything is PF-Tiny/2 on the embedded digits with small batches and few steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import pf.train as pf_train
import train_helpers
from child_env import child_env
from pf.data import DataError
from pf.models import load_checkpoint
from pf.models.checkpoint import read_checkpoint_file
from pf.training.checkpointing import resolve_resume
from pf.training.schema import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FAST = train_helpers.BASE  # the default validation and picture intervals


def make_cfg(*overrides: str):
    return train_helpers.make_cfg(*overrides, base=FAST)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------- config
def test_config_groups_compose():
    cfg = make_cfg()
    assert cfg.model.name == "Tiny/2" and cfg.data.name == "digits" and cfg.trainer.kind == "pf"
    assert cfg.model.input_size == 16 and cfg.model.num_classes == 10 and cfg.sampler.name == "euler_pf"
    big = make_cfg("model=pf-xl2", "data=latents", "trainer=fm", "sampler=look_ahead")
    assert big.model.name == "XL/2" and big.model.in_channels is None and big.model.num_classes is None  # from the data
    assert big.trainer.lr == 1e-4 and big.trainer.ema_decay == 0.9999 and big.trainer.max_steps == 400000
    assert big.trainer.timesteps.name == "uniform" and big.sampler.params.context_t_ratio == 1.4  # the paper's SiT
    for name in ("pf-s2", "pf-b2", "pf-l2"):
        assert make_cfg(f"model={name}").model.name == name[3:-1].upper() + "/2"
    assert make_cfg("sampler=dual_loop").sampler.params.n_inner == 4


def test_unknown_config_keys_are_errors(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'trainer.bogus'"):
        make_cfg("trainer.bogus=1")
    with pytest.raises(ConfigCompositionException):
        make_cfg("lr=1")
    cfg = make_cfg("+trainer.learning_rate=1")  # appended keys are caught by the job's schema check
    with pytest.raises(ConfigError, match=r"unknown config key trainer.learning_rate \(trainer takes: kind, "):
        pf_train.train(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------- artifacts, CLI, loss
def test_default_config_cli_writes_every_artifact(tmp_path):
    run_dir = tmp_path / "run"
    env = child_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pf.train", "trainer.max_steps=3", "trainer.val_every=3", "trainer.ckpt_every=3",
           "trainer.sample_every=3", *FAST, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "checkpoints" / "step_000003.pt").is_file()
    assert (run_dir / "samples" / "step_000003.png").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "config.yaml").is_file()
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3] and all("loss" in r for r in recs)
    assert len(recs[-1]["segments"]) == 8 and recs[-1]["val_loss"] > 0
    ckpt = read_checkpoint_file(run_dir / "checkpoints" / "last.pt")  # weights_only=True
    assert ckpt["step"] == 3 and {"optimizer", "scheduler", "ema", "rng"} <= set(ckpt)
    model = load_checkpoint(run_dir / "checkpoints" / "last.pt")  # the EMA weights
    assert type(model).__name__ == "PatchForcingDiT" and model.num_classes == 10
    from PIL import Image

    with Image.open(run_dir / "samples" / "step_000003.png") as img:
        assert img.width > 2 * img.height  # samples and difficulty map side by side


def test_tiny_run_loss_falls(tmp_path):
    cfg = make_cfg("trainer.max_steps=20", "trainer.batch_size=16", "trainer.log_every=5", "trainer.val_every=1000",
                   "trainer.sample_every=1000", "trainer.ckpt_every=1000", "trainer.warmup_steps=5")
    pf_train.train(cfg, tmp_path)
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [5, 10, 15, 20]
    assert recs[-1]["loss"] < 0.75 * recs[0]["loss"], [r["loss"] for r in recs]
    assert recs[-1]["img_per_s"] > 0 and recs[-1]["lr"] == pytest.approx(1e-3)


# ------------------------------------------------------------------------ resume
def test_resume_continues_exactly(tmp_path):
    common = ["trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.keep_every=3", "trainer.val_every=100",
              "trainer.sample_every=100", "trainer.warmup_steps=4"]
    full = pf_train.train(make_cfg(*common), tmp_path / "full")
    first = pf_train.train(make_cfg(*common[1:], "trainer.max_steps=3"), tmp_path / "first")
    assert resolve_resume(tmp_path / "first") == tmp_path / "first" / "checkpoints" / "last.pt"
    resumed = pf_train.train(make_cfg(*common, f"resume={tmp_path / 'first'}"), tmp_path / "first")

    full_losses = [(r["step"], r["loss"]) for r in records(tmp_path / "full")]
    assert [(r["step"], r["loss"]) for r in records(tmp_path / "first")] == full_losses  # bit-equal
    for a, b in zip(full["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full["ema"].state_dict().values(), resumed["ema"].state_dict().values()):
        assert torch.equal(a, b)
    assert first["summary"]["steps"] == 3 and resumed["summary"]["steps"] == 6


def test_crash_while_writing_a_checkpoint_keeps_the_previous_last(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half written, then the process "dies"
            f.write(b"PK\x03\x04 half a zip")
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    cfg = make_cfg("trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.keep_every=100", "trainer.val_every=100",
                   "trainer.sample_every=100")
    with pytest.raises(OSError, match="simulated"):
        pf_train.train(cfg, tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    ckpt_dir = tmp_path / "checkpoints"
    assert read_checkpoint_file(ckpt_dir / "last.pt")["step"] == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt"]  # no temp file left behind
    load_checkpoint(ckpt_dir / "last.pt")


def test_non_finite_loss_stops_and_names_the_step(tmp_path, monkeypatch):
    from pf.training.objective import Objective

    real_loss, calls = Objective.__call__, []

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Objective, "__call__", poisoned)
    cfg = make_cfg("trainer.max_steps=5", "trainer.ckpt_every=2", "trainer.val_every=100", "trainer.sample_every=100")
    with pytest.raises(pf_train.NonFiniteLoss, match=r"at step 3;.*last good checkpoint is .*last.pt"):
        pf_train.train(cfg, tmp_path)
    assert read_checkpoint_file(tmp_path / "checkpoints" / "last.pt")["step"] == 2
    assert [r["step"] for r in records(tmp_path)] == [1, 2]


# ------------------------------------------------------------------- data errors
@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["model.num_classes=12"], DataError, r"10 classes but the model is built for num_classes=12"),
        (["data=folder"], DataError, r"data=folder needs data.path"),
        (["data=folder", "data.path=/nonexistent/images"], DataError, r"is not a directory"),
        (["data=latents", "data.path=/nonexistent/lat.npz"], DataError, r"latents file not found"),
        (["trainer.batch_size=4096"], ValueError, r"fewer than one batch"),
        (["trainer=fm", "trainer.timesteps.name=ltg"], ValueError, r"one time per sample"),
    ],
)
def test_bad_data_or_settings_stop_before_training(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        pf_train.train(make_cfg("trainer.max_steps=2", *overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_folder_with_the_wrong_number_of_classes(tmp_path):
    from PIL import Image

    for name in ("a", "b", "c"):
        (tmp_path / "img" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / name / "0.png")
    cfg = make_cfg("data=folder", f"data.path={tmp_path / 'img'}", "data.num_classes=10", "data.image_size=8")
    with pytest.raises(DataError, match=r"3 classes but the model is built for num_classes=10"):
        pf_train.train(cfg, tmp_path / "run")


# ---------------------------------------------------------------- the fm baseline
def test_fm_baseline_trains_a_global_time_model(tmp_path):
    cfg = make_cfg("trainer=fm", "trainer.max_steps=2", "trainer.val_every=2", "trainer.sample_every=2")
    out = pf_train.train(cfg, tmp_path)
    assert type(out["model"]).__name__ == "GlobalTimeDiT" and not out["model"].predict_uncertainty
    assert "nll" not in records(tmp_path)[-1] and records(tmp_path)[-1]["mse"] > 0  # no difficulty head: no NLL term
    assert (tmp_path / "samples" / "step_000002.png").is_file()
    assert type(load_checkpoint(tmp_path / "checkpoints" / "last.pt")).__name__ == "GlobalTimeDiT"


# ---------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, cfg_yaml: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = pf_train.train(OmegaConf.create(cfg_yaml), Path(out_dir) / "run")
    torch.save({k: v.clone() for k, v in out["model"].state_dict().items()}, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    import torch.multiprocessing as mp

    cfg = make_cfg("trainer.max_steps=3", "trainer.ckpt_every=3", "trainer.val_every=3", "trainer.sample_every=100")
    mp.spawn(_ddp_worker, args=(2, _free_port(), OmegaConf.to_yaml(cfg), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    # the ranks trained: weights moved away from the initialisation
    fresh = pf_train.build_model("Tiny/2", input_size=16, in_channels=1, num_classes=10).state_dict()
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], r0["blocks.0.attn.qkv.weight"])
    ckpt = read_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # each rank has its own timestep stream (the compiled LTG's Philox seed, or its own generator)
    assert not torch.equal(ckpt["rng"][0]["timesteps"], ckpt["rng"][1]["timesteps"])
    lt0, lt1 = ckpt["rng"][0].get("timestep_sampler"), ckpt["rng"][1].get("timestep_sampler")
    if lt0 is not None:
        assert lt0["seed"] != lt1["seed"] and lt0["offset"] == lt1["offset"] == 3 * 8 * 64
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3]


def test_a_timestep_sampler_drawing_bad_times_stops_the_run(tmp_path, monkeypatch):
    from pf import timesteps

    def broken(self, batch, num_patches, device, generator):
        return torch.full((batch, num_patches), float("nan"), device=device)

    monkeypatch.setattr(timesteps.Uniform, "sample", broken)
    cfg = make_cfg("trainer=fm", "trainer.max_steps=2")
    with pytest.raises(ValueError, match=r"patch times must be finite and lie in \[0, 1\]"):  # the model's check
        pf_train.train(cfg, tmp_path)
    # where the model does not look (torch.compile), the loop's own check of the drawn times stops the run
    from pf.models.dit import PatchForcingDiT

    monkeypatch.setattr(PatchForcingDiT, "_check_inputs", lambda self, x, t, y: None)
    with pytest.raises(ValueError, match=r"drew patch times in \[nan, nan\] at step 1; times must be finite"):
        pf_train.train(cfg, tmp_path / "again")
