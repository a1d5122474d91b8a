"""Images with captions for text-to-image training: ``(image (C, H, W) in [-1, 1], caption str)``.

Three sources, one item format; :func:`collate_captions` makes a batch ``(images (B, C, H, W),
captions list[str])`` (PyTorch's default collate gives the captions as a tuple of str, which
the text encoders take too):

- :class:`CaptionFolder`: a folder of images with ``captions.jsonl`` at its root (lines
  ``{"file": "relative/path.png", "caption": "..."}`` or ``"captions": [...]``; ``file_name``
  and ``text`` are read too) or, without one, a ``.txt`` beside each image (one caption per
  line). An image may have several captions; images without any are skipped with one warning.
- :class:`CaptionShards`: webdataset tar shards (a glob, a brace pattern such as
  ``shards/{00000..00099}.tar``, a folder or a list), each sample an image (``png``, ``jpg``,
  ``jpeg``, ``webp``) and a caption (``txt``: one per line, or ``json`` with ``caption`` /
  ``captions``). An IterableDataset: each DDP rank and DataLoader worker reads its own shards.
- :class:`CaptionedClasses`: a class-labelled set (the embedded digits, Fashion-MNIST) with
  captions written from its class names by templates. The templates kept for training and the
  held-out ones (:func:`demo_prompts`) share no wording, so a model recognised from the
  held-out prompts generalises to new phrasings.

Images go through the same resize (shorter side to ``image_size``), center crop and scaling
as :class:`pf.data.folder.ImageFolder`.

Which caption an item shows: item ``i`` of epoch ``e`` takes caption ``hash(seed, e, i) mod n``
of its ``n`` captions (shards: ``i`` is a hash of the sample's key). Unlike a generator that
advances with every access, the pick does not depend on access order, DataLoader workers or a
resumed run; it changes with :meth:`set_epoch`, which ``pf.data.ShardedBatches`` calls every
epoch (a loop of one's own must call it too, or every epoch shows the same captions).
"""

from __future__ import annotations

import glob
import json
import random
import warnings
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from pf.data.base import DataError, TensorImages
from pf.data.digits import load_digits_dataset
from pf.data.folder import IMAGE_SUFFIXES, _readable, image_to_tensor, load_image
from pf.data.latent_shards import _mix
from pf.data.mnist_format import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_mnist_format

CAPTIONS_FILE = "captions.jsonl"
SHARD_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def collate_captions(batch) -> tuple[torch.Tensor, list[str]]:
    """``[(image, caption), ...]`` -> ``(images (B, C, H, W), captions list[str])``."""
    images, captions = zip(*batch)
    return torch.stack(images), list(captions)


def _pick(n: int, seed: int, epoch: int, i: int) -> int:
    """Which of ``n`` captions item ``i`` shows in ``epoch`` (see the module docstring)."""
    return 0 if n == 1 else _mix(seed, epoch, i) % n


def _clean(captions) -> list[str]:
    """Non-empty captions, stripped (an empty caption is the null prompt, not a description)."""
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise DataError(f"data.channels must be 1 (grey) or 3 (RGB) for images, got {channels}")
    return int(channels)


#################################################################################
#                         A folder of captioned images                          #
#################################################################################


