"""Train a Patch Forcing model (or the SiT baseline): ``python -m pf.train [overrides]``.

With no arguments: PF-Tiny/2 on the embedded digits, a few minutes on a CPU. The run
directory (``hydra.run.dir``) receives::

    checkpoints/last.pt, checkpoints/step_XXXXXX.pt   model, EMA, optimizer, scheduler, step, RNG
    samples/step_XXXXXX.png                           EMA samples beside the difficulty map
    metrics.jsonl                                     {"step", "loss", ...} per logged step
    config.yaml (and hydra's .hydra/)                 the resolved config

``resume=<run dir or checkpoint>`` continues exactly. A folder that already holds a run is
refused without ``resume=``; ``overwrite=true`` moves that run into ``previous-<time>/`` and
starts over. ``run.lock`` keeps a second process out while the run lives. ``torchrun --nproc_per_node=N -m
pf.train`` trains with DDP, or FSDP2 with ``trainer.strategy=fsdp`` (rank 0 writes). One step::

    cond = conditioning(labels)       class ids, or captions -> text tokens (pf.conditioning)
    t  ~ timestep sampler             (B, N) per patch (pf) or (B,) per sample (fm)
    x0 ~ N(0, I)                      noise from this rank's generator
    loss = MSE + nll_weight * NLL [+ lambda * repa_loss]    (pf.training.objective, each term logged)
    AdamW step with clipped gradients, warm-up LR, EMA update

``trainer.repa.enabled=true`` adds REPA (SPEC section 9): the model gets the projector and the
objective the alignment to a frozen encoder's tokens of the clean image (default: this
project's classifier of the same data, trained once and cached).

``model=t2i-*`` with captioned data trains the text-to-image model (SPEC section 11): the
``text`` keys pick the frozen text encoder, captions are dropped for guidance with
``text.dropout``; ``experiment=t2i_demo`` is a CPU-sized run on the captioned digits.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting make every torch op several
# times slower (6.5 s vs 0.85 s per digits step measured here with 2 threads on 2 busy
# cores). Passive waiting should cost little on an idle machine. It only takes
# effect when torch is imported after this line (python -m pf.train); set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pf import conditioning as conds
from pf import samplers as pf_samplers
from pf import timesteps as pf_timesteps
from pf.conditioning import ClassConditioning, TextConditioning
from pf.data import ShardedBatches, StreamBatches, build_dataset, check_against_model, split_validation
from pf.data.captions import (CAPTION_DATA, CaptionedClasses, build_caption_dataset, check_caption_data,
                              demo_prompts)
from pf.data.names import class_names
from pf.encoders import build_image_encoder
from pf.errors import NonFiniteLoss, run_command  # pf.train.NonFiniteLoss stays a name
from pf.eval.train_classifier import ensure_classifier
from pf.models.checkpoint import check_writable
from pf.models.presets import build_model, build_t2i, num_params
from pf.text import CachedTextEncoder, encoder_from_config
from pf.training.checkpointing import (
    load_training_checkpoint,
    resolve_resume,
    restore_rng_state,
    rng_state,
    write_checkpoint,
)
from pf.training.distributed import Dist, init_distributed, mean_over_ranks, shutdown
from pf.training.fid import InLoopFID
from pf.training.lr_schedule import build_scheduler
from pf.training.loggers import RunLog
from pf.training.metrics import progress_bar, read_records
from pf.training.objective import Alignment, FlowBatch, Objective, flow_objective, validation_loss
from pf.training.pictures import draw_samples, save_picture
from pf.training.precision import Precision
from pf.training.run_folder import RunFolderError, RunLock, check_before_hydra, prepare_run_folder
from pf.training.schema import check_config, check_overrides, compose_config, fill_family_defaults
from pf.training.step import TrainStep
from pf.training.strategy import Strategy
from pf.training.throughput import Throughput
from pf.training.warm_start import warm_start

log = logging.getLogger("pf.train")


#################################################################################
#                                  Set-up                                       #
#################################################################################


def _stream_seed(seed: int, rank: int, stream: int) -> int:
    """Distinct, reproducible seeds per (rank, purpose): 0 global torch RNG, 1 noise, 2 timesteps."""
    return (int(seed) * 1_000_003 + rank * 1009 + stream) % (2**63)


def _pick_device(name: str, d_local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available (use device=cpu)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name, d_local_rank) if name == "cuda" else torch.device("cpu")


def _timestep_sampler(tc: DictConfig, per_token: bool, seed: int):
    params = {k: v for k, v in tc.timesteps.items() if k != "name" and v is not None}
    name = tc.timesteps.name
    if not per_token and name not in ("uniform", "logit_normal"):
        raise ValueError(f"trainer.kind=fm draws one time per sample: trainer.timesteps.name must be uniform or "
                         f"logit_normal, got {name!r}")
    cls = pf_timesteps.SAMPLERS.get(str(name).lower().replace("-", "_"))
    if cls is not None and "seed" in inspect.signature(cls.__init__).parameters:
        params["seed"] = seed  # the compiled LTG sampler keys its Philox stream by seed
    return pf_timesteps.make(name, **params)


def _gather_rng(state: dict, d: Dist) -> list[dict]:
    if not d.enabled:
        return [state]
    states: list = [None] * d.world_size
    dist.all_gather_object(states, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state.items()})
    return states


def _stack(dataset, limit: int):
    """The first ``limit`` items: images stacked, and their conditions (class ids or captions) as a list."""
    xs, ys = zip(*(dataset[i][:2] for i in range(min(limit, len(dataset)))))
    return torch.stack(xs), list(ys)


@torch.no_grad()
def _validate(model, x1, y, x0, batch: int, autocast) -> dict:
    """SPEC section 3's validation loss, in chunks of ``batch`` (weighted by chunk size)."""
    segments = None
    for i in range(0, x1.shape[0], batch):
        with autocast():
            out = validation_loss(model, x1[i:i + batch], conds.rows(y, slice(i, i + batch)), x0[i:i + batch])
        w = x1[i:i + batch].shape[0] / x1.shape[0]
        chunk = [s * w for s in out["segments"]]
        segments = chunk if segments is None else [a + b for a, b in zip(segments, chunk)]
    return {"val_loss": sum(segments) / len(segments), "segments": segments}


