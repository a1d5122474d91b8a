"""Per-patch timestep samplers for training (SPEC.md section 4).

Each sampler is called as ``sampler(batch, num_patches, device=..., generator=None)`` and
returns a ``(B, N)`` float32 tensor of patch times in [0, 1] (0 = noise, 1 = data).
``make(name, **params)`` builds one by name.
"""

from __future__ import annotations

import math

import torch

from pf_kernels.ltg import ltg_sample


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


class TimestepSampler:
    """Base: subclasses implement ``sample`` on a generator and device."""

    name = "base"

    def __call__(self, batch: int, num_patches: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        if batch < 0 or num_patches < 1:
            raise ValueError(f"need batch >= 0 and num_patches >= 1, got ({batch}, {num_patches})")
        return self.sample(batch, num_patches, torch.device(device or "cpu"), generator)

    def sample(self, batch: int, num_patches: int, device: torch.device, generator) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


def _randn(shape, device, generator):
    return torch.randn(shape, device=device, generator=generator)


def _rand(shape, device, generator):
    return torch.rand(shape, device=device, generator=generator)


def below_max(tbar: torch.Tensor, n: torch.Tensor, u: torch.Tensor, std: float) -> torch.Tensor:
    """Patch times under a per-sample maximum: tbar (B, 1), n (B, N) normal, u (B, N) uniform."""
    sd = torch.clamp(tbar / 2, max=std)  # (B, 1)
    t = tbar - n.abs() * sd  # (B, N): lower half of a Gaussian at tbar
    return torch.where(t < 0, u * tbar, t)  # negatives resampled uniformly below tbar


def ltg_from_noise(n0: torch.Tensor, n: torch.Tensor, u: torch.Tensor, loc: float, scale: float, std: float) -> torch.Tensor:
    """LTG from its random inputs: n0 (B,) normal, n (B, N) normal, u (B, N) uniform."""
    tbar = torch.sigmoid(loc + scale * n0)[:, None]  # (B, 1): the cleanest patch allowed
    return below_max(tbar, n, u, std)


class LTG(TimestepSampler):
    """Logit-normal truncated Gaussian: controls the maximum information per sample.

    ``tbar = sigmoid(loc + scale*n0)``, ``sd = min(tbar/2, std)``, ``t_i = tbar - |n_i|*sd``,
    negative ``t_i`` resampled as ``u_i * tbar``.

    ``backend="compiled"`` (default) draws from ``pf_kernels.ltg_sample``: Philox keyed by
    ``seed`` at counter ``offset``, identical on CPU and CUDA; ``generator`` is not used (only
    to draw ``seed`` on the first call when it is None). ``offset`` advances by ``B*N`` per
    call; save and restore ``seed``/``offset`` (``state_dict``) to resume the stream.
    ``backend="torch"`` draws with torch's RNG from ``generator``.
    """

    name = "ltg"

    def __init__(self, loc: float = 0.7, scale: float = 1.0, std: float = 0.6, seed: int | None = None,
                 backend: str = "compiled"):
        for k, v in (("loc", loc), ("scale", scale), ("std", std)):
            _check_finite(k, v)
        if std <= 0:
            raise ValueError(f"LTG std must be > 0, got {std}")
        if backend not in ("compiled", "torch"):
            raise ValueError(f"LTG backend must be 'compiled' or 'torch', got {backend!r}")
        self.loc, self.scale, self.std = float(loc), float(scale), float(std)
        self.backend = backend
        self.seed = None if seed is None else int(seed)
        self.offset = 0  # Philox counter of the next draw (compiled backend)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.seed = None if state["seed"] is None else int(state["seed"])
        self.offset = int(state["offset"])

    def sample(self, batch, num_patches, device, generator):
        if self.backend == "torch":
            n0 = _randn((batch,), device, generator)
            n = _randn((batch, num_patches), device, generator)
            u = _rand((batch, num_patches), device, generator)
            return ltg_from_noise(n0, n, u, self.loc, self.scale, self.std)
        if self.seed is None:
            gen_device = generator.device if generator is not None else "cpu"
            self.seed = int(torch.randint(0, 2**63 - 1, (), generator=generator, device=gen_device))
        t = ltg_sample(batch, num_patches, loc=self.loc, scale=self.scale, std=self.std, seed=self.seed,
                       offset=self.offset, device=device)
        self.offset = (self.offset + batch * num_patches) % 2**64
        return t


class LTGMarginal(TimestepSampler):
    """One time per sample, drawn from LTG's per-patch marginal, shared by all patches.

    The control for "what patch heterogeneity adds": the same time density as LTG (every patch
    of an LTG sample has the same marginal; one patch of it is one draw) with equal times for
    all patches of a sample. ``t = below_max(sigmoid(loc + scale*n0), n, u, std)`` with one
    ``n``, ``u`` per sample, expanded to (B, N). Draws with torch's RNG from ``generator``.
    """

    name = "ltg_marginal"

    def __init__(self, loc: float = 0.7, scale: float = 1.0, std: float = 0.6):
        for k, v in (("loc", loc), ("scale", scale), ("std", std)):
            _check_finite(k, v)
        if std <= 0:
            raise ValueError(f"LTG std must be > 0, got {std}")
        self.loc, self.scale, self.std = float(loc), float(scale), float(std)

    def sample(self, batch, num_patches, device, generator):
        n0 = _randn((batch,), device, generator)
        n = _randn((batch, 1), device, generator)
        u = _rand((batch, 1), device, generator)
        t = ltg_from_noise(n0, n, u, self.loc, self.scale, self.std)  # (B, 1): one patch of an LTG draw
        return t.expand(batch, num_patches).contiguous()


class TruncatedGaussian(LTG):
    """LTG with ``tbar ~ U(0, 1)`` instead of the logit-normal (ablation)."""

    name = "truncated_gaussian"

    def __init__(self, std: float = 0.2):
        super().__init__(std=std)

    def sample(self, batch, num_patches, device, generator):
        tbar = _rand((batch, 1), device, generator)
        n = _randn((batch, num_patches), device, generator)
        return below_max(tbar, n, _rand((batch, num_patches), device, generator), self.std)


class Uniform(TimestepSampler):
    """One U(0, 1) time per sample, shared by all patches (the global-time baseline)."""

    name = "uniform"

    def sample(self, batch, num_patches, device, generator):
        return _rand((batch, 1), device, generator).expand(batch, num_patches).contiguous()


class LogitNormal(TimestepSampler):
    """One ``sigmoid(loc + scale*n)`` per sample, shared by all patches (SD3)."""

    name = "logit_normal"

    def __init__(self, loc: float = 0.0, scale: float = 1.0):
        _check_finite("loc", loc)
        _check_finite("scale", scale)
        self.loc, self.scale = float(loc), float(scale)

    def sample(self, batch, num_patches, device, generator):
        t = torch.sigmoid(self.loc + self.scale * _randn((batch, 1), device, generator))
        return t.expand(batch, num_patches).contiguous()


class Independent(TimestepSampler):
    """i.i.d. U(0, 1) per patch: the naive Diffusion-Forcing choice (ablation)."""

    name = "independent"

    def sample(self, batch, num_patches, device, generator):
        return _rand((batch, num_patches), device, generator)


class Gaussian(TimestepSampler):
    """``m ~ U(0,1)``, ``sd = min(min(m, 1-m)/2, std)``, ``t_i = clamp(m + sd*n_i, 0, 1)``."""

    name = "gaussian"

    def __init__(self, std: float = 0.2):
        _check_finite("std", std)
        if std <= 0:
            raise ValueError(f"gaussian std must be > 0, got {std}")
        self.std = float(std)

    def sample(self, batch, num_patches, device, generator):
        m = _rand((batch, 1), device, generator)
        sd = torch.clamp(torch.minimum(m, 1 - m) / 2, max=self.std)
        return torch.clamp(m + sd * _randn((batch, num_patches), device, generator), 0.0, 1.0)


class SRM(TimestepSampler):
    """Wewer et al.: the mean time ``m ~ U(0,1)`` is split recursively between halves.

    A segment of ``d`` patches holding the total ``T`` gives its first ``floor(d/2)``
    patches the share ``lo + f*(hi - lo)`` of the feasible range ``[lo, hi]`` (each patch in
    [0, 1]), ``f ~ Beta(a, a)``, ``a = (d - 1 - d mod 2)^1.05``; then patches are shuffled.
    """

    name = "srm"

    def sample(self, batch, num_patches, device, generator):
        total = _rand((batch,), device, generator) * num_patches  # (B,)
        out = torch.empty(batch, num_patches, device=device)
        # Iterative split: a stack of (start, size, total) segments, vectorised over the batch.
        stack = [(0, num_patches, total)]
        while stack:
            start, d, tot = stack.pop()
            if d == 1:
                out[:, start] = tot.clamp(0.0, 1.0)
                continue
            d1 = d // 2
            d2 = d - d1
            a = float(d - 1 - d % 2) ** 1.05
            conc = torch.full((batch,), a, device=device)
            # Beta(a, a) via two Gammas (torch's gamma takes no generator: global RNG here).
            g1 = torch._standard_gamma(conc)
            g2 = torch._standard_gamma(conc)
            f = g1 / (g1 + g2)
            lo = torch.clamp(tot - d2, min=0.0)
            hi = torch.clamp(tot, max=float(d1))
            t1 = lo + f * (hi - lo)
            stack.append((start, d1, t1))
            stack.append((start + d1, d2, tot - t1))
        perm = torch.argsort(_rand((batch, num_patches), device, generator), dim=1)
        return torch.gather(out, 1, perm)


SAMPLERS: dict[str, type[TimestepSampler]] = {
    cls.name: cls for cls in (LTG, LTGMarginal, Uniform, LogitNormal, Independent, Gaussian, TruncatedGaussian, SRM)
}


def make(name: str, **params) -> TimestepSampler:
    """Build a timestep sampler by name: ``ltg`` (default of the method), ``ltg_marginal``, ``uniform``,
    ``logit_normal``, ``independent``, ``gaussian``, ``truncated_gaussian``, ``srm``."""
    key = name.lower().replace("-", "_")
    if key not in SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    try:
        return SAMPLERS[key](**params)
    except TypeError as err:
        raise TypeError(f"bad parameters for timestep sampler {name!r}: {err}") from err
