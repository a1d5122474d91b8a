"""Sample from a checkpoint: a PNG grid, an FID dump, or a picture of adaptive sampling.

    python -m pf.sample ckpt=model.ckpt sampler=look_ahead steps=100 cfg=4.0 \\
        classes=[207,360,387,974] n=16 seed=0 out=samples/ [vae=sd-vae-ft-ema/]
    torchrun --nproc_per_node=8 -m pf.sample ckpt=... sampler=look_ahead cfg=1.0 \\
        fid=true num=50000 out=fid/ vae=...        # ADM evaluator .npz (arr_0, uint8, NHWC)
    python -m pf.sample ckpt=... viz=true ...      # also a strip over the sampling steps
    python -m pf.sample ckpt=t2i.pt prompt="a handwritten seven" n=10   # a text-to-image model
    python -m pf.sample ckpt=t2i.pt prompts=prompts.txt n=30            # one prompt a line, cycled
    python -m pf.sample ckpt=... inpaint=item.png mask_box=[8,0,16,16]  # complete a picture (pf.inpaint):
        # mask=MASK.png (white = generate) | mask_box=[x0,y0,x1,y1] | outpaint=left:8; n completions

Arguments are ``key=value`` (values read as YAML: ``true``, ``4.0``, ``[1,2]``); run with
``help`` for the list. Sample ``i`` (of the grid or the dump) always gets the same noise and
label, from ``seed`` and ``i`` alone: the result does not depend on the batch size or the
number of processes, and under ``torchrun`` rank ``r`` samples indices ``r, r+W, ...``.

A text-to-image checkpoint samples prompts (``prompt=`` or ``prompts=FILE``, cycled over the
samples), encoded by the text encoder it was trained with (its ``text`` config; ``text_path=``
where the encoder's folder is elsewhere now); guidance compares against the empty prompt.

This module reads the command line and writes the files; loading and drawing are
``pf.pipeline``'s (with ``pf.pipeline.indexed_inputs`` for the noise of each index).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from pf import cli, conditioning
from pf.autoencoder import to_uint8
from pf.cli import UsageError
from pf.data.names import class_names
from pf.errors import debug, is_expected, one_line
from pf.models.checkpoint import check_writable
from pf.inpaint import LatentEncoder, box_mask, inpaint, load_mask, load_picture, outpaint
from pf.pipeline import Pipeline, indexed_inputs, load_model
from pf.sampling.grid import rgb_nhwc, save_png, tile_grid
from pf.sampling.viz import StepRecorder, viz_strip

DEFAULTS = {
    "ckpt": None,  # released PFT file or one of this project's checkpoints (required)
    "sampler": "look_ahead",  # euler_pf | dual_loop | look_ahead (euler, heun or sde for global-time models)
    "steps": 100,  # outer steps (sde: grid points M, one model call each)
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
    "inpaint": None,  # a picture to complete (pf.inpaint); with one of mask / mask_box / outpaint
    "mask": None,  # inpaint: a mask picture, white = generate
    "mask_box": None,  # inpaint: [x0,y0,x1,y1] in pixels, the box to generate
    "outpaint": None,  # inpaint: side:pixels (left:8): move the picture over, generate the new strip
}

TEXT_KEYS = ("prompt", "prompts", "text_path", "inpaint", "mask", "outpaint")  # read as typed, not as YAML


def _show(value) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


USAGE = "usage: python -m pf.sample ckpt=PATH [key=value ...]\nkeys (default):\n" + "\n".join(
    f"  {k}={_show(v)}" for k, v in DEFAULTS.items()
)


#################################################################################
#                                  Arguments                                    #
#################################################################################


def parse_args(argv: list[str]) -> dict:
    """``key=value`` pairs over DEFAULTS, read by the one parser of every entry point
    (:func:`pf.cli.parse`: unknown keys and values of the wrong type are errors; prompts and paths
    as typed), then checked by :func:`validate`."""
    return validate(OmegaConf.to_container(cli.parse(DEFAULTS, argv, verbatim=TEXT_KEYS)))


def validate(cfg: dict) -> dict:
    if not cfg["ckpt"]:
        raise UsageError(f"ckpt=PATH is required\n{USAGE}")
    cfg["ckpt"], cfg["out"] = str(cfg["ckpt"]), str(cfg["out"])
    check_inpaint_keys(cfg)
    if cfg["cfg"] is None:
        unlabelled_inpaint = cfg["inpaint"] is not None and cfg["classes"] is None and cfg["prompt"] is None \
            and cfg["prompts"] is None
        cfg["cfg"] = 1.0 if cfg["fid"] is True or unlabelled_inpaint else 4.0
    for key in ("steps", "n", "seed", "batch", "num", "n_inner", "viz_cols"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < (0 if key == "seed" else 1):
            raise UsageError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg["vae_scale"] is None:
        cfg["vae_scale"] = 0.0  # resolved from the checkpoint's manifest (or 0.18215) by the pipeline
    for key in ("cfg", "p", "ratio", "vae_scale"):
        if not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or not math.isfinite(cfg[key]):
            raise UsageError(f"{key} must be a finite number, got {cfg[key]!r}")
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


def check_inpaint_keys(cfg: dict) -> None:
    """``inpaint=PICTURE`` goes with exactly one of mask / mask_box / outpaint, and not with fid."""
    given = [k for k in ("mask", "mask_box", "outpaint") if cfg[k] is not None]
    if cfg["inpaint"] is None:
        if given:
            raise UsageError(f"{given[0]}= describes what to generate in a picture: give inpaint=PICTURE with it")
        return
    if len(given) != 1:
        raise UsageError("inpaint=PICTURE needs one of mask=MASK.png (white = generate), mask_box=[x0,y0,x1,y1] "
                         f"or outpaint=side:pixels; got {', '.join(given) or 'none'}")
    if cfg["fid"] is True or cfg["graphs"] is True:
        raise UsageError("inpaint= draws a grid of completions: not with fid=true or graphs=true")
    cfg["inpaint"] = str(cfg["inpaint"])


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
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise UsageError(f"prompts={path} is not a UTF-8 text file (byte {err.start} cannot be read): give a text "
                         f"file with one prompt a line") from None
    prompts = [ln for ln in lines if ln]
    if not prompts:
        raise UsageError(f"prompts={path}: the file holds no prompt (one a line)")
    return prompts


#################################################################################
#                                   Pipeline                                    #
#################################################################################


def build_pipeline(cfg: dict, device: torch.device) -> Pipeline:
    """The checkpoint's pipeline (``pf.pipeline``) with this command's sampler and options,
    after the checks of what this command line asks of the model."""
    model, train_config = load_model(cfg["ckpt"], device=device)
    if model.cond_kind == "text":
        if cfg["classes"] is not None:
            raise UsageError("classes= is for class-conditional checkpoints; a text model takes prompt= or prompts=")
        if cfg["prompt_list"] is None:
            raise UsageError("a text-to-image checkpoint samples prompts: give prompt=\"...\" or prompts=FILE")
    else:
        if cfg["prompt_list"] is not None:
            raise UsageError("prompt= and prompts= are for text-to-image checkpoints; this model takes classes=")
        for c in cfg["classes"] or []:
            if not 0 <= c <= model.num_classes:
                raise UsageError(f"class {c} is outside [0, {model.num_classes}] of this model")
    name = str(cfg["sampler"]).lower().replace("-", "_")
    params = {"dual_loop": {"p": cfg["p"], "n_inner": cfg["n_inner"]},
              "look_ahead": {"p": cfg["p"], "context_t_ratio": cfg["ratio"]}}.get(name, {})
    pipe = Pipeline.for_model(model, name, train_config, sampler_params=params, device=device, vae=cfg["vae"],
                              vae_scale=cfg["vae_scale"] or None, text_path=cfg["text_path"], source=cfg["ckpt"],
                              precision=cfg["precision"])
    if pipe.text is not None and cfg["graphs"]:
        raise UsageError("graphs=true is not available for text-to-image models yet (compile=true is)")
    if (cfg["graphs"] or cfg["compile"] or cfg["precision"] != "fp32") and device.type != "cuda":
        raise UsageError("graphs=true, compile=true and precision=bf16/fp16 need a CUDA device; this run is on the CPU")
    if cfg["compile"]:
        try:
            pipe.compile(cfg["compile_mode"], graphs=cfg["graphs"])
        except ValueError as err:
            raise UsageError(str(err)) from err
    if cfg["graphs"]:
        pipe.use_graphs()
    return pipe


def inputs_of(pipe: Pipeline, cfg: dict, indices: list[int]) -> tuple[torch.Tensor, object]:
    """Noise and conditions of these sample indices: ``indexed_inputs`` (the noise of index
    ``i`` depends on ``seed`` and ``i`` alone), and the prompts (cycled) of a text model."""
    noise, labels = indexed_inputs(indices, pipe.shape, pipe.base.num_classes or 1, cfg["seed"], cfg["classes"])
    if pipe.text is None:
        return noise, pipe.conditions(labels)
    prompts = cfg["prompt_list"]
    return noise, pipe.conditions([prompts[i % len(prompts)] for i in indices])


def names(pipe: Pipeline, cfg: dict, indices: list[int]) -> list[str]:
    """What each sample shows: its prompt, or its class name."""
    if pipe.text is not None:
        prompts = cfg["prompt_list"]
        return [prompts[i % len(prompts)] for i in indices]
    _, labels = indexed_inputs(indices, pipe.shape, pipe.base.num_classes, cfg["seed"], cfg["classes"])
    known = class_names(pipe.train_config, pipe.base.num_classes) + ["(no class)"]  # the null class too
    return [known[int(c)] for c in labels]


def draw(pipe: Pipeline, cfg: dict, indices: list[int], bar=None) -> np.ndarray:
    """The pictures of these sample indices: (len, H, W, 3) uint8."""
    images, _ = pipe.draw(len(indices), lambda rows: inputs_of(pipe, cfg, indices[rows]), cfg["steps"],
                          cfg_scale=cfg["cfg"], guidance_interval=cfg["guidance_interval"], batch_size=cfg["batch"],
                          progress=cfg["progress"], on_batch=None if bar is None else bar.update)
    return rgb_nhwc(images)


#################################################################################
#                                   Outputs                                     #
#################################################################################


def _tag(cfg: dict) -> str:
    return f"{cfg['sampler']}-steps{cfg['steps']}-cfg{cfg['cfg']:g}-seed{cfg['seed']}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nfe_note(pipe: Pipeline) -> str:
    """How many of the model calls ran the doubled (guided) batch."""
    if pipe.guided_nfe == 0:
        return "unguided"
    if pipe.guided_nfe == pipe.nfe:
        return "guided, doubled batch"
    return f"{pipe.guided_nfe} guided on a doubled batch, {pipe.nfe - pipe.guided_nfe} unguided"


def caption(cfg: dict) -> str:
    gi = cfg.get("guidance_interval")
    interval = f" on [{gi[0]:g}, {gi[1]:g}]" if gi else ""
    return f"{cfg['sampler']}, {cfg['steps']} steps, cfg {cfg['cfg']:g}{interval}, seed {cfg['seed']}"


def write_grid(pipe: Pipeline, cfg: dict) -> Path:
    indices = list(range(cfg["n"]))
    with tqdm(total=cfg["n"], desc="images", disable=not cfg["progress"]) as bar:
        t0 = time.perf_counter()
        pictures = draw(pipe, cfg, indices, bar)
        _sync(pipe.device)
        seconds = time.perf_counter() - t0
    ncol = min(len(indices), 10 if len(indices) >= 10 else len(indices))
    grid = tile_grid(pictures, ncol, labels=names(pipe, cfg, indices), caption=caption(cfg))
    path = save_png(grid, Path(cfg["out"]) / f"{_tag(cfg)}.png")
    print(f"NFE {pipe.nfe} per sample ({nfe_note(pipe)}); "
          f"{cfg['n'] / seconds:.3f} images/s ({cfg['n']} in {seconds:.1f}s on {pipe.device})")
    print(f"wrote {path}")
    return path


def write_viz(pipe: Pipeline, cfg: dict) -> Path:
    """The strip of sample 0 over the sampler's model calls: its sampler run by hand, with a
    recorder standing in for the model."""
    x, y = inputs_of(pipe, cfg, [0])
    recorder = StepRecorder(pipe.base, batch=1)
    with pipe.autocast():
        pipe.sampler(recorder, x.to(pipe.device), cfg["steps"], y=y, cfg_scale=cfg["cfg"],
                     guidance_interval=cfg["guidance_interval"], uc_cond=pipe.null())
    strip = viz_strip(recorder.frames, pipe.decode, pipe.base.patch_size, max_cols=cfg["viz_cols"],
                      caption=f"{names(pipe, cfg, [0])[0]}: {caption(cfg)}")
    path = save_png(strip, Path(cfg["out"]) / f"{_tag(cfg)}-viz.png")
    print(f"wrote {path} (rows: image, difficulty exp(logvar), patch times; {len(recorder.frames)} model calls)")
    return path


def inpaint_inputs(pipe: Pipeline, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The picture to complete (1, C, H, W) in [-1, 1] (moved over for ``outpaint``), its
    generate-mask (1, 1, H, W) and the encode/decode pair of a latent model."""
    latent = pipe.decode is not None and pipe.decode.latent
    factor = 2 ** (len(pipe.decode.vae.config.block_out_channels) - 1) if latent else 1
    size, channels = pipe.base.input_size * factor, 3 if latent else pipe.base.in_channels
    image = load_picture(cfg["inpaint"], channels, size)
    if cfg["outpaint"] is not None:
        image, mask = outpaint(image, cfg["outpaint"])
    elif cfg["mask_box"] is not None:
        mask = box_mask(size, cfg["mask_box"])
    else:
        mask = load_mask(cfg["mask"], size)
    coders = {"encode": LatentEncoder(pipe.decode.vae, pipe.decode.scale), "decode": pipe.decode} if latent else {}
    return image, mask, coders


