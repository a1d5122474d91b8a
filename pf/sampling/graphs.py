"""Fast sampling: whole samplers as CUDA graphs, ``torch.compile`` of the model, and a
CPU check that a sampler never reads a tensor value on the host.

A sampler's loop branches only on its float32 schedule, which lives on the host, so one
run of ``sampler(model, x, steps, ...)`` is a fixed sequence of kernels for a given
(batch, steps, guidance): the quantile threshold, the certain-patch masks and the
per-patch times are all computed on the device (``certain_patches`` sorts instead of
calling ``torch.quantile``). ``GraphedSampler`` records that sequence once into a CUDA
graph with static input buffers, and each call copies new noise and labels in and replays.
The model runs inside ``model.sync_free(distinct_times=sampler.distinct_times(steps))``: its
deduplicated conditioning then has a static table width and it skips its label check (a
per-patch schedule's width is read from its table; kept patches add their t = 1).

``check_sync_free`` runs a sampler on the ``meta`` device, where every tensor has a shape
but no data: ``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``, ``int(t)``, boolean-mask
indexing, ``nonzero`` and ``unique`` all raise there, so a data-dependent host decision
anywhere in the step fails loudly on a CPU-only machine too.
"""

from __future__ import annotations

import torch

from pf.samplers.base import Sampler

# torch.compile modes that put their own CUDA graphs around the model: they cannot run
# inside our capture of the whole sampler.
_GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def compile_model(model: torch.nn.Module, mode: str | None = "default", *, graphs: bool = False):
    """``torch.compile`` of the model's forward (``mode`` as torch.compile takes it).

    With ``graphs=True`` (the result will be captured by ``GraphedSampler``) the modes that
    make their own CUDA graphs are refused. The result forwards attributes such as
    ``patch_size`` and ``sync_free`` to the model.
    """
    mode = None if mode in (None, "", "default") else mode
    if graphs and mode in _GRAPHING_COMPILE_MODES:
        raise ValueError(
            f"compile mode {mode!r} makes its own CUDA graphs and cannot be captured inside a "
            "whole-sampler graph; use compile_mode=default or max-autotune-no-cudagraphs with graphs"
        )
    return torch.compile(model, mode=mode, dynamic=False)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # through a torch.compile wrapper


class GraphedSampler:
    """A sampler run captured once as a CUDA graph for fixed (shape, steps, guidance).

    ``graphed = GraphedSampler(EulerPF(), model, (64, 4, 32, 32), 100, cfg_scale=4.0)``
    warms up (compiles Triton kernels and, for a compiled model, its graphs) on a side
    stream, captures, and then ``graphed(noise, labels)`` copies into the static buffers,
    replays and returns a copy of the result. ``nfe`` is the sampler's model-call count.
    ``uc_cond`` may be an int (fixed in the graph) or a tensor (copied in at each call).
    """

    def __init__(self, sampler: Sampler, model: torch.nn.Module, shape: tuple[int, ...], steps,
                 *, cfg_scale: float = 1.0, uc_cond=None, guidance_interval=None,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cuda", warmup: int = 1,
                 x_cond: torch.Tensor | None = None, keep: torch.Tensor | None = None):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; sample eagerly on the CPU")
        self.sampler, self.model, self.steps, self.cfg_scale = sampler, model, steps, float(cfg_scale)
        self.shape, self.guidance_interval = tuple(shape), guidance_interval  # decided on the host: fixed in the graph
        self.static_x = torch.randn(self.shape, device=device, dtype=dtype)  # (B, C, H, W) noise
        self.static_y = torch.zeros(self.shape[0], device=device, dtype=torch.long)  # (B,) labels
        self.static_uc = None
        if torch.is_tensor(uc_cond):
            self.static_uc = uc_cond.to(device=device, dtype=torch.long).expand(self.shape[0]).clone()
            uc_cond = self.static_uc
        self.uc_cond = uc_cond
        # inpainting / per-patch schedules: the clean image and the kept patches, copied in at each call
        self.static_x_cond = None if x_cond is None else x_cond.to(device=device, dtype=dtype).clone()
        self.static_keep = None if keep is None else keep.to(device).clone()
        distinct = sampler.distinct_times(steps, keep=keep is not None)
        self.graph = torch.cuda.CUDAGraph()
        with _base_model(model).sync_free(distinct_times=distinct), torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):  # JIT/compile everything outside the capture
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(self.graph):
                self.static_out = self._run()
        self.nfe, self.guided_nfe = sampler.nfe, sampler.guided_nfe

    def _run(self) -> torch.Tensor:
        extra = {k: v for k, v in (("x_cond", self.static_x_cond), ("keep", self.static_keep)) if v is not None}
        return self.sampler(self.model, self.static_x, self.steps, y=self.static_y, cfg_scale=self.cfg_scale,
                            uc_cond=self.uc_cond, guidance_interval=self.guidance_interval, **extra)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, uc_cond: torch.Tensor | None = None, *,
                 x_cond: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape) != self.shape or y.shape != (self.shape[0],):
            raise ValueError(
                f"this graph was captured for x {self.shape} and y ({self.shape[0]},); "
                f"got x {tuple(x.shape)} and y {tuple(y.shape)}: capture another GraphedSampler"
            )
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if uc_cond is not None:
            if self.static_uc is None:
                raise ValueError("uc_cond was not a tensor at capture time; capture with a tensor uc_cond to change it")
            self.static_uc.copy_(uc_cond.expand(self.shape[0]))
        for name, given in (("x_cond", x_cond), ("keep", keep)):
            static = getattr(self, f"static_{name}")
            if (given is None) != (static is None):
                raise ValueError(f"{name} must be given at each call exactly when it was given at capture time")
            if given is not None:
                static.copy_(given)
        self.graph.replay()
        self.sampler.nfe, self.sampler.guided_nfe = self.nfe, self.guided_nfe
        return self.static_out.clone()


def check_sync_free(sampler: Sampler, model: torch.nn.Module, shape: tuple[int, ...], steps, *,
                    cfg_scale: float = 1.0, uc_cond=None, guidance_interval=None,
                    dtype: torch.dtype = torch.float32, x_cond: bool = False, keep: bool = False) -> int:
    """Run ``sampler`` on a ``meta`` copy of ``model``: raises if anything reads tensor data
    on the host (see the module docstring). Returns the NFE of the run. ``x_cond``, ``keep``:
    also pass a (meta) clean image and (B, N) kept-patch mask, as inpainting does.

    The copy is built from ``model.config()`` on the meta device (no weights are copied).
    """
    base = _base_model(model)
    with torch.device("meta"):
        meta_model = type(base)(**base.config()).to(dtype).eval()
    x = torch.empty(shape, device="meta", dtype=dtype)
    y = torch.empty(shape[0], device="meta", dtype=torch.long)
    if torch.is_tensor(uc_cond):
        uc_cond = torch.empty(shape[0], device="meta", dtype=torch.long)
    extra = {}
    if x_cond or keep:
        extra["x_cond"] = torch.empty(shape, device="meta", dtype=dtype)
    if keep:
        n = (shape[-2] // base.patch_size) * (shape[-1] // base.patch_size)
        extra["keep"] = torch.empty((shape[0], n), device="meta", dtype=torch.bool)
    with meta_model.sync_free(distinct_times=sampler.distinct_times(steps, keep=keep)):
        out = sampler(meta_model, x, steps, y=y, cfg_scale=cfg_scale, uc_cond=uc_cond,
                      guidance_interval=guidance_interval, **extra)
    if out.shape != x.shape:
        raise AssertionError(f"sampler returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
    return sampler.nfe
