"""Captioned data (pf.data.captions): caption folders (captions.jsonl and .txt layouts),
webdataset shards written here, the captioned digits and Fashion-MNIST, and the held-out prompts."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pf.data import DataError, ImageFolder
from pf.data.captions import (
    CaptionedClasses,
    CaptionFolder,
    CaptionShards,
    build_caption_dataset,
    class_captions,
    class_words,
    collate_captions,
    demo_prompts,
    load_captioned,
    templates,
)
from pf.data.mnist_format import FASHION_MNIST_DIR

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _image(path: Path, colour, size=(10, 12)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _colour_of(x: torch.Tensor):
    """The (R, G, B) in 0..255 of a uniformly coloured (3, H, W) image in [-1, 1]."""
    return tuple(int(round(v)) for v in ((x.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def _nearest(x: torch.Tensor):
    """Which of RED, GREEN, BLUE a (lossily saved) uniform image is."""
    got = _colour_of(x)
    return min((RED, GREEN, BLUE), key=lambda c: sum(abs(a - b) for a, b in zip(got, c)))


def _captions_over_epochs(ds, i, epochs=60):
    out = []
    for e in range(epochs):
        ds.set_epoch(e)
        out.append(ds[i][1])
    return out


# ---------------------------------------------------------------- captions.jsonl
@pytest.fixture
def jsonl_folder(tmp_path):
    _image(tmp_path / "a" / "red.png", RED)
    _image(tmp_path / "b" / "green.jpg", GREEN)
    _image(tmp_path / "blue.png", BLUE)
    _image(tmp_path / "uncaptioned.png", RED)
    rows = [{"file": "a/red.png", "caption": "a red square"},
            {"file": "./b/green.jpg", "captions": ["a green square", "green", "  ", "something green"]},
            {"file": "blue.png", "caption": "a blue square"},
            {"file": "gone.png", "caption": "a file that is not there"}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return tmp_path


def test_jsonl_captions_are_read_back(jsonl_folder):
    with pytest.warns(UserWarning) as record:
        ds = CaptionFolder(jsonl_folder, image_size=8, channels=3)
    messages = " ".join(str(w.message) for w in record)
    assert "skipped 1 image(s) without a caption" in messages and "1 listed file(s) are not images" in messages
    assert len(ds) == 3 and ds.skipped == {"uncaptioned": 1, "unreadable": 0}
    by_colour = {}
    for i in range(len(ds)):
        x, caption = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        by_colour[_nearest(x)] = ds.captions[i]
        assert caption in ds.captions[i]
    assert by_colour[RED] == ["a red square"] and by_colour[BLUE] == ["a blue square"]
    assert by_colour[GREEN] == ["a green square", "green", "something green"]  # the blank one dropped
    assert ds.all_captions() == sorted(["a red square", "a blue square", "a green square", "green",
                                        "something green"])


def test_every_caption_is_picked_and_the_pick_is_reproducible(jsonl_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, same, other = (CaptionFolder(jsonl_folder, image_size=8, seed=s) for s in (0, 0, 1))
    green = next(i for i in range(len(ds)) if len(ds.captions[i]) == 3)
    picks = _captions_over_epochs(ds, green)
    assert set(picks) == set(ds.captions[green])
    assert picks == _captions_over_epochs(same, green)       # the same seed: the same captions
    assert picks != _captions_over_epochs(other, green)      # another seed: others
    ds.set_epoch(3)
    assert len({ds[green][1] for _ in range(5)}) == 1        # within an epoch an item keeps its caption


def test_batches_are_images_and_a_list_of_captions(jsonl_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CaptionFolder(jsonl_folder, image_size=8)
    images, captions = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_captions)))
    assert images.shape == (3, 3, 8, 8) and isinstance(captions, list) and all(isinstance(c, str) for c in captions)
    images, captions = next(iter(DataLoader(ds, batch_size=3)))  # the default collate: a tuple of str
    assert images.shape == (3, 3, 8, 8) and list(captions) == [ds[i][1] for i in range(3)]


def test_caption_folder_images_match_image_folder(tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (13, 17, 3), generator=rng, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "pic.png")
    (tmp_path / "pic.txt").write_text("noise\n")
    (tmp_path / "classes" / "only").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "classes" / "only" / "pic.png")
    for channels in (1, 3):
        with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) without a caption"):
            ours = CaptionFolder(tmp_path, image_size=8, channels=channels)
        ref = ImageFolder(tmp_path / "classes", image_size=8, channels=channels)
        i = next(k for k, p in enumerate(ours.paths) if p.parent == tmp_path)
        assert torch.equal(ours[i][0], ref[0][0])


# ---------------------------------------------------------------- .txt beside each image
def test_txt_captions_one_per_line(tmp_path):
    _image(tmp_path / "one.png", RED)
    (tmp_path / "one.txt").write_text("a red square\n\n  red, on its own  \n")
    _image(tmp_path / "deep" / "two.png", BLUE)
    (tmp_path / "deep" / "two.txt").write_text("a blue square")
    _image(tmp_path / "three.png", GREEN)  # no .txt
    with pytest.warns(UserWarning, match=r"skipped 1 image\(s\) without a caption \(a .txt file beside"):
        ds = CaptionFolder(tmp_path, image_size=4, channels=1)
    assert len(ds) == 2 and ds[0][0].shape == (1, 4, 4)
    captions = {Path(p).stem: cs for p, cs in zip(ds.paths, ds.captions)}
    assert captions == {"one": ["a red square", "red, on its own"], "two": ["a blue square"]}
    assert set(_captions_over_epochs(ds, ds.paths.index(tmp_path / "one.png"), 40)) == set(captions["one"])


# ---------------------------------------------------------------- errors
def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"needs data.path="):
        CaptionFolder(None, image_size=8)
    with pytest.raises(DataError, match=r"is not a directory"):
        CaptionFolder(tmp_path / "missing", image_size=8)
    with pytest.raises(DataError, match=r"holds no images"):
        CaptionFolder(tmp_path, image_size=8)
    _image(tmp_path / "x.png", RED)
    _image(tmp_path / "y.png", RED)
    with pytest.raises(DataError, match=r"none of its 2 image\(s\) has a caption"):
        CaptionFolder(tmp_path, image_size=8)
    with pytest.raises(DataError, match=r"data.channels must be 1"):
        CaptionFolder(tmp_path, image_size=8, channels=2)
    (tmp_path / "captions.jsonl").write_text('{"file": "x.png", "caption": "ok"}\n{"file": "y.png", "caption": \n')
    with pytest.raises(DataError, match=r"captions.jsonl:2: not a JSON object"):
        CaptionFolder(tmp_path, image_size=8)
    (tmp_path / "captions.jsonl").write_text('{"file": "x.png", "caption": 3}\n')
    with pytest.raises(DataError, match=r'captions.jsonl:1: no "caption"'):
        CaptionFolder(tmp_path, image_size=8)
    (tmp_path / "captions.jsonl").write_text('{"caption": "no file"}\n')
    with pytest.raises(DataError, match=r'captions.jsonl:1: no "file"'):
        CaptionFolder(tmp_path, image_size=8)


# ---------------------------------------------------------------- webdataset shards
def _encoded(colour, fmt):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, format=fmt)
    return buf.getvalue()


SHARD_SAMPLES = [  # (key, colour, fields)
    ("s0", RED, {"png": "PNG", "txt": "a red square"}),
    ("s1", GREEN, {"jpg": "JPEG", "json": {"caption": "a green square"}}),
    ("s2", BLUE, {"webp": "WEBP", "json": {"captions": ["a blue square", "blue"]}}),
    ("s3", RED, {"png": "PNG"}),  # no caption: skipped
    ("s4", GREEN, {"png": "PNG", "txt": "green\nthe colour green"}),
    ("s5", BLUE, {"jpeg": "JPEG", "txt": "a blue square again"}),
]


@pytest.fixture
def shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(3):
        with wds.TarWriter(str(folder / f"part-{s:03d}.tar")) as sink:
            for key, colour, fields in SHARD_SAMPLES[2 * s:2 * s + 2]:
                sample = {"__key__": key}
                for ext, value in fields.items():
                    if ext in ("png", "jpg", "jpeg", "webp"):
                        sample[ext] = _encoded(colour, value)
                    elif ext == "json":
                        sample[ext] = json.dumps(value).encode()
                    else:
                        sample[ext] = value.encode()
                sink.write(sample)
    return folder


def _read(ds):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        items = list(ds)
    return items, [str(w.message) for w in record]


def test_shards_are_read_back(shards):
    ds = CaptionShards(str(shards / "part-{000..002}.tar"), image_size=8, shuffle=0)
    items, messages = _read(ds)
    assert len(items) == 5 and ds.skipped == 1
    assert any(re.search(r"skipped 1 sample\(s\) without an image .* e.g. s3", m) for m in messages)
    expected = {"a red square": RED, "a green square": GREEN, "a blue square": BLUE, "blue": BLUE,
                "green": GREEN, "the colour green": GREEN, "a blue square again": BLUE}
    for x, caption in items:
        assert x.shape == (3, 8, 8) and caption in expected
        got, want = _colour_of(x), expected[caption]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 8  # jpeg and webp are lossy
    assert [c for _, c in items][0] == "a red square"  # shuffle=0 keeps file order
    # a folder, a glob and a list name the same shards
    for urls in (str(shards), str(shards / "part-*.tar"), [str(p) for p in sorted(shards.glob("*.tar"))]):
        assert CaptionShards(urls, image_size=8).shards == ds.shards


def test_shard_captions_vary_by_epoch_and_seed(shards):
    def picks(seed):
        ds = CaptionShards(str(shards), image_size=8, shuffle=0, seed=seed)
        out = []
        for e in range(40):
            ds.set_epoch(e)
            out.append([c for _, c in _read(ds)[0] if c in ("green", "the colour green")][0])
        return out

    first = picks(0)
    assert set(first) == {"green", "the colour green"} and first == picks(0) and first != picks(1)


def test_shards_split_over_ranks_and_workers(shards):
    everything = sorted(c for _, c in _read(CaptionShards(str(shards), image_size=8, shuffle=0))[0])
    ranks = [CaptionShards(str(shards), image_size=8, rank=r, world_size=2, seed=5) for r in range(2)]
    parts = [sorted(c for _, c in _read(ds)[0]) for ds in ranks]
    assert sorted(parts[0] + parts[1]) == everything and set(parts[0]).isdisjoint(parts[1])
    ds = CaptionShards(str(shards), image_size=8, shuffle=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(ds, batch_size=2, num_workers=3))
    captions = sorted(c for _, cs in batches for c in cs)
    assert captions == everything  # each of 3 workers read its own shard
    assert all(x.shape[1:] == (3, 8, 8) for x, _ in batches)
    too_many = CaptionShards(str(shards), image_size=8, rank=3, world_size=4)
    with pytest.raises(DataError, match=r"3 shard\(s\) for 4 rank\(s\) x 1 DataLoader worker\(s\)"):
        list(too_many)


def test_shard_errors(tmp_path):
    pytest.importorskip("webdataset")
    with pytest.raises(DataError, match=r"need data.path="):
        CaptionShards(None, image_size=8)
    with pytest.raises(DataError, match=r"shard .*nothing.tar not found"):
        CaptionShards(str(tmp_path / "nothing.tar"), image_size=8)
    with pytest.raises(DataError, match=r"names no .tar shards"):
        CaptionShards(str(tmp_path / "*.tar"), image_size=8)


# ---------------------------------------------------------------- captioned digits and Fashion-MNIST
def _names_class(caption: str, names) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", caption) for n in names)


def test_captioned_digits_images_labels_and_captions():
    from pf.data.digits import load_digits_dataset

    ds = load_captioned("digits", image_size=16)
    base = load_digits_dataset(16)
    assert isinstance(ds, CaptionedClasses) and len(ds) == len(base) == 1797
    assert ds.num_classes == 10 and ds.channels == 1 and ds.image_size == 16
    assert torch.equal(ds.labels, base.labels)
    names = class_words("digits")
    for i in range(0, len(ds), 97):
        x, caption = ds[i]
        assert torch.equal(x, base.images[i]) and ds.label(i) == int(base.labels[i])
        assert _names_class(caption, names[ds.label(i)]), (caption, ds.label(i))
    seven = [c for c in ds.class_captions[7]]
    assert "a handwritten seven" in seven and "the digit 7 in white on black" in seven and "a 7" in seven
    assert "an 8" in ds.class_captions[8] and "a 1" in ds.class_captions[1]
    first = next(i for i in range(len(ds)) if ds.label(i) == 7)
    assert set(_captions_over_epochs(ds, first, 200)) == set(seven)  # every template shows up
    with pytest.raises(DataError, match=r"the digits have no 'test' split"):
        load_captioned("digits", split="test")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST is not installed")
def test_captioned_fashion_mnist_test_split():
    from pf.data.mnist_format import load_mnist_format

    ds = load_captioned("fashion_mnist", split="test", image_size=16)
    base = load_mnist_format(FASHION_MNIST_DIR, "test", 16)
    assert len(ds) == 10000 and ds.num_classes == 10 and torch.equal(ds.labels, base.labels)
    assert ds.class_names[7] == "sneaker" and ds.class_names[9] == "ankle boot"
    names = class_words("fashion_mnist")
    for i in range(0, len(ds), 499):
        x, caption = ds[i]
        assert torch.equal(x, base.images[i]) and _names_class(caption, names[ds.label(i)]), caption
    assert {"a photo of a sneaker", "a grey ankle boot on black", "trousers"} <= set(ds.all_captions())


@pytest.mark.parametrize("name", ["digits", "fashion_mnist"])
def test_every_caption_names_its_class(name):
    names = class_words(name)
    for split in ("train", "test"):
        for c, captions in enumerate(class_captions(name, split)):
            assert captions and all(_names_class(t, names[c]) for t in captions), (split, c)


@pytest.mark.parametrize("name", ["digits", "fashion_mnist"])
def test_held_out_prompts_are_worded_unlike_training(name):
    assert set(templates(name, "train")).isdisjoint(templates(name, "test"))
    held_out, train = demo_prompts(name), demo_prompts(name, "train")
    assert {p for p, _ in held_out}.isdisjoint(p for p, _ in train)
    assert sorted({c for _, c in held_out}) == list(range(10))
    assert len(held_out) == 10 * len(templates(name, "test"))


def test_build_caption_dataset_from_config(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "captioned_digits", "image_size": 16, "split": "train"})
    assert len(build_caption_dataset(cfg)) == 1797
    _image(tmp_path / "x.png", RED)
    (tmp_path / "x.txt").write_text("a red square")
    cfg = OmegaConf.create({"name": "caption_folder", "path": str(tmp_path), "image_size": 8, "channels": 3})
    assert build_caption_dataset(cfg)[0][1] == "a red square"
    with pytest.raises(DataError, match=r"unknown captioned dataset 'captions'"):
        build_caption_dataset(OmegaConf.create({"name": "captions", "image_size": 8}))
    with pytest.raises(DataError, match=r"unknown captioned demo set 'cifar'"):
        load_captioned("cifar")
