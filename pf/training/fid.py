"""``trainer.fid_every=N``: FID and KID of the EMA model during training (pixel data).

Every N steps (and at the last) rank 0 draws ``trainer.fid_samples`` images with the run's
sampler (``sampler.*``: name, steps, guidance), classes in turn and fixed noise, so the numbers
are comparable across steps, and compares them with up to ``trainer.fid_reference`` training
images in the features of ``pf.eval``'s classifier of the data (``trainer.fid_weights``, or
the data's classifier trained once and cached). The values go into the step's record as
``fid`` and ``kid``: a trend to watch, not a number for papers (few samples, a small
classifier; ``pf.eval`` with Inception is that). Latent data would need the autoencoder's
decoder and Inception's local weights: not supported in the loop yet (one error line says so).
"""

from __future__ import annotations

import torch

from pf.autoencoder import to_uint8
from pf.eval.metrics import compute_metrics
from pf.eval.train_classifier import ensure_classifier


class InLoopFID:
    def __init__(self, tc, sc, data_cfg, reference: torch.Tensor, num_classes: int, sampler, uc_cond,
                 device: torch.device, seed: int):
        """``reference``: training images (M, C, H, W) in [-1, 1]; ``sampler``, ``uc_cond``: the pictures'."""
        if reference.shape[1] not in (1, 3):
            raise ValueError(f"trainer.fid_every works on pixel data (1 or 3 channels); this run trains on "
                             f"{reference.shape[1]}-channel latents: evaluate checkpoints with pf.eval instead")
        with torch.random.fork_rng(devices=[]):  # training the classifier must not move the run's random streams
            self.weights = tc.fid_weights or ensure_classifier(data_cfg, log=None)[0]
        self.reference = to_uint8(reference.cpu())
        self.data = (str(data_cfg.name), int(reference.shape[-1]))
        n = int(tc.fid_samples)
        g = torch.Generator().manual_seed(int(seed) + 54321)
        self.noise = torch.randn((n, *reference.shape[1:]), generator=g)  # (n, C, H, W)
        self.labels = torch.arange(n) % num_classes  # every class in turn
        self.sampler, self.uc_cond, self.sc = sampler, uc_cond, sc
        self.batch, self.device = int(tc.batch_size), device

    @torch.no_grad()
    def generate(self, model, autocast) -> torch.Tensor:
        """The fixed-noise samples of ``model``: uint8 (n, C, H, W)."""
        gi = list(self.sc.guidance_interval) if self.sc.get("guidance_interval") is not None else None
        out = []
        for i in range(0, self.noise.shape[0], self.batch):
            noise = self.noise[i:i + self.batch].to(self.device)
            labels = self.labels[i:i + self.batch].to(self.device)
            with autocast():
                x = self.sampler(model, noise, self.sc.steps, y=labels, cfg_scale=self.sc.cfg_scale,
                                 guidance_interval=gi, uc_cond=self.uc_cond)
            out.append(to_uint8(x.float().cpu()))
        return torch.cat(out)

    def score(self, generated: torch.Tensor) -> dict:
        """``{"fid", "kid"}`` of uint8 images against the reference."""
        m = compute_metrics(generated, self.reference, extractor="classifier", weights=self.weights, prc=False,
                            kid_subsets=20, device=self.device.type, data=self.data)
        return {"fid": m["fid"], "kid": m["kid"]}

    def __call__(self, model, autocast) -> dict:
        return self.score(self.generate(model, autocast))
