"""Checkpoint + autoencoder + sampler -> pictures: the one way ``pf.sample``, ``pf.eval`` and
the studies draw from a model.

    pipe = Pipeline.from_checkpoint("last.pt", "look_ahead", device="cuda")
    images, info = pipe.generate(64, 50, seed=0, cfg_scale=4.0)   # uint8 (64, C, H, W)

``from_checkpoint`` loads the model (its EMA weights when it has them), builds the sampler
(or takes one), and loads the autoencoder a latent run's manifest names (or ``vae=``) and,
for a text-to-image checkpoint, the text encoder it was trained with. ``check_compatible``
refuses, once and in one line naming the model's class and the sampler, a sampler the model
cannot run. Drawing returns pictures as uint8 (M, C, H, W) in [0, 255]
(``pf.autoencoder.to_uint8`` of the decoded samples): C = 3, or 1 for a grey pixel model.

Two seeding schemes give sample ``i`` its noise, both independent of the batch size:

- ``seeded_noise(num, shape, seed)``: one generator, one draw of (num, C, H, W); labels
  ``i % num_classes`` unless given (:meth:`Pipeline.generate`: ``pf.eval`` and the studies);
- ``indexed_inputs(indices, ...)``: a generator per index seeded by ``(seed, i)`` for the noise
  and a random label (``pf.sample``: any subset of indices, on any number of processes).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence

import torch

from pf import conditioning, samplers
from pf.autoencoder import LATENT_SCALE, Decoder, to_uint8, training_autoencoder
from pf.conditioning import TextConditioning
from pf.models.checkpoint import model_from_checkpoint_dict, read_checkpoint_file
from pf.samplers import Sampler
from pf.sampling.graphs import GraphedSampler, compile_model
from pf.text import encoder_from_config

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def unwrap(model):
    """The network itself, through a ``torch.compile`` wrapper."""
    return getattr(model, "_orig_mod", model)


def check_compatible(model, sampler: Sampler, source: str = "the model") -> None:
    """One line naming the model's class and the sampler when the sampler cannot run the model.

    ``euler``, ``heun`` and ``sde`` move one time per sample (``sampler.global_time``): they are
    for global-time models (the SiT baseline, ``per_token = False``, REPA's too); every other
    sampler moves one time per patch and needs a Patch Forcing model; ``dual_loop`` and
    ``look_ahead`` also read the difficulty head.
    """
    base = unwrap(model)
    held = f"{source} holds {type(base).__name__}"
    name = type(sampler).__name__
    per_patch = bool(getattr(base, "per_token", True))
    if sampler.global_time and per_patch:
        raise ValueError(f"{name} is for global-time models; {held}, a per-patch-time model "
                         "(use sampler=euler_pf, dual_loop or look_ahead)")
    if not sampler.global_time and not per_patch:
        raise ValueError(f"{name} needs a per-patch-time model; {held}, a global-time model "
                         "(use sampler=euler, heun or sde)")
    if sampler.needs_uncertainty and not getattr(base, "predict_uncertainty", False):
        raise ValueError(f"{name} needs a model with a difficulty head (predict_uncertainty); {held} without one")


def make_sampler(sampler: Sampler | str, params: dict | None = None) -> Sampler:
    """``sampler`` itself, or the sampler of that name (``pf.samplers.make``) built with ``params``."""
    if isinstance(sampler, Sampler):
        if params:
            raise ValueError(f"sampler parameters {sorted(params)} are for a sampler given by name, not {sampler!r}")
        return sampler
    return samplers.make(str(sampler), **dict(params or {}))


def load_model(path: str | os.PathLike, *, device="cpu", use_ema: bool = True,
               source: str | None = None) -> tuple[torch.nn.Module, dict | None]:
    """The model a checkpoint holds (its EMA weights when it has them and ``use_ema``), on
    ``device`` in eval mode, and the run's training config (None for a released file)."""
    ckpt = read_checkpoint_file(path)
    model = model_from_checkpoint_dict(ckpt, use_ema=use_ema, source=source or str(path)).to(device).eval()
    return model, ckpt.get("train_config")


def text_conditioning(model, train_config: dict | None, device, *, path: str | None = None,
                      source: str = "the checkpoint") -> TextConditioning:
    """The prompts' encoder of a text-to-image model: the one its training config names
    (``path``: where that encoder's folder is now), checked against the model's token width."""
    text = dict(((train_config or {}).get("text") or {}))
    if not text:
        raise ValueError(f"{source} does not say which text encoder it was trained with (no 'text' in its "
                         "training config)")
    encoder = encoder_from_config(text, device, path=path)
    if encoder.dim != model.text_dim:
        raise ValueError(f"the text encoder gives {encoder.dim}-wide tokens; the model was trained on "
                         f"{model.text_dim}-wide ones")
    return TextConditioning(encoder, dropout=0.0)


#################################################################################
#                                     Noise                                     #
#################################################################################


def seeded_noise(num: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """(num, C, H, W) standard normal noise on the CPU, drawn in one piece from a generator seeded by ``seed``."""
    return torch.randn((num, *shape), generator=torch.Generator().manual_seed(int(seed)))


def indexed_inputs(indices: Sequence[int], shape: tuple[int, int, int], num_classes: int, seed: int,
                   classes: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (len, C, H, W) and labels (len,) of the given sample indices, on the CPU.

    Index ``i`` draws from its own generator seeded by ``seed * 1_000_003 + i``: its noise,
    then (``classes`` None) a random label in ``[0, num_classes)``; else ``classes`` cycled.
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
#                                   Pipeline                                    #
#################################################################################


class Pipeline:
    """A model, its sampler and the decoder into pictures, checked once; draws pictures.

    ``model``: what the sampler calls (a ``torch.compile``-d model: pass ``static=True`` so it
    runs in ``sync_free(sampler.max_distinct_times)``, its static-shape form); ``decode``:
    samples -> pictures in [-1, 1] (a :class:`pf.autoencoder.Decoder`; None: the samples are
    pictures already); ``text``: the prompts' encoder of a text-to-image model (it also gives
    the empty prompt guidance compares against); ``precision``: ``fp32``, or ``bf16``/``fp16``
    autocast around the sampler (CUDA). ``nfe``/``guided_nfe``: model calls per sample of the
    last batch, and how many of them ran the doubled (guided) batch.
    """

    def __init__(self, model, sampler: Sampler, decode: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 text: TextConditioning | None = None, device=None, source: str = "the model",
                 precision: str = "fp32", static: bool = False, train_config: dict | None = None):
        check_compatible(model, sampler, source)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.model, self.sampler, self.decode, self.text = model, sampler, decode, text
        self.base = unwrap(model)
        self.device = torch.device(device) if device is not None else next(self.base.parameters()).device
        self.source, self.precision, self.static, self.train_config = source, precision, bool(static), train_config
        self.graphs: dict | None = None  # captured samplers by (batch, steps, guidance), once use_graphs() is called
        self.nfe, self.guided_nfe = 0, 0

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, sampler: Sampler | str, *, device="cpu", use_ema: bool = True,
                        source: str | None = None, **options) -> Pipeline:
        """Load ``path`` (see :func:`load_model`), then :meth:`for_model` with ``options``."""
        source = source or str(path)
        model, train_config = load_model(path, device=device, use_ema=use_ema, source=source)
        return cls.for_model(model, sampler, train_config, device=device, source=source, **options)

    @classmethod
    def for_model(cls, model, sampler: Sampler | str, train_config: dict | None, *, sampler_params: dict | None = None,
                  device="cpu", vae=None, vae_scale: float | None = None, text_path: str | None = None,
                  source: str = "the model", precision: str = "fp32") -> Pipeline:
        """The pipeline of a loaded model and its run's training config: the sampler (or its
        name and ``sampler_params``), the autoencoder ``vae`` (default: the one the latent
        set's manifest names; None for a pixel model) with ``vae_scale`` (default: the
        manifest's, else ``LATENT_SCALE``), and the text encoder of a text-to-image model
        (``text_path``: its folder, when it moved)."""
        pipe = cls(model, make_sampler(sampler, sampler_params), device=device, source=source, precision=precision,
                   train_config=train_config)  # checked before the autoencoder and the text encoder load
        manifest_vae, manifest_scale = training_autoencoder(train_config)
        pipe.decode = Decoder(model.in_channels, vae or manifest_vae, device=device,
                              scale=vae_scale or manifest_scale or LATENT_SCALE)
        if model.cond_kind == "text":
            pipe.text = text_conditioning(model, train_config, device, path=text_path, source=source)
        return pipe

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the model's samples (latents or pixels)."""
        return self.base.in_channels, self.base.input_size, self.base.input_size

    #############################################################################
    #                                 Options                                   #
    #############################################################################

    def compile(self, mode: str | None = "default", *, graphs: bool = False) -> Pipeline:
        """``torch.compile`` the model's forward (``graphs``: it will run inside captured samplers)."""
        self.model, self.static = compile_model(self.base, mode, graphs=graphs), True
        return self

    def use_graphs(self) -> Pipeline:
        """Run the whole sampler as a CUDA graph, one capture per batch size, steps and guidance."""
        if self.text is not None:
            raise ValueError("CUDA graphs are not available for text-to-image models yet (compile is)")
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this pipeline runs on {self.device}")
        if not getattr(self.sampler, "graph_safe", True):
            raise ValueError(f"{type(self.sampler).__name__} cannot run as a CUDA graph (graphs=true); sample eagerly")
        self.graphs = {}
        return self

    def autocast(self):
        """The precision context of the sampler (``fp32``: none)."""
        dtype = PRECISIONS[self.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)

    #############################################################################
    #                                Conditions                                 #
    #############################################################################

    def conditions(self, labels_or_prompts, device=None):
        """The model's conditions on ``device`` (default the pipeline's): prompts (a list of
        str) through the text encoder, or class ids (B,)."""
        device = self.device if device is None else device
        if self.text is not None:
            prompts = list(labels_or_prompts)
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"{self.source} holds a text-to-image model: draw it with prompts (str), not labels")
            return self.text.fixed(prompts, device)
        return torch.as_tensor(labels_or_prompts, dtype=torch.long).to(device)  # (B,)

    def null(self, device=None):
        """Guidance's unconditional condition: the empty prompt's encoding, or None (the null class)."""
        return None if self.text is None else self.text.null(self.device if device is None else device)

    #############################################################################
    #                                  Drawing                                  #
    #############################################################################

    def sample(self, noise: torch.Tensor, cond, steps, *, cfg_scale: float = 1.0, guidance_interval=None,
               uc_cond=None, progress: bool = False, batch_size: int | None = None) -> torch.Tensor:
        """The sampler's output (B, C, H, W), latents or pixels, for noise and conditions on the
        device. ``uc_cond``: default :meth:`null`. ``batch_size``: the captured graph's batch
        (a shorter batch is padded), with :meth:`use_graphs`."""
        uc_cond = self.null() if uc_cond is None else uc_cond
        with self.autocast():
            if self.graphs is not None:
                return self._sample_graphed(noise, cond, steps, cfg_scale, guidance_interval,
                                            batch_size or noise.shape[0])
            static = self.base.sync_free(self.sampler.distinct_times(steps)) if self.static else contextlib.nullcontext()
            with static:
                out = self.sampler(self.model, noise, steps, y=cond, cfg_scale=cfg_scale,
                                   guidance_interval=guidance_interval, uc_cond=uc_cond, progress=progress)
        self.nfe, self.guided_nfe = self.sampler.nfe, self.sampler.guided_nfe
        return out

    def _sample_graphed(self, noise, labels, steps, cfg_scale, guidance_interval, batch: int) -> torch.Tensor:
        key = (batch, steps if isinstance(steps, int) else tuple(torch.as_tensor(steps).flatten().tolist()), cfg_scale,
               None if guidance_interval is None else tuple(guidance_interval))
        if key not in self.graphs:
            self.graphs[key] = GraphedSampler(self.sampler, self.model, (batch, *self.shape), steps,
                                              cfg_scale=cfg_scale, device=self.device,
                                              guidance_interval=guidance_interval)
        graph = self.graphs[key]
        k = noise.shape[0]  # a short last batch is padded with copies of its last row
        x = torch.cat([noise, noise[-1:].expand(batch - k, *noise.shape[1:])]) if k < batch else noise
        y = torch.cat([labels, labels[-1:].expand(batch - k)]) if k < batch else labels
        out = graph(x, y)[:k]
        self.nfe, self.guided_nfe = graph.nfe, graph.guided_nfe
        return out

    def pictures(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples (B, C, H, W) -> pictures uint8 (B, C', H', W') on the CPU (decoded, then ``to_uint8``)."""
        return to_uint8(self.decode(samples) if self.decode is not None else samples)

    @torch.no_grad()
    def draw(self, count: int, inputs: Callable[[slice], tuple[torch.Tensor, object]], steps, *,
             cfg_scale: float = 1.0, guidance_interval=None, uc_cond=None, batch_size: int = 64,
             progress: bool = False, on_batch: Callable[[int], object] | None = None) -> tuple[torch.Tensor, dict]:
        """``count`` pictures, ``batch_size`` at a time: uint8 (count, C, H, W) in [0, 255]
        ((0, 3, 0, 0) when ``count`` is 0), and ``{"nfe", "guided_nfe", "seconds"}`` (model
        calls per sample; ``nfe`` None when nothing was drawn).

        ``inputs(rows)`` gives the noise (b, C, H, W) and the conditions of the samples in
        ``rows`` (a slice), anywhere (they are moved to the device). ``progress``: the
        sampler's bar over its steps; ``on_batch(b)`` after each batch (a bar over pictures).
        """
        uc_cond = self.null() if uc_cond is None else uc_cond  # the empty prompt encoded once, not per batch
        pictures, t0 = [], time.perf_counter()
        for start in range(0, count, batch_size):
            rows = slice(start, min(start + batch_size, count))
            noise, cond = inputs(rows)
            samples = self.sample(noise.to(self.device), conditioning.to(cond, self.device), steps,
                                  cfg_scale=cfg_scale, guidance_interval=guidance_interval, uc_cond=uc_cond,
                                  progress=progress, batch_size=batch_size)
            pictures.append(self.pictures(samples))
            if on_batch is not None:
                on_batch(rows.stop - rows.start)
        images = torch.cat(pictures) if pictures else torch.zeros((0, 3, 0, 0), dtype=torch.uint8)
        return images, {"nfe": self.nfe if pictures else None, "guided_nfe": self.guided_nfe,
                        "seconds": time.perf_counter() - t0}

    def generate(self, num_samples: int, steps, *, seed: int = 0, cfg_scale: float = 1.0, batch_size: int = 500,
                 labels=None, prompts: Sequence[str] | None = None, guidance_interval=None, uc_cond=None,
                 progress: bool = False) -> tuple[torch.Tensor, dict]:
        """:meth:`draw` with :func:`seeded_noise`: the same seed gives the same noise for every
        sampler and batch size. Conditions: ``prompts`` (a text model; encoded once, on the
        CPU), or ``labels`` (class ids, or a :class:`pf.conditioning.TextCond`), default
        ``i % num_classes`` (balanced classes)."""
        if prompts is not None:
            labels = self.conditions(prompts, torch.device("cpu"))
        elif labels is None:
            if self.base.cond_kind == "text":
                raise ValueError(f"{self.source} holds a text-to-image model: draw it with prompts")
            labels = torch.arange(num_samples) % self.base.num_classes
        noise = seeded_noise(num_samples, self.shape, seed)  # (M, C, H, W)
        return self.draw(num_samples, lambda rows: (noise[rows], conditioning.rows(labels, rows)), steps,
                         cfg_scale=cfg_scale, guidance_interval=guidance_interval, uc_cond=uc_cond,
                         batch_size=batch_size, progress=progress)


def generate(model, sampler: Sampler, num_samples: int, steps, *, seed: int = 0, cfg_scale: float = 1.0,
             batch_size: int = 500, labels=None, device=None, static: bool = False, decode=None,
             guidance_interval=None, uc_cond=None) -> tuple[torch.Tensor, dict]:
    """Draw ``num_samples`` pictures of a model at hand with ``sampler`` at ``steps`` outer steps:
    :meth:`Pipeline.generate` of ``Pipeline(model, sampler, decode, device=device, static=static)``.

    ``decode``: samples -> pictures in [-1, 1] (a :class:`pf.autoencoder.Decoder`; None: the
    samples are pixels); ``labels`` may be a text condition (:class:`pf.conditioning.TextCond`,
    with ``uc_cond`` the empty prompt's for guidance). Returns uint8 pictures (M, C, H, W) and
    ``{"nfe": model calls per sample, "guided_nfe", "seconds": wall time}``.
    """
    pipe = Pipeline(model, sampler, decode, device=device, static=static)
    return pipe.generate(num_samples, steps, seed=seed, cfg_scale=cfg_scale, batch_size=batch_size, labels=labels,
                         guidance_interval=guidance_interval, uc_cond=uc_cond)


__all__ = ["Pipeline", "check_compatible", "generate", "indexed_inputs", "load_model", "make_sampler", "seeded_noise",
           "text_conditioning", "unwrap"]
