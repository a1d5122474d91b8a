"""Train a Patch Forcing model (or the SiT baseline): ``python -m pf.train [overrides]``.

With no arguments: PF-Tiny/2 on the embedded digits, a few minutes on a CPU. The run
directory (``hydra.run.dir``) receives::

    checkpoints/last.pt, checkpoints/step_XXXXXX.pt   model, EMA, optimizer, scheduler, step, RNG
    samples/step_XXXXXX.png                           EMA samples beside the difficulty map
    metrics.jsonl                                     {"step", "loss", ...} per logged step
    config.yaml (and hydra's .hydra/)                 the resolved config

``resume=<run dir or checkpoint>`` continues exactly; ``torchrun --nproc_per_node=N -m
pf.train`` trains with DDP (rank 0 writes). One step::

    t  ~ timestep sampler             (B, N) per patch (pf) or (B,) per sample (fm)
    x0 ~ N(0, I)                      noise from this rank's generator
    loss = MSE(v, x1 - x0) + nll_weight * NLL(logvar)       (pf.flow.training_loss)
    AdamW step with clipped gradients, warm-up LR, EMA update
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
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
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from pf import samplers as pf_samplers
from pf import timesteps as pf_timesteps
from pf.data import ShardedBatches, build_dataset, check_against_model, split_validation
from pf.flow import training_loss, validation_loss
from pf.models.checkpoint import load_state_dict_checked
from pf.models.dit import build_model, num_params
from pf.sampling.grid import class_names
from pf.training.checkpointing import (
    load_training_checkpoint,
    resolve_resume,
    restore_rng_state,
    rng_state,
    training_checkpoint,
    write_checkpoint,
)
from pf.training.distributed import Dist, init_distributed, mean_over_ranks, shutdown
from pf.training.ema import EMA
from pf.training.metrics import MetricsWriter, progress_bar
from pf.training.schema import check_config, check_overrides
from pf.training.pictures import draw_samples, save_picture

log = logging.getLogger("pf.train")


class NonFiniteLoss(RuntimeError):
    """The loss (or the gradient norm) stopped being finite; the run stops before the update."""


class _Forward:
    """Calls the (DDP-wrapped and/or compiled) model; attributes come from the plain module,
    so ``pf.flow`` can read ``patch_size`` and ``predict_uncertainty``."""

    def __init__(self, call, module):
        self._call, self._module = call, module

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


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
        raise RuntimeError("device=cuda but no CUDA device is available (use device=cpu)")
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


def _lr_lambda(warmup: int):
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    return factor


def _gather_rng(state: dict, d: Dist) -> list[dict]:
    if not d.enabled:
        return [state]
    states: list = [None] * d.world_size
    dist.all_gather_object(states, {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state.items()})
    return states


def _stack(dataset, limit: int):
    xs, ys = zip(*(dataset[i] for i in range(min(limit, len(dataset)))))
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)


@torch.no_grad()
def _validate(model, x1, y, x0, batch: int, autocast) -> dict:
    """SPEC section 3's validation loss, in chunks of ``batch`` (weighted by chunk size)."""
    segments = None
    for i in range(0, x1.shape[0], batch):
        with autocast():
            out = validation_loss(model, x1[i:i + batch], y[i:i + batch], x0[i:i + batch])
        w = x1[i:i + batch].shape[0] / x1.shape[0]
        chunk = [s * w for s in out["segments"]]
        segments = chunk if segments is None else [a + b for a, b in zip(segments, chunk)]
    return {"val_loss": sum(segments) / len(segments), "segments": segments}


