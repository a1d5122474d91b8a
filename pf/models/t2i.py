"""PatchForcingT2I: the text-to-image Patch Forcing transformer (SPEC.md section 11).

An HDiT-style transformer with one time per patch:

- patches: channels-last ``p x p`` patches flattened, ``Linear(p*p*C, D, bias=False)``; no
  position embedding added: positions enter through 2-D axial RoPE (patch centres on a
  relative canvas, the longer side spanning [-1, 1]);
- time, per token: Fourier features ``[cos, sin](2 pi t W^T)`` (W ~ N(0, 1), a buffer),
  ``Linear(W, W)``, then a mapping network (RMSNorm, 2 residual SwiGLU blocks, RMSNorm):
  ``c`` of shape (B, N, W), W = 384 at every published size;
- text: encoder tokens (B, L, C_txt) -> ``Linear(C_txt, D)`` -> 2 unconditioned transformer
  layers with 1-D RoPE over the token index and a key-padding mask (the published code has
  none: every padded token was attended);
- each layer: self-attention, cross-attention to the text, SwiGLU feed-forward, every
  sub-block ``x = x + f(AdaRMSNorm(x, c))`` with ``AdaRMSNorm(x, c) = rms_norm(x) * (1 +
  Linear(W, D)(c))`` (per token, zero-initialised, no shift and no gate); attention is
  cosine-similarity (q, k L2-normalised per head, each times ``sqrt(s_h)``, a learnable
  per-head scale initialised to 10; attention scale 1); output projections zero-initialised;
- output: RMSNorm, zero-initialised ``Linear(D, p*p*(C+1))``, unpatchify; the last channel
  is the per-pixel log-variance (the difficulty map).

``forward(x, t, cond, return_uncertainty=False)`` with ``cond`` a :class:`pf.conditioning.TextCond`
(``tokens`` (B, L, C_txt), ``mask`` (B, L) bool). Samplers call it exactly as they call the
class-conditional model. At sampling the time mapping network and every AdaRMSNorm scale are
computed once per distinct time (:mod:`pf.models.dedup`), read per token by the indexed
``ada_rms_norm``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import pf_kernels
from pf.conditioning import TextCond, check_text_cond
from pf.models.dedup import DistinctTimes, check_image

#################################################################################
#                          Norms, feed-forward, positions                       #
#################################################################################


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Where the model computes norms, rotations and time features: fp32, fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` (learnable weight, initialised to 1), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = acc_dtype(x)
        return F.rms_norm(x.to(acc), (x.shape[-1],), self.weight.to(acc), self.eps).to(x.dtype)


class AdaRMSNorm(nn.Module):
    """``rms_norm(x) * (1 + Linear(W, D)(c))``: per-token scale from the time conditioning,
    zero-initialised (the block starts as a plain RMSNorm with weight 1)."""

    def __init__(self, dim: int, cond_width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(cond_width, dim, bias=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        # x (B, N, D); c (B, N|1, W), or the (B, K, W) table of distinct times with index (B, N)
        scale = self.linear(c)  # (B, N|1|K, D)
        if index is not None:
            return pf_kernels.ada_rms_norm_indexed(x, scale, index, self.eps)
        return pf_kernels.ada_rms_norm(x, scale, self.eps)


class SwiGLU(nn.Module):
    """``down(a * silu(g))`` with ``a, g = up(x).chunk(2)``; no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.up(x).chunk(2, dim=-1)
        return self.down(a * F.silu(g))


