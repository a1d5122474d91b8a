"""The comparison's runs and its yardstick: an arm's training config and training stage, the EMA
weights kept with the records, a run trained only when a point needs it, and the feature
classifier and held-out test split that every point is measured against.

The stage functions here (``train_stage``, ``classifier_stage``) are shared by every study on
the comparison; their addresses (``pf.experiments.common:...``) are part of the stored stage
keys, so they stay in this module.
"""

from __future__ import annotations

import copy
import hashlib
import os
import platform
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from pf import timesteps
from pf.autoencoder import from_uint8
from pf.encoders.classifier import accuracy, load_classifier
from pf.eval.inputs import load_dataset_images
from pf.eval.train_classifier import ensure_classifier
from pf.flow import interpolate, patch_mean
from pf.experiments.comparison import ARMS, euler_sampler
from pf.experiments.records import config_key, directory_lock
from pf.experiments.trajectories import ensure_trained, logged_records, trajectory_config
from pf.models import load_checkpoint
from pf.models.checkpoint import model_from_checkpoint_dict, read_checkpoint_file, save_checkpoint
from pf.sampling.graphs import compile_model
from pf.training.objective import training_loss
from pf.training.schema import compose_config

#################################################################################
#                                   Training                                    #
#################################################################################


_COMPOSED: dict = {}
# Steps between the checkpoints a stopped run resumes from (``last.pt``; a trajectory key ignores
# it): a study stopped mid-run loses at most this many steps, not a whole ``keep_every``.
RESUME_EVERY = 250


def compose_train_config(study: dict, overrides: list[str], seed: int):
    """The ``pf.train`` config of one arm and training seed (hydra's compose, no run directory;
    composed once per process for the same inputs)."""
    key = config_key({"study": {k: study.get(k) for k in ("data", "model", "device", "image_size", "data_overrides",
                                                          "train")}, "overrides": overrides, "seed": seed})
    if key not in _COMPOSED:
        _COMPOSED[key] = _compose(study, overrides, seed)
    return copy.deepcopy(_COMPOSED[key])


def _compose(study: dict, overrides: list[str], seed: int):
    tc = study["train"]
    every = int(tc["keep_every"])
    args = [
        f"data={study['data']}", f"model={study['model']}", f"seed={seed}", f"device={resolve_device(study)}",
        f"data.image_size={study['image_size']}", *study.get("data_overrides", []),
        f"trainer.batch_size={tc['batch_size']}", f"trainer.lr={tc['lr']}",
        f"trainer.warmup_steps={tc['warmup_steps']}", "trainer.progress=false",
        f"trainer.ckpt_every={min(every, RESUME_EVERY)}", f"trainer.keep_every={every}", f"trainer.val_every={every}",
        f"trainer.sample_every={every}", f"trainer.log_every={max(1, min(50, every))}",
        *overrides, *tc.get("overrides", []),
        f"sampler={euler_sampler(overrides)}", "sampler.steps=25", "sampler.cfg_scale=1.0",
    ]
    return compose_config(args)


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
    return state_fingerprint(model.state_dict())