def write_inpaint(pipe: Pipeline, cfg: dict) -> Path:
    """``n`` completions of the picture (sample ``i``'s noise from ``seed`` and ``i``; classes
    cycled, default the null class), in a grid after the input and its masked form; with
    ``viz=true`` also the strip of completion 0 (the patch-times row shows the kept patches at 1)."""
    image, mask, coders = inpaint_inputs(pipe, cfg)
    indices = list(range(cfg["n"]))
    noise, cond = inputs_of(pipe, cfg, indices)
    if pipe.text is None and cfg["classes"] is None:
        cond = torch.full_like(cond, pipe.base.num_classes)  # no class given: the null class
    with pipe.autocast():  # as it was encoded inside each batch's autocast
        uc_cond = pipe.null()  # a text model's empty prompt, encoded once rather than per batch
    done, t0 = [], time.perf_counter()
    for start in tqdm(range(0, len(indices), cfg["batch"]), desc="batches", disable=not cfg["progress"]):
        rows = slice(start, min(start + cfg["batch"], len(indices)))
        b = rows.stop - rows.start
        with pipe.autocast():
            out = inpaint(pipe.model, image.expand(b, -1, -1, -1), mask, pipe.sampler, steps=cfg["steps"],
                          y=conditioning.to(conditioning.rows(cond, rows), pipe.device), cfg_scale=cfg["cfg"],
                          guidance_interval=cfg["guidance_interval"], uc_cond=uc_cond, noise=noise[rows],
                          progress=cfg["progress"], **coders)
        done.append(to_uint8(out.images))
    seconds = time.perf_counter() - t0
    masked = torch.where(out.kept_pixels[:1].cpu(), image, torch.zeros_like(image))  # generated region grey
    tiles = rgb_nhwc(torch.cat([to_uint8(image), to_uint8(masked), *done]))
    labels = ["input", "kept"] + [f"seed {cfg['seed']}/{i}" for i in indices]
    grid = tile_grid(tiles, min(len(tiles), 10), labels=labels,
                     caption=f"inpainting ({out.keep[0].sum().item()} of {out.keep.shape[1]} patches kept): {caption(cfg)}")
    path = save_png(grid, Path(cfg["out"]) / f"inpaint-{_tag(cfg)}.png")
    print(f"NFE {out.nfe} per completion; {cfg['n']} completions in {seconds:.1f}s on {pipe.device}")
    print(f"wrote {path} (first tiles: the input and its kept patches; grey = generated region)")
    if cfg["viz"]:
        recorder = StepRecorder(pipe.base, batch=1)
        with pipe.autocast():
            inpaint(recorder, image, mask, pipe.sampler, steps=cfg["steps"], y=conditioning.to(
                conditioning.rows(cond, slice(0, 1)), pipe.device), cfg_scale=cfg["cfg"],
                guidance_interval=cfg["guidance_interval"], uc_cond=uc_cond, noise=noise[:1], **coders)
        strip = viz_strip(recorder.frames, pipe.decode, pipe.base.patch_size, max_cols=cfg["viz_cols"],
                          caption=f"inpainting: {caption(cfg)} (patch t: kept patches stay white, t = 1)")
        viz = save_png(strip, Path(cfg["out"]) / f"inpaint-{_tag(cfg)}-viz.png")
        print(f"wrote {viz} (rows: image, difficulty, patch times; {len(recorder.frames)} model calls)")
    return path


