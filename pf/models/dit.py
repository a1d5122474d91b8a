"""PatchForcingDiT: a DiT whose conditioning is per token (SPEC.md section 2).

Every patch carries its own time, so the timestep embedding, the conditioning vector ``c``
and every block's AdaLN modulation are ``(B, N, *)`` instead of DiT's ``(B, *)``. The
modulation and gated residuals go through ``pf_kernels`` (fused Triton on CUDA, the torch
reference on the CPU). ``GlobalTimeDiT`` is the SiT baseline: the same network with one
time per sample, conditioning ``(B, 1, D)``.

At inference a sample's patches share a few distinct times, and the conditioning is then
computed once per distinct time and indexed per token (the "deduplicated conditioning"
section below; exact, on by default outside training; ``model.dedup_max_distinct = 0``
turns it off, ``model.sync_free(distinct_times=K)`` gives the static form for CUDA graphs
and ``torch.compile``).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import pf_kernels

try:  # optional: flash-attn is used on CUDA when installed
    from flash_attn import flash_attn_qkvpacked_func  # type: ignore
except Exception:  # pragma: no cover - depends on the machine
    flash_attn_qkvpacked_func = None


#################################################################################
#                      Embedders: patches, positions, time, class                #
#################################################################################


class PatchEmbed(nn.Module):
    """Conv2d(C, D, kernel=p, stride=p) flattened to tokens in raster order."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (not x1000), then Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t: (B, N) or (B, 1) -> (B, N, D)
        freq = pf_kernels.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row for the null class (id ``num_classes``).

    During training each label is replaced by the null class with ``dropout_prob``
    (classifier-free guidance).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)  # (B, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE layout: first half of the channels encodes the column, second half the row.

    Each half is ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 1 / 10000^(k / (D/4))``.
    Returns (grid_h * grid_w, embed_dim) in raster order.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D pos embed, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))  # (D/4,)

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = pos.reshape(-1)[:, None] * omega[None]  # (N, D/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (N, D/2)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)  # (N, D)


#################################################################################
#                                 Core blocks                                   #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv Linear, output projection, scale hd^-0.5."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)  # (B, N, 3, H, hd)
        if (
            flash_attn_qkvpacked_func is not None
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
        ):
            out = flash_attn_qkvpacked_func(qkv)  # (B, N, H, hd)
            return self.proj(out.reshape(b, n, d))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PFBlock(nn.Module):
    """DiT block with token-wise AdaLN-Zero: modulation is (B, N, 6D) (or (B, 1, 6D))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, N, D); c: (B, N, D) or (B, 1, D). chunk gives strided views the kernels take as is.
        # With ``index`` (B, N), c is a (B, K, D) table of distinct conditionings (deduplicated).
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # (B, N|1|K, D)
        if index is not None:
            x = pf_kernels.gated_residual_indexed(
                x, gate1, self.attn(pf_kernels.adaln_modulate_indexed(x, shift1, scale1, index)), index)
            return pf_kernels.gated_residual_indexed(
                x, gate2, self.mlp(pf_kernels.adaln_modulate_indexed(x, shift2, scale2, index)), index)
        x = pf_kernels.gated_residual(x, gate1, self.attn(pf_kernels.adaln_modulate(x, shift1, scale1)))
        x = pf_kernels.gated_residual(x, gate2, self.mlp(pf_kernels.adaln_modulate(x, shift2, scale2)))
        return x


class FinalLayer(nn.Module):
    """AdaLN then Linear(D, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, N|1|K, D)
        if index is not None:
            return self.linear(pf_kernels.adaln_modulate_indexed(x, shift, scale, index))  # (B, N, p*p*C_out)
        return self.linear(pf_kernels.adaln_modulate(x, shift, scale))  # (B, N, p*p*C_out)


