"""Sample from a checkpoint: a PNG grid, an FID dump, or a picture of adaptive sampling.

    python -m pf.sample ckpt=model.ckpt sampler=look_ahead steps=100 cfg=4.0 \\
        classes=[207,360,387,974] n=16 seed=0 out=samples/ [vae=sd-vae-ft-ema/]
    torchrun --nproc_per_node=8 -m pf.sample ckpt=... sampler=look_ahead cfg=1.0 \\
        fid=true num=50000 out=fid/ vae=...        # ADM evaluator .npz (arr_0, uint8, NHWC)
    python -m pf.sample ckpt=... viz=true ...      # also a strip over the sampling steps
    python -m pf.sample ckpt=t2i.pt prompt="a handwritten seven" n=10   # a text-to-image model
    python -m pf.sample ckpt=t2i.pt prompts=prompts.txt n=30            # one prompt a line, cycled

Arguments are ``key=value`` (values read as YAML: ``true``, ``4.0``, ``[1,2]``); run with
``help`` for the list. Sample ``i`` (of the grid or the dump) always gets the same noise and
label, from ``seed`` and ``i`` alone: the result does not depend on the batch size or the
number of processes, and under ``torchrun`` rank ``r`` samples indices ``r, r+W, ...``.

A text-to-image checkpoint samples prompts (``prompt=`` or ``prompts=FILE``, cycled over the
samples), encoded by the text encoder it was trained with (its ``text`` config; ``text_path=``
where the encoder's folder is elsewhere now); guidance compares against the empty prompt.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULTS = {
    "ckpt": None,  # released PFT file or one of this project's checkpoints (required)
    "sampler": "look_ahead",  # euler_pf | dual_loop | look_ahead (euler for global-time models)
    "steps": 100,  # outer steps
    "guidance_interval": None,  # [lo, hi]: guide only the outer steps with lo <= s_k <= hi (SPEC section 10)
    "cfg": None,  # guidance scale; default 4.0 for pictures, 1.0 (no guidance, the published FID setting) with fid=true
    "classes": None,  # labels, cycled over the samples; default: random per sample
    "prompt": None,  # text models: one prompt for every sample
    "prompts": None,  # text models: a file of prompts, one a line, cycled over the samples
    "text_path": None,  # text models: the text encoder's local folder (null: the one the checkpoint was trained with)
    "n": 16,  # pictures in the grid
    "seed": 0,
    "out": "samples",  # output folder
    "batch": 64,  # samples per model batch (doubled inside by guidance)
    "device": "auto",  # auto | cpu | cuda | cuda:1 (torchrun: cuda:LOCAL_RANK)
    "vae": None,  # local diffusers AutoencoderKL folder/file; null: the one the training latent set's manifest names
    "vae_scale": None,  # null: the manifest's scale factor (0.18215 for SD-VAE)
    "fid": False,  # write the ADM evaluator .npz of `num` samples instead of a grid
    "num": 50000,
    "viz": False,  # also a PNG strip of image / difficulty / patch times over the steps
    "viz_cols": 10,
    "graphs": False,  # capture the whole sampler as a CUDA graph (CUDA only)
    "compile": False,  # torch.compile the model's forward
    "compile_mode": "default",  # a torch.compile mode (not reduce-overhead with graphs)
    "precision": "fp32",  # fp32 | bf16 | fp16 (autocast, CUDA only)
    "p": 0.4,  # dual_loop / look_ahead: fraction of certain patches
    "n_inner": 4,  # dual_loop
    "ratio": 1.4,  # look_ahead: context_t_ratio
    "progress": True,
}

TEXT_KEYS = ("prompt", "prompts", "text_path")  # read as typed, not as YAML


def _show(value) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


USAGE = "usage: python -m pf.sample ckpt=PATH [key=value ...]\nkeys (default):\n" + "\n".join(
    f"  {k}={_show(v)}" for k, v in DEFAULTS.items()
)


class UsageError(ValueError):
    pass


#################################################################################
#                                  Arguments                                    #
#################################################################################


def parse_args(argv: list[str]) -> dict:
    """``key=value`` pairs over DEFAULTS; unknown keys and malformed values are errors."""
    import yaml

    cfg = dict(DEFAULTS)
    for arg in argv:
        if "=" not in arg:
            raise UsageError(f"expected key=value, got {arg!r}\n{USAGE}")
        key, value = arg.split("=", 1)
        key = key.strip().lstrip("+-")
        if key not in DEFAULTS:
            raise UsageError(f"unknown key {key!r}; known keys: {', '.join(DEFAULTS)}")
        if key in TEXT_KEYS:  # a prompt or a path as typed: prompt=7 is the text "7", not the number
            cfg[key] = value
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise UsageError(f"{key}: cannot read value {value!r}: {err}") from err
        cfg[key] = parsed
    return validate(cfg)


def validate(cfg: dict) -> dict:
    if not cfg["ckpt"]:
        raise UsageError(f"ckpt=PATH is required\n{USAGE}")
    cfg["ckpt"], cfg["out"] = str(cfg["ckpt"]), str(cfg["out"])
    if cfg["cfg"] is None:
        cfg["cfg"] = 1.0 if cfg["fid"] is True else 4.0
    for key in ("steps", "n", "seed", "batch", "num", "n_inner", "viz_cols"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < (0 if key == "seed" else 1):
            raise UsageError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg["vae_scale"] is None:
        cfg["vae_scale"] = 0.0  # resolved from the checkpoint's manifest (or 0.18215) by the Runner
    for key in ("cfg", "p", "ratio", "vae_scale"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool):
            raise UsageError(f"{key} must be a number, got {cfg[key]!r}")
        cfg[key] = float(cfg[key])
    for key in ("fid", "viz", "graphs", "compile", "progress"):
        if not isinstance(cfg[key], bool):
            raise UsageError(f"{key} must be true or false, got {cfg[key]!r}")
    if cfg["classes"] is not None:
        classes = cfg["classes"] if isinstance(cfg["classes"], list) else [cfg["classes"]]
        if not classes or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
            raise UsageError(f"classes must be a list of class ids like [1,2,3], got {cfg['classes']!r}")
        cfg["classes"] = classes
    gi = cfg["guidance_interval"]
    if gi is not None:
        if not (isinstance(gi, list) and len(gi) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               for v in gi) and 0 <= gi[0] <= gi[1] <= 1):
            raise UsageError(f"guidance_interval must be [lo,hi] with 0 <= lo <= hi <= 1, got {gi!r}")
        cfg["guidance_interval"] = [float(v) for v in gi]
    if cfg["precision"] not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"precision must be fp32, bf16 or fp16, got {cfg['precision']!r}")
    if cfg["vae"] is not None:
        cfg["vae"] = str(cfg["vae"])
    cfg["prompt_list"] = read_prompts(cfg)
    cfg["compile_mode"] = str(cfg["compile_mode"])
    return cfg


def read_prompts(cfg: dict) -> list[str] | None:
    """``prompt=`` (one) or ``prompts=FILE`` (one a line, blank lines skipped) as a list, or None."""
    if cfg["prompt"] is not None and cfg["prompts"] is not None:
        raise UsageError("give prompt=... or prompts=FILE, not both")
    if cfg["prompt"] is not None:
        if not isinstance(cfg["prompt"], str):
            raise UsageError(f"prompt must be a string (quote it: prompt=\"a handwritten seven\"), got {cfg['prompt']!r}")
        return [cfg["prompt"]]
    if cfg["prompts"] is None:
        return None
    path = Path(str(cfg["prompts"])).expanduser()
    if not path.is_file():
        raise UsageError(f"prompts={path}: no such file (one prompt a line)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise UsageError(f"prompts={path}: the file holds no prompt (one a line)")
    return prompts


#################################################################################
#                               Noise and labels                                #
#################################################################################


def sample_inputs(indices: list[int], shape: tuple[int, int, int], num_classes: int, seed: int,
                  classes: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (len, C, H, W) and labels (len,) of the given sample indices, on the CPU.

    Index ``i`` draws from its own generator seeded by ``(seed, i)``: independent of batching.
    """
    noise, labels = [], []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        noise.append(torch.randn(shape, generator=g))
        if classes is None:
            labels.append(int(torch.randint(num_classes, (1,), generator=g)))
        else:
            labels.append(classes[i % len(classes)])
    return torch.stack(noise), torch.tensor(labels, dtype=torch.long)


