"""``trainer.strategy=fsdp`` (FSDP2, ``fully_shard``) on two CPU ranks over gloo: the same
training as DDP, and full-state checkpoints that load across strategies and world sizes.

In the compatibility pass: FSDP2's API and its gloo support differ between torch releases.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import pf.train as pf_train
import train_helpers
from pf.models import load_checkpoint
from pf.models.checkpoint import read_checkpoint_file

FAST = ["trainer.batch_size=4", "trainer.log_every=1", "trainer.progress=false", "data.val_size=16",
        "sampler.steps=2", "sampler.num_images=4", "trainer.val_every=100", "trainer.sample_every=100",
        "trainer.warmup_steps=2", "trainer.keep_every=1", "trainer.ckpt_every=100",
        "trainer.grad_accum=2"]  # two micro-batches: DDP no_sync and FSDP set_requires_gradient_sync with real ranks

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(*overrides: str):
    return train_helpers.make_cfg(*overrides, base=FAST)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, runs: list[tuple[str, str, str, str]], out: str) -> None:
    """Each run: (config yaml, run dir, port, the checkpoint to keep as out/<name>)."""
    torch.set_num_threads(1)
    for cfg_yaml, run_dir, port, keep in runs:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=port)
        pf_train.train(OmegaConf.create(cfg_yaml), run_dir)
        if rank == 0:
            name, path = keep.split("=")
            shutil.copy(path, Path(out) / name)


def test_fsdp_trains_as_ddp_and_its_checkpoints_load_everywhere(tmp_path):
    import torch.multiprocessing as mp

    a, b, c = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "fsdp_from_ddp"
    yaml = lambda *o: OmegaConf.to_yaml(make_cfg(*o))  # noqa: E731
    runs = [
        (yaml("trainer.strategy=ddp", "trainer.max_steps=2"), str(a), str(_free_port()),
         f"ddp2.pt={a}/checkpoints/last.pt"),
        (yaml("trainer.strategy=fsdp", "trainer.max_steps=1"), str(b), str(_free_port()),
         f"fsdp1.pt={b}/checkpoints/last.pt"),
        # FSDP continues DDP's step-1 file (the reverse direction: below)
        (yaml("trainer.strategy=fsdp", "trainer.max_steps=2", f"resume={a}/checkpoints/step_000001.pt"), str(c),
         str(_free_port()), f"fsdp_from_ddp2.pt={c}/checkpoints/last.pt"),
    ]
    mp.spawn(_worker, args=(runs, str(tmp_path)), nprocs=2, join=True)
    ddp1 = read_checkpoint_file(a / "checkpoints" / "step_000001.pt")
    fsdp1, ddp2 = read_checkpoint_file(tmp_path / "fsdp1.pt"), read_checkpoint_file(tmp_path / "ddp2.pt")
    fsdp2 = read_checkpoint_file(tmp_path / "fsdp_from_ddp2.pt")
    # the same layout as a single-process file: plain class name, index-keyed optimizer state
    assert fsdp1["model_class"] == "PatchForcingDiT" and sorted(fsdp1["optimizer"]["state"]) == sorted(
        ddp1["optimizer"]["state"]) and fsdp1["world_size"] == 2
    for want, got in ((ddp1, fsdp1), (ddp2, fsdp2)):  # sharded training = replicated training (float rounding)
        assert want["step"] == got["step"]
        for key in ("state_dict", "ema"):
            assert want[key].keys() == got[key].keys()
            for name in want[key]:
                torch.testing.assert_close(got[key][name], want[key][name], rtol=1e-5, atol=1e-6, msg=name)
        for i, s in want["optimizer"]["state"].items():
            torch.testing.assert_close(got["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-4,
                                       atol=1e-10)
    assert not torch.equal(ddp1["state_dict"]["final_layer.linear.weight"], ddp2["state_dict"]["final_layer.linear.weight"])
    # FSDP's file in one process: pf.models reads it, and a single-process run resumes from it
    assert type(load_checkpoint(tmp_path / "fsdp1.pt")).__name__ == "PatchForcingDiT"
    one = pf_train.train(make_cfg("trainer.max_steps=1", f"resume={tmp_path / 'fsdp1.pt'}"), tmp_path / "single")
    for name, value in one["model"].state_dict().items():
        assert torch.equal(value, fsdp1["state_dict"][name]), name
