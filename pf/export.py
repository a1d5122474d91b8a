"""Export a checkpoint's EMA weights for sharing.

    python -m pf.export runs/default/checkpoints/last.pt                      # released format
    python -m pf.export last.pt --format safetensors --out pf-tiny.safetensors

``released`` writes SPEC section 2's file, ``{"state_dict", "config": {"target", "params"}}``,
as the published PFT checkpoints are; ``safetensors`` writes the weights with the model
config as JSON metadata. ``pf.models.load_checkpoint`` reads both. The output never replaces
the input, nor an existing file without ``--overwrite``, and is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from pf import cli
from pf.errors import run_command
from pf.models.checkpoint import RELEASED_TARGETS, read_checkpoint_file, model_from_checkpoint_dict, save_checkpoint, save_safetensors

# Constructor arguments the released config names (SPEC section 2), plus mlp_ratio when it
# is not the default 4 (the released loader passes params straight to the constructor).
RELEASED_PARAMS = ("in_channels", "input_size", "depth", "hidden_size", "patch_size", "num_heads", "num_classes",
                   "predict_uncertainty")
REPA_PARAMS = ("z_dim", "encoder_depth", "projector_dim")  # the released REPA config's three more (SPEC section 9)


def released_checkpoint(model) -> dict:
    config = model.config()
    if getattr(model, "cond_kind", "class") == "text":
        params = dict(config)  # no T2I file was released: every constructor argument, our class as the target
    else:
        params = {k: config[k] for k in (*RELEASED_PARAMS, *REPA_PARAMS) if k in config}
        params["compile"] = False
        if config["mlp_ratio"] != 4.0:
            params["mlp_ratio"] = config["mlp_ratio"]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"state_dict": state, "config": {"target": RELEASED_TARGETS[type(model).__name__], "params": params}}


def check_out(src: Path, out: Path, overwrite: bool) -> None:
    """The export never replaces its input (a training checkpoint's optimizer, EMA and RNG state
    would be lost to the EMA-only file), nor another existing file unless ``overwrite``."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name the file to write (e.g. {out / 'model.ckpt'})")
    if out.exists() and src.exists() and os.path.samefile(out, src):  # the same path, or a hard link to it
        raise ValueError(f"--out {out} is the checkpoint being exported: name another file")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists: name another file, or add --overwrite to replace it")


def export(src: str | Path, out: str | Path | None = None, fmt: str = "released", use_ema: bool = True,
           overwrite: bool = False) -> Path:
    """Write ``src``'s (EMA) weights to ``out`` (atomically: the whole file or none); returns the path written."""
    if fmt not in ("released", "safetensors"):
        raise ValueError(f"--format must be 'released' or 'safetensors', got {fmt!r}")
    src = Path(src)
    if out is None:
        out = src.with_name(src.stem + ("_ema" if use_ema else "") + (".ckpt" if fmt == "released" else ".safetensors"))
    out = Path(out)
    check_out(src, out, overwrite)
    model = model_from_checkpoint_dict(read_checkpoint_file(src), use_ema=use_ema, source=str(src))
    if fmt == "released":
        save_checkpoint(released_checkpoint(model), out)
    else:
        save_safetensors(model, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m pf.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training checkpoint (or any file load_checkpoint reads)")
    parser.add_argument("--format", default="released", choices=["released", "safetensors"])
    parser.add_argument("--out", default=None, help="output file (default: next to the input)")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file (never the input)")
    def run() -> None:
        args = parser.parse_args(argv)
        out = export(args.checkpoint, args.out, args.format, use_ema=not args.no_ema, overwrite=args.overwrite)
        print(f"wrote {out}")

    return run_command(run)


if __name__ == "__main__":
    raise SystemExit(main())