#################################################################################
#                                    Runner                                     #
#################################################################################


class Runner:
    """Model, sampler and decoder, set up once; ``run(indices)`` -> uint8 NHWC pictures."""

    def __init__(self, cfg: dict, device: torch.device, verbose: bool = True):
        from pf import samplers
        from pf.models.checkpoint import model_from_checkpoint_dict, read_checkpoint_file
        from pf.sampling.grid import LATENT_SCALE, Decoder, class_names, training_autoencoder

        self.cfg, self.device, self.verbose = cfg, device, verbose
        ckpt = read_checkpoint_file(cfg["ckpt"])
        model = model_from_checkpoint_dict(ckpt, source=str(cfg["ckpt"])).to(device).eval()
        train_config = ckpt.get("train_config")
        del ckpt
        self.base = model
        self.shape = (model.in_channels, model.input_size, model.input_size)
        self.text = self._text_part(train_config, device) if model.cond_kind == "text" else None
        if self.text is None:
            if cfg["prompt_list"] is not None:
                raise UsageError("prompt= and prompts= are for text-to-image checkpoints; this model takes classes=")
            # one more name for the null class (label num_classes)
            self.class_names = class_names(train_config, model.num_classes) + ["(no class)"]
            for c in cfg["classes"] or []:
                if not 0 <= c <= model.num_classes:
                    raise UsageError(f"class {c} is outside [0, {model.num_classes}] of this model")
        name = str(cfg["sampler"]).lower().replace("-", "_")
        params = {"dual_loop": {"p": cfg["p"], "n_inner": cfg["n_inner"]},
                  "look_ahead": {"p": cfg["p"], "context_t_ratio": cfg["ratio"]}}.get(name, {})
        try:
            self.sampler = samplers.make(name, **params)
        except ValueError as err:
            raise UsageError(str(err)) from err
        if name == "euler" and getattr(model, "per_token", True):
            raise UsageError("sampler=euler is for global-time (SiT) models; use euler_pf, dual_loop or look_ahead")
        if name != "euler" and not getattr(model, "per_token", True):
            raise UsageError(f"this is a global-time model: use sampler=euler, not {name}")
        if self.sampler.needs_uncertainty and not model.predict_uncertainty:
            raise UsageError(f"sampler={name} needs a model with a difficulty head (predict_uncertainty)")
        vae, scale = training_autoencoder(train_config)  # the manifest's, unless vae= is given
        vae = cfg["vae"] or vae
        scale = cfg["vae_scale"] or scale or LATENT_SCALE
        self.decoder = Decoder(model.in_channels, vae, device=device, scale=scale)
        if self.text is not None and cfg["graphs"]:
            raise UsageError("graphs=true is not available for text-to-image models yet (compile=true is)")
        if (cfg["graphs"] or cfg["compile"] or cfg["precision"] != "fp32") and device.type != "cuda":
            raise UsageError("graphs=true, compile=true and precision=bf16/fp16 need a CUDA device; this run is on the CPU")
        self.model = model
        if cfg["compile"]:
            from pf.sampling.graphs import compile_model

            try:
                self.model = compile_model(model, cfg["compile_mode"], graphs=cfg["graphs"])
            except ValueError as err:
                raise UsageError(str(err)) from err
        self.graphs: dict = {}
        self.nfe, self.guided_nfe = 0, 0

    def _text_part(self, train_config: dict | None, device: torch.device):
        """The text encoder the checkpoint was trained with (``text_path`` overrides its folder)."""
        from pf.text import encoder_from_config
        from pf.training.conditioning import TextConditioning

        if self.cfg["classes"] is not None:
            raise UsageError("classes= is for class-conditional checkpoints; a text model takes prompt= or prompts=")
        if self.cfg["prompt_list"] is None:
            raise UsageError("a text-to-image checkpoint samples prompts: give prompt=\"...\" or prompts=FILE")
        text = dict(((train_config or {}).get("text") or {}))
        if not text:
            raise UsageError(f"{self.cfg['ckpt']} does not say which text encoder it was trained with (no 'text' "
                             f"in its training config)")
        encoder = encoder_from_config(text, device, path=self.cfg["text_path"])
        if encoder.dim != self.base.text_dim:
            raise UsageError(f"the text encoder gives {encoder.dim}-wide tokens; the model was trained on "
                             f"{self.base.text_dim}-wide ones")
        return TextConditioning(encoder, dropout=0.0)

    def conditions(self, indices: list[int], labels: torch.Tensor):
        """The model's conditions of these samples: their prompts' encoding (text) or the labels."""
        if self.text is None:
            return labels.to(self.device)
        prompts = self.cfg["prompt_list"]
        return self.text.fixed([prompts[i % len(prompts)] for i in indices], self.device)

    def names(self, indices: list[int]) -> list[str]:
        """What each sample shows: its prompt, or its class name."""
        if self.text is not None:
            prompts = self.cfg["prompt_list"]
            return [prompts[i % len(prompts)] for i in indices]
        _, labels = sample_inputs(indices, self.shape, self.base.num_classes, self.cfg["seed"], self.cfg["classes"])
        return [self.class_names[int(c)] for c in labels]

    def autocast(self):
        import contextlib

        if self.cfg["precision"] == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg["precision"] == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def sample(self, x: torch.Tensor, y) -> torch.Tensor:
        """Latents/pixels (B, C, H, W) for noise x and conditions y (already on the device)."""
        cfg = self.cfg
        with self.autocast():
            if cfg["graphs"]:
                from pf.sampling.graphs import GraphedSampler

                b = cfg["batch"]
                if b not in self.graphs:
                    self.graphs[b] = GraphedSampler(self.sampler, self.model, (b, *self.shape), cfg["steps"],
                                                    cfg_scale=cfg["cfg"], device=self.device,
                                                    guidance_interval=cfg["guidance_interval"])
                k = x.shape[0]  # pad a short last batch: one graph per batch size
                pad = torch.cat([x, x[-1:].expand(b - k, *x.shape[1:])]) if k < b else x
                ypad = torch.cat([y, y[-1:].expand(b - k)]) if k < b else y
                out = self.graphs[b](pad, ypad)[:k]
                self.nfe, self.guided_nfe = self.graphs[b].nfe, self.graphs[b].guided_nfe
                return out
            import contextlib

            # A compiled model keeps the deduplicated conditioning only with a static table width.
            static = self.base.sync_free(self.sampler.max_distinct_times) if cfg["compile"] else contextlib.nullcontext()
            with static:
                out = self.sampler(self.model, x, cfg["steps"], y=y, cfg_scale=cfg["cfg"],
                                   guidance_interval=cfg["guidance_interval"], uc_cond=self.null(),
                                   progress=cfg["progress"] and self.verbose)
            self.nfe, self.guided_nfe = self.sampler.nfe, self.sampler.guided_nfe
            return out

    def null(self):
        """The unconditional condition of guidance: the empty prompt's encoding (text), else the null class."""
        return self.text.null(self.device) if self.text is not None else None

    def run(self, indices: list[int], bar=None) -> np.ndarray:
        from pf.sampling.grid import to_uint8

        pictures = []
        for start in range(0, len(indices), self.cfg["batch"]):
            chunk = indices[start : start + self.cfg["batch"]]
            x, y = sample_inputs(chunk, self.shape, self.base.num_classes or 1, self.cfg["seed"], self.cfg["classes"])
            z = self.sample(x.to(self.device), self.conditions(chunk, y))
            pictures.append(to_uint8(self.decoder(z)))
            if bar is not None:
                bar.update(len(chunk))
        return np.concatenate(pictures) if pictures else np.zeros((0, 0, 0, 3), np.uint8)