def write_fid_dump(pipe: Pipeline, cfg: dict, rank: int, world: int) -> Path | None:
    """Each rank samples indices ``rank::world`` into a part file; rank 0 checks that the
    parts cover every index once and writes ``arr_0`` (num, H, W, 3) uint8 in index order."""
    out = Path(cfg["out"])
    parts = out / f".parts-{_tag(cfg)}-{cfg['num']}"
    parts.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, cfg["num"], world))
    with tqdm(total=len(mine), desc=f"rank {rank}", disable=not cfg["progress"]) as bar:
        t0 = time.perf_counter()
        pictures = draw(pipe, cfg, mine, bar)
        _sync(pipe.device)
        seconds = time.perf_counter() - t0
    np.savez(parts / f"rank{rank:05d}.npz", images=pictures, indices=np.asarray(mine, dtype=np.int64))
    if rank == 0:
        print(f"NFE {pipe.nfe} per sample; {len(mine) / max(seconds, 1e-9):.3f} images/s per process "
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
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        cfg["progress"] = cfg["progress"] and rank == 0  # one set of progress bars
        try:
            check_writable(cfg["out"])  # before the model is drawn from: a read-only folder or a file in the way
            pipe = build_pipeline(cfg, device)
            if cfg["inpaint"] is not None:
                write_inpaint(pipe, cfg)
            elif cfg["fid"]:
                write_fid_dump(pipe, cfg, rank, world)
            else:
                write_grid(pipe, cfg)
            if cfg["viz"] and rank == 0 and cfg["inpaint"] is None:
                write_viz(pipe, cfg)
        finally:
            if world > 1:
                dist.destroy_process_group()
    except Exception as err:
        if debug() or not is_expected(err):
            raise
        print(one_line(err), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