def _repa_encoder(cfg, d: Dist, device: torch.device):
    """The frozen encoder of ``trainer.repa`` (the default classifier: trained once on the
    training data and cached, by rank 0 first)."""
    rc = cfg.trainer.repa
    weights = rc.weights
    if rc.encoder == "classifier" and weights is None:
        if d.enabled and not d.is_main:
            dist.barrier()  # rank 0 trains and caches it first
        if d.is_main:
            log.info("REPA encoder: this project's classifier of data=%s (trained once, then cached; "
                     "trainer.repa.weights=FILE picks another)", cfg.data.name)
        weights, info = ensure_classifier(cfg.data, log=None)
        if d.is_main:
            log.info("REPA encoder: %s (test accuracy %.3f)", weights, info.get("test_accuracy", float("nan")))
        if d.enabled and d.is_main:
            dist.barrier()
    encoder = build_image_encoder(rc.encoder, weights=weights, repo=rc.repo, model=rc.model, resolution=rc.resolution)
    return encoder.to(device)


def _build_network(cfg, per_token: bool, input_size: int, in_channels: int, num_classes: int, z_dim: int | None,
                   text_dim: int | None = None):
    if cfg.model.family == "t2i":
        return build_t2i(cfg.model.name, input_size=input_size, in_channels=in_channels, text_dim=int(text_dim))
    repa = None
    if z_dim is not None:
        rc = cfg.trainer.repa
        repa = {"z_dim": int(z_dim), "encoder_depth": int(rc.encoder_depth), "projector_dim": int(rc.projector_dim)}
    try:
        return build_model(cfg.model.name, per_token=per_token, input_size=input_size, in_channels=in_channels,
                           num_classes=num_classes, class_dropout_prob=cfg.model.class_dropout_prob,
                           predict_uncertainty=per_token, repa=repa)
    except ValueError as err:
        if repa is not None and "encoder_depth" in str(err):
            raise ValueError(f"trainer.repa.encoder_depth: {err}") from None
        raise


