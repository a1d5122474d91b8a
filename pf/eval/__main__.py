"""FID / KID / precision-recall of generated images against a reference: ``python -m pf.eval key=value ...``.

    # a checkpoint drawn with a sampler, against the embedded digits, in classifier features
    python -m pf.eval generated=runs/x/checkpoints/last.pt sampler.name=look_ahead sampler.steps=50
    # against the held-out Fashion-MNIST test split (classifier: train_classifier data.name=fashion_mnist)
    python -m pf.eval generated=runs/x/checkpoints/last.pt data.name=fashion_mnist data.split=test
    # a folder of PNGs (or an .npz with arr_0 uint8 NHWC) against another set
    python -m pf.eval generated=samples/ reference=ref.npz
    # Inception features (the weights file must be local: nothing is downloaded)
    python -m pf.eval generated=s.npz reference=ref/ extractor=inception \
        feature_extractor_weights_path=/models/weights-inception-2015-12-05-6726825d.pth

``reference=data`` (the default) is the dataset of the ``data`` options (the digits).
Prints one JSON line (also written to ``out`` when set). The classifier extractor needs
``python -m pf.eval.train_classifier`` once (for the same ``data`` options).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pf import cli
from pf.eval import inputs
from pf.eval.metrics import compute_metrics
from pf.eval.train_classifier import DEFAULTS as CLASSIFIER_DEFAULTS
from pf.models.checkpoint import check_writable, read_checkpoint_file
from pf.pipeline import Pipeline

DEFAULTS = {
    "generated": None,          # folder | .npz | checkpoint (.pt / .pth / .ckpt)
    "reference": "data",        # data | folder | .npz
    "data": dict(CLASSIFIER_DEFAULTS["data"]),
    "extractor": "classifier",  # classifier | inception
    "feature_extractor_weights_path": None,  # classifier file (default: the cached one) or Inception weights
    "metrics": ["fid", "kid", "prc"],
    "kid_subset_size": 1000,
    "kid_subsets": 100,
    # drawing from a checkpoint
    "sampler": {"name": "euler_pf", "params": {}, "steps": 50, "cfg_scale": 1.0, "guidance_interval": None},
    "num_samples": 2000,
    "seed": 0,
    "batch_size": 500,
    "use_ema": True,
    "vae": None,                # latent models: a local AutoencoderKL; null: the one the training manifest names
    "device": "auto",
    "threads": 0,               # torch CPU threads (0: torch's default; 1 is often fastest on a busy CPU)
    "save_samples": None,       # write the drawn images: a folder, or a path ending in .npz
    "out": None,                # also write the JSON result here
}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def load_images(source: str, cfg, role: str):
    """uint8 (M, C, H, W) images of a source (see pf.eval.inputs), plus a note on where they came from."""
    if source == "data":
        images, _ = inputs.load_dataset_images(cfg.data)
        return images, {"source": f"data:{cfg.data.name}", "image_size": cfg.data.image_size}
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{role}={source}: no such file or folder")
    if path.is_dir():
        return inputs.load_folder(path), {"source": str(path)}
    if path.suffix == ".npz":
        return inputs.load_npz(path), {"source": str(path)}
    if path.suffix in CHECKPOINT_SUFFIXES:
        if role != "generated":
            raise ValueError(f"{role}: a checkpoint can only be the generated side")
        return draw_from_checkpoint(path, cfg)
    raise ValueError(f"{role}={source}: expected a folder of images, an .npz (arr_0 uint8 NHWC) or a checkpoint "
                     f"({'/'.join(CHECKPOINT_SUFFIXES)})")


def draw_from_checkpoint(path: Path, cfg):
    """``num_samples`` pictures of a checkpoint's model (``pf.pipeline``), balanced classes, and a note on how."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device} but no CUDA device is available (use device=cpu)")
    if path.suffix != ".safetensors" and read_checkpoint_file(path, mmap=True).get("model_class") == "PatchForcingT2I":
        raise ValueError(f"generated={path} is a text-to-image checkpoint: pf.eval draws class-conditional models "
                         f"(measure a text model with python -m pf.experiments.t2i, or draw with pf.sample and "
                         f"give pf.eval the folder)")
    pipe = Pipeline.from_checkpoint(path, cfg.sampler.name, sampler_params=cfg.sampler.params, device=device,
                                    use_ema=cfg.use_ema, vae=cfg.vae)
    images, info = pipe.generate(cfg.num_samples, cfg.sampler.steps, seed=cfg.seed, cfg_scale=cfg.sampler.cfg_scale,
                                 batch_size=cfg.batch_size, guidance_interval=cfg.sampler.guidance_interval)
    return images, {"source": str(path), "sampler": repr(pipe.sampler), "steps": cfg.sampler.steps,
                    "cfg_scale": cfg.sampler.cfg_scale, "seed": cfg.seed, **info}


def evaluate(cfg) -> dict:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if not cfg.generated:
        raise ValueError("set generated=<folder | .npz | checkpoint> (the images to evaluate)")
    unknown = set(cfg.metrics) - {"fid", "kid", "prc"}
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from fid, kid, prc")
    for key in ("num_samples", "batch_size", "kid_subset_size", "kid_subsets"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]!r}: expected an integer >= 1")
    # before any drawing: where the results go must take them
    if cfg.out:
        if Path(str(cfg.out)).is_dir():
            raise ValueError(f"out={cfg.out} is a folder: name the JSON file to write (e.g. {cfg.out}/eval.json)")
        check_writable(Path(str(cfg.out)).parent)
    if cfg.save_samples:
        save = Path(str(cfg.save_samples))
        check_writable(save.parent if save.suffix == ".npz" else save)
    gen, gen_info = load_images(str(cfg.generated), cfg, "generated")
    ref, ref_info = load_images(str(cfg.reference), cfg, "reference")
    if cfg.save_samples:
        save = inputs.save_npz if str(cfg.save_samples).endswith(".npz") else inputs.save_folder
        save(cfg.save_samples, gen)
    result = compute_metrics(gen, ref, extractor=cfg.extractor, weights=cfg.feature_extractor_weights_path,
                             fid="fid" in cfg.metrics, kid="kid" in cfg.metrics, prc="prc" in cfg.metrics,
                             kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets, device=cfg.device,
                             data=(cfg.data.name, int(cfg.data.image_size)))
    return {**result, "generated": gen_info, "reference": ref_info}


def main(cfg) -> None:
    result = evaluate(cfg)
    line = json.dumps(result)
    print(line)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(line + "\n")


if __name__ == "__main__":
    sys.exit(cli.run(main, DEFAULTS, __doc__, free=("sampler.params",)))
