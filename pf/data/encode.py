"""Encode images into a latent set: ``python -m pf.data.encode images=DIR out=DIR vae=PATH [key=value ...]``.

    python -m pf.data.encode images=/data/imagenet/train out=/data/in256_latents vae=/models/sd-vae-ft-ema
    torchrun --nproc_per_node=8 -m pf.data.encode images=/data/imagenet/train out=... vae=...
    python -m pf.data.encode images=/data/shards out=... vae=...      # webdataset .tar shards

``images`` is a folder with one sub-folder of images per class (the ImageNet train layout;
classes are the sorted folder names) or webdataset ``.tar`` shards (a folder of them, one
file, or a brace pattern ``train-{0000..0099}.tar``; each sample an image under ``jpg``,
``jpeg``, ``png`` or ``webp`` and its class id under ``cls``). Every image gets the ADM/DiT
center crop at ``image_size`` (box downsampling by halves, then a bicubic resize of the
shorter side, then the center), is scaled to [-1, 1], and is encoded together with its mirror
image by a local diffusers ``AutoencoderKL`` (SD-VAE ft-EMA / ft-MSE, or one with more latent
channels); the posterior mean (and std, ``keep_std``) go to ``.npy`` shards of
``shard_size`` images with their labels (``pf.data.latent_shards``), and ``manifest.json``
(autoencoder, resolution, scale factor, counts, class names) is written last. ``pixels=true``
also keeps the cropped images (uint8, the unmirrored one: the loader mirrors it with its
latent), which training with REPA needs (``trainer.repa.enabled=true``).

A shard is written atomically and is never encoded twice: run the same command again after a
kill and it continues. The settings that shape the shards (``images``, ``vae``, ``image_size``,
``shard_size``, ``dtype``, ``keep_std``, ``pixels``) are recorded in ``encode.json`` before the
first shard; a rerun with other settings is refused naming the key, so a set never mixes two
encodes. The manifest is built from what the shards on disk hold (their shapes checked against
their records). Under ``torchrun`` rank ``r`` encodes shards ``r, r + W, ...``.
Unreadable images are skipped and counted (per shard and in the manifest). Then:

    python -m pf.train model=pf-b2 data=latents data.path=/data/in256_latents
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from pf.autoencoder import load_vae
from pf.data.base import DataError
from pf.data.latent_shards import FORMAT, MANIFEST, shard_name
from pf.models.checkpoint import write_atomically
from pf import cli

DEFAULTS = {
    "images": None,        # class folders or webdataset .tar shards (required)
    "out": None,           # the latent set's folder (required)
    "vae": None,           # local diffusers AutoencoderKL folder or single file (required)
    "image_size": 256,     # the center crop; latents are image_size / 8 across for SD-VAE
    "batch": 32,           # images per autoencoder call (x2: each with its mirror)
    "shard_size": 10000,   # images per shard of a folder input (a .tar input: one shard per tar)
    "dtype": "float16",    # float16 | float32: how the latents are stored
    "keep_std": True,      # also store the posterior std (training may then sample the posterior)
    "pixels": False,       # also store the cropped images (uint8), which REPA's encoder reads
    "scale_factor": None,  # null: the autoencoder's config.scaling_factor (0.18215 for SD-VAE)
    "device": "auto",      # auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)
    "num_workers": 4,      # image-decoding processes
    "progress": True,
}
SETTINGS = "encode.json"  # the settings a partial set was made with, written before its first shard
FLIPS = 2  # each image is stored with its mirror
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".JPEG"}
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


#################################################################################
#                              Images and the crop                              #
#################################################################################


def center_crop_adm(image, size: int):
    """The ADM / DiT center crop: halve with a box filter while the shorter side is at least
    ``2 * size``, resize (bicubic) so the shorter side is ``size``, then take the center."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float32 in [-1, 1] after the ADM crop."""
    arr = np.asarray(center_crop_adm(image.convert("RGB"), size), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def _open(source) -> torch.Tensor | None:
    try:
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except Exception:
        return None


class _Items(torch.utils.data.Dataset):
    """One shard's items for a DataLoader: (tensor or None, label)."""

    def __init__(self, items: list, size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        source, label = self.items[i]
        img = _open(io.BytesIO(source) if isinstance(source, bytes) else source)
        return (to_tensor(img, self.size) if img is not None else None), int(label)


def _collate(batch):
    good = [(x, y) for x, y in batch if x is not None]
    xs = torch.stack([x for x, _ in good]) if good else None
    return xs, torch.tensor([y for _, y in good], dtype=torch.long), len(batch) - len(good)


#################################################################################
#                                     Inputs                                    #
#################################################################################


def _tar_files(images: str) -> list[str] | None:
    if "{" in images and ".tar" in images:
        import braceexpand  # optional (a dependency of webdataset, the vae extra): only for tar shards

        return list(braceexpand.braceexpand(images))
    path = Path(images).expanduser()
    if path.is_file() and path.suffix == ".tar":
        return [str(path)]
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if tars and not subdirs:
            return tars
    return None


def plan(images: str, shard_size: int) -> dict:
    """What will be encoded: ``{"kind", "units", "class_names"}``; a unit is one output shard."""
    if images is None or str(images) in ("", "???"):
        raise DataError("set images=<folder with one sub-folder per class> (or webdataset .tar shards)")
    tars = _tar_files(str(images))
    if tars is not None:
        missing = [t for t in tars if not Path(t).is_file()]
        if missing:
            raise DataError(f"webdataset shard not found: {missing[0]}")
        return {"kind": "webdataset", "units": [{"tar": t} for t in tars], "class_names": None}
    root = Path(images).expanduser()
    if not root.is_dir():
        raise DataError(f"images={images}: no such folder (or .tar shards)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders ({root}/<class>/*.jpg) and no .tar shards")
    items = []
    for label, name in enumerate(classes):
        items += [(str(p), label) for p in sorted((root / name).rglob("*")) if p.suffix in IMAGE_SUFFIXES
                  or p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(f"{root}: no images ({sorted(IMAGE_SUFFIXES)}) in its {len(classes)} class folders")
    units = [{"items": items[i:i + shard_size]} for i in range(0, len(items), shard_size)]
    return {"kind": "folder", "units": units, "class_names": classes}


def unit_source(unit: dict) -> str:
    """What a shard was made from: its tar, or a fingerprint of its (image, label) list."""
    if "tar" in unit:
        return str(unit["tar"])
    listing = "\n".join(f"{path}\t{label}" for path, label in unit["items"])
    return f"{len(unit['items'])} images, sha1 {hashlib.sha1(listing.encode()).hexdigest()[:16]}"


def _unit_items(unit: dict) -> list:
    if "items" in unit:
        return unit["items"]
    import webdataset as wds  # optional (the vae extra): only for webdataset inputs

    items = []
    for sample in wds.WebDataset(unit["tar"], shardshuffle=False, empty_check=False):
        image = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
        label = sample.get("cls", sample.get("cls.txt", b"0"))
        items.append((image if image is not None else b"", int(label.decode() if isinstance(label, bytes) else label)))
    return items


#################################################################################
#                                   Encoding                                    #
#################################################################################


def _atomic_save(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    write_atomically(path, write)


def _write_json(path: Path, obj, indent: int | None = None) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=indent)))


#################################################################################
#                          One encode per set: its settings                     #
#################################################################################


def settings_of(cfg, kind: str) -> dict:
    """What shapes the shards, by the command's key names (``flips`` is fixed by this version)."""
    images = str(cfg.images)
    if "{" not in images:
        images = str(Path(images).expanduser().resolve())
    return {"images": images, "vae": str(Path(str(cfg.vae)).expanduser().resolve()),
            "image_size": int(cfg.image_size), "shard_size": int(cfg.shard_size) if kind == "folder" else None,
            "dtype": str(cfg.dtype), "keep_std": bool(cfg.keep_std), "pixels": bool(cfg.pixels), "flips": FLIPS}


def claim_settings(out: Path, settings: dict) -> None:
    """Record ``settings`` in ``out/encode.json``, or check them against the ones recorded there:
    a partial set continues only with the settings it was started with (every rank checks)."""
    path = out / SETTINGS
    if not path.is_file():
        if any(out.glob("shard_*.json")) or (out / MANIFEST).is_file():
            raise DataError(f"out={out} holds latent shards whose settings were not recorded ({SETTINGS} is "
                            f"missing), so this encode cannot tell whether they match: choose another out= folder")
        tmp = out / f".{SETTINGS}.{os.getpid()}.tmp"
        try:
            _write_json(tmp, settings)
            os.link(tmp, path)  # exclusive: under torchrun one rank records, the others compare
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        recorded = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}): choose another out= folder") from None
    for key, value in settings.items():
        if recorded.get(key) != value:
            raise DataError(f"out={out} holds a partial encode made with {key}={recorded.get(key)!r}, this run asks "
                            f"{key}={value!r}: rerun with the same settings to continue it, or choose another out= "
                            f"folder")