#################################################################################
#            Deduplicated conditioning: one modulation per distinct time         #
#################################################################################
# At sampling time the patches of a sample share only a few distinct times (one for
# EulerPF, two for dual-loop and look-ahead). The timestep embedding, ``c`` and every
# block's Linear(D, 6D) modulation are then computed once per distinct time, as a
# (B, K, *) table, and read per token through a (B, N) row index by the indexed forms of
# ``adaln_modulate`` / ``gated_residual``: the (B, N, 6D) tensor never exists. This is
# exact (the same rows, computed once) and removes about a third of each block's FLOPs.
#
# Finding the distinct times needs no host sync: sort each row, mark where the sorted value
# changes, cumsum gives each token's rank. Only the table width K is a host number:
#   eager    K = the largest distinct count over the batch, read with ONE sync per forward
#            (not per block); the table is used when K <= dedup_max_distinct and
#            K * dedup_min_tokens_per_time <= N, else the plain per-token path runs;
#   K = 1    (EulerPF, and every sample at one time) needs no index at all: the (B, 1, D)
#            conditioning broadcasts over the tokens, as for a (B,) time;
#   static   inside ``model.sync_free(distinct_times=K)`` K is given by the caller (the
#            sampler knows it: 1 for EulerPF, 2 for dual-loop and look-ahead) and nothing
#            syncs: the path for CUDA-graph capture and torch.compile. A sample with more
#            than K distinct times would be wrong there; that is the caller's contract.
# Training (``model.training``) keeps the plain path: there every patch has its own time.


class TimeTable(NamedTuple):
    times: torch.Tensor  # (B, K) the distinct times of each sample, padded with its largest
    index: torch.Tensor  # (B, N) int64: row of ``times`` holding each token's time


