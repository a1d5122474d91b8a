"""Drop-in: rebind the ``forward`` of DiT/SiT/PF-style modules to the fused ops.

Recognised by their attributes (no import of the other codebase needed):
  block        ``adaLN_modulation``, ``norm1``, ``norm2``, ``attn``, ``mlp``; forward(x, c);
               ``adaLN_modulation(c)`` split in 6 in DiT's order
               (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp);
  final layer  ``adaLN_modulation``, ``norm_final``, ``linear``; split in 2 (shift, scale).
``c`` may be per sample (B, D), as in DiT/SiT (whose forward does ``chunk(6, dim=1)`` and
``unsqueeze(1)``), or per token (B, N, D) / (B, 1, D) as in Patch Forcing, or a (B, K, D)
table with a third argument ``index`` (B, N) (PF's deduplicated conditioning). The chunks stay
strided views of the modulation output: the kernels read them in place. Within a block the
attention's residual update and the MLP's modulation are one ``gated_residual_modulate`` call;
the MLP's residual and the next module's modulation stay two calls (fusing across blocks would
mean rewriting the model's own loop). ``pf.models.PatchForcingDiT`` fuses across blocks itself
and has no module named like these (its norms live in the fused ops): nothing to patch there.

Only LayerNorms without affine parameters are fused (that is DiT's design); a module whose
norms carry weights, or whose modulation Linear has an unexpected width, is left alone.

The names only nominate a module: it is patched when the fused forward computes what its own
forward does. ``patch_dit`` runs both on a copy of the module with random weights (AdaLN-Zero
init would hide any difference) and a small probe input, and skips, with a warning that
names the module and the reason, a module whose forward computes something else (an extra
submodule, another residual form), takes other arguments, or has forward hooks on a norm the
fused path would bypass. A patched module stays picklable (``torch.save(model)``) and its
state dict is unchanged.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from pf_kernels.dispatch import (
    adaln_modulate,
    adaln_modulate_indexed,
    gated_residual,
    gated_residual_indexed,
    gated_residual_modulate,
    gated_residual_modulate_indexed,
)

_PATCHED = "_pf_kernels_original_forward"
_FUSED = "_pf_kernels_fused_forward"  # the FusedForward installed (a later wrapper may call it)


def _plain_layernorm(norm: nn.Module) -> bool:
    return (
        isinstance(norm, nn.LayerNorm)
        and norm.weight is None
        and norm.bias is None
        and len(norm.normalized_shape) == 1
    )


def _modulation_width(mod: nn.Module) -> int | None:
    """out_features of the last Linear in ``adaLN_modulation`` (None when there is none)."""
    last = None
    for m in mod.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else last.out_features


def _per_token(mod: torch.Tensor) -> torch.Tensor:
    # (B, k*D) per-sample modulation -> (B, 1, k*D); (B, N, k*D) is left as it is.
    return mod.unsqueeze(1) if mod.dim() == 2 else mod


def _block_forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    # x (B, N, D); c (B, D) per sample or (B, N, D) / (B, 1, D) per token; with index (B, N),
    # c is a (B, K, D) table of distinct conditionings (PF's deduplicated form).
    # The attention's residual update and the MLP's modulation are one fused call; the MLP's
    # residual stays a plain gated_residual (fusing it with the next block's modulation would
    # mean rewriting the model's own loop, which patch_dit leaves alone).
    mod = _per_token(self.adaLN_modulation(c))  # (B, N|1|K, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    if index is not None:
        h = adaln_modulate_indexed(x, shift_msa, scale_msa, index, self.norm1.eps)
        x, h = gated_residual_modulate_indexed(x, gate_msa, self.attn(h), shift_mlp, scale_mlp, index, self.norm2.eps)
        return gated_residual_indexed(x, gate_mlp, self.mlp(h), index)
    h = adaln_modulate(x, shift_msa, scale_msa, self.norm1.eps)
    x, h = gated_residual_modulate(x, gate_msa, self.attn(h), shift_mlp, scale_mlp, self.norm2.eps)
    return gated_residual(x, gate_mlp, self.mlp(h))


def _final_forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    mod = _per_token(self.adaLN_modulation(c))  # (B, N|1|K, 2D)
    shift, scale = mod.chunk(2, dim=-1)
    if index is not None:
        return self.linear(adaln_modulate_indexed(x, shift, scale, index, self.norm_final.eps))
    return self.linear(adaln_modulate(x, shift, scale, self.norm_final.eps))


BLOCK_PARTS = ("adaLN_modulation", "norm1", "norm2", "attn", "mlp")
FINAL_PARTS = ("adaLN_modulation", "norm_final", "linear")


def _nominate(m: nn.Module) -> tuple[str | None, str | None]:
    """(kind, None) for a module the fused forward may replace, (kind, reason) for one named
    like a DiT module that it cannot, (None, None) for the rest."""
    if all(hasattr(m, a) for a in BLOCK_PARTS):
        kind, norms, chunks = "block", ("norm1", "norm2"), 6
    elif all(hasattr(m, a) for a in FINAL_PARTS):
        kind, norms, chunks = "final", ("norm_final",), 2
    else:
        return None, None
    for name in norms:
        if not _plain_layernorm(getattr(m, name)):
            return kind, f"{name} is not a LayerNorm without affine weights (fusing it would drop them)"
    width = _modulation_width(m.adaLN_modulation)
    d = getattr(m, norms[0]).normalized_shape[0]
    if width != chunks * d:
        return kind, f"adaLN_modulation gives {width} features, not {chunks} x {d}"
    return kind, None


class FusedForward:
    """The patched ``forward`` of one module: a picklable callable (a bound method of a
    function the module's class does not have would not unpickle). ``active`` False: the
    module's class forward (what ``unpatch_dit`` leaves under a wrapper installed later)."""

    def __init__(self, module: nn.Module, kind: str):
        self.module, self.kind, self.active = module, kind, True

    def __call__(self, *args, **kwargs):
        if not getattr(self, "active", True):  # (pickles from before the flag: active)
            return type(self.module).forward(self.module, *args, **kwargs)
        fn = _block_forward if self.kind == "block" else _final_forward
        return fn(self.module, *args, **kwargs)


class PatchReport(int):
    """How many modules ``patch_dit`` patched (an int), and ``skipped``: (name, reason) pairs."""

    skipped: list

    def __new__(cls, patched: int, skipped: list):
        report = super().__new__(cls, patched)
        report.skipped = list(skipped)
        return report

    def __str__(self) -> str:
        text = f"patched {int(self)} module(s)"
        if self.skipped:
            text += f", skipped {len(self.skipped)}: " + "; ".join(f"{n} ({why})" for n, why in self.skipped)
        return text

    __repr__ = __str__


PROBE_B, PROBE_N = 2, 3  # unequal, so a wrong broadcast cannot pass by chance


def _bypassed_hooks(module: nn.Module, kind: str) -> str | None:
    norms = ("norm1", "norm2") if kind == "block" else ("norm_final",)
    for name in norms:
        norm = getattr(module, name)
        if norm._forward_hooks or norm._forward_pre_hooks:
            return f"{name} has forward hooks, which the fused path (it never calls {name}) would not fire"
    return None


@torch.no_grad()
def _judge(module: nn.Module, kind: str) -> str | None:
    """None if the fused forward computes what ``module``'s forward does, else the reason.

    The probe runs in float32 whatever the model's dtype: it judges what the forward computes,
    and half precision cannot resolve a tolerance that tells a missing term from rounding."""
    if "forward" in module.__dict__:
        return ("its forward is replaced on the instance (a wrapper, e.g. a hook library's), which the fused "
                "path would drop")
    probe = copy.deepcopy(module).eval().float()
    gen = torch.Generator().manual_seed(0)
    for prm in probe.parameters():
        prm.copy_(0.3 * torch.randn(prm.shape, generator=gen, dtype=torch.float32).to(prm))
    norm = probe.norm1 if kind == "block" else probe.norm_final
    d = norm.normalized_shape[0]
    like = next(probe.parameters())
    x = torch.randn(PROBE_B, PROBE_N, d, generator=gen).to(like)
    fused = _block_forward if kind == "block" else _final_forward
    tried = []
    for c_shape in ((PROBE_B, d), (PROBE_B, PROBE_N, d)):  # DiT's (B, D), then per token
        c = torch.randn(c_shape, generator=gen).to(like)
        try:
            want = probe(x, c)
        except Exception as err:  # its forward does not take this conditioning
            tried.append(f"c {tuple(c_shape)}: {type(err).__name__}")
            continue
        try:
            got = fused(probe, x, c)
        except Exception as err:  # e.g. its attention takes more than the tokens (RoPE frequencies)
            return f"the fused forward cannot call its submodules as its own forward does ({type(err).__name__}: {err})"
        if not torch.is_tensor(want) or want.shape != got.shape:
            return f"its forward returns {getattr(want, 'shape', type(want).__name__)}, the fused one {tuple(got.shape)}"
        diff = (want.float() - got.float()).abs().max().item()
        scale = want.float().abs().max().item()
        if not diff <= 1e-3 * max(scale, 1.0):
            return f"its forward computes something else (max |difference| {diff:.3g} on a random probe)"
        return None
    return "its forward does not take (x, c) as a DiT block does (" + "; ".join(tried) + ")"


def patch_dit(model: nn.Module, *, verbose: bool = True) -> PatchReport:
    """Rebind the forward of every DiT-style block and final layer in ``model`` (``model``
    itself included) whose own forward the fused one reproduces. Returns a :class:`PatchReport`
    (an int: how many this call patched; ``.skipped``: the nominated modules left alone, each
    also warned about when ``verbose``). Modules already patched are skipped silently, so
    calling it twice is harmless. ``unpatch_dit`` undoes it.
    """
    patched, skipped = 0, []
    for name, module in model.named_modules():
        if hasattr(module, _PATCHED):
            continue
        kind, reason = _nominate(module)
        if kind is None:
            continue
        reason = reason or _bypassed_hooks(module, kind) or _judge(module, kind)
        if reason is not None:
            skipped.append((name or type(module).__name__, reason))
            if verbose:
                warnings.warn(f"pf_kernels.patch_dit: left {name or type(module).__name__} "
                              f"({type(module).__name__}) as it is: {reason}", stacklevel=2)
            continue
        # The instance attribute shadows the class's forward: only this module changes.
        setattr(module, _PATCHED, module.__dict__.get("forward"))
        module.forward = FusedForward(module, kind)
        setattr(module, _FUSED, module.forward)
        patched += 1
    return PatchReport(patched, skipped)


def unpatch_dit(model: nn.Module) -> int:
    """Restore the forwards that ``patch_dit`` replaced. Returns how many were restored.

    A wrapper installed on a patched module's ``forward`` after the patch (a hook library's,
    e.g. diffusers' or accelerate's hooks) is never removed: the patched forward under it is
    switched off instead, so the wrapper then runs the module's own forward."""
    restored = 0
    for module in model.modules():
        if not hasattr(module, _PATCHED):
            continue
        original = getattr(module, _PATCHED)
        fused = module.__dict__.get(_FUSED)
        delattr(module, _PATCHED)
        if fused is not None:
            delattr(module, _FUSED)
            fused.active = False
        current = module.__dict__.get("forward")
        if fused is not None and current is not fused:
            pass  # wrapped since the patch: the wrapper stays, calling the switched-off forward
        elif original is None:
            del module.forward
        else:
            module.forward = original
        restored += 1
    return restored
