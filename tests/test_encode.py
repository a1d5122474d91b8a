"""From an image folder to a trained model: the ADM crop, encoding both flips with a small
randomly initialised AutoencoderKL (built from a config, nothing downloaded), the shards and
manifest, resuming a killed encode, webdataset input, the memory-mapped loader (flips,
posterior samples, resident memory that does not grow with the set), training on it and
decoding samples with the manifest's autoencoder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from child_env import ROOT, child_env  # noqa: E402
from pf.data import DataError, LatentShards, ShardedBatches  # noqa: E402
from pf.data.encode import DEFAULTS, center_crop_adm, encode, plan  # noqa: E402
from pf import cli  # noqa: E402


def tiny_vae(path: Path) -> Path:
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(path)
    return path


def image_folder(root: Path, per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    base = tmp_path_factory.mktemp("enc")
    vae = tiny_vae(base / "vae")
    images = image_folder(base / "images")
    cfg = cli.parse(DEFAULTS, [f"images={images}", f"out={base / 'latents'}", f"vae={vae}", "image_size=32",
                               "batch=5", "shard_size=10", "num_workers=0", "progress=false", "device=cpu"])
    manifest = encode(cfg)
    return {"base": base, "vae": vae, "images": images, "cfg": cfg, "manifest": manifest, "out": base / "latents"}


def test_center_crop_is_adm():
    from PIL import Image

    img = Image.fromarray(np.arange(150 * 100 * 3, dtype=np.uint8).reshape(100, 150, 3) % 251)
    out = center_crop_adm(img, 32)  # 100 >= 64: one box halving to 75x50, then bicubic to 48x32, then center
    half = img.resize((75, 50), resample=Image.Resampling.BOX)
    want = half.resize((48, 32), resample=Image.Resampling.BICUBIC).crop((8, 0, 40, 32))
    assert out.size == (32, 32) and np.array_equal(np.asarray(out), np.asarray(want))


def test_manifest_counts_and_shards(chain):
    m, out = chain["manifest"], chain["out"]
    assert m["num_images"] == 24 and m["skipped"] == 1 and m["num_classes"] == 3
    assert m["class_names"] == ["cat", "dog", "fox"] and m["latent_shape"] == [4, 4, 4] and m["image_size"] == 32
    assert m["scale_factor"] == pytest.approx(0.18215) and m["autoencoder"]["path"] == str(chain["vae"].resolve())
    assert [s["count"] for s in m["shards"]] == [10, 9, 5] and sum(s["skipped"] for s in m["shards"]) == 1
    mean = np.load(out / "shard_00000.mean.npy")
    assert mean.shape == (10, 2, 4, 4, 4) and mean.dtype == np.float16
    assert np.load(out / "shard_00000.std.npy").shape == mean.shape
    assert np.load(out / "shard_00002.labels.npy").tolist() == [2] * 5


def test_latents_are_the_autoencoder_posterior_of_both_flips(chain):
    from PIL import Image

    from pf.data.encode import to_tensor

    vae = diffusers.AutoencoderKL.from_pretrained(chain["vae"]).eval()
    first = sorted((chain["images"] / "cat").glob("*.png"))[0]
    x = to_tensor(Image.open(first), 32)[None]
    with torch.no_grad():
        post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    mean = np.load(chain["out"] / "shard_00000.mean.npy")[0].astype(np.float32)  # (2, C, h, w)
    std = np.load(chain["out"] / "shard_00000.std.npy")[0].astype(np.float32)
    assert np.allclose(mean, post.mean.numpy(), atol=2e-3) and np.allclose(std, post.std.numpy(), atol=2e-3, rtol=2e-3)


def test_a_killed_encode_resumes_where_it_stopped(chain, tmp_path):
    import shutil

    out = tmp_path / "latents"
    shutil.copytree(chain["out"], out)
    (out / "manifest.json").unlink()
    (out / "shard_00001.json").unlink()  # shard 1 was being written when the run died
    (out / "shard_00001.mean.npy").write_bytes(b"half written")
    before = (out / "shard_00000.mean.npy").stat().st_mtime_ns
    with pytest.raises(DataError, match=r"has no manifest.json"):
        LatentShards(out)
    cfg = cli.parse(DEFAULTS, [f"images={chain['images']}", f"out={out}", f"vae={chain['vae']}", "image_size=32",
                               "batch=5", "shard_size=10", "num_workers=0", "progress=false", "device=cpu"])
    manifest = encode(cfg)
    assert (out / "shard_00000.mean.npy").stat().st_mtime_ns == before  # not encoded again
    assert manifest["num_images"] == 24
    assert np.array_equal(np.load(out / "shard_00001.mean.npy"), np.load(chain["out"] / "shard_00001.mean.npy"))


def test_webdataset_shards_as_input(chain, tmp_path):
    import io
    import tarfile

    from PIL import Image

    tar_path = tmp_path / "train-0000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, p in enumerate(sorted((chain["images"] / "fox").glob("*.png"))[:4]):
            for ext, data in (("png", p.read_bytes()), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert plan(str(tmp_path), 10)["kind"] == "webdataset"
    cfg = cli.parse(DEFAULTS, [f"images={tmp_path}", f"out={tmp_path / 'lat'}", f"vae={chain['vae']}",
                               "image_size=32", "num_workers=0", "progress=false", "device=cpu", "keep_std=false"])
    m = encode(cfg)
    assert m["num_images"] == 4 and m["num_classes"] == 2 and not (tmp_path / "lat" / "shard_00000.std.npy").exists()
    with pytest.raises(DataError, match=r"without the posterior std"):
        LatentShards(tmp_path / "lat", sample_posterior=True)
    assert isinstance(Image.open(io.BytesIO((chain["images"] / "fox" / "0.png").read_bytes())), Image.Image)


def test_loader_flips_per_epoch_and_samples_the_posterior(chain):
    ds = LatentShards(chain["out"], seed=3)
    mean = np.load(chain["out"] / "shard_00001.mean.npy").astype(np.float32)
    assert len(ds) == 24 and ds.channels == 4 and ds.image_size == 4 and ds.num_classes == 3
    sides = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        z, y = ds[12]  # shard 1, item 2
        side = next(k for k in (0, 1) if torch.allclose(z, torch.from_numpy(mean[2, k]) * 0.18215))
        sides.append(side)
        assert y == int(np.load(chain["out"] / "shard_00001.labels.npy")[2])
        assert torch.equal(ds[12][0], z)  # the same (epoch, item): the same flip
    assert set(sides) == {0, 1}
    still = LatentShards(chain["out"], flip=False)
    assert all(torch.allclose(still[12][0], torch.from_numpy(mean[2, 0]) * 0.18215) for _ in range(3))
    post = LatentShards(chain["out"], flip=False, sample_posterior=True, scale_factor=1.0)
    a, b = post[12][0], post[12][0]
    assert torch.equal(a, b) and not torch.allclose(a, torch.from_numpy(mean[2, 0]))
    batches = ShardedBatches(ds, 4, seed=0)
    next(batches.iterate(len(ds) // 4 * 2))  # step in epoch 2: the loader tells the dataset
    assert ds.epoch == 2


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to read resident memory")
def test_opening_gigabytes_of_latents_does_not_load_them(tmp_path):
    n = 32768  # 32768 x 2 x 4 x 32 x 32 float32 = 1 GiB per file: 4 GiB in mean and std of two shards
    root = tmp_path / "big"
    root.mkdir()
    shards = []
    for s in range(2):
        for kind in ("mean", "std"):
            arr = np.lib.format.open_memmap(root / f"shard_{s:05d}.{kind}.npy", mode="w+", dtype=np.float32,
                                            shape=(n, 2, 4, 32, 32))
            arr[::997] = 1.0  # a few real pages; the rest of the file is sparse
            del arr
        np.save(root / f"shard_{s:05d}.labels.npy", np.zeros(n, np.int64))
        shards.append({"name": f"shard_{s:05d}", "count": n, "skipped": 0})
    (root / "manifest.json").write_text(json.dumps({"format": "pf-latents", "version": 1, "scale_factor": 0.18215,
                                                   "num_classes": 1000, "shards": shards}))
    size_gb = sum(p.stat().st_size for p in root.glob("*.npy")) / 2**30
    assert size_gb > 3.9
    before = _rss_mb()
    ds = LatentShards(root, sample_posterior=True)
    for i in range(0, len(ds), 97):
        ds[i]
    grown = _rss_mb() - before
    assert len(ds) == 2 * n and grown < 200, f"resident memory grew by {grown:.0f} MB for a {size_gb:.1f} GB set"


def test_train_on_the_latent_set_and_decode_samples_with_its_autoencoder(chain, tmp_path):
    env = child_env(OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "pf.train", "data=latents", f"data.path={chain['out']}",
                            "trainer.max_steps=2", "trainer.batch_size=4", "trainer.progress=false", "data.val_size=0",
                            "sampler.steps=2", "sampler.num_images=3", "device=cpu", f"hydra.run.dir={run}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run / "samples" / "step_000002.png").is_file()
    sample = subprocess.run([sys.executable, "-m", "pf.sample", f"ckpt={run / 'checkpoints' / 'last.pt'}",
                             "sampler=euler_pf", "steps=2", "n=3", "classes=[0,1,2]", f"out={tmp_path / 's'}",
                             "progress=false", "device=cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert sample.returncode == 0, sample.stderr[-3000:]
    from PIL import Image

    png = next((tmp_path / "s").glob("*.png"))
    assert Image.open(png).size[0] >= 3 * 64  # decoded 32 px images, upscaled


def test_pixels_ride_with_their_latents_and_train_repa(chain, tmp_path):
    from pf.data.encode import to_tensor
    from PIL import Image

    out = tmp_path / "latents"
    cfg = cli.parse(DEFAULTS, [f"images={chain['images']}", f"out={out}", f"vae={chain['vae']}", "image_size=32",
                               "batch=5", "shard_size=10", "num_workers=0", "progress=false", "device=cpu",
                               "pixels=true"])
    assert encode(cfg)["pixels"] is True
    px = np.load(out / "shard_00000.pixels.npy")
    assert px.shape == (10, 3, 32, 32) and px.dtype == np.uint8
    first = sorted((chain["images"] / "cat").glob("*.png"))[0]
    want = to_tensor(Image.open(first), 32)  # the cropped image that was encoded, in [-1, 1]
    ds = LatentShards(out, seed=3, pixels=True)
    mean = np.load(out / "shard_00000.mean.npy").astype(np.float32)
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        z, y, image = ds[0]
        side = next(k for k in (0, 1) if torch.allclose(z, torch.from_numpy(mean[0, k]) * 0.18215))
        seen.add(side)
        expected = want.flip(-1) if side else want  # the image is mirrored with its latent
        assert image.shape == (3, 32, 32) and (image - expected).abs().max() <= 1 / 127.5 + 1e-6
    assert seen == {0, 1}
    with pytest.raises(DataError, match="holds no pixels, which trainer.repa needs"):
        LatentShards(chain["out"], pixels=True)
    # REPA on the latent set: the encoder reads the pixels, the DiT the latents
    env = child_env(OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    train = subprocess.run([sys.executable, "-m", "pf.train", "data=latents", f"data.path={out}",
                            "trainer.max_steps=2", "trainer.batch_size=4", "trainer.progress=false", "data.val_size=4",
                            "trainer.repa.enabled=true", "trainer.repa.encoder=test_repa:_stub_factory",
                            "trainer.repa.encoder_depth=2", "trainer.repa.projector_dim=16", "trainer.log_every=1",
                            "sampler.steps=2", "sampler.num_images=3", "device=cpu", f"hydra.run.dir={run}"],
                           cwd=ROOT, env={**env, "PYTHONPATH": f"{Path(ROOT) / 'tests'}:{env.get('PYTHONPATH', '')}"},
                           capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    assert all("repa_loss" in r for r in records if "loss" in r)


def _partial_copy(chain, tmp_path: Path) -> Path:
    """The chain's set as a kill left it: shards 0 and 2 finished, shard 1 not, no manifest."""
    import shutil

    out = tmp_path / "latents"
    shutil.copytree(chain["out"], out)
    (out / "manifest.json").unlink()
    for p in out.glob("shard_00001.*"):
        p.unlink()
    return out