#################################################################################
#                                 Training                                      #
#################################################################################


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as ``cfg`` says, writing into ``run_dir``. Returns the model, its EMA and a summary."""
    check_config(cfg)
    run_dir = Path(run_dir)
    tc = cfg.trainer
    device = _pick_device(cfg.device)
    d = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        if tc.tf32:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
    use_bf16 = device.type == "cuda" and tc.precision == "bf16"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    try:
        return _train(cfg, tc, run_dir, device, d, autocast)
    finally:
        shutdown(d)


def _train(cfg, tc, run_dir: Path, device: torch.device, d: Dist, autocast) -> dict:
    seed = int(cfg.seed)
    per_token = tc.kind == "pf"
    if tc.kind not in ("pf", "fm"):
        raise ValueError(f"trainer.kind must be pf or fm, got {tc.kind!r}")

    # ---- data: checked against the model before anything trains
    dataset = build_dataset(cfg.data, seed=seed)
    # null sizes come from the data (a latent set's manifest)
    num_classes = cfg.model.num_classes if cfg.model.num_classes is not None else dataset.num_classes
    input_size = cfg.model.input_size if cfg.model.input_size is not None else dataset.image_size
    in_channels = cfg.model.in_channels if cfg.model.in_channels is not None else dataset.channels
    check_against_model(dataset, num_classes=num_classes, channels=in_channels, image_size=input_size)
    train_set, val_set = split_validation(dataset, cfg.data.val_size, seed)
    batches = ShardedBatches(train_set, tc.batch_size, rank=d.rank, world_size=d.world_size, seed=seed,
                             num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")

    # ---- model, EMA, optimizer (identical initial weights on every rank)
    torch.manual_seed(seed)
    model = build_model(cfg.model.name, per_token=per_token, input_size=input_size,
                        in_channels=in_channels, num_classes=num_classes,
                        class_dropout_prob=cfg.model.class_dropout_prob, predict_uncertainty=per_token).to(device)
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr,
                                  betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc.warmup_steps))
    timestep_sampler = _timestep_sampler(tc, per_token, _stream_seed(seed, d.rank, 2))
    num_patches = model.grid_size**2

    # ---- this rank's random streams: global (class dropout), noise, timesteps
    torch.manual_seed(_stream_seed(seed, d.rank, 0))
    generators = {
        "noise": torch.Generator(device).manual_seed(_stream_seed(seed, d.rank, 1)),
        "timesteps": torch.Generator(device).manual_seed(_stream_seed(seed, d.rank, 2)),
    }

    # ---- resume
    step = 0
    if cfg.resume:
        path = resolve_resume(cfg.resume)
        ckpt = load_training_checkpoint(path)
        load_state_dict_checked(model, ckpt["state_dict"], source=str(path))
        ema.load_state_dict(ckpt["ema"], ckpt.get("ema_updates", ckpt["step"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        if len(ckpt["rng"]) == d.world_size:
            restore_rng_state(ckpt["rng"][d.rank], generators, timestep_sampler, device)
        else:
            log.warning("resume: the checkpoint was written by %d rank(s), this run has %d: data order continues, "
                        "random streams are reseeded (not bit-exact)", len(ckpt["rng"]), d.world_size)
        if d.is_main:
            log.info("resumed from %s at step %d", path, step)
        del ckpt

    train_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile:
        train_model = torch.compile(train_model)
    forward = _Forward(train_model, model)

    # ---- fixed inputs for validation and pictures (same every time: comparable across steps)
    fixed = torch.Generator().manual_seed(seed + 12345)
    val = None
    if val_set is not None:
        x1_val, y_val = _stack(val_set, len(val_set))
        val = (x1_val.to(device), y_val.to(device), torch.randn(x1_val.shape, generator=fixed).to(device))
    sc = cfg.sampler
    picture_sampler = pf_samplers.make(sc.name, **sc.params)
    if not per_token and sc.name != "euler":
        log.warning("sampler=%s needs per-patch times; the fm baseline draws its pictures with sampler=euler", sc.name)
        picture_sampler = pf_samplers.make("euler")
    shape = (sc.num_images, model.in_channels, model.input_size, model.input_size)
    picture_noise = torch.randn(shape, generator=fixed).to(device)
    classes = list(sc.classes) if sc.classes else list(range(num_classes))
    picture_labels = torch.as_tensor([classes[i % len(classes)] for i in range(sc.num_images)], device=device)
    picture_names = class_names(OmegaConf.to_container(cfg, resolve=True), num_classes) + ["(no class)"]

    # ---- run directory (rank 0)
    ckpt_dir = run_dir / "checkpoints"
    metrics = None
    if d.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        metrics = MetricsWriter(run_dir / "metrics.jsonl", resume_step=step if cfg.resume else None)
        if not cfg.resume:
            (run_dir / "metrics.jsonl").write_text("")
        log.info("%s %s: %.2fM parameters, %d training examples (%d per rank), batch %d x %d rank(s), %s, device %s",
                 "PF" if per_token else "SiT", cfg.model.name, num_params(model) / 1e6, len(train_set),
                 batches.sampler.num_samples, tc.batch_size, d.world_size, timestep_sampler, device)

    last_ckpt = ckpt_dir / "last.pt" if (ckpt_dir / "last.pt").is_file() else None
    first_loss, window, window_images, record = None, [], 0, {}
    bar = progress_bar(tc.max_steps, step, enabled=d.is_main and tc.progress)
    t_window = time.perf_counter()
    t_start = t_window
    model.train()
    data = batches.iterate(step)
    while step < tc.max_steps:
        x1, y = next(data)
        x1, y = x1.to(device, non_blocking=True), y.to(device, non_blocking=True)
        b = x1.shape[0]
        if per_token:
            t = timestep_sampler(b, num_patches, device=device, generator=generators["timesteps"])  # (B, N)
        else:
            t = timestep_sampler(b, 1, device=device, generator=generators["timesteps"])[:, 0]  # (B,)
        x0 = torch.randn(x1.shape, generator=generators["noise"], device=device)  # (B, C, H, W)

        with autocast():
            out = training_loss(forward, x1, y, t, x0=x0, nll_weight=tc.nll_weight)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        stats = mean_over_ranks(torch.stack([out["loss"].detach().float(), out["mse"].detach().float(),
                                             out["nll"].detach().float(), grad_norm.detach().float()]), d)
        # this rank's time range rides along with the one host read of the step
        loss, mse, nll, gnorm, t_lo, t_hi = torch.cat([stats, torch.stack([t.min(), t.max()]).float()]).tolist()
        if not (0.0 <= t_lo and t_hi <= 1.0):
            raise ValueError(f"the timestep sampler {timestep_sampler} drew patch times in [{t_lo}, {t_hi}] at step "
                             f"{step + 1}; times must be finite and lie in [0, 1]")
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise NonFiniteLoss(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                f"(loss={loss}, grad_norm={gnorm}) at step {step + 1}; stopped before the update, "
                                f"{where}")
        optimizer.step()
        scheduler.step()
        ema.update(model)
        step += 1
        first_loss = loss if first_loss is None else first_loss
        window.append((loss, mse, nll, gnorm))
        window_images += b * d.world_size
        bar.update(1)

        final = step == tc.max_steps
        val_step = val is not None and (step % tc.val_every == 0 or final)
        if step % tc.log_every == 0 or final or val_step:
            elapsed = time.perf_counter() - t_window
            mean = [sum(col) / len(window) for col in zip(*window)]
            record = {"step": step, "loss": mean[0], "mse": mean[1], "nll": mean[2], "grad_norm": mean[3],
                      "lr": scheduler.get_last_lr()[0], "img_per_s": window_images / max(elapsed, 1e-9),
                      "epoch": batches.epoch_of(step - 1)}
            bar.set_postfix(loss=f"{mean[0]:.4f}", img_s=f"{record['img_per_s']:.0f}")
            window, window_images = [], 0
        if d.is_main and val_step:
            record.update({"step": step, **_validate(ema.model, *val, tc.batch_size, autocast)})
        if d.is_main and record:
            metrics.write(record)
        if d.is_main and (step % tc.sample_every == 0 or final):
            _picture(run_dir / "samples" / f"step_{step:06d}.png", step, ema.model, picture_sampler, picture_noise,
                     picture_labels, sc, autocast, picture_names)
        keep = step % tc.keep_every == 0 or final
        if step % tc.ckpt_every == 0 or keep:
            rng = _gather_rng(rng_state(generators, timestep_sampler, device), d)
            if d.is_main:
                ckpt = training_checkpoint(model, ema, optimizer, scheduler, step, rng,
                                           OmegaConf.to_container(cfg, resolve=True))
                last_ckpt = write_checkpoint(ckpt, ckpt_dir, step, keep=keep)
        if record:
            t_window = time.perf_counter()  # time spent on pictures and checkpoints is not training speed
        record = {}
    bar.close()

    summary = {"steps": step, "first_loss": first_loss, "seconds": time.perf_counter() - t_start,
               "run_dir": str(run_dir)}
    if d.is_main and (run_dir / "metrics.jsonl").is_file():
        import json

        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        if records:
            summary["final_loss"] = records[-1]["loss"]
            summary["val_loss"] = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
        log.info("done: %s", summary)
    return {"model": model, "ema": ema.model, "summary": summary}


def _picture(path: Path, step: int, ema_model, sampler, noise, labels, sc, autocast, names: list[str]) -> None:
    with autocast():
        gi = list(sc.guidance_interval) if sc.get("guidance_interval") is not None else None
        samples, difficulty = draw_samples(ema_model, sampler, noise, labels, sc.steps, sc.cfg_scale, sc.map_time, gi)
    save_picture(path, samples, difficulty, sc.nrow, labels=[names[int(c)] for c in labels],
                 title=f"EMA samples at step {step}: {sampler.name}, {sc.steps} steps, cfg {sc.cfg_scale:g}"
                       + (f" on [{gi[0]:g}, {gi[1]:g}]" if gi else ""),
                 map_title=f"difficulty exp(logvar) at t={sc.map_time}")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    import sys

    from hydra.core.hydra_config import HydraConfig

    from pf.errors import run_command

    # Inside hydra's app: an expected error is our one line (hydra would print a trace summary).
    code = run_command(lambda: train(cfg, HydraConfig.get().runtime.output_dir))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    import sys

    from pf.errors import run_command

    # Group options and key names are checked before hydra composes (it would print its search
    # path or a trace summary); every expected error reads as one line (PF_DEBUG=1: traceback).
    code = run_command(lambda: check_overrides(sys.argv[1:]))
    sys.exit(code or main())