def axial_positions(gh: int, gw: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Patch centres on a relative canvas, (gh * gw, 2) as (row, col) in raster order.

    A pixel centre of an H x W image sits at ``((i + 0.5) / H * 2 - 1) * H / max(H, W)`` along
    the rows (likewise the columns): the longer side spans [-1, 1]. The mean over a patch's
    pixel centres is the patch centre, the same formula on the patch grid.
    """
    longest = max(gh, gw)
    rows = ((torch.arange(gh, dtype=torch.float64) + 0.5) / gh * 2 - 1) * (gh / longest)
    cols = ((torch.arange(gw, dtype=torch.float64) + 0.5) / gw * 2 - 1) * (gw / longest)
    pos = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)  # (N, 2)
    return pos.to(device=device, dtype=dtype)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """RoPE on the first ``2 * angles.shape[-1]`` channels of x: the first half rotated with
    the second half of that span by ``angles`` (rotate-half layout); the rest unchanged.

    x (B, H, N, hd); angles (N, r) -> (B, H, N, hd).
    """
    r = angles.shape[-1]
    x1, x2, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # (N, r), from fp64 angles
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def axial_rope_angles(pos: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Angles of 2-D axial RoPE on half of each head's channels: ``head_dim // 8`` frequencies
    per axis, log-spaced from pi to 10 pi; (N, 2) positions -> (N, head_dim // 4) angles
    (the row angles, then the column angles). Every head gets the same frequencies, as SPEC
    section 11 words it; HDiT instead deals ``n_heads`` times as many over the heads (no T2I
    checkpoint is released to say which the published model used, and a change would alter
    models trained here)."""
    n_freq = head_dim // 8
    freqs = torch.exp(torch.linspace(math.log(math.pi), math.log(10 * math.pi), n_freq, dtype=torch.float64))
    freqs = freqs.to(pos.device)
    return torch.cat([pos[:, :1].double() * freqs, pos[:, 1:].double() * freqs], dim=-1)  # (N, hd/4) fp64


def text_rope_angles(length: int, head_dim: int, device=None) -> torch.Tensor:
    """1-D RoPE over the token index on every channel of a head: (L, head_dim // 2) angles,
    frequencies ``10000^(-2i / head_dim)``."""
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    freqs = 10000.0 ** (-2 * i / head_dim)
    return (torch.arange(length, dtype=torch.float64)[:, None] * freqs).to(device)  # (L, hd/2) fp64


def cosine_qk(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """q, k (B, H, *, hd) L2-normalised per head and each multiplied by ``sqrt(s_h)``
    (``scale`` (H,)): the dot product is ``s_h * cos(q, k)``. In fp32 (fp64 for fp64), returned in q's dtype."""
    acc = acc_dtype(q)
    root = scale.to(acc).clamp_min(eps).sqrt()[:, None, None]  # (H, 1, 1)
    qf, kf = q.to(acc), k.to(acc)
    qf = qf * torch.rsqrt(qf.pow(2).sum(-1, keepdim=True) + eps) * root
    kf = kf * torch.rsqrt(kf.pow(2).sum(-1, keepdim=True) + eps) * root
    return qf.to(q.dtype), kf.to(k.dtype)


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) bool (True = a real token) -> (B, 1, 1, L), SDPA's boolean attn_mask."""
    return None if mask is None else mask[:, None, None, :]


#################################################################################
#                                 Attention                                     #
#################################################################################


class SelfAttention(nn.Module):
    """Cosine-similarity self-attention with 2-D axial RoPE; zero-initialised output."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim or head_dim % 8:
            raise ValueError(f"width {dim} must be a multiple of the head dim {head_dim}, itself a multiple of 8")
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.scale = nn.Parameter(torch.full((self.num_heads,), 10.0))
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        q, k = cosine_qk(q, k, self.scale)
        q, k = rotate(q, angles), rotate(k, angles)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, H, N, hd)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Cosine-similarity attention from the image tokens (RoPE on the queries) to the text
    tokens (RMSNorm'd; padding masked); zero-initialised output."""

    def __init__(self, dim: int, text_dim: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.text_norm = RMSNorm(text_dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(text_dim, 2 * dim, bias=False)
        self.scale = nn.Parameter(torch.full((self.num_heads,), 10.0))
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor | None, angles: torch.Tensor):
        b, n, d = x.shape
        L = text.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        k, v = self.kv(self.text_norm(text)).reshape(b, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = cosine_qk(q, k, self.scale)  # (B, H, N|L, hd)
        q = rotate(q, angles)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(mask), scale=1.0)  # (B, H, N, hd)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class TextLayer(nn.Module):
    """An unconditioned pre-norm transformer layer of the text refiner: self-attention with
    1-D RoPE (scale hd^-0.5, padding masked), then a SwiGLU feed-forward."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim or head_dim % 2:
            raise ValueError(f"text width {dim} must be a multiple of the text head dim {head_dim} (even)")
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.norm1 = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm2 = RMSNorm(dim)
        self.ff = SwiGLU(dim, 3 * dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, angles: torch.Tensor) -> torch.Tensor:
        b, L, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, angles), rotate(k, angles)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask(mask))  # (B, H, L, hd)
        h = h + self.out(att.transpose(1, 2).reshape(b, L, d))
        return h + self.ff(self.norm2(h))


class TextRefiner(nn.Module):
    """Encoder tokens (B, L, C_txt) -> ``Linear(C_txt, D)`` -> ``depth`` TextLayers -> (B, L, D)."""

    def __init__(self, text_dim: int, dim: int, head_dim: int, depth: int = 2):
        super().__init__()
        self.head_dim = head_dim
        self.proj = nn.Linear(text_dim, dim, bias=False)
        self.layers = nn.ModuleList([TextLayer(dim, head_dim) for _ in range(depth)])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.proj(tokens)
        angles = text_rope_angles(h.shape[1], self.head_dim, h.device)
        for layer in self.layers:
            h = layer(h, mask, angles)
        return h


#################################################################################
#                           Time: Fourier features, mapping                     #
#################################################################################


class FourierTime(nn.Module):
    """``[cos, sin](2 pi t W^T)`` with W ~ N(0, 1) of shape (width / 2, 1) (a saved buffer)."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(width // 2, 1))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        f = 2 * math.pi * t.to(acc)[..., None] * self.weight[:, 0].to(acc)  # (B, N, W/2)
        return torch.cat([f.cos(), f.sin()], dim=-1)  # (B, N, W)


class MappingBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = RMSNorm(width)
        self.ff = SwiGLU(width, 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class TimeMapping(nn.Module):
    """Per-token time conditioning: Fourier features -> Linear -> RMSNorm -> 2 residual SwiGLU
    blocks -> RMSNorm. (B, N) times -> (B, N, W)."""

    def __init__(self, width: int, depth: int = 2):
        super().__init__()
        self.fourier = FourierTime(width)
        self.proj = nn.Linear(width, width, bias=False)
        self.in_norm = RMSNorm(width)
        self.blocks = nn.ModuleList([MappingBlock(width) for _ in range(depth)])
        self.out_norm = RMSNorm(width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        c = self.in_norm(self.proj(self.fourier(t).to(self.proj.weight.dtype)))
        for block in self.blocks:
            c = block(c)
        return self.out_norm(c)


#################################################################################
#                                   Layers                                      #
#################################################################################


class T2IBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; each ``x + f(AdaRMSNorm(x, c))``."""

    def __init__(self, dim: int, cond_width: int, head_dim: int, text_dim: int, ff_mult: int = 3):
        super().__init__()
        self.norm_attn = AdaRMSNorm(dim, cond_width)
        self.attn = SelfAttention(dim, head_dim)
        self.norm_cross = AdaRMSNorm(dim, cond_width)
        self.cross = CrossAttention(dim, text_dim, head_dim)
        self.norm_ff = AdaRMSNorm(dim, cond_width)
        self.ff = SwiGLU(dim, ff_mult * dim)

    def forward(self, x, c, index, text, mask, angles) -> torch.Tensor:
        # x (B, N, D); c (B, N|1|K, W); text (B, L, D); angles (N, hd/4)
        x = x + self.attn(self.norm_attn(x, c, index), angles)
        x = x + self.cross(self.norm_cross(x, c, index), text, mask, angles)
        return x + self.ff(self.norm_ff(x, c, index))


#################################################################################
#                                  The model                                    #
#################################################################################


class PatchForcingT2I(DistinctTimes, nn.Module):
    """Text-to-image Patch Forcing transformer (SPEC section 11).

    ``forward(x, t, cond, return_uncertainty=False)``: x (B, C, H, W) (H, W multiples of the
    patch size; any size: positions are relative); t (B, N) per patch or (B,) per sample;
    ``cond`` a :class:`TextCond`. Returns v (B, C, H, W), and (v, logvar (B, 1, H, W)).
    """

    per_token = True
    cond_kind = "text"  # samplers and guidance: the condition is a TextCond, the null one the empty prompt's
    num_classes = None

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1536,
        depth: int = 28,
        head_dim: int = 96,
        text_dim: int = 384,
        text_head_dim: int = 128,
        text_depth: int = 2,
        cond_width: int = 384,
        mapping_depth: int = 2,
        ff_mult: int = 3,
        predict_uncertainty: bool = True,
        **unused,
    ):
        super().__init__()
        if unused:
            raise TypeError(f"{type(self).__name__} got unknown arguments: {sorted(unused)}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if cond_width % 2:
            raise ValueError(f"cond_width must be even (cos and sin halves), got {cond_width}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.hidden_size, self.depth, self.head_dim = hidden_size, depth, head_dim
        self.text_dim, self.text_head_dim, self.text_depth = text_dim, text_head_dim, text_depth
        self.cond_width, self.mapping_depth, self.ff_mult = cond_width, mapping_depth, ff_mult
        self.predict_uncertainty = predict_uncertainty
        self.out_channels = in_channels + 1 if predict_uncertainty else in_channels
        self.grid_size = input_size // patch_size

        self.patch_in = nn.Linear(patch_size * patch_size * in_channels, hidden_size, bias=False)
        self.time_mapping = TimeMapping(cond_width, mapping_depth)
        self.text_refiner = TextRefiner(text_dim, hidden_size, text_head_dim, text_depth)
        self.blocks = nn.ModuleList([T2IBlock(hidden_size, cond_width, head_dim, hidden_size, ff_mult)
                                     for _ in range(depth)])
        self.out_norm = RMSNorm(hidden_size)
        self.patch_out = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels, bias=False)
        self.initialize_weights()

    def config(self) -> dict:
        """Constructor arguments, as stored in checkpoints."""
        return {"input_size": self.input_size, "patch_size": self.patch_size, "in_channels": self.in_channels,
                "hidden_size": self.hidden_size, "depth": self.depth, "head_dim": self.head_dim,
                "text_dim": self.text_dim, "text_head_dim": self.text_head_dim, "text_depth": self.text_depth,
                "cond_width": self.cond_width, "mapping_depth": self.mapping_depth, "ff_mult": self.ff_mult,
                "predict_uncertainty": self.predict_uncertainty}

    def initialize_weights(self) -> None:
        """Xavier-uniform Linears, then zero: every AdaRMSNorm scale, every attention output
        and feed-forward down projection of the layers and the mapping network, and the output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        for block in self.blocks:
            for norm in (block.norm_attn, block.norm_cross, block.norm_ff):
                nn.init.zeros_(norm.linear.weight)
            nn.init.zeros_(block.attn.out.weight)
            nn.init.zeros_(block.cross.out.weight)
            nn.init.zeros_(block.ff.down.weight)
        for block in self.time_mapping.blocks:
            nn.init.zeros_(block.ff.down.weight)
        nn.init.zeros_(self.patch_out.weight)

    # ------------------------------------------------------------------ checks
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond) -> None:
        b, n = check_image(x, self.in_channels, self.patch_size)
        if t.shape not in ((b, n), (b,)):
            raise ValueError(f"t must have shape ({b}, {n}) (per patch) or ({b},) (per sample), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"t must hold floating-point times in [0, 1], got dtype {t.dtype}")
        if not isinstance(cond, TextCond):
            raise TypeError(f"a text-to-image model is conditioned on a TextCond (tokens, mask), got "
                            f"{type(cond).__name__}; encode prompts with pf.text")
        check_text_cond(cond, b)
        if cond.tokens.shape[-1] != self.text_dim:
            raise ValueError(f"text tokens are {cond.tokens.shape[-1]} wide; the model was built for a "
                             f"{self.text_dim}-wide text encoder")
        if b > 0 and self.may_read_host(x):
            # one host read for both checks (skipped in sync_free: graphs and compile)
            t_lo, t_hi, empty = torch.stack([t.min().double(), t.max().double(),
                                             (~cond.mask.any(1)).sum().double()]).tolist()
            if not (0.0 <= t_lo and t_hi <= 1.0):  # also false for NaN
                raise ValueError(f"patch times must be finite and lie in [0, 1] (0 = noise, 1 = data), got values "
                                 f"in [{t_lo}, {t_hi}]")
            if empty:
                raise ValueError(f"{int(empty)} text condition(s) have no real token (mask all False); even the "
                                 f"empty prompt keeps the encoder's special tokens")

    # ----------------------------------------------------------------- forward
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), each token ordered (row a, col q, channel)."""
        b, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, N, p*p*C_out), each token ordered (row a, col q, channel) -> (B, C_out, H, W)."""
        b = x.shape[0]
        p, c = self.patch_size, self.out_channels
        x = x.reshape(b, h // p, w // p, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond, return_uncertainty: bool = False):
        self._check_inputs(x, t, cond)
        _, _, h, w = x.shape
        p = self.patch_size
        tokens = self.patch_in(self.patchify(x))  # (B, N, D)
        times, index = self.conditioning_times(t)  # (B, N|1|K), (B, N) row per token when a table
        c = self.time_mapping(times).to(tokens.dtype)  # (B, N|1|K, W)
        text = self.text_refiner(cond.tokens.to(tokens.dtype), cond.mask)  # (B, L, D)
        angles = axial_rope_angles(axial_positions(h // p, w // p, x.device, torch.float64), self.head_dim)  # (N, hd/4)
        for block in self.blocks:
            tokens = block(tokens, c, index, text, cond.mask, angles)
        out = self.unpatchify(self.patch_out(self.out_norm(tokens)), h, w)  # (B, C_out, H, W)
        v = out[:, : self.in_channels]
        if not return_uncertainty:
            return v
        if not self.predict_uncertainty:
            raise ValueError("this model has no uncertainty head (predict_uncertainty=False)")
        return v, out[:, self.in_channels :]


__all__ = ["PatchForcingT2I", "axial_positions", "TextCond"]
