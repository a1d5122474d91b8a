"""``python -m pf.sample``: grids, the ADM ``.npz`` dump (one process and two under
torchrun), the viz strip, and clear errors."""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from child_env import child_env
from model_helpers import tiny_model
from pf import sample, samplers
from pf.autoencoder import to_uint8
from pf.models.checkpoint import model_checkpoint, save_checkpoint
from pf.pipeline import indexed_inputs
from pf.sampling.grid import rgb_nhwc
from pf.sampling.viz import LABEL_WIDTH

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    pixel, latent = folder / "tiny.ckpt", folder / "tiny-latent.ckpt"
    save_checkpoint(model_checkpoint(tiny_model(dtype=torch.float32)), pixel)  # 3 x 8 x 8 pixels
    save_checkpoint(model_checkpoint(tiny_model(dtype=torch.float32, in_channels=4)), latent)
    return {"pixel": str(pixel), "latent": str(latent)}


def _run(*args):
    return sample.main([str(a) for a in args])


def test_grid_png_and_nfe(ckpts, tmp_path, capsys):
    assert _run(f"ckpt={ckpts['pixel']}", "sampler=dual_loop", "steps=3", "cfg=4.0", "classes=[1,2]",
                "n=5", "batch=2", f"out={tmp_path}", "progress=false") == 0
    out = capsys.readouterr().out
    assert "NFE 12" in out and "images/s" in out  # 3 outer steps x 4 inner calls
    png = tmp_path / "dual_loop-steps3-cfg4-seed0.png"
    picture = np.asarray(Image.open(png))
    # readable at 1:1: 8 px samples upscaled to 64, a 14 px label under each, 2 px gaps, a 16 px caption row
    assert picture.shape == (16 + (64 + 14 + 2) + 2, 5 * (64 + 2) + 2, 3)
    assert (picture[:16] < 128).any()  # the caption is written
    tiles = picture[16 + 2:16 + 2 + 64, 2:2 + 64]
    assert len(np.unique(tiles.reshape(-1, 3), axis=0)) > 1  # a sample, not padding


def test_cli_samples_are_the_sampler_output(ckpts):
    cfg = sample.parse_args([f"ckpt={ckpts['pixel']}", "sampler=look_ahead", "steps=3", "cfg=2.0",
                             "classes=[3,5,7]", "batch=2", "progress=false"])
    pipe = sample.build_pipeline(cfg, torch.device("cpu"))
    got = sample.draw(pipe, cfg, [0, 1, 2])
    x, y = indexed_inputs([0, 1, 2], (3, 8, 8), 10, 0, [3, 5, 7])
    assert y.tolist() == [3, 5, 7]
    expected = rgb_nhwc(to_uint8(samplers.LookAhead()(pipe.base, x, 3, y=y, cfg_scale=2.0)))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def _dump(ckpts, out, *extra):
    return [f"ckpt={ckpts['pixel']}", "sampler=euler_pf", "steps=2", "cfg=1.0", "fid=true", "num=5",
            f"out={out}", "progress=false", *extra]


def test_fid_dump_single_process(ckpts, tmp_path):
    assert _run(*_dump(ckpts, tmp_path / "a", "batch=5")) == 0
    assert _run(*_dump(ckpts, tmp_path / "b", "batch=2")) == 0
    a = np.load(tmp_path / "a" / "euler_pf-steps2-cfg1-seed0-5.npz")
    b = np.load(tmp_path / "b" / "euler_pf-steps2-cfg1-seed0-5.npz")
    assert a.files == ["arr_0"] and a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (5, 8, 8, 3)
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # batching changes nothing
    assert not any(p.name.startswith(".parts") for p in (tmp_path / "a").iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fid_dump_two_processes_torchrun(ckpts, tmp_path):
    env = child_env(OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "pf.sample", *_dump(ckpts, tmp_path / "tr", "batch=2", "device=cpu")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 processes" in proc.stdout
    two = np.load(tmp_path / "tr" / "euler_pf-steps2-cfg1-seed0-5.npz")["arr_0"]
    assert _run(*_dump(ckpts, tmp_path / "one", "batch=5")) == 0
    one = np.load(tmp_path / "one" / "euler_pf-steps2-cfg1-seed0-5.npz")["arr_0"]
    # Every index sampled exactly once (checked inside), in index order: same as one process.
    assert two.shape == one.shape == (5, 8, 8, 3)
    assert np.abs(two.astype(int) - one.astype(int)).max() <= 1


def test_viz_strip(ckpts, tmp_path, capsys):
    assert _run(f"ckpt={ckpts['pixel']}", "sampler=look_ahead", "steps=4", "n=2", "viz=true", "viz_cols=4",
                f"out={tmp_path}", "progress=false") == 0
    strip = np.asarray(Image.open(tmp_path / "look_ahead-steps4-cfg4-seed0-viz.png"))
    tile = 64 + 2  # 8 px upscaled to 64, 2 px gaps
    assert strip.shape[1] == LABEL_WIDTH + 4 * tile + 2  # 4 recorded calls
    assert strip.shape[0] > 3 * tile + 2  # image, difficulty, patch times, then each column's time and a caption
    assert "7 model calls" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["stpes=3"], "unknown option 'stpes'"),
    (["steps=0"], "steps must be a positive integer"),
    (["classes=[a]"], "classes must be a list"),
    (["sampler=nope"], "unknown sampler"),
    (["sampler=euler"], "global-time"),
    (["graphs=true"], "need a CUDA device") if not torch.cuda.is_available() else (["cfg=x"], "must be a finite number"),
    (["classes=[11]"], "outside"),
    (["guidance_interval=[0.8,0.2]"], "guidance_interval must be [lo,hi]"),
    (["guidance_interval=0.5"], "guidance_interval must be [lo,hi]"),
])
def test_clear_errors(ckpts, tmp_path, capsys, args, match):
    assert _run(f"ckpt={ckpts['pixel']}", f"out={tmp_path}", "progress=false", *args) == 2
    assert match in capsys.readouterr().err


