"""The first stage: the autoencoder between pictures and the latents a model works on, and
the one value range of pictures.

A picture is a float tensor in [-1, 1] (the data sets give that, the decoder returns that);
``to_uint8`` quantises it to 0..255 and ``from_uint8`` goes back. Latent models were trained
on SD-VAE latents multiplied by a scale factor (``LATENT_SCALE`` unless the latent set's
manifest says otherwise); ``Decoder`` divides by it and decodes with a local diffusers
``AutoencoderKL`` (``load_vae``, never a download). Pixel models pass through.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pf.data.latent_shards import is_latent_set, read_manifest

LATENT_SCALE = 0.18215  # SD-VAE latents are stored multiplied by this (SPEC.md section 2)


class AutoencoderError(ValueError):
    """The autoencoder cannot be loaded, or a model's output cannot be decoded with what was given."""


#################################################################################
#                        Pictures: [-1, 1] floats <-> uint8                     #
#################################################################################


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Pictures in [-1, 1] (any shape, float dtype and device; values outside are clamped)
    -> uint8 in [0, 255], same shape, on the CPU: ``round((x + 1) * 127.5)`` computed in
    float32, ties to even (``torch.round``)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [-1, 1] (the inverse of :func:`to_uint8` up to its rounding)."""
    return images.float() / 127.5 - 1.0


#################################################################################
#                                The autoencoder                                #
#################################################################################


def load_vae(path: str | os.PathLike, device="cpu"):
    """A diffusers ``AutoencoderKL`` from a local folder or single file (never downloads), in eval mode."""
    path = Path(path)
    if not path.exists():
        raise AutoencoderError(f"vae not found: {path} (a local diffusers AutoencoderKL folder or file)")
    try:
        # diffusers is optional (only latent models need it): imported where it is used.
        from diffusers import AutoencoderKL  # type: ignore
    except ImportError as err:
        raise AutoencoderError(
            f"decoding latents with vae={path} needs the 'diffusers' package, which is not installed: "
            "pip install diffusers"
        ) from err
    try:
        if path.is_dir():
            vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        else:
            vae = AutoencoderKL.from_single_file(str(path), local_files_only=True)
    except Exception as err:
        raise AutoencoderError(f"could not load a diffusers AutoencoderKL from {path}: {err}") from err
    return vae.to(device).eval()


def training_autoencoder(train_config: dict | None) -> tuple[str | None, float | None]:
    """(autoencoder path, scale factor) named by the manifest of a checkpoint's latent training
    data; (None, None) when the run trained on pixels or its latent set is not here."""
    data = (train_config or {}).get("data", {}) or {}
    if data.get("name") == "latents" and is_latent_set(data.get("path")):
        manifest = read_manifest(Path(data["path"]).expanduser())
        scale = data.get("scale_factor") or manifest["scale_factor"]
        return manifest["autoencoder"]["path"], float(scale)
    return None, None


class Decoder:
    """A model's samples (B, C, H, W) -> pictures in [-1, 1] (B, 3 or 1, H', W').

    Pixel models (1 or 3 channels) pass through, clamped. Latent models need ``vae``: a local
    diffusers ``AutoencoderKL`` folder (``from_pretrained``) or single file
    (``from_single_file``); the latents are divided by ``scale`` and decoded ``chunk`` at a time.
    """

    def __init__(self, in_channels: int, vae: str | os.PathLike | None = None, *, device="cpu",
                 scale: float = LATENT_SCALE, chunk: int = 16):
        self.in_channels, self.scale, self.chunk, self.vae = in_channels, float(scale), int(chunk), None
        if vae is None:
            if in_channels not in (1, 3):
                raise AutoencoderError(
                    f"this is a latent model (in_channels={in_channels}): pass vae=PATH, a local diffusers "
                    "AutoencoderKL folder or .safetensors/.ckpt file (e.g. the sd-vae-ft-ema weights), to decode "
                    "its samples into pictures"
                )
            return
        if in_channels in (1, 3):
            raise AutoencoderError(f"vae={vae} was given, but the model works in pixel space (in_channels={in_channels})")
        self.vae = load_vae(vae, device)

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return z.float().clamp(-1, 1)
        dtype = next(self.vae.parameters()).dtype
        out = [self.vae.decode(part.to(dtype) / self.scale).sample.float() for part in z.split(self.chunk)]
        return torch.cat(out).clamp(-1, 1)  # (B, 3, 8H, 8W)


__all__ = ["LATENT_SCALE", "AutoencoderError", "Decoder", "from_uint8", "load_vae", "to_uint8", "training_autoencoder"]
