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

    # ADM's suite against ADM's reference batch: FID, sFID, IS (10 splits), precision/recall (k=3)
    python -m pf.eval generated=samples.npz reference=VIRTUAL_imagenet256_labeled.npz extractor=inception \
        feature_extractor_weights_path=/models/weights-inception-2015-12-05-6726825d.pth
    # a guidance sweep of a checkpoint: a table, a JSON file and a plot of FID against cfg
    python -m pf.eval generated=runs/sit/last.pt sampler.name=sde sampler.steps=250 sweep.cfg=[1,1.5,2,3] \
        sweep.guidance_interval=[null,[0.1,0.9]] sweep.out=sweeps/sit reference=ref.npz extractor=inception ...

``reference=data`` (the default) is the dataset of the ``data`` options (the digits).
Prints one JSON line (also written to ``out`` when set). The classifier extractor needs
``python -m pf.eval.train_classifier`` once (for the same ``data`` options). With
``extractor=inception`` the metrics are ADM's (``pf.eval.adm``; docs/evaluation.md): a
reference ``.npz`` may hold ``mu``/``sigma``/``mu_s``/``sigma_s`` (used as stored) and/or
images ``arr_0``, whose statistics are computed once and cached in ``stats_cache``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pf import cli
from pf.eval import adm, inputs, sweep
from pf.eval.inception import PORT, InceptionFeatures
from pf.eval.metrics import compute_metrics, resolve_extractor
from pf.eval.train_classifier import DEFAULTS as CLASSIFIER_DEFAULTS
from pf.models.checkpoint import check_writable, read_checkpoint_file
from pf.pipeline import Pipeline

DEFAULTS = {
    "generated": None,          # folder | .npz | checkpoint (.pt / .pth / .ckpt)
    "reference": "data",        # data | folder | .npz
    "data": dict(CLASSIFIER_DEFAULTS["data"]),
    "extractor": "classifier",  # classifier | inception
    "feature_extractor_weights_path": None,  # classifier file (default: the cached one) or Inception weights
    "metrics": None,            # null: [fid, kid, prc] (classifier) or ADM's [fid, sfid, is, prc] (inception)
    "stats_cache": "~/.cache/pf/reference_stats",  # inception: reference statistics computed once (null: none)
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
    # a guidance sweep of a checkpoint: every cfg x interval, a table + plot in sweep.out
    "sweep": {"cfg": None, "guidance_interval": None, "out": "sweep"},
}
METRICS = {"classifier": ("fid", "kid", "prc"), "inception": ("fid", "sfid", "is", "prc")}
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


def device_of(cfg) -> str:
    """``cfg.device`` with ``auto`` resolved: CUDA when there is one."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def pipeline_of(path: Path, cfg) -> Pipeline:
    device = device_of(cfg)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device} but no CUDA device is available (use device=cpu)")
    if path.suffix != ".safetensors" and read_checkpoint_file(path, mmap=True).get("model_class") == "PatchForcingT2I":
        raise ValueError(f"generated={path} is a text-to-image checkpoint: pf.eval draws class-conditional models "
                         f"(measure a text model with python -m pf.experiments.t2i, or draw with pf.sample and "
                         f"give pf.eval the folder)")
    return Pipeline.from_checkpoint(path, cfg.sampler.name, sampler_params=cfg.sampler.params, device=device,
                                    use_ema=cfg.use_ema, vae=cfg.vae)


def draw_from_checkpoint(path: Path, cfg, pipe: Pipeline | None = None):
    """``num_samples`` pictures of a checkpoint's model (``pf.pipeline``), balanced classes, and a note on how."""
    pipe = pipe or pipeline_of(path, cfg)
    images, info = pipe.generate(cfg.num_samples, cfg.sampler.steps, seed=cfg.seed, cfg_scale=cfg.sampler.cfg_scale,
                                 batch_size=cfg.batch_size, guidance_interval=cfg.sampler.guidance_interval)
    return images, {"source": str(path), "sampler": repr(pipe.sampler), "steps": cfg.sampler.steps,
                    "cfg_scale": cfg.sampler.cfg_scale, "seed": cfg.seed, **info}


def metrics_of(cfg) -> tuple[str, ...]:
    if cfg.extractor not in METRICS:
        resolve_extractor(cfg.extractor, None)  # the one "unknown feature extractor" line
    known = METRICS[cfg.extractor]
    metrics = tuple(cfg.metrics) if cfg.metrics is not None else known
    unknown = set(metrics) - set(known)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)} for extractor={cfg.extractor}; choose from "
                         f"{', '.join(known)}")
    if not metrics:
        raise ValueError(f"ask for at least one metric of {', '.join(known)}")
    return metrics