def test_latent_models_need_a_vae(ckpts, tmp_path, capsys):
    assert _run(f"ckpt={ckpts['latent']}", f"out={tmp_path}", "steps=1") == 2
    assert "latent model (in_channels=4): pass vae=PATH" in capsys.readouterr().err
    assert _run(f"ckpt={ckpts['latent']}", f"out={tmp_path}", "steps=1", f"vae={tmp_path / 'nope'}") == 2
    assert "vae not found" in capsys.readouterr().err
    try:
        import diffusers  # noqa: F401
    except ImportError:
        assert _run(f"ckpt={ckpts['latent']}", f"out={tmp_path}", "steps=1", f"vae={tmp_path}") == 2
        assert "needs the 'diffusers' package" in capsys.readouterr().err
    assert _run("steps=1") == 2
    assert "ckpt=PATH is required" in capsys.readouterr().err


def test_guidance_default_is_4_for_pictures_and_1_for_fid(ckpts):
    assert sample.parse_args([f"ckpt={ckpts['pixel']}"])["cfg"] == 4.0
    assert sample.parse_args([f"ckpt={ckpts['pixel']}", "fid=true"])["cfg"] == 1.0  # the published FID setting
    assert sample.parse_args([f"ckpt={ckpts['pixel']}", "fid=true", "cfg=2.5"])["cfg"] == 2.5  # explicit wins


def test_tile_grid_upscales_labels_and_captions():
    from pf.sampling.grid import tile_grid

    images = np.zeros((3, 16, 16, 3), np.uint8)
    images[1] = 255
    grid = tile_grid(images, 3, labels=["Sandal", "Bag", "Coat"], caption="look_ahead, 100 steps, cfg 4")
    assert grid.shape == (16 + 64 + 14 + 4, 3 * 66 + 2, 3)
    assert (grid[18:18 + 64, 2 + 66:2 + 66 + 64] == 255).all() and (grid[18:18 + 64, 2:66] == 0).all()
    assert (grid[18 + 64:18 + 64 + 14, 2:66] < 128).any()  # the label under the first image
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        tile_grid(images, labels=["a", "b"])
    assert tile_grid(np.zeros((4, 200, 200, 3), np.uint8), 2).shape == (2 * 202 + 2, 2 * 202 + 2, 3)  # no upscaling


def test_long_labels_wrap_instead_of_being_cut():
    from pf.sampling.grid import label_lines, tile_grid

    from PIL import ImageFont

    font = ImageFont.load_default()
    assert label_lines("T-shirt/top", 58) == ["T-shirt/top"]  # whole (it was cut to "T-shirt/to")
    lines = label_lines("the digit seven written by hand in white on black", 58)
    assert len(lines) == 4 and lines[-1].endswith("...") and all(font.getlength(ln) <= 58 for ln in lines)
    assert lines[0] == "the digit" and label_lines("a seven", 58) == ["a seven"]
    assert "".join(label_lines("Supercalifragilistic", 30)) == "Supercalifragilistic"  # a long word is split
    images = np.zeros((2, 16, 16, 3), np.uint8)
    one = tile_grid(images, 2, labels=["Bag", "Coat"])
    three = tile_grid(images, 2, labels=["Bag", "the digit seven written by hand in white on black"])
    assert three.shape[0] == one.shape[0] + 3 * 12  # three more text lines under every tile of the row


def test_guidance_interval_in_the_cli(ckpts, tmp_path, capsys):
    # K = 4: s_k = 0, .25, .5, .75; [0.2, 0.6] guides the 2nd and 3rd steps only
    assert _run(f"ckpt={ckpts['pixel']}", "sampler=euler_pf", "steps=4", "cfg=3.0", "guidance_interval=[0.2,0.6]",
                "n=2", f"out={tmp_path}", "progress=false") == 0
    assert "NFE 4 per sample (2 guided on a doubled batch, 2 unguided)" in capsys.readouterr().out
    cfg = sample.parse_args([f"ckpt={ckpts['pixel']}", "sampler=euler_pf", "steps=4", "cfg=3.0",
                             "guidance_interval=[0.2,0.6]", "classes=[3,5]", "progress=false"])
    pipe = sample.build_pipeline(cfg, torch.device("cpu"))
    got = sample.draw(pipe, cfg, [0, 1])
    x, y = indexed_inputs([0, 1], (3, 8, 8), 10, 0, [3, 5])
    expected = rgb_nhwc(to_uint8(samplers.EulerPF()(pipe.base, x, 4, y=y, cfg_scale=3.0, guidance_interval=(0.2, 0.6))))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