def time_ranks(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank of every distinct value per row, without host sync.

    t (B, N) -> (sorted t (B, N), order (B, N), rank of each sorted entry (B, N)); the
    rank counts the distinct values before it, so ``rank[:, -1] + 1`` is each row's K.
    """
    ts, order = t.sort(dim=1)  # (B, N)
    changed = (ts[:, 1:] != ts[:, :-1]).to(torch.int64)  # (B, N-1) 1 where a new value starts
    rank = torch.cat([torch.zeros_like(changed[:, :1]), changed.cumsum(1)], dim=1)  # (B, N)
    return ts, order, rank


def time_table(t: torch.Tensor, k: int, ranks=None) -> TimeTable:
    """The (B, k) table of distinct times of t (B, N) and each token's row, no host sync.

    Rows with fewer than k distinct times repeat their largest one (harmless extra rows);
    rows with more than k would map the extra times onto row k-1 (wrong: callers ensure k).
    """
    ts, order, rank = ranks if ranks is not None else time_ranks(t)
    rank = rank.clamp_max(k - 1)  # (B, N)
    times = ts[:, -1:].repeat(1, k)  # (B, k) new memory; padding: the row's largest time
    times.scatter_(1, rank, ts)  # equal values land on the same row: order does not matter
    index = torch.empty_like(rank).scatter_(1, order, rank)  # (B, N) back to token order
    return TimeTable(times, index)


#################################################################################
#                                  The model                                    #
#################################################################################


class PatchForcingDiT(nn.Module):
    """DiT with one timestep per patch and a per-pixel log-variance (difficulty) channel.

    ``forward(x, t, y, return_uncertainty=False)``: x (B, C, H, W); t (B, N) per patch or
    (B,) per sample (broadcast to every token); y (B,) class ids in [0, num_classes]
    (``num_classes`` is the null class). Returns the velocity (B, C, H, W), and
    ``(v, logvar)`` with logvar (B, 1, H, W) when ``return_uncertainty``.
    """

    per_token = True
    # Deduplicated conditioning (see the section above): used outside training when a
    # sample has at most this many distinct times and N >= K * dedup_min_tokens_per_time.
    # Set dedup_max_distinct = 0 for the plain per-token path everywhere.
    dedup_max_distinct = 8
    dedup_min_tokens_per_time = 4
    _sync_free = False  # inside ``sync_free()``: no host reads in forward
    _static_distinct: int | None = None  # the time-table width given by ``sync_free()``

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        predict_uncertainty: bool = True,
        compile: bool = False,  # noqa: A002 - name kept from the released config
        **unused,
    ):
        super().__init__()
        if unused:
            raise TypeError(f"{type(self).__name__} got unknown arguments: {sorted(unused)}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.predict_uncertainty = predict_uncertainty
        self.compile = compile
        self.out_channels = in_channels + 1 if predict_uncertainty else in_channels
        self.grid_size = input_size // patch_size
        num_patches = self.grid_size**2

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([PFBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def config(self) -> dict:
        """Constructor arguments, as stored in checkpoints."""
        return {
            "input_size": self.input_size,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "hidden_size": self.hidden_size,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "class_dropout_prob": self.y_embedder.dropout_prob,
            "num_classes": self.num_classes,
            "predict_uncertainty": self.predict_uncertainty,
        }

    def initialize_weights(self) -> None:
        """DiT init: xavier Linears with zero bias, N(0, 0.02) embeddings, AdaLN-Zero."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.hidden_size, self.grid_size, self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data  # initialise the patch conv like a Linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------ checks
    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        p = self.patch_size
        if c != self.in_channels:
            raise ValueError(f"x has {c} channels, the model expects {self.in_channels}")
        if h % p or w % p:
            raise ValueError(f"H, W = {h}, {w} must be divisible by the patch size {p}")
        if (h // p) * (w // p) != self.pos_embed.shape[1]:
            raise ValueError(
                f"x of size {h}x{w} gives {(h // p) * (w // p)} patches; the model was built for "
                f"{self.input_size}x{self.input_size} ({self.pos_embed.shape[1]} patches)"
            )
        n = (h // p) * (w // p)
        self._check_t(t, b, n)
        if y.shape != (b,):
            raise ValueError(f"y must have shape ({b},), got {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"y must hold integer class ids, got dtype {y.dtype}")
        if not t.is_floating_point():
            raise TypeError(f"t must hold floating-point times in [0, 1], got dtype {t.dtype}")
        if not self._sync_free and not torch.compiler.is_compiling() and not _capturing(y) and b > 0:
            # one host read for both checks (skipped inside sync_free: graphs and compile)
            lo, hi, t_lo, t_hi = torch.stack([y.min().double(), y.max().double(), t.min().double(),
                                              t.max().double()]).tolist()
            if lo < 0 or hi > self.num_classes:
                raise ValueError(
                    f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), "
                    f"got values in [{int(lo)}, {int(hi)}]"
                )
            if not (0.0 <= t_lo and t_hi <= 1.0):  # also false for NaN
                raise ValueError(f"patch times must be finite and lie in [0, 1] (0 = noise, 1 = data), got values "
                                 f"in [{t_lo}, {t_hi}]")

    def _check_t(self, t: torch.Tensor, b: int, n: int) -> None:
        if t.shape not in ((b, n), (b,)):
            raise ValueError(f"t must have shape ({b}, {n}) (per patch) or ({b},) (per sample), got {tuple(t.shape)}")

    # ------------------------------------------------------- conditioning dedup
    @contextlib.contextmanager
    def sync_free(self, distinct_times: int | None = None):
        """Within this context ``forward`` reads no tensor value on the host.

        ``distinct_times=K``: every sample's patch times take at most K distinct values
        (the caller's promise, e.g. a sampler's ``max_distinct_times``), so the conditioning
        is computed once per time with a static table width. ``None``: the plain per-token
        path. The label range check (a host read) is skipped. Use it for CUDA-graph capture
        and ``torch.compile``; nests, restoring the previous state on exit.
        """
        if distinct_times is not None and int(distinct_times) < 1:
            raise ValueError(f"distinct_times must be a positive int or None, got {distinct_times}")
        saved = self._sync_free, self._static_distinct
        self._sync_free = True
        self._static_distinct = None if distinct_times is None else int(distinct_times)
        try:
            yield self
        finally:
            self._sync_free, self._static_distinct = saved

    def time_table(self, t: torch.Tensor) -> TimeTable | None:
        """The deduplicated (B, K) time table for per-patch ``t`` (B, N), or None for the plain path."""
        if t.dim() != 2:
            return None  # (B,) times already give a (B, 1, D) conditioning
        if self._static_distinct is not None:
            return time_table(t, self._static_distinct)
        n = t.shape[1]
        if (
            self.training
            or self._sync_free
            or self.dedup_max_distinct < 1
            or n < self.dedup_min_tokens_per_time
            or torch.compiler.is_compiling()
            or _capturing(t)
        ):
            return None
        ranks = time_ranks(t)
        k = int(ranks[2][:, -1].max()) + 1  # the one host sync of a forward
        if k > self.dedup_max_distinct or k * self.dedup_min_tokens_per_time > n:
            return None
        return time_table(t, k, ranks)

    # ----------------------------------------------------------------- forward
    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, N, D); (B,) -> (B, 1, D) (broadcast over tokens downstream)."""
        if t.dim() == 1:
            t = t[:, None]
        return self.t_embedder(t)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, N, p*p*C_out), each token ordered (row a, col q, channel) -> (B, C_out, H, W)."""
        b = x.shape[0]
        p, c = self.patch_size, self.out_channels
        x = x.reshape(b, h // p, w // p, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_uncertainty: bool = False):
        out, _ = self._trunk(x, t, y)
        return self._heads(out, return_uncertainty)

    def _trunk(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tap_after: int = 0):
        """The network's output (B, C_out, H, W), and the tokens (B, N, D) after block
        ``tap_after`` (1-based; 0: None) for a head on the hidden states (REPA)."""
        self._check_inputs(x, t, y)
        _, _, h, w = x.shape
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        table = self.time_table(t)
        times, index = t, None  # (B, N) or (B,): the plain path
        if table is not None and table.times.shape[1] == 1:
            times = table.times[:, 0]  # one time per sample: the (B, 1, D) broadcast, no index
        elif table is not None:
            times, index = table.times, table.index  # (B, K) distinct times, (B, N) row per token
        c = self.embed_time(times) + self.y_embedder(y)[:, None, :]  # (B, N|1|K, D)
        c = c.to(tokens.dtype)
        tapped = None
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, index)  # (B, N, D)
            if i + 1 == tap_after:
                tapped = tokens
        return self.unpatchify(self.final_layer(tokens, c, index), h, w), tapped  # (B, C_out, H, W)

    def _heads(self, out: torch.Tensor, return_uncertainty: bool):
        v = out[:, : self.in_channels]
        if not return_uncertainty:
            return v
        if not self.predict_uncertainty:
            raise ValueError("this model has no uncertainty head (predict_uncertainty=False)")
        return v, out[:, self.in_channels :]


class GlobalTimeDiT(PatchForcingDiT):
    """The SiT baseline: one timestep per sample, AdaLN conditioning (B, 1, D).

    Same architecture family (and the same fused ops in their per-sample form); by
    default no uncertainty head, as in SiT. ``t`` must be (B,).
    """

    per_token = False

    def __init__(self, *args, predict_uncertainty: bool = False, **kwargs):
        super().__init__(*args, predict_uncertainty=predict_uncertainty, **kwargs)

    def _check_t(self, t: torch.Tensor, b: int, n: int) -> None:
        if t.shape != (b,):
            raise ValueError(f"GlobalTimeDiT takes one time per sample: t must have shape ({b},), got {tuple(t.shape)}")


def _capturing(ref: torch.Tensor) -> bool:
    return ref.is_cuda and torch.cuda.is_current_stream_capturing()


#################################################################################
#                                   Presets                                     #
#################################################################################


# (hidden_size, depth, num_heads) per size; patch size 2, MLP ratio 4 throughout.
PRESET_SIZES = {
    "XL/2": (1152, 28, 16),
    "L/2": (1024, 24, 16),
    "B/2": (768, 12, 12),
    "S/2": (384, 12, 6),
    # Small enough to train on a 2-core CPU in minutes (the embedded digits default).
    "Tiny/2": (128, 4, 4),
}


def build_model(name: str, per_token: bool = True, repa: dict | None = None, **kwargs) -> PatchForcingDiT:
    """Build a preset by name (``PF-B/2``, ``B/2``, ``SiT-B/2``); ``per_token=False`` gives the
    baseline; ``repa={"z_dim", "encoder_depth", "projector_dim"}`` adds the REPA projector."""
    key = name.split("-", 1)[1] if "-" in name else name
    if key not in PRESET_SIZES:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESET_SIZES)}")
    d, depth, heads = PRESET_SIZES[key]
    if repa is not None:
        from pf.models.repa import REPAGlobalTimeDiT, REPAPatchForcingDiT

        cls, kwargs = (REPAPatchForcingDiT if per_token else REPAGlobalTimeDiT), {**kwargs, **repa}
    else:
        cls = PatchForcingDiT if per_token else GlobalTimeDiT
    return cls(hidden_size=d, depth=depth, num_heads=heads, patch_size=int(key.split("/")[1]), **kwargs)


def _preset(name: str):
    def build(**kwargs) -> PatchForcingDiT:
        return build_model(name, per_token=True, **kwargs)

    return build


PF_models = {f"PF-{key}": _preset(key) for key in PRESET_SIZES}


def num_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "PatchForcingDiT",
    "GlobalTimeDiT",
    "PF_models",
    "build_model",
    "get_2d_sincos_pos_embed",
    "time_table",
    "TimeTable",
    "num_params",
]