def manifest_shards(out: Path, count: int, settings: dict) -> list[dict]:
    """The records of shards ``0..count-1``, each checked against the arrays it names: the
    manifest is built from what is on disk, never from what this run meant to write."""
    records = []
    dtype = np.dtype(settings["dtype"])
    latent_shape = None
    for i in range(count):
        rec = json.loads((out / f"{shard_name(i)}.json").read_text())
        records.append(rec)
        if not rec["count"]:
            continue
        base = out / rec["name"]
        files = {"mean": None, "labels": (rec["count"],)}
        if settings["keep_std"]:
            files["std"] = None
        if settings["pixels"]:
            files["pixels"] = (rec["count"], 3, settings["image_size"], settings["image_size"])
        for kind, want in files.items():
            path = base.with_name(f"{base.name}.{kind}.npy")
            if not path.is_file():
                raise DataError(f"{path} is missing though {rec['name']}.json records {rec['count']} images: delete "
                                f"{rec['name']}.json and run the encode again to redo that shard")
            arr = np.load(path, mmap_mode="r")
            if kind in ("mean", "std"):
                want = (rec["count"], FLIPS, *(latent_shape or arr.shape[2:]))
                latent_shape = latent_shape or tuple(arr.shape[2:])
                if arr.dtype != dtype:
                    want = f"{want} {dtype}"
            got = tuple(arr.shape) if not isinstance(want, str) else f"{tuple(arr.shape)} {arr.dtype}"
            if got != want:
                raise DataError(f"{path} holds {got}, expected {want} from {rec['name']}.json and the set's other "
                                f"shards: delete {rec['name']}.json and run the encode again to redo that shard")
    return records


