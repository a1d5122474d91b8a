"""``trainer.fid_every=N``: FID (and KID) of the EMA model during training.

Every N steps (and at the last) rank 0 draws ``trainer.fid_samples`` images with the run's
sampler (``sampler.*``: name, steps, guidance), classes in turn and fixed noise, so the numbers
are comparable across steps, and compares them with the first ``trainer.fid_reference``
training images. ``trainer.fid_extractor`` picks the features:

    classifier  (pixel data) ``pf.eval``'s classifier of the data (``trainer.fid_weights``, or
                the data's classifier trained once and cached): ``fid`` and ``kid``
    inception   (pixel or latent data) Inception from the local file ``trainer.fid_weights``
                (``pf.eval.inception``, nothing downloaded), ADM's FID (``pf.eval.adm``):
                ``fid``. Latents, drawn and reference alike, are decoded first with the
                autoencoder their latent set's manifest names (``pf.autoencoder.Decoder``),
                so the reference is the training images as the autoencoder gives them back;
                or ``trainer.fid_reference_stats``: an ADM reference ``.npz`` (its stored
                statistics, or its images ``arr_0``), read as ``pf.eval`` reads it

The values go into the step's record: a trend to watch, not a number for papers (few samples;
``pf.eval`` on 50K samples is that).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pf.autoencoder import Decoder, to_uint8, training_autoencoder
from pf.eval import adm
from pf.eval.inception import Features, InceptionFeatures
from pf.eval.metrics import compute_metrics
from pf.eval.train_classifier import ensure_classifier
from pf.training.schema import ConfigError


def decoder_of(data_cfg, channels: int, device: torch.device) -> Decoder:
    """Samples -> pictures in [-1, 1]: pixels pass through; latents go through the autoencoder
    (and scale factor) their latent set's manifest names."""
    if channels in (1, 3):
        return Decoder(channels)
    vae, scale = training_autoencoder({"data": data_cfg})
    if vae is None:
        raise ConfigError(f"trainer.fid_every on {channels}-channel latents decodes them with the autoencoder a latent "
                          "set's manifest names; data.path is not such a folder (make one with pf.data.encode)")
    return Decoder(channels, vae, device=device, scale=scale)


class InLoopFID:
    def __init__(self, tc, sc, data_cfg, reference: torch.Tensor, num_classes: int, sampler, uc_cond,
                 device: torch.device, seed: int):
        """``reference``: training items (M, C, H, W), pictures in [-1, 1] or latents; ``sampler``,
        ``uc_cond``: the pictures'."""
        self.extractor = str(tc.get("fid_extractor", "classifier"))
        latent = reference.shape[1] not in (1, 3)
        if self.extractor == "classifier" and latent:
            raise ConfigError(f"trainer.fid_every on {reference.shape[1]}-channel latents measures with Inception: set "
                              "trainer.fid_extractor=inception trainer.fid_weights=/path/to/"
                              "weights-inception-2015-12-05-6726825d.pth")
        if self.extractor == "inception" and not tc.fid_weights:
            raise ConfigError("trainer.fid_extractor=inception needs the local Inception weights: set "
                              "trainer.fid_weights=/path/to/weights-inception-2015-12-05-6726825d.pth "
                              "(nothing is downloaded)")
        stats = tc.get("fid_reference_stats")
        if stats and self.extractor != "inception":
            raise ConfigError(f"trainer.fid_reference_stats={stats} holds Inception statistics: set "
                              "trainer.fid_extractor=inception trainer.fid_weights=PATH")
        if stats and not Path(stats).is_file():
            raise FileNotFoundError(f"trainer.fid_reference_stats={stats}: no such file")
        self.batch, self.device = int(tc.batch_size), device
        # building networks (random init before their weights load) and training the classifier
        # must not move the run's random streams
        with torch.random.fork_rng(devices=[]):
            self.decode = decoder_of(data_cfg, reference.shape[1], device)
            if self.extractor == "inception":
                self.extract = InceptionFeatures(tc.fid_weights, device=device)
                self.reference = (adm.read_reference(stats, self.extract, tc.fid_weights, None, need_features=False)
                                  if stats else adm.Reference(*self._statistics(reference)))
            else:
                self.weights = tc.fid_weights or ensure_classifier(data_cfg, log=None)[0]
                self.reference = to_uint8(reference.cpu())
        self.data = (str(data_cfg.name), int(reference.shape[-1]))
        n = int(tc.fid_samples)
        g = torch.Generator().manual_seed(int(seed) + 54321)
        self.noise = torch.randn((n, *reference.shape[1:]), generator=g)  # (n, C, H, W)
        self.labels = torch.arange(n) % num_classes  # every class in turn
        self.sampler, self.uc_cond, self.sc = sampler, uc_cond, sc

    def _statistics(self, reference: torch.Tensor) -> tuple:
        """ADM's reference (pool and spatial Gaussians, pool features) of the training items,
        decoded and read through Inception a batch at a time (never all pictures at once)."""
        parts = [self.extract(to_uint8(self.decode(reference[i:i + self.batch].to(self.device))))
                 for i in range(0, reference.shape[0], self.batch)]
        s = adm.statistics_of(Features(*(torch.cat(f) for f in zip(*parts))))
        return adm.Gaussian(s["mu"], s["sigma"]), adm.Gaussian(s["mu_s"], s["sigma_s"]), s["pool_features"], "computed"

    @torch.no_grad()
    def generate(self, model, autocast) -> torch.Tensor:
        """The fixed-noise samples of ``model``, decoded: uint8 pictures (n, C, H, W)."""
        gi = list(self.sc.guidance_interval) if self.sc.get("guidance_interval") is not None else None
        out = []
        for i in range(0, self.noise.shape[0], self.batch):
            noise = self.noise[i:i + self.batch].to(self.device)
            labels = self.labels[i:i + self.batch].to(self.device)
            with autocast():
                x = self.sampler(model, noise, self.sc.steps, y=labels, cfg_scale=self.sc.cfg_scale,
                                 guidance_interval=gi, uc_cond=self.uc_cond)
            out.append(to_uint8(self.decode(x.float())))
        return torch.cat(out)

    def score(self, generated: torch.Tensor) -> dict:
        """``{"fid", "kid"}`` (classifier) or ``{"fid"}`` (inception) of uint8 images against the reference."""
        if self.extractor == "inception":
            return adm.evaluate_features(self.extract(generated), self.reference, ("fid",))
        m = compute_metrics(generated, self.reference, extractor="classifier", weights=self.weights, prc=False,
                            kid_subsets=20, device=self.device.type, data=self.data)
        return {"fid": m["fid"], "kid": m["kid"]}

    def __call__(self, model, autocast) -> dict:
        return self.score(self.generate(model, autocast))