def state_fingerprint(state: dict) -> str:
    """:func:`weights_fingerprint` of a state dict (its tensors' bytes, in order)."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


# Kept weights are stored in float16: 2 bytes a parameter, so the records of many runs still
# travel with the repository to a lent GPU machine (64 MiB in all; tests/test_tree_size.py).
# Rounding moves a tiny model's velocity by about 2e-4 (relative), far below what retraining the
# same run changes; but it is another realization, so every point of a kept run is measured on
# the stored float16 weights (TrainedRun.checkpoint) and names their fingerprint, and the file
# records the fingerprint of the exact float32 weights it was rounded from ("exact_weights").
KEPT_DTYPE = torch.float16


def compact_state(state: dict) -> dict:
    """``state`` with its floating-point tensors in :data:`KEPT_DTYPE` (integer buffers as they are)."""
    return {k: v.to(KEPT_DTYPE) if v.is_floating_point() else v for k, v in state.items()}


def kept_checkpoint(ckpt: dict, exact_weights: str) -> dict:
    """``ckpt`` as kept with the records: its weights in :data:`KEPT_DTYPE`, naming the
    fingerprint of the exact weights they were rounded from."""
    kept = {**ckpt, "exact_weights": exact_weights, "kept_dtype": str(KEPT_DTYPE)}
    for name in ("ema", "state_dict"):
        if kept.get(name) is not None:
            kept[name] = compact_state(kept[name])
    return kept


def compact_kept_file(path: str | Path) -> bool:
    """Rewrite a kept-weights file in :data:`KEPT_DTYPE` (atomically), recording the fingerprint
    of the exact weights it held; False when it is compact already."""
    ckpt = read_checkpoint_file(path)
    if ckpt.get("kept_dtype") == str(KEPT_DTYPE):
        return False
    exact = model_from_checkpoint_dict(ckpt, use_ema=True, source=str(path))  # what the stored points measured
    save_checkpoint(kept_checkpoint(ckpt, weights_fingerprint(exact)), path)
    return True


def keep_weights(study: dict, identity: dict, checkpoint: str) -> Path:
    """Keep a run's EMA weights with the records (once: the first realization stays), so a
    study continued on another machine evaluates the very model its stored numbers came from
    instead of retraining a slightly different one. Only the EMA model, in :data:`KEPT_DTYPE`
    (2 bytes a parameter), written atomically, loaded with ``load_checkpoint``."""
    path = kept_weights_path(study, identity)
    if not path.is_file():
        ckpt = read_checkpoint_file(checkpoint)
        name = "ema" if ckpt.get("ema") is not None else "state_dict"
        slim = {k: ckpt[k] for k in ("format", "model_class", "config", "train_config", "step", name) if k in ckpt}
        exact = model_from_checkpoint_dict(ckpt, use_ema=True, source=checkpoint)
        save_checkpoint(kept_checkpoint(slim, weights_fingerprint(exact)), path)
    return path


def train_stage(study: dict, overrides: list[str], seed: int, steps: int) -> dict:
    """Stage: one arm trained (or resumed) to ``steps``; its budget and losses. A run of the
    comparison's length keeps its EMA weights with the records (:func:`keep_weights`)."""
    cfg = compose_train_config(study, overrides, seed)
    out = ensure_trained(cfg, study["out_dir"], check_steps(study, steps))
    upto = logged_records(out)
    val = [r for r in upto if "val_loss" in r]
    model = load_checkpoint(out["checkpoint"], use_ema=True)
    trajectory = config_key(trajectory_config(cfg))
    kept = {}
    if int(steps) == int(study["train"]["steps"]):
        path = keep_weights(study, {"trajectory": trajectory, "steps": int(steps)}, out["checkpoint"])
        kept = {"kept_weights": weights_fingerprint(load_checkpoint(path, use_ema=True))}  # what its points name
    return {**out, **kept, "trajectory": trajectory, "weights": weights_fingerprint(model),
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "first_loss": upto[0]["loss"] if upto else None, "final_loss": upto[-1]["loss"] if upto else None,
            "val_loss": val[-1]["val_loss"] if val else None,
            "val_segments": val[-1].get("segments") if val else None,  # MSE at t = (k + 0.5) / 8
            "flops_per_step": training_flops(model, cfg)}


