"""Inpainting and outpainting (``pf.inpaint``, ``pf.sample inpaint=...``): kept patches bit-exact
after decoding, the mask taken to the patch grid, latent space, and the command line."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model_helpers import tiny_global_model, tiny_model
from pf import sample
from pf.autoencoder import from_uint8, to_uint8
from pf.inpaint import box_mask, inpaint, kept_patches, load_mask, outpaint
from pf.models.checkpoint import model_checkpoint, save_checkpoint
from pf.samplers import DualLoop, EulerPF, LookAhead


def _picture(batch=2, size=8, seed=0):
    """uint8 pictures (B, 3, size, size) and the same in [-1, 1]."""
    u8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return u8, from_uint8(u8)


def test_a_patch_is_kept_only_if_every_pixel_is_kept():
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 3, 3] = True  # one pixel of patch (1, 1) of a 4x4 grid of 2-pixel patches
    mask[0, 0, 6:, :] = True  # the last patch row
    keep = kept_patches(mask, 2).reshape(4, 4)
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[1, 1], expected[3, :] = False, False
    assert torch.equal(keep, expected)
    assert kept_patches(mask, 4).reshape(2, 2).tolist() == [[False, True], [False, False]]


@pytest.mark.parametrize("sampler", ["euler_pf", "dual_loop", "look_ahead", "euler"])
def test_kept_patches_are_bit_exact_after_decoding(sampler):
    model = tiny_global_model(dtype=torch.float32) if sampler == "euler" else tiny_model(dtype=torch.float32)
    u8, image = _picture()
    mask = box_mask(8, [4, 0, 8, 8])  # the right half
    out = inpaint(model, image, mask, sampler, steps=3, y=torch.tensor([1, 2]), seed=1)
    kept = out.kept_pixels.expand_as(u8)
    assert kept.float().mean() == 0.5
    got = to_uint8(out.images)
    assert torch.equal(got[kept], u8[kept])
    assert not torch.equal(got[~kept], u8[~kept])  # the rest is generated
    assert out.nfe == {"euler_pf": 3, "dual_loop": 12, "look_ahead": 5, "euler": 3}[sampler]


def test_inpainting_is_the_samplers_run_with_kept_patches():
    import pf.inpaint

    model = tiny_model(dtype=torch.float32)
    _, image = _picture()
    mask = box_mask(8, [0, 0, 8, 4])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for sampler in (EulerPF(), DualLoop(), LookAhead()):
        out = pf.inpaint(model, image, mask, sampler, steps=3, noise=noise)  # the module is callable
        direct = sampler(model, noise, 3, keep=out.keep, x_cond=image)
        assert torch.equal(out.samples, direct)
    assert out.keep.sum(1).tolist() == [8, 8]


def test_latent_space_keeps_pixels_of_whole_kept_patches():
    model = tiny_model(dtype=torch.float32)  # 3 x 8 x 8 "latents" of 16 x 16 pictures

    def encode(pictures):  # a stand-in autoencoder: 2x2 average pooling, and back by repetition
        return F.avg_pool2d(pictures, 2)

    def decode(latents):
        return F.interpolate(latents, scale_factor=2, mode="nearest")

    u8, image = _picture(size=16)
    mask = box_mask(16, [5, 0, 16, 16])  # x = 5 cuts the second 4-pixel patch column
    out = inpaint(model, image, mask, "look_ahead", steps=3, encode=encode, decode=decode)
    assert out.keep.reshape(2, 4, 4)[0].tolist() == [[True, False, False, False]] * 4  # block = patch 2 x factor 2
    kept = out.kept_pixels.expand_as(u8)
    assert torch.equal(to_uint8(out.images)[kept], u8[kept])
    assert kept[0, 0, 0].tolist() == [True] * 4 + [False] * 12


def test_outpaint_moves_the_picture_and_masks_the_new_strip():
    _, image = _picture(batch=1)
    moved, mask = outpaint(image, "left:2")
    assert torch.equal(moved[..., 2:], image[..., :-2]) and mask[..., :2].all() and not mask[..., 2:].any()
    moved, mask = outpaint(image, "bottom:4")
    assert torch.equal(moved[..., :4, :], image[..., 4:, :]) and mask[..., 4:, :].all()
    for bad in ("left", "middle:2", "left:8", "left:x"):
        with pytest.raises(ValueError, match="outpaint"):
            outpaint(image, bad)
    with pytest.raises(ValueError, match="mask_box"):
        box_mask(8, [4, 0, 9, 8])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    save_checkpoint(model_checkpoint(tiny_model(dtype=torch.float32)), path)
    return str(path)


def test_command_line_inpaint_with_a_mask_png_and_viz(ckpt, tmp_path, capsys):
    u8, _ = _picture(batch=1)
    Image.fromarray(u8[0].permute(1, 2, 0).numpy()).save(tmp_path / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255  # white = generate: the right half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert torch.equal(load_mask(tmp_path / "mask.png", 8), box_mask(8, [4, 0, 8, 8]))
    args = [f"ckpt={ckpt}", f"inpaint={tmp_path / 'in.png'}", f"mask={tmp_path / 'mask.png'}", "sampler=dual_loop",
            "steps=2", "n=3", "viz=true", f"out={tmp_path}", "progress=false"]
    assert sample.main(args) == 0
    out = capsys.readouterr().out
    assert "NFE 8 per completion" in out and "inpaint-dual_loop-steps2-cfg1-seed0-viz.png" in out
    grid = np.asarray(Image.open(tmp_path / "inpaint-dual_loop-steps2-cfg1-seed0.png"))
    tiles = [grid[16 + 2:16 + 2 + 64, 2 + i * 66:2 + i * 66 + 64] for i in range(5)]  # input, kept, 3 completions
    left = [t[:64:8, :32:8, 0] for t in tiles]  # one pixel of each 8x upscaled source pixel, left half
    for t in left[2:]:
        assert np.array_equal(t, left[0])  # the kept half of every completion is the input's


@pytest.mark.parametrize("args,match", [
    (["inpaint=x.png"], "needs one of mask"),
    (["inpaint=x.png", "mask_box=[0,0,4,4]", "outpaint=left:2"], "needs one of mask"),
    (["mask_box=[0,0,4,4]"], "give inpaint=PICTURE"),
    (["inpaint=x.png", "mask_box=[0,0,4,4]", "fid=true"], "not with fid"),
    (["inpaint=missing.png", "mask_box=[0,0,4,4]"], "no such picture"),
    (["inpaint={png}", "mask_box=[0,0,40,4]"], "mask_box"),
])
def test_command_line_errors_are_one_line(ckpt, tmp_path, capsys, args, match):
    u8, _ = _picture(batch=1)
    Image.fromarray(u8[0].permute(1, 2, 0).numpy()).save(tmp_path / "in.png")
    args = [a.format(png=tmp_path / "in.png") for a in args]
    assert sample.main([f"ckpt={ckpt}", f"out={tmp_path}", "progress=false", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


def test_study_masks_cover_what_they_say_in_whole_patches():
    from pf.experiments.inpaint import DEFAULTS, generate_mask, render

    for name, fraction in (("centre_box_25", 0.25), ("right_half_50", 0.5), ("random_patches_75", 0.75)):
        m = generate_mask(name, 3, 16, 2, 1234)
        assert m.float().mean(dim=(1, 2, 3)).tolist() == [fraction] * 3
        assert set(F.avg_pool2d(m.float(), 2).unique().tolist()) <= {0.0, 1.0}  # each patch all or nothing
    a, b = generate_mask("random_patches_75", 2, 16, 2, 1), generate_mask("random_patches_75", 2, 16, 2, 1)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])  # fixed by the seed, drawn per image
    page = render(DEFAULTS, {"stages": [("classifier", None)], "baseline": {}, "cells": {}}, "python -m x")
    assert "python -m x" in page and page.count("pending") >= 12  # 3 masks x 4 columns, nothing measured yet