def read_captions_jsonl(path: Path) -> dict[str, list[str]]:
    """``{relative posix path: captions}`` from a captions.jsonl (a file listed twice gets both)."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not a JSON object ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            file = row.get("file", row.get("file_name"))
            if not isinstance(file, str) or not file:
                raise DataError(f'{path}:{lineno}: no "file" (the image path relative to {path.parent})')
            captions = row.get("captions", row.get("caption", row.get("text")))
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(captions, list):
                raise DataError(f'{path}:{lineno}: no "caption" (a string) or "captions" (a list of strings) '
                                f"for {file}")
            out.setdefault(Path(file).as_posix().removeprefix("./"), []).extend(_clean(captions))
    return out


class CaptionFolder(Dataset):
    """Captioned images under ``root`` (any depth): ``(image, caption)`` items, one caption picked
    per epoch among an image's captions. Every image file is checked with Pillow when the
    dataset is built; unreadable ones and ones without a caption are skipped with a warning."""

    def __init__(self, root: str | Path | None, image_size: int, channels: int = 3, seed: int = 0):
        if root is None or str(root) in ("", "???"):
            raise DataError(f"a caption folder needs data.path=<folder of images with {CAPTIONS_FILE} or a .txt "
                            f"caption file beside each image>")
        self.root = Path(root).expanduser()
        self.source = f"caption folder {self.root}"
        if not self.root.is_dir():
            raise DataError(f"data.path {self.root} is not a directory")
        self.image_size, self.channels = int(image_size), _check_channels(channels)
        self.seed, self.epoch = int(seed), 0

        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise DataError(f"{self.source} holds no images (suffixes {sorted(IMAGE_SUFFIXES)})")
        jsonl = self.root / CAPTIONS_FILE
        if jsonl.is_file():
            listed = read_captions_jsonl(jsonl)
            captions_of = {p: listed.get(p.relative_to(self.root).as_posix(), []) for p in images}
            on_disk = {p.relative_to(self.root).as_posix() for p in images}
            absent = [f for f in listed if f not in on_disk]
            if absent:
                warnings.warn(f"{jsonl}: {len(absent)} listed file(s) are not images in the folder, e.g. {absent[0]}",
                              stacklevel=2)
        else:
            captions_of = {p: self._txt_captions(p) for p in images}

        self.paths: list[Path] = []
        self.captions: list[list[str]] = []
        uncaptioned, bad = [], []
        for path in images:
            if not captions_of[path]:
                uncaptioned.append(path)
            elif not _readable(path):
                bad.append(path)
            else:
                self.paths.append(path)
                self.captions.append(captions_of[path])
        where = f"a line in {jsonl}" if jsonl.is_file() else "a .txt file beside the image"
        if not self.paths and uncaptioned:
            raise DataError(f"{self.source}: none of its {len(images)} image(s) has a caption; write {where} "
                            f"({CAPTIONS_FILE}: {{\"file\": \"relative/path.png\", \"caption\": \"...\"}} per line)")
        if not self.paths:
            raise DataError(f"{self.source} holds no readable images ({len(bad)} unreadable, e.g. {bad[0]})")
        if uncaptioned:
            warnings.warn(f"{self.source}: skipped {len(uncaptioned)} image(s) without a caption ({where}), "
                          f"e.g. {uncaptioned[0]}", stacklevel=2)
        if bad:
            warnings.warn(f"{self.source}: skipped {len(bad)} unreadable image file(s), e.g. {bad[0]}", stacklevel=2)
        self.skipped = {"uncaptioned": len(uncaptioned), "unreadable": len(bad)}

    @staticmethod
    def _txt_captions(image: Path) -> list[str]:
        txt = image.with_suffix(".txt")
        if not txt.is_file():
            return []
        return _clean(txt.read_text(encoding="utf-8", errors="replace").splitlines())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def caption(self, i: int) -> str:
        """The caption item ``i`` shows in the current epoch."""
        captions = self.captions[i]
        return captions[_pick(len(captions), self.seed, self.epoch, i)]

    def __getitem__(self, i: int):
        return load_image(self.paths[i], self.image_size, self.channels), self.caption(i)

    def all_captions(self) -> list[str]:
        """Every distinct caption (the fixed set a text-embedding cache encodes once)."""
        return sorted({c for cs in self.captions for c in cs})


#################################################################################
#                              webdataset shards                                #
#################################################################################


def expand_shards(urls) -> list[str]:
    """Tar files named by a folder, a glob, a brace pattern (``{000..009}``) or a list of those."""
    if urls is None or str(urls) in ("", "???"):
        raise DataError("caption shards need data.path=<.tar shards: a folder, a glob or a brace pattern such as "
                        "shards/{00000..00099}.tar>")
    patterns = [str(u) for u in urls] if isinstance(urls, (list, tuple)) else [str(urls)]
    found: list[str] = []
    from braceexpand import braceexpand  # a dependency of webdataset

    for pattern in patterns:
        for one in braceexpand(pattern):
            path = Path(one).expanduser()
            if path.is_dir():
                found += sorted(str(p) for p in path.glob("*.tar"))
            elif any(ch in one for ch in "*?["):
                found += sorted(glob.glob(str(path)))
            elif path.is_file():
                found.append(str(path))
            else:
                raise DataError(f"data.path: shard {path} not found")
    if not found:
        raise DataError(f"data.path={urls!r} names no .tar shards")
    return found


def _shard_captions(sample: dict) -> list[str]:
    text = sample.get("txt")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if isinstance(text, str):
        return _clean(text.splitlines())
    meta = sample.get("json")
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except ValueError:
            return []
    if isinstance(meta, dict):
        captions = meta.get("captions", meta.get("caption"))
        return _clean([captions] if isinstance(captions, str) else captions or [])
    return []


class CaptionShards(IterableDataset):
    """Captioned images from webdataset tar shards (see the module docstring).

    Sharding: the shard list (shuffled per epoch from ``seed`` when ``shuffle``) is dealt out
    round-robin to the ``world_size * num_workers`` readers, reader ``rank * num_workers +
    worker``; so every reader needs a shard of its own (use at least that many shards, better
    several times more: ranks then see about equal counts). ``rank`` / ``world_size`` default
    to torch.distributed's when it is initialised. Samples are shuffled in a buffer of
    ``shuffle`` samples (0: file order). One pass over this reader's shards per ``iter()``;
    call :meth:`set_epoch` between passes. A sample without an image or a caption is skipped
    (counted, one warning per pass); an unreadable one is skipped with webdataset's warning.
    """

    def __init__(self, urls, image_size: int, channels: int = 3, *, seed: int = 0, shuffle: int = 1000,
                 rank: int | None = None, world_size: int | None = None):
        try:
            import webdataset  # noqa: F401  (fail here, not in a DataLoader worker)
        except ImportError as err:
            raise ImportError("caption shards need the 'webdataset' package: pip install 'patch-forcing[t2i]'") from err
        self.shards = expand_shards(urls)
        self.source = f"caption shards {urls}"
        self.image_size, self.channels = int(image_size), _check_channels(channels)
        self.seed, self.epoch, self.shuffle = int(seed), 0, int(shuffle)
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if on else 0
            world_size = dist.get_world_size() if on else 1
        self.rank, self.world_size = int(rank), int(world_size)
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def reader_shards(self) -> list[str]:
        """The shards this rank and DataLoader worker read in the current epoch."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = list(self.shards)
        if self.shuffle:
            random.Random(_mix(self.seed, self.epoch)).shuffle(order)
        readers = self.world_size * workers
        mine = order[self.rank * workers + worker::readers]
        if not mine:
            raise DataError(f"{self.source}: {len(self.shards)} shard(s) for {self.world_size} rank(s) x {workers} "
                            f"DataLoader worker(s) leave reader {self.rank * workers + worker} without a shard; use "
                            f"fewer workers or split the data into more shards")
        return mine

    def __iter__(self):
        import webdataset as wds  # optional (the t2i extra): only caption shards read it

        mine = self.reader_shards()
        stages = [wds.SimpleShardList(mine), wds.tarfile_to_samples(handler=wds.warn_and_continue)]
        if self.shuffle:
            info = get_worker_info()
            rng = random.Random(_mix(self.seed, self.epoch, self.rank, info.id if info else 0))
            stages.append(wds.shuffle(self.shuffle, initial=min(self.shuffle, 100), rng=rng))
        stages.append(wds.decode("pil", handler=wds.warn_and_continue))
        skipped, first = 0, None
        for sample in wds.DataPipeline(*stages):
            image = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
            captions = _shard_captions(sample)
            if image is None or not captions:
                skipped, first = skipped + 1, first or sample.get("__key__")
                continue
            key = zlib.crc32(str(sample.get("__key__", "")).encode())
            caption = captions[_pick(len(captions), self.seed, self.epoch, key)]
            yield image_to_tensor(image, self.image_size, self.channels), caption
        self.skipped = skipped
        if skipped:
            warnings.warn(f"{self.source}: skipped {skipped} sample(s) without an image ({'/'.join(SHARD_IMAGE_KEYS)}) "
                          f"or a caption (txt, or json with caption/captions), e.g. {first}", stacklevel=2)