@torch.no_grad()
def encode_unit(vae, unit: dict, index: int, out: Path, cfg, device, bar=None) -> dict:
    """Encode one shard (both flips) and write it; returns its record."""
    items = _unit_items(unit)
    loader = torch.utils.data.DataLoader(_Items(items, int(cfg.image_size)), batch_size=int(cfg.batch),
                                         num_workers=int(cfg.num_workers), collate_fn=_collate)
    dtype = np.float16 if cfg.dtype == "float16" else np.float32
    vae_dtype = next(vae.parameters()).dtype
    means, stds, labels, pixels, skipped = [], [], [], [], 0
    for x, y, bad in loader:
        skipped += bad
        if x is not None:
            if cfg.pixels:  # [-1, 1] -> uint8, exactly the pixels that were encoded (up to rounding)
                pixels.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())  # (B, 3, S, S)
            x = x.to(device, vae_dtype)
            post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist  # (2B, C, h, w): images, then mirrors
            b = x.shape[0]
            for store, value in ((means, post.mean), (stds, post.std)):
                v = value.float().reshape(2, b, *value.shape[1:]).transpose(0, 1)  # (B, 2, C, h, w)
                store.append(v.cpu().numpy().astype(dtype))
            labels.append(y.numpy())
        if bar is not None:
            bar.update(len(y) + bad)
    base = out / shard_name(index)
    if means:
        _atomic_save(base.with_name(base.name + ".mean.npy"), np.concatenate(means))
        if cfg.keep_std:
            _atomic_save(base.with_name(base.name + ".std.npy"), np.concatenate(stds))
        _atomic_save(base.with_name(base.name + ".labels.npy"), np.concatenate(labels).astype(np.int64))
        if cfg.pixels:
            _atomic_save(base.with_name(base.name + ".pixels.npy"), np.concatenate(pixels))
    record = {"name": shard_name(index), "count": int(sum(len(m) for m in means)), "skipped": int(skipped),
              "source": unit_source(unit)}
    _write_json(base.with_name(base.name + ".json"), record)  # last: the shard is complete
    return record