def measurer(cfg, metrics):
    """``measure(generated uint8 images) -> metrics`` against the reference, which is read
    (and, for Inception, passed through the network) once; and a note on the reference."""
    if cfg.extractor == "classifier":
        ref, ref_info = load_images(str(cfg.reference), cfg, "reference")
        return (lambda gen: compute_metrics(gen, ref, extractor="classifier", weights=cfg.feature_extractor_weights_path,
                                            fid="fid" in metrics, kid="kid" in metrics, prc="prc" in metrics,
                                            kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets,
                                            device=cfg.device, data=(cfg.data.name, int(cfg.data.image_size)))), ref_info
    weights = resolve_extractor("inception", cfg.feature_extractor_weights_path)[1]  # one line if missing
    device = device_of(cfg)
    extract = InceptionFeatures(weights, device=device)
    source = str(cfg.reference)
    if source != "data" and Path(source).suffix == ".npz":
        if not Path(source).is_file():
            raise FileNotFoundError(f"reference={source}: no such file")
        cache = None if cfg.stats_cache is None else Path(str(cfg.stats_cache)).expanduser()
        ref = adm.read_reference(source, extract, weights, cache, need_features="prc" in metrics)
        ref_info = {"source": source, "statistics": ref.source}
    else:
        images, ref_info = load_images(source, cfg, "reference")
        ref = adm.reference_of_images(images, extract)
    num_ref = None if ref.pool_features is None else len(ref.pool_features)

    def measure(gen):
        result = adm.evaluate_features(extract(gen), ref, metrics, device=device)
        return {"extractor": "inception", "inception_port": PORT, **result, "num_generated": len(gen),
                "num_reference": num_ref}

    return measure, ref_info


def evaluate(cfg) -> dict:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if not cfg.generated:
        raise ValueError("set generated=<folder | .npz | checkpoint> (the images to evaluate)")
    metrics = metrics_of(cfg)
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
    if cfg.sweep.cfg is not None:
        return run_sweep(cfg, metrics)
    gen, gen_info = load_images(str(cfg.generated), cfg, "generated")
    if cfg.save_samples:
        save = inputs.save_npz if str(cfg.save_samples).endswith(".npz") else inputs.save_folder
        save(cfg.save_samples, gen)
    measure, ref_info = measurer(cfg, metrics)
    return {**measure(gen), "generated": gen_info, "reference": ref_info}


def run_sweep(cfg, metrics) -> dict:
    """Every (cfg, interval) of ``sweep``: draw, measure against the one reference, then the
    table, JSON and plot in ``sweep.out``."""
    path = Path(str(cfg.generated))
    if path.suffix not in CHECKPOINT_SUFFIXES or not path.is_file():
        raise ValueError(f"sweep.cfg needs generated=<checkpoint> to draw from, got {path}")
    if "fid" not in metrics:
        raise ValueError("a guidance sweep plots FID: keep fid in metrics")
    points = sweep.settings(cfg.sweep.cfg, cfg.sweep.guidance_interval)
    out = Path(str(cfg.sweep.out))
    if (out / "sweep.json").exists():
        raise ValueError(f"sweep.out={out} already holds a sweep (sweep.json): name another folder")
    check_writable(out, create=False)
    measure, ref_info = measurer(cfg, metrics)
    pipe = pipeline_of(path, cfg)
    rows = []
    for scale, interval in points:
        cfg.sampler.cfg_scale = scale
        cfg.sampler.guidance_interval = None if interval is None else list(interval)
        images, info = draw_from_checkpoint(path, cfg, pipe)
        row = {"cfg": scale, "guidance_interval": interval, **measure(images), "nfe": info["nfe"]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    title = f"{path.name}: {cfg.sampler.name}, {cfg.sampler.steps} steps, {cfg.num_samples} samples, {cfg.extractor}"
    files = sweep.write(rows, out, title)
    return {"sweep": rows, "files": files, "reference": ref_info}


def summary(result: dict) -> str:
    """One readable line of the headline numbers."""
    return "  ".join(f"{n} {result[k]:.4g}" for k, n in sweep.COLUMNS if result.get(k) is not None)


def main(cfg) -> None:
    result = evaluate(cfg)
    line = json.dumps(result)
    if "sweep" in result:
        print(sweep.table(result["sweep"]), file=sys.stderr)
    elif summary(result):
        print(summary(result), file=sys.stderr)
    print(line)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(line + "\n")


if __name__ == "__main__":
    sys.exit(cli.run(main, DEFAULTS, __doc__, free=("sampler.params",)))