#################################################################################
#                  Class-labelled sets with written captions                    #
#################################################################################

# Each class: the words that name it (the first in held-out prompts) and its article form.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = (  # Fashion-MNIST's classes (pf.data.mnist_format.FASHION_MNIST_CLASSES), as people say them
    ("t-shirt", "top"), ("trousers",), ("pullover", "sweater"), ("dress",), ("coat",), ("sandal",), ("shirt",),
    ("sneaker", "trainer"), ("bag", "handbag"), ("ankle boot",))
PLURAL = {"trousers"}

# {word}/{a_word}: "seven" / "a seven"; {numeral}/{a_numeral}: "7" / "a 7" (digits only).
# {name}/{a_name}/{a_grey_name}: "ankle boot" / "an ankle boot" / "a grey ankle boot"; "trousers" /
# "a pair of trousers" / "a pair of grey trousers".
TEMPLATES = {
    "digits": {
        "train": (
            "a handwritten {word}", "the digit {numeral} in white on black", "{a_numeral}",
            "number {word}, handwritten",
            "a white {word} on a black background", "handwritten number {numeral}", "the number {word}",
            "{word}", "a blurry, low resolution {word}", "the digit {word} written by hand",
            "a small grey image of the digit {numeral}", "{numeral}, drawn by hand", "a sketch of the number {numeral}",
        ),
        "test": (
            "a picture of the number {word}", "an image showing {a_numeral}", "someone wrote the digit {word}",
            "digit: {numeral}", "a scanned handwritten {numeral}", "the numeral {word}",
        ),
    },
    "fashion_mnist": {
        "train": (
            "a photo of {a_name}", "{a_grey_name} on black", "{name}", "{a_name}, low resolution",
            "a black and white photo of {a_name}", "a product photo of {a_name}", "{a_name} on a black background",
            "a small greyscale image of {a_name}", "a picture of {a_name} from a clothing catalogue",
            "{a_name}, seen from above",
        ),
        "test": (
            "an image of {a_name}", "a greyscale picture showing {a_name}", "a thumbnail of {a_name}",
            "fashion item: {name}", "{a_name} in a web shop",
        ),
    },
}
DEMO_SETS = tuple(TEMPLATES)