#################################################################################
#                                 Training                                      #
#################################################################################


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as ``cfg`` says, writing into ``run_dir``. Returns the model, its EMA and a summary."""
    check_config(cfg)
    cfg = fill_family_defaults(cfg)
    run_dir = Path(run_dir)
    tc = cfg.trainer
    device = _pick_device(cfg.device)
    d = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        if tc.tf32:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
    precision = Precision(tc.precision, device)  # autocast, and fp16's loss scaling
    lock = None
    try:
        lock = _claim_run_folder(cfg, run_dir, d)
        return _train(cfg, tc, run_dir, device, d, precision)
    finally:
        if lock is not None:
            lock.release()
        shutdown(d)


def _claim_run_folder(cfg, run_dir: Path, d: Dist) -> RunLock | None:
    """Rank 0 locks ``run_dir`` for the run's life and refuses (or, with ``overwrite``, moves
    aside) a run already in it; every rank raises rank 0's refusal, so none waits for the others."""
    lock, refusal = None, None
    if d.is_main:
        try:
            lock = RunLock(run_dir).acquire()
            resume_ckpt = resolve_resume(cfg.resume) if cfg.resume else None
            prepare_run_folder(run_dir, cfg.resume, bool(cfg.get("overwrite", False)), resume_ckpt)
        except (ValueError, FileNotFoundError) as err:
            if lock is not None:
                lock.release()
            refusal = err
    if d.enabled:
        box = [None if refusal is None else str(refusal)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and refusal is None:
            raise RunFolderError(box[0])
    if refusal is not None:
        raise refusal
    return lock


def _data(cfg, d: Dist, device: torch.device, seed: int):
    """The data, checked against the model's sizes (null sizes come from the data, e.g. a
    latent set's manifest), split for validation, and this rank's batches. With REPA a latent
    set's items also carry their pixels; captioned data gives captions in place of class ids."""
    captioned = cfg.data.name in CAPTION_DATA
    if captioned != (cfg.model.family == "t2i"):
        raise ValueError(f"data={cfg.data.name} " + ("has captions: train it with a text model (model=t2i-tiny, ...)"
                                                     if captioned else "has no captions: a text model (model="
                                                     f"{cfg.model.name}) needs data=" + ", ".join(CAPTION_DATA)))
    dataset = (build_caption_dataset(cfg.data, seed=seed) if captioned
               else build_dataset(cfg.data, seed=seed, pixels=bool(cfg.trainer.repa.enabled)))
    # a caption folder or shard stream has no classes (captioned digits keep theirs)
    sizes = {"num_classes": cfg.model.num_classes if cfg.model.num_classes is not None
             else getattr(dataset, "num_classes", None),
             "input_size": cfg.model.input_size if cfg.model.input_size is not None else dataset.image_size,
             "in_channels": cfg.model.in_channels if cfg.model.in_channels is not None else dataset.channels}
    if captioned:
        check_caption_data(dataset, channels=sizes["in_channels"], image_size=sizes["input_size"])
    else:
        check_against_model(dataset, num_classes=sizes["num_classes"], channels=sizes["in_channels"],
                            image_size=sizes["input_size"])
    if isinstance(dataset, torch.utils.data.IterableDataset):  # webdataset shards: a stream, no held-out split
        batches = StreamBatches(dataset, cfg.trainer.batch_size, num_workers=cfg.data.num_workers,
                                pin_memory=device.type == "cuda")
        return sizes, dataset, dataset, None, batches
    train_set, val_set = split_validation(dataset, cfg.data.val_size, seed)
    batches = ShardedBatches(train_set, cfg.trainer.batch_size, rank=d.rank, world_size=d.world_size, seed=seed,
                             num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    return sizes, dataset, train_set, val_set, batches


def _conditioning(cfg, dataset, device: torch.device):
    """The conditioning part: class ids, or for a text model the frozen encoder of ``text``
    (the training captions encoded once when ``text.cache``)."""
    if cfg.model.family != "t2i":
        num_classes = cfg.model.num_classes if cfg.model.num_classes is not None else dataset.num_classes
        return ClassConditioning(num_classes, class_names(OmegaConf.to_container(cfg, resolve=True), num_classes))
    tx = cfg.text
    encoder = encoder_from_config(OmegaConf.to_container(tx, resolve=True), device)
    prompts = picture_prompts(cfg, dataset)
    if tx.cache and hasattr(dataset, "all_captions") and not isinstance(dataset, torch.utils.data.IterableDataset):
        encoder = CachedTextEncoder(encoder, [*dataset.all_captions(), *prompts], path=tx.cache_dir)
    return TextConditioning(encoder, tx.dropout, prompts)


def picture_prompts(cfg, dataset) -> list[str]:
    """The training pictures' prompts: ``sampler.prompts``, else for a demo set one held-out
    prompt per class (a wording no training caption has), else the data's first captions."""
    if cfg.sampler.prompts:
        return list(cfg.sampler.prompts)
    if isinstance(dataset, CaptionedClasses):
        first: dict[int, str] = {}
        for prompt, c in demo_prompts(dataset.name, "test"):
            first.setdefault(c, prompt)
        return [first[c] for c in sorted(first)]
    if hasattr(dataset, "all_captions") and not isinstance(dataset, torch.utils.data.IterableDataset):
        return dataset.all_captions()[:10]
    raise ValueError("a text model trained on shards needs the pictures' prompts: set sampler.prompts=[...]")


def _objective(tc, model, encoder):
    """The loss as its named parts: flow MSE, the difficulty NLL (PF), REPA's alignment."""
    terms = flow_objective(model, tc.nll_weight).terms
    if encoder is not None:
        terms.append(Alignment(encoder, model.grid_size, tc.repa["lambda"]))
    return Objective(terms)


def _resume(cfg, d: Dist, device, state: dict, generators: dict, timestep_sampler, strategy: Strategy) -> int:
    """Load ``cfg.resume`` into the model, EMA, optimizer, scheduler and random streams; its step."""
    path = resolve_resume(cfg.resume)
    ckpt = load_training_checkpoint(path)
    strategy.load(state["model"], state["optimizer"], ckpt["state_dict"], ckpt["optimizer"], source=str(path))
    state["ema"].load_state_dict(ckpt["ema"], ckpt.get("ema_updates", ckpt["step"]))
    state["scheduler"].load_state_dict(ckpt["scheduler"])
    state["precision"].load_state_dict(ckpt.get("precision", {}))
    if len(ckpt["rng"]) == d.world_size:
        restore_rng_state(ckpt["rng"][d.rank], generators, timestep_sampler, device)
    else:
        log.warning("resume: the checkpoint was written by %d rank(s), this run has %d: data order continues, "
                    "random streams are reseeded (not bit-exact)", len(ckpt["rng"]), d.world_size)
    if d.is_main:
        log.info("resumed from %s at step %d", path, int(ckpt["step"]))
    return int(ckpt["step"])


class _Pictures:
    """Fixed noise and conditions for the EMA pictures (comparable across steps)."""

    def __init__(self, cfg, model, conditioning, per_token: bool, fixed: torch.Generator, device):
        sc = self.sc = cfg.sampler
        self.sampler = pf_samplers.make(sc.name, **sc.params)
        if not per_token and not self.sampler.global_time:
            log.warning("sampler=%s needs per-patch times; the fm baseline draws its pictures with sampler=euler "
                        "(or heun / sde)", sc.name)
            self.sampler = pf_samplers.make("euler")
        shape = (sc.num_images, model.in_channels, model.input_size, model.input_size)
        self.noise = torch.randn(shape, generator=fixed).to(device)
        wanted = sc.prompts if conditioning.kind == "text" else sc.classes
        self.conds, self.names = conditioning.for_pictures(wanted, sc.num_images, device)
        self.uc_cond = conditioning.null(device)

    def draw(self, path: Path, step: int, ema_model, autocast):
        return _picture(path, step, ema_model, self.sampler, self.noise, self.conds, self.sc, autocast, self.names,
                        self.uc_cond)


def _check_step(step: int, loss: float, gnorm: float, t_lo: float, t_hi: float, timestep_sampler, last_ckpt,
                may_skip: bool = False) -> None:
    if not (0.0 <= t_lo and t_hi <= 1.0):
        raise ValueError(f"the timestep sampler {timestep_sampler} drew patch times in [{t_lo}, {t_hi}] at step "
                         f"{step + 1}; times must be finite and lie in [0, 1]")
    if not (math.isfinite(loss) and (math.isfinite(gnorm) or may_skip)):  # fp16: an overflow skips the step
        where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise NonFiniteLoss(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                            f"(loss={loss}, grad_norm={gnorm}) at step {step + 1}; stopped before the update, {where}")


def _summary(run_dir: Path, step: int, first_loss, seconds: float, main: bool) -> dict:
    summary = {"steps": step, "first_loss": first_loss, "seconds": seconds, "run_dir": str(run_dir)}
    path = run_dir / "metrics.jsonl"
    records = read_records(path) if main and path.is_file() else []
    if records:
        summary["final_loss"] = records[-1]["loss"]
        summary["val_loss"] = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    return summary


def _train(cfg, tc, run_dir: Path, device: torch.device, d: Dist, precision: Precision) -> dict:
    autocast = precision.autocast
    seed = int(cfg.seed)
    per_token = tc.kind == "pf"
    encoder = _repa_encoder(cfg, d, device) if tc.repa.enabled else None  # REPA: the frozen encoder
    sizes, dataset, train_set, val_set, batches = _data(cfg, d, device, seed)

    # ---- the parts of a step: conditioning and the objective's terms (REPA: alignment and its head)
    conditioning = _conditioning(cfg, dataset, device)
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = _build_network(cfg, per_token, sizes["input_size"], sizes["in_channels"], sizes["num_classes"],
                           encoder.z_dim if encoder is not None else None,
                           getattr(conditioning.encoder, "dim", None) if conditioning.kind == "text" else None).to(device)
    if cfg.init_from and not cfg.resume:  # a resumed run has its weights in its checkpoint
        warm_start(model, cfg.init_from, cfg.init_from_ema)
    strategy = Strategy(tc.strategy, d, device, tc.precision)  # ddp | fsdp (sharded before the optimizer exists)
    model = strategy.shard(model, tc.activation_checkpointing)
    objective = _objective(tc, model, encoder)
    ema = strategy.ema(model, tc.ema_decay, tc.ema_warmup)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                  betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc)
    timestep_sampler = _timestep_sampler(tc, per_token, _stream_seed(seed, d.rank, 2))
    # this rank's random streams: global (class dropout), noise, timesteps
    torch.manual_seed(_stream_seed(seed, d.rank, 0))
    generators = {"noise": torch.Generator(device).manual_seed(_stream_seed(seed, d.rank, 1)),
                  "timesteps": torch.Generator(device).manual_seed(_stream_seed(seed, d.rank, 2))}
    state = {"model": model, "ema": ema, "optimizer": optimizer, "scheduler": scheduler, "precision": precision}
    step = _resume(cfg, d, device, state, generators, timestep_sampler, strategy) if cfg.resume else 0
    forward, skip_sync = strategy.wrap(model, tc.compile)
    train_step = TrainStep(forward, objective, model.parameters(), optimizer, precision, tc.grad_accum, tc.grad_clip,
                           skip_sync)

    # ---- fixed inputs for validation and pictures
    fixed = torch.Generator().manual_seed(seed + 12345)
    val = None
    if val_set is not None:
        x1_val, y_val = _stack(val_set, len(val_set))
        val = (x1_val.to(device), conditioning.fixed(y_val, device), torch.randn(x1_val.shape, generator=fixed).to(device))
    pictures = _Pictures(cfg, model, conditioning, per_token, fixed, device)
    fid = None
    if tc.fid_every and d.is_main:  # rank 0 draws and scores
        if conditioning.kind != "class":
            raise ValueError("trainer.fid_every is for class-conditional models; a text model's FID needs prompts: "
                             "evaluate its checkpoints with pf.eval")
        fid = InLoopFID(tc, cfg.sampler, cfg.data, _stack(dataset, tc.fid_reference)[0], sizes["num_classes"],
                        pictures.sampler, pictures.uc_cond, device, seed)

    # ---- run directory (rank 0)
    ckpt_dir, run_log = run_dir / "checkpoints", None
    throughput = Throughput(model, device, tc.precision, d.world_size)
    if d.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        run_log = RunLog(tc.log, run_dir, step if cfg.resume else None, OmegaConf.to_container(cfg, resolve=True),
                         nrow=cfg.sampler.nrow)  # metrics.jsonl, TensorBoard, wandb
        log.info("%s %s: %.2fM parameters, %s training examples (%s per rank), batch %d x %d rank(s), %s, "
                 "objective %s, device %s", "PF" if per_token else "SiT", cfg.model.name, num_params(model) / 1e6,
                 _count(train_set), batches.per_rank, tc.batch_size, d.world_size, timestep_sampler,
                 " + ".join(f"{t.weight:g}*{t.name}" for t in objective.terms), device)

    last_ckpt = ckpt_dir / "last.pt" if (ckpt_dir / "last.pt").is_file() else None

    def save(step: int, keep: bool) -> None:
        nonlocal last_ckpt
        rng = _gather_rng(rng_state(generators, timestep_sampler, device), d)
        ckpt = strategy.checkpoint(model, ema, optimizer, scheduler, step, rng, OmegaConf.to_container(cfg, resolve=True))
        if d.is_main:
            ckpt["precision"] = precision.state_dict()  # fp16: the loss scale and skipped count
            last_ckpt = write_checkpoint(ckpt, ckpt_dir, step, keep=keep)

    if tc.max_steps == 0:  # an init-only run: its starting weights (e.g. init_from's) as a checkpoint
        save(0, keep=True)
    names = ["loss", *objective.names, "grad_norm"]
    first_loss, window, window_images, record = None, [], 0, {}
    bar = progress_bar(tc.max_steps, step, enabled=d.is_main and tc.progress)
    t_start = t_window = time.perf_counter()
    model.train()
    data = batches.iterate(step)
    while step < tc.max_steps:
        x1, labels, *images = next(data)  # latents with REPA: and the images behind them
        x1 = x1.to(device, non_blocking=True)  # (B, C, H, W)
        pixels = images[0].to(device, non_blocking=True) if images else x1  # pixel data: x1 is the image
        b = x1.shape[0]
        t = timestep_sampler(b, model.grid_size**2 if per_token else 1, device=device,
                             generator=generators["timesteps"])  # (B, N) per patch, (B, 1) per sample
        t = t if per_token else t[:, 0]
        x0 = torch.randn(x1.shape, generator=generators["noise"], device=device)
        out = train_step.accumulate(FlowBatch(x1, conditioning(labels, device), t, x0, pixels=pixels))
        grad_norm = train_step.clip()
        stats = mean_over_ranks(torch.stack([out[n].detach().float() for n in names[:-1]] + [grad_norm.float()]), d)
        # this rank's time range rides along with the one host read of the step
        values = torch.cat([stats, torch.stack([t.min(), t.max()]).float()]).tolist()
        _check_step(step, values[0], values[-3], values[-2], values[-1], timestep_sampler, last_ckpt,
                    precision.may_skip)
        train_step.apply(math.isfinite(values[-3]))
        scheduler.step()
        ema.update(model)
        step += 1
        first_loss = values[0] if first_loss is None else first_loss
        window.append(values[:-2])
        window_images += b * d.world_size
        bar.update(1)

        final = step == tc.max_steps
        val_step = val is not None and (step % tc.val_every == 0 or final)
        if step % tc.log_every == 0 or final or val_step:
            elapsed = time.perf_counter() - t_window
            mean = [sum(col) / len(window) for col in zip(*window)]  # an fp16-skipped step's inf norm: inf
            record = {"step": step, **dict(zip(names, mean)), "lr": scheduler.get_last_lr()[0],
                      **throughput.rates(window_images / max(elapsed, 1e-9)), "epoch": batches.epoch_of(step - 1),
                      **precision.stats()}
            bar.set_postfix(loss=f"{mean[0]:.4f}", img_s=f"{record['img_per_s']:.0f}")
            window, window_images = [], 0
        fid_step = bool(tc.fid_every) and (step % tc.fid_every == 0 or final)
        picture_step = step % tc.sample_every == 0 or final
        ema_model = ema.whole() if val_step or fid_step or picture_step else None  # fsdp: every rank gathers
        if d.is_main and val_step:
            record.update({"step": step, **_validate(ema_model, *val, tc.batch_size, autocast)})
        if fid is not None and fid_step:
            record.update({"step": step, **fid(ema_model, autocast)})
        if d.is_main and record:
            run_log.write(record)
        if d.is_main and picture_step:
            run_log.pictures(step, *pictures.draw(run_dir / "samples" / f"step_{step:06d}.png", step, ema_model,
                                                  autocast))
        keep = step % tc.keep_every == 0 or final
        if step % tc.ckpt_every == 0 or keep:
            save(step, keep)
        if record:
            t_window = time.perf_counter()  # time spent on pictures and checkpoints is not training speed
        record = {}
    bar.close()
    if run_log is not None:
        run_log.close()

    summary = _summary(run_dir, step, first_loss, time.perf_counter() - t_start, d.is_main)
    if d.is_main:
        log.info("done: %s", summary)
    return {"model": model, "ema": ema.whole(), "summary": summary}  # fsdp: the EMA on rank 0 only


def _picture(path: Path, step: int, ema_model, sampler, noise, conds, sc, autocast, names: list[str],
             uc_cond=None) -> None:
    with autocast():
        gi = list(sc.guidance_interval) if sc.get("guidance_interval") is not None else None
        samples, difficulty = draw_samples(ema_model, sampler, noise, conds, sc.steps, sc.cfg_scale, sc.map_time, gi,
                                           uc_cond=uc_cond)
    save_picture(path, samples, difficulty, sc.nrow, labels=names,
                 title=f"EMA samples at step {step}: {sampler.name}, {sc.steps} steps, cfg {sc.cfg_scale:g}"
                       + (f" on [{gi[0]:g}, {gi[1]:g}]" if gi else ""),
                 map_title=f"difficulty exp(logvar) at t={sc.map_time}")
    return samples, difficulty


def _count(dataset) -> str:
    try:
        return str(len(dataset))
    except TypeError:  # a stream of shards
        return "streamed"


def _check_command_line(argv: list[str]) -> None:
    """What hydra would report with a trace, checked first: the keys, hydra's own parse and
    compose of the config, the run folder (in use, holding a run) and whether it can be written."""
    if any(a.startswith("-") for a in argv):  # hydra's own flags (--help, --cfg job, --config-name x): hydra's call
        check_overrides([a for a in argv if "=" in a and not a.startswith("-")])
    else:
        cfg = compose_config(argv, with_hydra=True)
        check_writable(cfg.hydra.run.dir, create=False)
    check_before_hydra(argv)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    # Inside hydra's app: an expected error is our one line (hydra would print a trace summary).
    code = run_command(lambda: train(cfg, HydraConfig.get().runtime.output_dir))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    # Group options and key names are checked before hydra composes (it would print its search
    # path or a trace summary); every expected error reads as one line (PF_DEBUG=1: traceback).
    code = run_command(lambda: _check_command_line(sys.argv[1:]))
    sys.exit(code or main())