def training_flops(model, cfg) -> int:
    """FLOPs of one training step (forward + backward of the loss on one batch), counted by
    ``torch.utils.flop_counter`` (matrix products and attention; elementwise ops are not counted)."""
    b, s, c = int(cfg.trainer.batch_size), int(model.input_size), int(model.in_channels)
    model = model.train()
    x1 = torch.zeros(b, c, s, s)
    y = torch.zeros(b, dtype=torch.long)
    n = (s // model.patch_size) ** 2
    t = torch.full((b, n), 0.5) if model.per_token else torch.full((b,), 0.5)
    with FlopCounterMode(display=False) as counter:
        training_loss(model, x1, y, t, x0=torch.zeros_like(x1), nll_weight=float(cfg.trainer.nll_weight))["loss"].backward()
    return int(counter.get_total_flops())


class PointModel:
    """A checkpoint's EMA model, compiled once for sampling when asked (``torch.compile``,
    about 2x on this CPU); the same callable for every point of a stage."""

    def __init__(self, checkpoint: str, study: dict):
        self.device = resolve_device(study)
        self.model = load_checkpoint(checkpoint, use_ema=True).to(self.device).eval()
        self.weights = weights_fingerprint(self.model)
        self.call = self.model
        if study["eval"].get("compile"):
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
        if not kept.is_file():
            trained = self.trained  # trains (or resumes) the run; one of the comparison's length is kept
            if not kept.is_file():
                return trained["checkpoint"]
        # a kept run's points all come from its stored weights, from the session that trained it on
        return str(kept)

    def model(self) -> PointModel:
        if self._model is None:
            self._model = PointModel(self.checkpoint(), self.study)
        return self._model


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
    cc = study["classifier"]
    path = classifier_path(study)
    with directory_lock(path.with_name(path.stem + ".lock"), log=lambda *_: None):
        return ensure_classifier(data_config(study, "train"), path, epochs=int(cc["epochs"]), width=int(cc["width"]),
                                 lr=float(cc["lr"]), test_frac=0.0, log=None)


def classifier_stage(study: dict) -> dict:
    """Stage: the feature classifier trained on the train split; accuracy on the test split."""
    path, info = feature_classifier(study)
    test_accuracy, test_size = classifier_accuracy(study, path)
    return {"path": str(path), "train_size": info["train_size"], "epochs": info["epochs"],
            "test_accuracy": test_accuracy, "test_size": test_size, "seconds": info.get("seconds")}


def classifier_accuracy(study: dict, path: Path) -> tuple[float, int]:
    """The accuracy of the classifier in ``path`` on the whole test split, and that split's size."""
    model, _ = load_classifier(path)
    test, labels = load_dataset_images(data_config(study, "test"))
    return accuracy(model, from_uint8(test), labels), int(test.shape[0])


def classifier_file(study: dict, prefix: str, settings: dict) -> Path:
    """Where a classifier of the train split and these training ``settings`` lives in
    ``out_dir`` (named by both: another data set or setting is another file)."""
    data = OmegaConf.to_container(data_config(study, "train"), resolve=True)
    data.pop("num_workers", None)
    return Path(study["out_dir"]) / f"{prefix}_{config_key({'data': data, **settings})}.pt"


def classifier_path(study: dict) -> Path:
    """Where the feature classifier of this data and classifier config lives."""
    return classifier_file(study, "classifier", study["classifier"])


_REFERENCE: dict = {}


def _test_split(study: dict) -> tuple[torch.Tensor, torch.Tensor]:
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


def held_out_batch(study: dict, count: int, noise_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a network is measured on away from sampling: the first ``count`` held-out test
    images in [-1, 1] (M, C, H, W), their labels (M,) and fixed noise of their shape."""
    x1 = from_uint8(reference_images(study)[:count])
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(noise_seed))
    return x1, load_test_labels(study)[:count], x0


@torch.no_grad()
def forward_with_uncertainty(model, x, t, y, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's velocity and log-variance for every row of ``x`` (``batch`` rows a
    forward: bounded memory)."""
    vs, lvs = [], []
    for i in range(0, x.shape[0], batch):
        v, lv = model(x[i:i + batch], t[i:i + batch], y[i:i + batch], return_uncertainty=True)
        vs.append(v)
        lvs.append(lv)
    return torch.cat(vs), torch.cat(lvs)


def patch_stats(v, logvar, target, patch_size: int):
    """(per-patch predicted variance, per-patch squared error), each (B, N), as finding 1 has them."""
    var = patch_mean(torch.exp(logvar.double()), patch_size)
    err = patch_mean(((v.double() - target.double()) ** 2).mean(1, keepdim=True), patch_size)
    return var, err


def device_name(study: dict) -> str:
    """Where the study runs, as its reports state it."""
    if resolve_device(study) == "cuda":  # rendered away from the GPU, the card is named in device_calls/
        return (torch.cuda.get_device_name() if torch.cuda.is_available()
                else f"a CUDA GPU (named in {study['records_dir']}/device_calls)")
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
            f"{study['jobs']} worker process(es) with {study['threads']} torch thread(s) each")


def velocity_profile(study: dict, overrides: list[str], seed: int, times: list[float], images: int,
                     draws: int) -> dict:
    """One trained arm's EMA velocity MSE with every patch at each of ``times`` (held-out test
    images, fixed noise), and how its timestep sampler spreads ``draws`` training times over the
    ten tenths of [0, 1] (with the share above t = 0.9, the data end)."""
    run = TrainedRun(study, overrides, seed, int(study["train"]["steps"]))
    model = run.model().model
    x1, labels, x0 = held_out_batch(study, int(images), noise_seed=1234)  # x1, x0: (M, C, H, W)
    n = (x1.shape[-1] // model.patch_size) ** 2
    errors = []
    with torch.no_grad():
        for tv in times:
            mse = 0.0
            for i in range(0, x1.shape[0], 250):  # 250 images a forward: bounded memory
                b = x1[i:i + 250].shape[0]
                t = torch.full((b, n) if model.per_token else (b,), float(tv))
                xt, u = interpolate(x1[i:i + 250], x0[i:i + 250], t, model.patch_size)
                mse += float(((model(xt, t, labels[i:i + 250]) - u) ** 2).sum())
            errors.append(mse / x1.numel())
    cfg = compose_train_config(study, overrides, seed)
    params = {k: v for k, v in cfg.trainer.timesteps.items() if k != "name" and v is not None}
    if cfg.trainer.timesteps.name == "ltg":
        params["backend"] = "torch"
    drawn = timesteps.make(cfg.trainer.timesteps.name, **params)(int(draws), n if model.per_token else 1,
                                                                generator=torch.Generator().manual_seed(0))
    hist = torch.histc(drawn.double().flatten(), bins=10, min=0.0, max=1.0)
    return {"times": [float(v) for v in times], "mse": errors, "train_time_bins": (hist / hist.sum()).tolist(),
            "above_0.9": float((drawn > 0.9).double().mean()), "images": int(x1.shape[0]),
            "weights": run.model().weights}
