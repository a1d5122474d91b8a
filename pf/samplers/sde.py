"""SiT's SDE sampler for global-time models: Euler-Maruyama on the reverse SDE whose marginals
are the flow's, with a drift-only last step (SPEC.md section 13, SiT's ``sample_sde``).

With ``w(t)`` the diffusion coefficient and ``s = (t v - x) / (1 - t)`` the score of the linear
path, ``dx = [v + w s] dt + sqrt(2 w) dW`` has the same marginals as ``dx = v dt`` for any
``w >= 0`` (the ``w s`` drift cancels the spreading of the noise in the Fokker-Planck
equation), which is why the factor 2 under the root and the ``w s`` term must go together.
"""

from __future__ import annotations

import hashlib
import math

import torch

from pf.samplers.base import Sampler

DIFFUSION_FORMS = ("sigma", "sbdm")


def diffusion_coefficient(form: str, norm: float, t: float) -> float:
    """``w(t)``: ``norm * (1 - t)`` ("sigma"), ``norm * (1 - t) / t`` ("SBDM")."""
    if form == "sigma":
        return norm * (1.0 - t)
    return norm * (1.0 - t) / t


class SDE(Sampler):
    """Euler-Maruyama on ``t_i = linspace(t0, 1 - last_step_size, M)`` (``M = steps``; ``t0 = 0``
    for "sigma", ``sample_eps`` for "SBDM"): for ``i < M - 1``
    ``x += f(x, t_i) dt + sqrt(2 w(t_i)) sqrt(dt) xi``, ``f = v + w s``; then the "Mean" last
    step ``x += f(x, t_{M-1}) * last_step_size`` (no noise). M NFE (SiT reports M = 250).

    The noise ``xi``: with ``generator`` (a ``torch.Generator`` on x's device) one
    ``randn(x.shape)`` per step from it, so a run is fixed by the generator's state. Without
    one, every sample has its own stream, a CPU generator seeded by ``seed`` and the bytes of
    that sample's starting noise: a sample's result then depends on its noise and ``seed``
    alone, not on the batch it is drawn in, the batch size or the device (as ``pf.sample``
    promises). That stream reads the noise on the host once per call: no CUDA graphs.
    """

    name = "sde"
    global_time = True
    graph_safe = False  # the per-sample streams are seeded on the host from the noise

    def __init__(self, diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step_size: float = 0.04,
                 sample_eps: float = 1e-3, seed: int = 0, generator: torch.Generator | None = None):
        super().__init__()
        form = str(diffusion_form).lower()
        if form not in DIFFUSION_FORMS:
            raise ValueError(f"diffusion_form must be one of {DIFFUSION_FORMS} (SiT's sigma or SBDM), "
                             f"got {diffusion_form!r}")
        if not (math.isfinite(diffusion_norm) and diffusion_norm >= 0):
            raise ValueError(f"diffusion_norm must be a finite number >= 0, got {diffusion_norm}")
        if not 0.0 < last_step_size < 1.0:
            raise ValueError(f"last_step_size must lie in (0, 1), got {last_step_size}")
        if form == "sbdm" and not 0.0 < sample_eps < 1.0 - last_step_size:
            raise ValueError(f"diffusion_form=SBDM starts at sample_eps, which must lie in (0, 1 - last_step_size), "
                             f"got {sample_eps}")
        self.diffusion_form, self.diffusion_norm = form, float(diffusion_norm)
        self.last_step_size, self.sample_eps, self.seed = float(last_step_size), float(sample_eps), int(seed)
        self._generator = generator
        self._grid: list[float] = []

    def schedule_of(self, timesteps, x: torch.Tensor, model) -> torch.Tensor:
        """``t_0 .. t_{M-1}`` (the model calls) and 1 (where the last step lands), float32."""
        if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < 2:
            raise ValueError(f"the SDE sampler takes its number of grid points M >= 2 as steps, got {timesteps!r}")
        t0 = self.sample_eps if self.diffusion_form == "sbdm" else 0.0
        grid = torch.linspace(t0, 1.0 - self.last_step_size, timesteps, dtype=torch.float64)
        self._grid = grid.tolist()  # float64 times of the arithmetic
        return torch.cat([grid, torch.ones(1, dtype=torch.float64)]).float()

    def run(self, model, x, schedule, y, steps):
        grid, last = self._grid, len(self._grid) - 1
        noise = self._noise_source(x)
        for i in steps:
            self.at_step(i)
            t = grid[i]
            v = self.call(model, x, torch.full((x.shape[0],), t, dtype=self.time_dtype(x), device=x.device), y,
                          with_logvar=False).v
            w = diffusion_coefficient(self.diffusion_form, self.diffusion_norm, t)
            score = (t * v - x) / (1.0 - t)  # of the linear path, from the velocity
            drift = v + w * score
            if i == last:  # "Mean": the drift alone over the last step
                x = x + drift * self.last_step_size
            else:
                dt = grid[i + 1] - t
                x = x + drift * dt + self.noise_scale(w, dt) * noise()
        return x

    @staticmethod
    def noise_scale(w: float, dt: float) -> float:
        """``sqrt(2 w) sqrt(dt)``: the spread that the ``w s`` drift undoes (a test breaks it on purpose)."""
        return math.sqrt(2.0 * w) * math.sqrt(dt)

    def _noise_source(self, x: torch.Tensor):
        """A function giving each step's standard normal noise (B, C, H, W) like ``x``."""
        if self._generator is not None:
            g = self._generator
            return lambda: torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
        rows = x.detach().float().cpu()  # one copy to the host for the whole batch
        gens = [torch.Generator().manual_seed(self.stream_seed(row)) for row in rows]
        return lambda: torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, x.dtype)

    def stream_seed(self, row: torch.Tensor) -> int:
        """The seed of one sample's noise stream: ``seed`` and its starting noise (as float32 bytes)."""
        digest = hashlib.blake2b(row.detach().float().cpu().numpy().tobytes(), digest_size=8,
                                 key=self.seed.to_bytes(8, "little", signed=True)).digest()
        return int.from_bytes(digest, "little") >> 1  # manual_seed takes < 2**63

    def expected_nfe(self, num_steps: int) -> int:
        return num_steps