def _article(phrase: str) -> str:
    """``phrase`` with its indefinite article: "an eight", "an 8", "a one", "a pair of grey trousers"."""
    if phrase.split()[-1] in PLURAL:
        return f"a pair of {phrase}"
    vowel = phrase[0] in "aeiou8" and not phrase.startswith(("one", "uni", "use"))
    return ("an " if vowel else "a ") + phrase


def class_words(name: str) -> tuple[tuple[str, ...], ...]:
    """The words naming each class of a demo set (``digits`` or ``fashion_mnist``)."""
    if name == "digits":
        return tuple((w, str(i)) for i, w in enumerate(DIGIT_WORDS))
    if name == "fashion_mnist":
        return FASHION_NAMES
    raise DataError(f"unknown captioned demo set {name!r}: choose one of {', '.join(DEMO_SETS)}")


def _render(name: str, template: str, class_id: int, which: int = 0) -> str:
    """A template filled in for a class (``which``: which of the class's names)."""
    if name == "digits":
        word, numeral = DIGIT_WORDS[class_id], str(class_id)
        return template.format(word=word, a_word=_article(word), numeral=numeral, a_numeral=_article(numeral))
    noun = FASHION_NAMES[class_id][which]
    return template.format(name=noun, a_name=_article(noun), a_grey_name=_article(f"grey {noun}"))


def templates(name: str, split: str = "train") -> tuple[str, ...]:
    """The caption templates of a demo set: ``train`` (captions of the data) or ``test`` (held out)."""
    class_words(name)
    if split not in ("train", "test"):
        raise DataError(f"template split must be 'train' or 'test', got {split!r}")
    return TEMPLATES[name][split]


def class_captions(name: str, split: str = "train") -> list[list[str]]:
    """Per class, every caption its ``split`` templates give (training: with every name of the class)."""
    names = class_words(name)
    out = []
    for c in range(len(names)):
        which = range(len(names[c])) if name == "fashion_mnist" and split == "train" else [0]
        out.append(sorted({_render(name, t, c, w) for t in templates(name, split) for w in which}))
    return out


def demo_prompts(name: str, split: str = "test") -> list[tuple[str, int]]:
    """``(prompt, class_id)`` pairs of a demo set: ``test``, the held-out templates (worded unlike
    any training caption: a recognition test of generalisation), or ``train``, the captions the
    data shows."""
    return [(p, c) for c, prompts in enumerate(class_captions(name, split)) for p in prompts]