def _device(cfg, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise DataError("device=cuda but no CUDA device is available")
    return torch.device(cfg.device if cfg.device != "cuda" else f"cuda:{local_rank}")


def encode(cfg) -> dict:
    """Encode everything ``cfg`` names (resuming a killed run); returns the manifest."""
    if not cfg.out:
        raise DataError("set out=<folder for the latent set>")
    if not cfg.vae:
        raise DataError("set vae=<local diffusers AutoencoderKL folder or file> (e.g. sd-vae-ft-ema)")
    if cfg.dtype not in ("float16", "float32"):
        raise DataError(f"dtype must be float16 or float32, got {cfg.dtype!r}")
    if int(cfg.image_size) % 8:
        raise DataError(f"image_size must be a multiple of 8 (the autoencoder downsamples by 8), got {cfg.image_size}")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = _device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    work = plan(cfg.images, int(cfg.shard_size))
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"out={out} is a file, not a folder for the latent set")
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(cfg, work["kind"])
    claim_settings(out, settings)
    if world == 1:  # temp files of a killed run (a kill -9 cleans nothing up); under torchrun a rank may be writing
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    vae = load_vae(cfg.vae, device)
    mine = [i for i in range(len(work["units"])) if i % world == rank]
    todo = [i for i in mine if not (out / f"{shard_name(i)}.json").is_file()]
    for i in sorted(set(mine) - set(todo)):  # a finished shard must still be what this run would write
        source = json.loads((out / f"{shard_name(i)}.json").read_text()).get("source")
        if source != unit_source(work["units"][i]):
            raise DataError(f"{out / shard_name(i)}.json was made from {source}, but images={cfg.images} now gives "
                            f"{unit_source(work['units'][i])} for it (images added or removed?): choose another out= "
                            f"folder")
    unfinished = any(not (out / f"{shard_name(i)}.json").is_file() for i in range(len(work["units"])))
    if unfinished and rank == 0:
        (out / MANIFEST).unlink(missing_ok=True)  # the set reads as unfinished until its manifest is rewritten
    if rank == 0 and len(todo) < len(mine):
        print(f"{len(mine) - len(todo)} of {len(mine)} shards already encoded in {out}; continuing")
    total = sum(len(work["units"][i]["items"]) for i in todo) if work["kind"] == "folder" else None
    t0 = time.perf_counter()
    with tqdm(total=total, desc=f"encode (rank {rank})", unit="img", disable=not cfg.progress or rank != 0) as bar:
        for i in todo:
            encode_unit(vae, work["units"][i], i, out, cfg, device, bar)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dist.barrier()
    manifest = None
    if rank == 0:
        records = manifest_shards(out, len(work["units"]), settings)
        labels = [np.load(out / f"{r['name']}.labels.npy") for r in records if r["count"]]
        if not labels:
            raise DataError(f"no image in {cfg.images} could be read ({sum(r['skipped'] for r in records)} skipped)")
        first = np.load(out / f"{next(r for r in records if r['count'])['name']}.mean.npy", mmap_mode="r")
        scaling = cfg.scale_factor if cfg.scale_factor is not None else getattr(vae.config, "scaling_factor", 0.18215)
        manifest = {
            "format": FORMAT, "version": 1,
            "autoencoder": {"path": str(Path(cfg.vae).expanduser().resolve()), "class": type(vae).__name__,
                            "latent_channels": int(first.shape[2]), "scaling_factor": float(scaling)},
            "image_size": int(cfg.image_size), "latent_shape": [int(s) for s in first.shape[2:]],
            "scale_factor": float(scaling), "dtype": cfg.dtype, "std": bool(cfg.keep_std), "flips": FLIPS,
            "shard_size": settings["shard_size"],
            "pixels": bool(cfg.pixels),
            "num_images": int(sum(r["count"] for r in records)), "skipped": int(sum(r["skipped"] for r in records)),
            "num_classes": len(work["class_names"]) if work["class_names"] else int(max(int(x.max()) for x in labels)) + 1,
            "class_names": work["class_names"], "input": str(cfg.images), "shards": records,
        }
        _write_json(out / MANIFEST, manifest, indent=1)  # last, from the checked shards
        print(f"wrote {out / MANIFEST}: {manifest['num_images']} images ({manifest['skipped']} unreadable, skipped) "
              f"in {len(records)} shards, latents {manifest['latent_shape']} x 2 flips, "
              f"{time.perf_counter() - t0:.0f} s")
    if world > 1:
        dist.destroy_process_group()
    return manifest


def main(cfg) -> None:
    encode(cfg)


if __name__ == "__main__":
    sys.exit(cli.run(main, DEFAULTS, __doc__))
