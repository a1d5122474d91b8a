"""What the study's commands share: training configs, the feature classifier and the held-out
reference, one cached evaluation point, and small report helpers.

A *point* is one evaluation: a trained checkpoint, a sampler with its parameters, K outer
steps and a sampling seed -> ``num_samples`` images (labels ``i mod classes``, the same noise
for every column of a seed) -> FID / KID / precision / recall against the held-out test split
in the features of the classifier trained on the train split. Points are cached by
everything that decides them (:func:`pf.experiments.stages.cached`), so the main comparison
and the findings share the points they have in common.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pf.experiments.stages import (cached, cached_result, config_key, directory_lock, ensure_trained,
                                  trajectory_config)

# The arms of the comparison: pf.train overrides on top of the shared recipe.
ARMS = {
    "sit_uniform": {"label": "SiT (uniform t)", "overrides": ["trainer=fm", "trainer.timesteps.name=uniform"]},
    "sit_logit_normal": {"label": "SiT (logit-normal t)",
                         "overrides": ["trainer=fm", "trainer.timesteps.name=logit_normal"]},
    "pf_ltg": {"label": "PF (LTG)", "overrides": ["trainer=pf", "trainer.timesteps.name=ltg"]},
    "pf_logit_normal": {"label": "PF (one logit-normal t per sample)",
                        "overrides": ["trainer=pf", "trainer.timesteps.name=logit_normal"]},
}
SAMPLER_LABELS = {"euler": "Euler", "euler_pf": "Euler", "dual_loop": "dual-loop", "look_ahead": "look-ahead"}


def is_pf(arm_overrides: list[str]) -> bool:
    return "trainer=fm" not in arm_overrides


#################################################################################
#                                   Training                                    #
#################################################################################


_COMPOSED: dict = {}


# Study keys that decide which stages exist, or how the study runs and reports, never what one
# stage computes: a stage does not see them, so they are not part of its key (changing the trend's
# steps or adding an arm re-runs nothing that is done).
LAYOUT_KEYS = ("arms", "jobs", "threads", "results", "figures", "page", "findings", "repa")
LAYOUT_EVAL_KEYS = ("samplers", "adaptive_train_seeds", "trend_steps", "trend_arms", "profile_times",
                    "profile_images")


def stage_study(study: dict, *, keep: tuple[str, ...] = (), keep_eval: tuple[str, ...] = (),
                evaluation: bool = True) -> dict:
    """The part of ``study`` a stage may see (and its key hashes): without the layout keys but
    those in ``keep`` / ``keep_eval``; ``evaluation=False`` (training stages) also without the
    evaluation and classifier settings."""
    out = {k: v for k, v in study.items() if k not in LAYOUT_KEYS or k in keep}
    if not evaluation:
        out.pop("eval", None)
        out.pop("classifier", None)
    elif "eval" in out:
        out["eval"] = {k: v for k, v in out["eval"].items() if k not in LAYOUT_EVAL_KEYS or k in keep_eval}
    return out


def compose_train_config(study: dict, overrides: list[str], seed: int):
    """The ``pf.train`` config of one arm and training seed (hydra's compose, no run directory;
    composed once per process for the same inputs)."""
    import copy

    key = config_key({"study": {k: study.get(k) for k in ("data", "model", "device", "image_size", "data_overrides",
                                                          "train")}, "overrides": overrides, "seed": seed})
    if key not in _COMPOSED:
        _COMPOSED[key] = _compose(study, overrides, seed)
    return copy.deepcopy(_COMPOSED[key])


def _compose(study: dict, overrides: list[str], seed: int):
    from hydra import compose, initialize_config_dir

    import pf

    tc = study["train"]
    every = int(tc["keep_every"])
    args = [
        f"data={study['data']}", f"model={study['model']}", f"seed={seed}", f"device={resolve_device(study)}",
        f"data.image_size={study['image_size']}", *study.get("data_overrides", []),
        f"trainer.batch_size={tc['batch_size']}", f"trainer.lr={tc['lr']}",
        f"trainer.warmup_steps={tc['warmup_steps']}", "trainer.progress=false",
        f"trainer.ckpt_every={every}", f"trainer.keep_every={every}", f"trainer.val_every={every}",
        f"trainer.sample_every={every}", f"trainer.log_every={max(1, min(50, every))}",
        *overrides, *tc.get("overrides", []),
        f"sampler={'euler_pf' if is_pf(overrides) else 'euler'}", "sampler.steps=25", "sampler.cfg_scale=1.0",
    ]
    config_dir = str(Path(pf.__file__).resolve().parent / "configs")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name="config", overrides=args)


def resolve_device(study: dict) -> str:
    if study.get("device", "auto") == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(study["device"])


def check_steps(study: dict, steps: int) -> int:
    every = int(study["train"]["keep_every"])
    if int(steps) < 1 or int(steps) % every:
        raise ValueError(f"training steps must be a positive multiple of train.keep_every={every}, got {steps}")
    return int(steps)


def kept_weights_path(study: dict, identity: dict) -> Path:
    """Where the EMA weights of a trained run (a :class:`TrainedRun`'s ``identity``) are kept with
    the records: ``<records_dir>/weights/<trajectory>-<steps>.pt``."""
    return Path(study["records_dir"]) / "weights" / f"{identity['trajectory']}-{int(identity['steps']):06d}.pt"


def weights_fingerprint(model) -> str:
    """A short hash of a model's weights (state dict, in order): which realization of a run a
    number was measured on. The same config trained on another machine is another realization
    (other floating-point rounding, diverging over training), so the run's config does not say it."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


def keep_weights(study: dict, identity: dict, checkpoint: str) -> Path:
    """Keep a run's EMA weights with the records (once: the first realization stays), so a
    study continued on another machine evaluates the very model its stored numbers came from
    instead of retraining a slightly different one. Only the EMA model (about 4 bytes a
    parameter), written atomically, loaded with ``load_checkpoint``."""
    from pf.models.checkpoint import read_checkpoint_file, save_checkpoint

    path = kept_weights_path(study, identity)
    if not path.is_file():
        ckpt = read_checkpoint_file(checkpoint)
        slim = {k: ckpt[k] for k in ("format", "model_class", "config", "train_config", "step") if k in ckpt}
        if ckpt.get("ema") is not None:
            slim["ema"] = ckpt["ema"]
        else:
            slim["state_dict"] = ckpt["state_dict"]
        save_checkpoint(slim, path)
    return path


def train_stage(study: dict, overrides: list[str], seed: int, steps: int) -> dict:
    """Stage: one arm trained (or resumed) to ``steps``; its budget and losses. A run of the
    comparison's length keeps its EMA weights with the records (:func:`keep_weights`)."""
    import json

    cfg = compose_train_config(study, overrides, seed)
    out = ensure_trained(cfg, study["out_dir"], check_steps(study, steps))
    records = [json.loads(line) for line in (Path(out["run_dir"]) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    upto = [r for r in records if r["step"] <= steps]
    val = [r for r in upto if "val_loss" in r]
    from pf.models import load_checkpoint

    model = load_checkpoint(out["checkpoint"], use_ema=True)
    trajectory = config_key(trajectory_config(cfg))
    if int(steps) == int(study["train"]["steps"]):
        keep_weights(study, {"trajectory": trajectory, "steps": int(steps)}, out["checkpoint"])
    return {**out, "trajectory": trajectory, "weights": weights_fingerprint(model),
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "first_loss": upto[0]["loss"] if upto else None, "final_loss": upto[-1]["loss"] if upto else None,
            "val_loss": val[-1]["val_loss"] if val else None,
            "val_segments": val[-1].get("segments") if val else None,  # MSE at t = (k + 0.5) / 8
            "flops_per_step": training_flops(model, cfg)}


def training_flops(model, cfg) -> int:
    """FLOPs of one training step (forward + backward of the loss on one batch), counted by
    ``torch.utils.flop_counter`` (matrix products and attention; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pf.flow import training_loss

    b, s, c = int(cfg.trainer.batch_size), int(model.input_size), int(model.in_channels)
    model = model.train()
    x1 = torch.zeros(b, c, s, s)
    y = torch.zeros(b, dtype=torch.long)
    n = (s // model.patch_size) ** 2
    t = torch.full((b, n), 0.5) if model.per_token else torch.full((b,), 0.5)
    with FlopCounterMode(display=False) as counter:
        training_loss(model, x1, y, t, x0=torch.zeros_like(x1), nll_weight=float(cfg.trainer.nll_weight))["loss"].backward()
    return int(counter.get_total_flops())


#################################################################################
#                         Classifier and held-out reference                     #
#################################################################################


def data_config(study: dict, split: str):
    cfg = compose_train_config(study, ARMS["pf_ltg"]["overrides"], 0).data
    cfg.split = split
    return cfg


def feature_classifier(study: dict) -> tuple[Path, dict]:
    """The feature classifier's file and training info: the cached file, or trained now (one
    process at a time; deterministic, so a study continued in a fresh clone, whose classifier
    stage is recorded but whose ``out_dir`` is empty, gets the same classifier back)."""
    from pf.eval.train_classifier import ensure_classifier

    cc = study["classifier"]
    path = classifier_path(study)
    with directory_lock(path.with_name(path.stem + ".lock"), log=lambda *_: None):
        return ensure_classifier(data_config(study, "train"), path, epochs=int(cc["epochs"]), width=int(cc["width"]),
                                 lr=float(cc["lr"]), test_frac=0.0, log=None)


def classifier_stage(study: dict) -> dict:
    """Stage: the feature classifier trained on the train split; accuracy on the test split."""
    from pf.eval.classifier import accuracy, load_classifier
    from pf.eval.inputs import from_uint8, load_dataset_images

    path, info = feature_classifier(study)
    model, _ = load_classifier(path)
    test, labels = load_dataset_images(data_config(study, "test"))
    return {"path": str(path), "train_size": info["train_size"], "epochs": info["epochs"],
            "test_accuracy": accuracy(model, from_uint8(test), labels), "test_size": int(test.shape[0]),
            "seconds": info.get("seconds")}


def classifier_path(study: dict) -> Path:
    """Where the classifier of this data and classifier config lives (decided by both)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(data_config(study, "train"), resolve=True)
    data.pop("num_workers", None)
    return Path(study["out_dir"]) / f"classifier_{config_key({'data': data, **study['classifier']})}.pt"


_REFERENCE: dict = {}


def _test_split(study: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from pf.eval.inputs import load_dataset_images

    limit = study["eval"].get("reference_size")
    key = f"{data_config(study, 'test')}|{limit}"
    if key not in _REFERENCE:
        images, labels = load_dataset_images(data_config(study, "test"))
        _REFERENCE[key] = (images[:limit], labels[:limit]) if limit else (images, labels)
    return _REFERENCE[key]


def reference_images(study: dict) -> torch.Tensor:
    """The held-out test split as uint8 (M, C, H, W) (loaded once per process)."""
    return _test_split(study)[0]


def load_test_labels(study: dict) -> torch.Tensor:
    return _test_split(study)[1]


#################################################################################
#                                Evaluation points                              #
#################################################################################


class PointModel:
    """A checkpoint's EMA model, compiled once for sampling when asked (``torch.compile``,
    about 2x on this CPU); the same callable for every point of a stage."""

    def __init__(self, checkpoint: str, study: dict):
        from pf.models import load_checkpoint

        self.device = resolve_device(study)
        self.model = load_checkpoint(checkpoint, use_ema=True).to(self.device).eval()
        self.weights = weights_fingerprint(self.model)
        self.call = self.model
        if study["eval"].get("compile"):
            from pf.sampling.graphs import compile_model

            torch._dynamo.reset()  # a fresh cache per model: no silent fall-back to eager after many recompiles
            self.call = compile_model(self.model)
        self.compiled = study["eval"].get("compile", False)


class TrainedRun:
    """One arm's run at a step count, trained (or resumed) only when a point still needs it:
    a study continued from its records in a fresh clone evaluates its missing points without
    retraining the arms whose points are all stored."""

    def __init__(self, study: dict, overrides: list[str], seed: int, steps: int):
        self.study, self.overrides, self.seed, self.steps = study, list(overrides), int(seed), int(steps)
        cfg = compose_train_config(study, overrides, seed)
        self.identity = {"trajectory": config_key(trajectory_config(cfg)), "steps": check_steps(study, steps)}
        self._trained: dict | None = None
        self._model: PointModel | None = None

    @property
    def trained(self) -> dict:
        if self._trained is None:
            self._trained = train_stage(self.study, self.overrides, self.seed, self.steps)
        return self._trained

    def checkpoint(self) -> str:
        """The kept weights of this run when the records hold them (no training), else its
        checkpoint in ``out_dir`` (trained or resumed as needed)."""
        kept = kept_weights_path(self.study, self.identity)
        return str(kept) if kept.is_file() else self.trained["checkpoint"]

    def model(self) -> PointModel:
        if self._model is None:
            self._model = PointModel(self.checkpoint(), self.study)
        return self._model


def point_key(study: dict, train: dict, sampler: str, params: dict, steps: int, seed: int) -> dict:
    """Everything that decides a point's numbers."""
    ec = study["eval"]
    key = {"trajectory": train["trajectory"], "train_steps": train["steps"], "sampler": sampler, "params": params,
           "steps": int(steps), "seed": int(seed), "num_samples": int(ec["num_samples"]),
           "cfg_scale": float(ec["cfg_scale"]), "classifier": str(classifier_path(study)),
           "kid_subsets": int(ec["kid_subsets"]), "device": resolve_device(study), "compile": bool(ec.get("compile"))}
    if ec.get("reference_size"):
        key["reference_size"] = int(ec["reference_size"])
    return key


def stored_point(study: dict, train: dict, sampler: str, params: dict, steps: int, seed: int) -> dict | None:
    """A point already evaluated (by any stage), or None."""
    return cached_result(study["records_dir"], "points", point_key(study, train, sampler, params, steps, seed))


def evaluate_point(study: dict, train: dict, sampler: str, params: dict, steps: int, seed: int,
                   model: PointModel | Callable[[], PointModel] | None = None, keep_images: int = 0) -> dict:
    """One cached point: metrics of ``sampler`` at ``steps`` on the trained run ``train`` (a
    train-stage result, or a :class:`TrainedRun`'s ``identity``). ``model``: the loaded model, or
    a function that loads it (called only when the point is not stored yet)."""
    ec = study["eval"]
    key = point_key(study, train, sampler, params, steps, seed)

    def compute() -> dict:
        from pf import samplers
        from pf.eval.inputs import generate
        from pf.eval.metrics import compute_metrics

        pm = model() if callable(model) else model or PointModel(train["checkpoint"], study)
        s = samplers.make(sampler, **params)
        images, info = generate(pm.call, s, int(ec["num_samples"]), int(steps), seed=int(seed),
                                cfg_scale=float(ec["cfg_scale"]), batch_size=int(ec["batch_size"]),
                                device=pm.device, static=pm.compiled)
        t0 = time.perf_counter()
        m = compute_metrics(images, reference_images(study), extractor="classifier",
                            weights=str(feature_classifier(study)[0]), kid_subsets=int(ec["kid_subsets"]),
                            seed=int(seed), device=pm.device)
        out = {**m, **info, "metric_seconds": time.perf_counter() - t0, "weights": pm.weights}
        if keep_images:
            path = Path(study["out_dir"]) / "images" / f"{config_key(key)}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(images[:keep_images].clone(), path)
            out["images"] = str(path)
        return out

    return cached(study["records_dir"], "points", key, compute)


def steps_for_nfe(sampler, budget: int) -> int:
    """The K whose expected NFE is closest to ``budget`` (ties: the cheaper one)."""
    best = None
    for k in range(1, 4 * budget + 1):
        nfe = sampler.expected_nfe(k)
        key = (abs(nfe - budget), nfe)
        if best is None or key < best[0]:
            best = (key, k)
        if nfe > 2 * budget:
            break
    return best[1]


#################################################################################
#                                 Report helpers                                #
#################################################################################


def mean_std(values) -> tuple[float, float]:
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def fmt(values, digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if math.isfinite(m) else "pending"


def shared_runs(*runs: dict) -> list[dict]:
    """Each ``{(training seed, sampling seed): point}`` dict cut to the runs every one of them has
    (in key order), so numbers set side by side come from the same models and noise."""
    keys = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
    return [{k: r[k] for k in keys} for r in runs]


def paired(a: dict, b: dict, key: str = "fid") -> list[float]:
    """``b - a`` over the (training seed, sampling seed) pairs both have: same noise, labels and seeds."""
    a, b = shared_runs(a, b)
    return [b[k][key] - a[k][key] for k in a]


def verdict(diffs: list[float], lower_is_better: bool = True) -> str:
    """``mean ± std`` of paired differences and how many pairs favour the second column."""
    if not diffs:
        return "not measured yet"
    better = sum((d < 0) == lower_is_better for d in diffs if d != 0)
    worse = sum(1 for d in diffs if d != 0) - better
    m, s = mean_std(diffs)
    n = len(diffs)
    if better == n:
        word = f"better in all {n} paired runs"
    elif worse == n:
        word = f"worse in all {n} paired runs"
    else:
        word = f"better in {better}, worse in {worse}" + (f", equal in {n - better - worse}" if n - better - worse else "") \
            + f" of {n} paired runs"
    return f"{m:+.2f} ± {s:.2f}, {word}"


def rel(path: str | Path, results_file: str | Path) -> str:
    """``path`` as a link from the folder of ``results_file``."""
    import os

    return Path(os.path.relpath(Path(path).resolve(), Path(results_file).resolve().parent)).as_posix()


def device_name(study: dict) -> str:
    import os
    import platform

    if resolve_device(study) == "cuda":
        return torch.cuda.get_device_name()
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
            f"{study['jobs']} worker process(es) with {study['threads']} torch thread(s) each")