#################################################################################
#                                   Outputs                                     #
#################################################################################


def _tag(cfg: dict) -> str:
    return f"{cfg['sampler']}-steps{cfg['steps']}-cfg{cfg['cfg']:g}-seed{cfg['seed']}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nfe_note(runner: Runner) -> str:
    """How many of the model calls ran the doubled (guided) batch."""
    if runner.guided_nfe == 0:
        return "unguided"
    if runner.guided_nfe == runner.nfe:
        return "guided, doubled batch"
    return f"{runner.guided_nfe} guided on a doubled batch, {runner.nfe - runner.guided_nfe} unguided"


def caption(cfg: dict) -> str:
    gi = cfg.get("guidance_interval")
    interval = f" on [{gi[0]:g}, {gi[1]:g}]" if gi else ""
    return f"{cfg['sampler']}, {cfg['steps']} steps, cfg {cfg['cfg']:g}{interval}, seed {cfg['seed']}"


def write_grid(runner: Runner, cfg: dict) -> Path:
    from tqdm.auto import tqdm

    from pf.sampling.grid import save_png, tile_grid

    indices = list(range(cfg["n"]))
    with tqdm(total=cfg["n"], desc="images", disable=not cfg["progress"]) as bar:
        t0 = time.perf_counter()
        pictures = runner.run(indices, bar)
        _sync(runner.device)
        seconds = time.perf_counter() - t0
    names = runner.names(indices)
    ncol = min(len(indices), 10 if len(indices) >= 10 else len(indices))
    path = save_png(tile_grid(pictures, ncol, labels=names, caption=caption(cfg)), Path(cfg["out"]) / f"{_tag(cfg)}.png")
    print(f"NFE {runner.nfe} per sample ({nfe_note(runner)}); "
          f"{cfg['n'] / seconds:.3f} images/s ({cfg['n']} in {seconds:.1f}s on {runner.device})")
    print(f"wrote {path}")
    return path


