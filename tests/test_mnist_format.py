"""MNIST-format data (idx files, gzipped or not): the reader against files written here byte by
byte from the format's definition, the splits, resizing, the clear errors, the hydra options,
and the real Fashion-MNIST when Debian's package is installed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pf.data import DataError, build_dataset
from pf.data.mnist_format import FASHION_MNIST_DIR, find_split_files, load_mnist_format, read_idx


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """The idx format from its definition: 0, 0, type code 0x08 (uint8), ndim, big-endian sizes, data."""
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def fake_set(root: Path, n_train: int = 12, n_test: int = 5, size: int = 28, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gives_back_the_bytes_written(tmp_path, gz):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / "x-idx3-ubyte", a, gz)
    out = read_idx(path)
    assert out.shape == (2, 3, 5) and out.dtype == np.uint8 and np.array_equal(out, a)


def test_read_idx_refuses_broken_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(DataError, match=r"not an idx file"):
        read_idx(tmp_path / "bad")
    short = bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc"  # says 5 values, holds 3
    (tmp_path / "short").write_bytes(short)
    with pytest.raises(DataError, match=r"header says shape \(5,\)"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"cannot read idx file"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_splits_at_native_size_are_the_bytes_scaled_to_minus_one_one(tmp_path, gz):
    arrays = fake_set(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_mnist_format(tmp_path, split, image_size=28, num_classes=10)
        images, labels = arrays[prefix]
        assert len(ds) == images.shape[0] and ds.channels == 1 and ds.image_size == 28 and ds.num_classes == 10
        expected = torch.from_numpy(images.astype(np.float64))[:, None] / 255.0 * 2 - 1
        assert torch.allclose(ds.images.double(), expected, atol=1e-6)
        assert ds.labels.tolist() == labels.tolist()


def test_resize_keeps_range_and_constant_images(tmp_path):
    root = tmp_path / "set"
    const = np.full((3, 28, 28), 200, np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte", const)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.array([0, 1, 2], np.uint8))
    ds = load_mnist_format(root, "train", image_size=16)
    assert ds.images.shape == (3, 1, 16, 16)
    assert torch.allclose(ds.images, torch.full_like(ds.images, 200 / 255 * 2 - 1), atol=1e-5)
    fake_set(tmp_path / "rand")
    ds = load_mnist_format(tmp_path / "rand", "test", image_size=16)
    assert ds.images.min() >= -1 and ds.images.max() <= 1


def test_dotted_file_names_are_found(tmp_path):
    write_idx(tmp_path / "train-images.idx3-ubyte", np.zeros((2, 4, 4), np.uint8), gz=False)
    write_idx(tmp_path / "train-labels.idx1-ubyte", np.zeros((2,), np.uint8), gz=False)
    images, labels = find_split_files(tmp_path, "train")
    assert images.name == "train-images.idx3-ubyte" and labels.name == "train-labels.idx1-ubyte"


def test_missing_files_name_both_ways_to_get_them(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*data\.path="):
        load_mnist_format(tmp_path, "train")
    with pytest.raises(DataError, match=r"needs data.path"):
        load_mnist_format(None, "train")
    with pytest.raises(DataError, match=r"'train' or 'test'"):
        load_mnist_format(tmp_path, "val")


def test_labels_that_do_not_match_the_images(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((3,), np.uint8))
    with pytest.raises(DataError, match=r"\(3,\) labels for 4 images"):
        load_mnist_format(tmp_path, "train")


def test_hydra_options_and_splits(tmp_path):
    from hydra import compose, initialize_config_dir

    import pf

    fake_set(tmp_path)
    config_dir = str(Path(pf.__file__).resolve().parent / "configs")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        fm = compose(config_name="config", overrides=["data=fashion_mnist"])
        generic = compose(config_name="config", overrides=["data=mnist_format", f"data.path={tmp_path}",
                                                          "data.split=test", "data.image_size=8"])
        digits = compose(config_name="config", overrides=["data.split=test"])
    assert fm.data.name == "fashion_mnist" and fm.data.path == FASHION_MNIST_DIR and fm.data.image_size == 16
    assert fm.model.input_size == 16 and fm.trainer.batch_size == 64  # the CPU recipe of the MNIST-format sets
    ds = build_dataset(generic.data)
    assert len(ds) == 5 and ds.image_size == 8
    with pytest.raises(DataError, match=r"data=digits has no 'test' split"):
        build_dataset(digits.data)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_splits():
    from pf.data.mnist_format import FASHION_MNIST_CLASSES

    train = load_mnist_format(FASHION_MNIST_DIR, "train", 16, class_names=FASHION_MNIST_CLASSES)
    test = load_mnist_format(FASHION_MNIST_DIR, "test", 16, class_names=FASHION_MNIST_CLASSES)
    assert len(train) == 60000 and len(test) == 10000 and train.images.shape[1:] == (1, 16, 16)
    assert torch.bincount(train.labels).tolist() == [6000] * 10 and torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names[9] == "Ankle boot"
    assert train.images.min() == -1 and train.images.max() > 0.9