class CaptionedClasses(Dataset):
    """A class-labelled image set whose items are ``(image, caption)``, the caption picked per
    epoch among its class's captions. ``labels`` (M,) int64 keeps the classes (``label(i)``)."""

    def __init__(self, base: TensorImages, captions: list[list[str]], *, class_names: tuple, seed: int = 0,
                 name: str = "captioned"):
        if len(captions) != base.num_classes:
            raise DataError(f"{base.source}: {base.num_classes} classes but captions for {len(captions)}")
        empty = [c for c, cs in enumerate(captions) if not cs]
        if empty:
            raise DataError(f"{base.source}: no caption for class(es) {empty}")
        self.images, self.labels = base.images, base.labels
        self.num_classes, self.channels, self.image_size = base.num_classes, base.channels, base.image_size
        self.source, self.name = f"{base.source} with captions", name
        self.class_captions = [list(cs) for cs in captions]
        self.class_names = tuple(class_names)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.images.shape[0]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def caption(self, i: int) -> str:
        captions = self.class_captions[self.label(i)]
        return captions[_pick(len(captions), self.seed, self.epoch, i)]

    def __getitem__(self, i: int):
        return self.images[i], self.caption(i)

    def all_captions(self) -> list[str]:
        return sorted({c for cs in self.class_captions for c in cs})


def load_captioned(name: str, split: str = "train", image_size: int = 16, path: str | Path | None = None,
                   seed: int = 0) -> CaptionedClasses:
    """A demo set with its training captions: ``digits`` (scikit-learn's, one split: ``train``)
    or ``fashion_mnist`` (``train`` / ``test``; ``path`` default the Debian package's folder)."""
    if name == "digits":
        if split != "train":
            raise DataError(f"the digits have no {split!r} split (only 'train'); held-out prompts come from "
                            f"demo_prompts('digits', 'test')")
        base = load_digits_dataset(image_size=image_size)
    elif name == "fashion_mnist":
        base = load_mnist_format(path or FASHION_MNIST_DIR, split, image_size, name="Fashion-MNIST",
                                 class_names=FASHION_MNIST_CLASSES)
    else:
        class_words(name)  # the error naming the demo sets
    return CaptionedClasses(base, class_captions(name, "train"), class_names=tuple(n[0] for n in class_words(name)),
                            seed=seed, name=name)


#################################################################################
#                                 From config                                   #
#################################################################################

CAPTION_DATA = ("captioned_digits", "captioned_fashion_mnist", "caption_folder", "caption_shards")


def build_caption_dataset(data_cfg, seed: int = 0):
    """The captioned dataset named by ``data_cfg.name`` (one of :data:`CAPTION_DATA`), reading
    ``path``, ``split``, ``image_size``, ``channels`` and ``shuffle`` (shards) from ``data_cfg``."""
    name = data_cfg.name
    split = data_cfg.get("split", "train") or "train"
    size = int(data_cfg.image_size)
    if name == "captioned_digits":
        return load_captioned("digits", split, size, seed=seed)
    if name == "captioned_fashion_mnist":
        return load_captioned("fashion_mnist", split, size, path=data_cfg.get("path"), seed=seed)
    if split != "train":
        raise DataError(f"data={name} has no {split!r} split")
    channels = int(data_cfg.get("channels", 3))
    if name == "caption_folder":
        return CaptionFolder(data_cfg.get("path"), image_size=size, channels=channels, seed=seed)
    if name == "caption_shards":
        return CaptionShards(data_cfg.get("path"), image_size=size, channels=channels, seed=seed,
                             shuffle=int(data_cfg.get("shuffle", 1000)))
    raise DataError(f"unknown captioned dataset {name!r}; choose data=" + ", ".join(CAPTION_DATA))


def check_caption_data(dataset, *, channels: int, image_size: int) -> None:
    """Stop before training when captioned data and the model disagree."""
    src = getattr(dataset, "source", "the dataset")
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        raise DataError(f"{src} holds no training examples")
    if dataset.channels != channels:
        raise DataError(f"{src} has {dataset.channels} channels but the model expects in_channels={channels}")
    if dataset.image_size != image_size:
        raise DataError(f"{src} holds {dataset.image_size}x{dataset.image_size} inputs but the model expects "
                        f"input_size={image_size}")


__all__ = ["collate_captions", "CaptionFolder", "CaptionShards", "CaptionedClasses", "load_captioned", "demo_prompts",
           "templates", "class_captions", "class_words", "build_caption_dataset", "check_caption_data", "expand_shards",
           "read_captions_jsonl", "TEMPLATES", "CAPTION_DATA"]
