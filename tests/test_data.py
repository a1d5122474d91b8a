"""Training data: the embedded digits, image folders, latents, sharded resumable batches,
and the clear errors for data that cannot train the model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pf.data import DataError, ImageFolder, ShardedBatches, check_against_model, load_digits_dataset, load_latents
from pf.data.base import TensorImages, split_validation


def _png(path, size=(10, 12), value=128, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 0)).save(path)


# ----------------------------------------------------------------------- digits
def test_digits_are_16x16_grey_in_minus_one_to_one():
    ds = load_digits_dataset(16)
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.channels == 1 and ds.image_size == 16
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.images.min() == -1 and ds.images.max() > 0.9  # background black, strokes bright
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    check_against_model(ds, num_classes=10, channels=1, image_size=16)


def test_digits_label_count_must_match_the_model():
    ds = load_digits_dataset(16)
    with pytest.raises(DataError, match=r"10 classes but the model is built for num_classes=12"):
        check_against_model(ds, num_classes=12, channels=1, image_size=16)
    with pytest.raises(DataError, match=r"in_channels=3"):
        check_against_model(ds, num_classes=10, channels=3, image_size=16)
    with pytest.raises(DataError, match=r"input_size=32"):
        check_against_model(ds, num_classes=10, channels=1, image_size=32)


# ---------------------------------------------------------------- image folders
def test_folder_reads_classes_and_skips_corrupt_files(tmp_path):
    for i in range(3):
        _png(tmp_path / "cat" / f"{i}.png", value=40 * i)
        _png(tmp_path / "dog" / f"{i}.jpg", value=200)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored: not an image suffix")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file"):
        ds = ImageFolder(tmp_path, image_size=8, channels=3)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 6 and ds.skipped == 1
    x, y = ds[3]
    assert x.shape == (3, 8, 8) and y == 1 and x.min() >= -1 and x.max() <= 1
    check_against_model(ds, num_classes=2, channels=3, image_size=8)
    with pytest.raises(DataError, match=r"2 classes but the model is built for num_classes=10"):
        check_against_model(ds, num_classes=10, channels=3, image_size=8)


def test_folder_grey_images(tmp_path):
    _png(tmp_path / "a" / "0.png", size=(20, 20), value=255, mode="L")
    ds = ImageFolder(tmp_path, image_size=4, channels=1)
    x, _ = ds[0]
    assert x.shape == (1, 4, 4) and torch.allclose(x, torch.ones_like(x))


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", r"is not a directory"),
        ("empty", r"has no sub-folders"),
        ("flat", r"has no sub-folders"),
        ("no_images", r"holds no readable images"),
        ("all_corrupt", r"holds no readable images"),
    ],
)
def test_folder_bad_directories_give_clear_errors(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "flat":
        _png(root / "0.png")
    if layout == "no_images":
        (root / "cls").mkdir()
        (root / "cls" / "readme.txt").write_text("x")
    if layout == "all_corrupt":
        (root / "cls").mkdir()
        (root / "cls" / "0.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped-file warning of "all_corrupt"
        ImageFolder(root, image_size=8)


def test_folder_needs_a_path():
    with pytest.raises(DataError, match=r"data.path"):
        ImageFolder(None, image_size=8)


# ---------------------------------------------------------------------- latents
def test_latents_npz_are_scaled_by_the_sd_vae_factor(tmp_path):
    rng = np.random.default_rng(0)
    lat = rng.normal(0, 5.5, size=(20, 4, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 7, size=20)
    np.savez(tmp_path / "lat.npz", latents=lat, labels=labels)
    ds = load_latents(tmp_path / "lat.npz", num_classes=7)
    assert ds.channels == 4 and ds.image_size == 8 and len(ds) == 20 and ds.num_classes == 7
    torch.testing.assert_close(ds.images, torch.from_numpy(lat) * 0.18215)
    # scale_factor 1.0 keeps the values (and warns: these are not scaled latents, std 5.5)
    with pytest.warns(UserWarning, match=r"set data.scale_factor=1.0 if the file is already scaled"):
        kept = load_latents(tmp_path / "lat.npz", scale_factor=1.0, num_classes=7)
    torch.testing.assert_close(kept.images, torch.from_numpy(lat))


def test_latents_npy_with_separate_labels(tmp_path):
    lat = np.random.default_rng(1).normal(size=(6, 4, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", lat)
    np.save(tmp_path / "y.npy", np.arange(6) % 3)
    ds = load_latents(tmp_path / "x.npy", labels_path=tmp_path / "y.npy", scale_factor=1.0, num_classes=3)
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DataError, match=r"holds no labels"):
        load_latents(tmp_path / "x.npy", scale_factor=1.0)


def test_latents_errors(tmp_path):
    lat = np.zeros((5, 4, 4, 4), np.float32)
    np.savez(tmp_path / "count.npz", latents=lat, labels=np.arange(4))
    with pytest.raises(DataError, match=r"5 latents but 4 labels"):
        load_latents(tmp_path / "count.npz")
    with pytest.raises(DataError, match=r"not found"):
        load_latents(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"cannot read"):
        load_latents(tmp_path / "junk.npz")
    np.savez(tmp_path / "range.npz", latents=np.random.default_rng(0).normal(0, 5, (5, 4, 4, 4)), labels=np.array([0, 1, 2, 3, 12]))
    ds = load_latents(tmp_path / "range.npz", num_classes=10)
    with pytest.raises(DataError, match=r"labels lie in \[0, 12\], outside \[0, 9\]"):
        check_against_model(ds, num_classes=10, channels=4, image_size=4)
    np.savez(tmp_path / "nan.npz", latents=np.full((2, 4, 4, 4), np.nan, np.float32), labels=np.arange(2))
    with pytest.raises(DataError, match=r"NaN"):
        load_latents(tmp_path / "nan.npz")


def test_empty_dataset_is_refused():
    ds = TensorImages(torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long), 2, source="empty set")
    with pytest.raises(DataError, match=r"no training examples"):
        check_against_model(ds, num_classes=2, channels=1, image_size=4)


# ---------------------------------------------------------------------- batches
def _dataset(n=40):
    return TensorImages(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(),
                        torch.arange(n) % 4, 4, source="toy")


def _ids(batch):
    return batch[0][:, 0, 0, 0].long().tolist()


def test_ranks_get_disjoint_shards_and_resume_reads_the_same_batches():
    ds = _dataset()
    r0 = ShardedBatches(ds, 4, rank=0, world_size=2, seed=3)
    r1 = ShardedBatches(ds, 4, rank=1, world_size=2, seed=3)
    assert r0.batches_per_epoch == 5
    it0, it1 = r0.iterate(0), r1.iterate(0)
    first0 = [_ids(next(it0)) for _ in range(12)]  # crosses two epoch boundaries
    first1 = [_ids(next(it1)) for _ in range(5)]
    assert not set(sum(first0[:5], [])) & set(sum(first1, []))  # disjoint within an epoch
    assert sorted(sum(first0[:5], []) + sum(first1, [])) == list(range(40))
    assert first0[:5] != first0[5:10]  # reshuffled each epoch
    resumed = r0.iterate(7)
    assert [_ids(next(resumed)) for _ in range(5)] == first0[7:12]
    # the global RNG is not touched by the loader
    state = torch.get_rng_state()
    next(r0.iterate(3))
    assert torch.equal(state, torch.get_rng_state())


def test_too_little_data_for_one_batch():
    with pytest.raises(ValueError, match=r"fewer than one batch"):
        ShardedBatches(_dataset(6), 4, rank=0, world_size=2)


def test_validation_split_is_fixed_and_disjoint():
    ds = _dataset(100)
    train, val = split_validation(ds, 10, seed=0)
    train2, val2 = split_validation(ds, 10, seed=0)
    assert len(val) == 10 and len(train) == 90 and val.indices == val2.indices
    assert not set(train.indices) & set(val.indices)
    assert len(split_validation(ds, 50, seed=0)[1]) == 10  # at most a tenth