def write_viz(runner: Runner, cfg: dict) -> Path:
    from pf.sampling.grid import save_png
    from pf.sampling.viz import StepRecorder, viz_strip

    x, y = sample_inputs([0], runner.shape, runner.base.num_classes or 1, cfg["seed"], cfg["classes"])
    recorder = StepRecorder(runner.base, batch=1)
    with runner.autocast():
        runner.sampler(recorder, x.to(runner.device), cfg["steps"], y=runner.conditions([0], y),
                       cfg_scale=cfg["cfg"], guidance_interval=cfg["guidance_interval"], uc_cond=runner.null())
    strip = viz_strip(recorder.frames, runner.decoder, runner.base.patch_size, max_cols=cfg["viz_cols"],
                      caption=f"{runner.names([0])[0]}: {caption(cfg)}")
    path = save_png(strip, Path(cfg["out"]) / f"{_tag(cfg)}-viz.png")
    print(f"wrote {path} (rows: image, difficulty exp(logvar), patch times; {len(recorder.frames)} model calls)")
    return path


def write_fid_dump(runner: Runner, cfg: dict, rank: int, world: int) -> Path | None:
    """Each rank samples indices ``rank::world`` into a part file; rank 0 checks that the
    parts cover every index once and writes ``arr_0`` (num, H, W, 3) uint8 in index order."""
    from tqdm.auto import tqdm

    out = Path(cfg["out"])
    parts = out / f".parts-{_tag(cfg)}-{cfg['num']}"
    parts.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, cfg["num"], world))
    with tqdm(total=len(mine), desc=f"rank {rank}", disable=not cfg["progress"] or rank != 0) as bar:
        t0 = time.perf_counter()
        pictures = runner.run(mine, bar)
        _sync(runner.device)
        seconds = time.perf_counter() - t0
    np.savez(parts / f"rank{rank:05d}.npz", images=pictures, indices=np.asarray(mine, dtype=np.int64))
    if rank == 0:
        print(f"NFE {runner.nfe} per sample; {len(mine) / max(seconds, 1e-9):.3f} images/s per process "
              f"({world} process{'es' if world > 1 else ''})")
    _barrier(world)
    if rank != 0:
        return None
    images, seen = None, np.zeros(cfg["num"], dtype=np.int64)
    for r in range(world):
        with np.load(parts / f"rank{r:05d}.npz") as part:
            idx, imgs = part["indices"], part["images"]
            if images is None:
                images = np.zeros((cfg["num"], *imgs.shape[1:]), dtype=np.uint8)
            np.add.at(seen, idx, 1)
            images[idx] = imgs
    if not (seen == 1).all():
        raise RuntimeError(f"the parts do not cover every index once: {int((seen == 0).sum())} missing, "
                           f"{int((seen > 1).sum())} repeated")
    path = out / f"{_tag(cfg)}-{cfg['num']}.npz"
    np.savez(path, arr_0=images)
    for r in range(world):
        (parts / f"rank{r:05d}.npz").unlink()
    parts.rmdir()
    print(f"wrote {path} (arr_0 {images.shape} uint8, NHWC)")
    return path


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


#################################################################################
#                                     Main                                      #
#################################################################################


def _device(cfg: dict, local_rank: int) -> torch.device:
    name = cfg["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device={name} but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("help", "-h", "--help") for a in argv):
        print(__doc__ + "\n" + USAGE)
        return 0
    from pf.errors import debug, expected_errors, one_line

    try:
        cfg = parse_args(argv)
    except UsageError as err:
        if debug():
            raise
        print(one_line(err), file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not cfg["fid"]:
        print("error: several processes only make sense with fid=true (a grid is one process's work)", file=sys.stderr)
        return 2
    try:
        device = _device(cfg, local_rank)
        if world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        try:
            runner = Runner(cfg, device, verbose=rank == 0)
            if cfg["fid"]:
                write_fid_dump(runner, cfg, rank, world)
            else:
                write_grid(runner, cfg)
            if cfg["viz"] and rank == 0:
                write_viz(runner, cfg)
        finally:
            if world > 1:
                import torch.distributed as dist

                dist.destroy_process_group()
    except expected_errors() as err:
        if debug():
            raise
        print(one_line(err), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