def _args(chain, out, *extra):
    return cli.parse(DEFAULTS, [f"images={chain['images']}", f"out={out}", f"vae={chain['vae']}", "image_size=32",
                                "batch=5", "shard_size=10", "num_workers=0", "progress=false", "device=cpu", *extra])


@pytest.mark.parametrize("change,key", [
    ("shard_size=7", "shard_size"),    # issue 27, finding 4: 300 images became 270, silently
    ("image_size=16", "image_size"),   # finding 4: 16x16 and 8x8 latents mixed under one manifest
    ("dtype=float32", "dtype"),
    ("keep_std=false", "keep_std"),
    ("pixels=true", "pixels"),
    ("vae=/elsewhere/vae", "vae"),
])
def test_a_rerun_with_other_settings_is_refused_naming_the_key(chain, tmp_path, change, key):
    out = _partial_copy(chain, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(DataError, match=rf"out={out} holds a partial encode made with {key}=.*, this run asks "
                                        rf"{key}=.*: rerun with the same settings to continue it"):
        encode(_args(chain, out, change))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written


def test_a_set_changes_only_through_its_own_settings(chain, tmp_path):
    import shutil

    # shards without recorded settings (another tool's, or hand-made) are not continued
    out = _partial_copy(chain, tmp_path / "a")
    (out / "encode.json").unlink()
    with pytest.raises(DataError, match=r"holds latent shards whose settings were not recorded"):
        encode(_args(chain, out))
    # images added to the input since: a finished shard no longer matches its slice of the input
    images = tmp_path / "images"
    shutil.copytree(chain["images"], images)
    out = _partial_copy(chain, tmp_path / "b")
    settings = json.loads((out / "encode.json").read_text())
    (out / "encode.json").write_text(json.dumps({**settings, "images": str(images.resolve())}))
    shutil.copy(images / "cat" / "0.png", images / "cat" / "00.png")
    with pytest.raises(DataError, match=r"shard_00000.json was made from 10 images, sha1 \w+, but images=.* now gives"):
        encode(_args(chain, out, f"images={images}"))
    # a shard whose arrays are not what its record says (mixed by hand or another encode) stops the manifest
    out = _partial_copy(chain, tmp_path / "c")
    np.save(out / "shard_00002.mean.npy", np.zeros((5, 2, 4, 2, 2), np.float16))
    with pytest.raises(DataError, match=r"shard_00002.mean.npy holds \(5, 2, 4, 2, 2\), expected \(5, 2, 4, 4, 4\)"):
        encode(_args(chain, out))
    assert not (out / "manifest.json").exists()


def test_a_set_mixing_latent_shapes_is_refused_by_the_loader(chain, tmp_path):
    # issue 27, finding 4: 16x16 and 8x8 latents under one manifest failed later in training with a traceback
    import shutil

    out = tmp_path / "latents"
    shutil.copytree(chain["out"], out)
    np.save(out / "shard_00002.mean.npy", np.zeros((5, 2, 4, 2, 2), np.float16))
    with pytest.raises(DataError, match=r"shards hold latents of different shapes \[\(4, 2, 2\), \(4, 4, 4\)\]"):
        LatentShards(out)


@pytest.mark.parametrize("name", ["/etc/shard_00000", "../latents/shard_00000", "sub/shard_00000", "..", ""])
def test_manifest_shard_names_stay_in_the_set(chain, tmp_path, name):
    # issue 27, finding 9: an absolute shard name loaded another folder's shards
    import shutil

    out = tmp_path / "latents"
    shutil.copytree(chain["out"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shard name .* is not a file name inside"):
        LatentShards(out)


# ------------------------------------------------------------------ faults (issue 27; see also test_faults.py)
def _same_set(out: Path, reference: Path) -> None:
    """``out`` holds the reference set's shards byte for byte and a manifest that counts the same."""
    names = sorted(p.name for p in reference.glob("shard_*"))
    assert sorted(p.name for p in out.glob("shard_*")) == names
    for name in names:
        if name.endswith(".npy"):
            assert np.array_equal(np.load(out / name), np.load(reference / name)), name
    got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert [(s["name"], s["count"]) for s in got["shards"]] == [(s["name"], s["count"]) for s in want["shards"]]
    assert got["num_images"] == want["num_images"] and got["latent_shape"] == want["latent_shape"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_encoding_onto_a_full_disk_stops_in_one_line_and_continues_when_there_is_room(chain, tmp_path, capsys):
    """Finding 7: a disk filling up during encoding was a traceback and left a stale .tmp."""
    from mounts import mount_tmpfs, unmount

    import pf.data.encode as encode_command

    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "24k"):  # the settings and the first shard fit, not the rest
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = disk / "latents"
        argv = [f"images={chain['images']}", f"out={out}", f"vae={chain['vae']}", "image_size=32", "batch=5",
                "shard_size=10", "num_workers=0", "progress=false", "device=cpu"]
        assert cli.run(encode_command.main, DEFAULTS, "", argv=argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and re.fullmatch(rf"error: {out}/shard_0000\d\.\w+\.(npy|json): No space left on "
                                                r"device( \(nothing written\))?", lines[0]), lines
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no stale temp file
        assert not (out / "manifest.json").exists() and not (out / "shard_00002.json").exists()
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)  # room again: it continues
        assert cli.run(encode_command.main, DEFAULTS, "", argv=argv) == 0
        _same_set(out, chain["out"])
    finally:
        unmount(disk)


def test_a_kill_9_during_encoding_continues_to_the_uninterrupted_set(chain, tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "latents"
    args = [f"images={chain['images']}", f"out={out}", f"vae={chain['vae']}", "image_size=32", "batch=5",
            "shard_size=10", "num_workers=0", "progress=false", "device=cpu"]
    # a forked child has the modules imported already (a fresh interpreter spends ~5 s importing)
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            encode(cli.parse(DEFAULTS, args))
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while not (out / "shard_00000.json").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)  # mid-way: shard 0 finished, shard 1 being encoded or written
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and (out / "shard_00000.json").exists(), "not killed half-way"
    assert not (out / "manifest.json").exists()
    encode(cli.parse(DEFAULTS, args))
    _same_set(out, chain["out"])


# ------------------------------------------------------------- in-loop FID on latents (issue 28)
def _train_cfg(chain, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(ROOT) / "pf" / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "data=latents", f"data.path={chain['out']}", "trainer.max_steps=3", "trainer.batch_size=4",
            "trainer.progress=false", "data.val_size=0", "sampler.steps=2", "sampler.num_images=3", "device=cpu",
            "trainer.ckpt_every=100", "trainer.sample_every=100", "trainer.val_every=100", "trainer.fid_every=2",
            *overrides])


def test_in_loop_fid_on_latents_decodes_them_and_equals_pf_eval(chain, tmp_path, monkeypatch, one_thread):
    pytest.importorskip("torch_fidelity")
    import pf.train as pf_train
    from pf.autoencoder import to_uint8
    from pf.eval.__main__ import DEFAULTS as EVAL_DEFAULTS, evaluate
    from pf.eval.inception import random_inception_weights
    from pf.eval.inputs import save_npz
    from pf.training import fid as fid_module
    from pf.training.schema import ConfigError

    with pytest.raises(ConfigError, match="set trainer.fid_extractor=inception trainer.fid_weights="):
        pf_train.train(_train_cfg(chain), tmp_path / "no-extractor")
    with pytest.raises(ConfigError, match="needs the local Inception weights"):
        pf_train.train(_train_cfg(chain, "trainer.fid_extractor=inception"), tmp_path / "no-weights")

    weights = random_inception_weights(tmp_path / "inception.pth")
    seen = {}
    real_init, real_generate = fid_module.InLoopFID.__init__, fid_module.InLoopFID.generate

    def init(self, tc, sc, data_cfg, reference, *args):
        seen["latents"] = reference.clone()  # the training latents it compares with
        seen["args"] = (tc, sc, data_cfg, reference, *args)
        real_init(self, tc, sc, data_cfg, reference, *args)

    def generate(self, *args):
        seen["drawn"] = real_generate(self, *args)  # the last drawing's decoded pictures
        return seen["drawn"]

    monkeypatch.setattr(fid_module.InLoopFID, "__init__", init)
    monkeypatch.setattr(fid_module.InLoopFID, "generate", generate)
    run = tmp_path / "run"
    pf_train.train(_train_cfg(chain, "trainer.fid_extractor=inception", f"trainer.fid_weights={weights}",
                              "trainer.fid_samples=6", "trainer.fid_reference=10", "trainer.log_every=1",
                              "trainer.ema_warmup=true"), run)  # an EMA that moves: each step scores its own model
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    fids = {r["step"]: r["fid"] for r in recs if "fid" in r}
    assert sorted(fids) == [2, 3] and all(np.isfinite(v) and v > 0 for v in fids.values()) and fids[2] != fids[3]
    assert seen["latents"].shape == (10, 4, 4, 4) and seen["drawn"].shape == (6, 3, 32, 32)

    # independently: the latents decoded by diffusers itself, measured by pf.eval's own command path
    vae = diffusers.AutoencoderKL.from_pretrained(chain["vae"]).eval()
    with torch.no_grad():
        pictures = vae.decode(seen["latents"] / chain["manifest"]["scale_factor"]).sample
    save_npz(tmp_path / "ref.npz", to_uint8(pictures))
    save_npz(tmp_path / "gen.npz", seen["drawn"])
    result = evaluate(cli.parse(EVAL_DEFAULTS, [
        f"generated={tmp_path / 'gen.npz'}", f"reference={tmp_path / 'ref.npz'}", "extractor=inception",
        f"feature_extractor_weights_path={weights}", "metrics=[fid]", "stats_cache=null", "device=cpu"]))
    assert fids[3] == pytest.approx(result["fid"], rel=1e-4)

    # or against a reference statistics file (trainer.fid_reference_stats), read as pf.eval reads it
    from omegaconf import OmegaConf
    from pf.eval import adm
    from pf.eval.inception import InceptionFeatures

    stats = adm.statistics_of(InceptionFeatures(weights)(to_uint8(pictures)))
    stats_file = adm.write_statistics(tmp_path / "ref-stats.npz", {k: stats[k] for k in adm.STAT_KEYS})
    tc, *rest = seen["args"]
    from_stats = fid_module.InLoopFID(OmegaConf.merge(tc, {"fid_reference_stats": str(stats_file)}), *rest)
    assert from_stats.reference.source == "stored"
    assert from_stats.score(seen["drawn"])["fid"] == pytest.approx(result["fid"], rel=1e-4)
    with pytest.raises(FileNotFoundError, match="fid_reference_stats=.*no such file"):
        fid_module.InLoopFID(OmegaConf.merge(tc, {"fid_reference_stats": str(tmp_path / "none.npz")}), *rest)
