"""PatchForcingDiT: a DiT whose conditioning is per token (SPEC.md section 2).

Every patch carries its own time, so the timestep embedding, the conditioning vector ``c``
and every block's AdaLN modulation are ``(B, N, *)`` instead of DiT's ``(B, *)``. The
modulation and gated residuals go through ``pf_kernels`` (fused Triton on CUDA, the torch
reference on the CPU); each residual update is one fused call with the LayerNorm and
modulation after it, across block boundaries too (see ``PFBlock``). ``GlobalTimeDiT`` is the
SiT baseline: the same network with one time per sample, conditioning ``(B, 1, D)``.

At inference a sample's patches share a few distinct times, and the conditioning is then
computed once per distinct time and indexed per token (the "deduplicated conditioning"
section below; exact, on by default outside training; ``model.dedup_max_distinct = 0``
turns it off, ``model.sync_free(distinct_times=K)`` gives the static form for CUDA graphs
and ``torch.compile``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import pf_kernels
from pf.models.dedup import DistinctTimes, check_image

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


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """LN(x) * (1 + scale) + shift (LN without affine, eps 1e-6); (B, K, D) tables with ``index``."""
    if index is not None:
        return pf_kernels.adaln_modulate_indexed(x, shift, scale, index)
    return pf_kernels.adaln_modulate(x, shift, scale)


def residual_modulate(x, gate, y, shift, scale, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, LN(x + gate * y) * (1 + scale) + shift) in one fused pass."""
    if index is not None:
        return pf_kernels.gated_residual_modulate_indexed(x, gate, y, shift, scale, index)
    return pf_kernels.gated_residual_modulate(x, gate, y, shift, scale)


class PFBlock(nn.Module):
    """DiT block with token-wise AdaLN-Zero: modulation is (B, N, 6D) (or (B, 1, 6D), or a
    (B, K, 6D) table with ``index``).

    SPEC's block is ``x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)``, then the same with
    MLP and the second three. Each residual update is fused with the LayerNorm + modulation
    that reads its result (``pf_kernels.gated_residual_modulate``): the attention's with the
    MLP's input, the MLP's with the input of the module after the block (the next block's
    attention, or the final layer). So a block takes its attention input already modulated
    and returns the stream with the next module's input:

        forward(x, h, mod, next_mod, index=None) -> (x, h)
          x         (B, N, D) the stream; h = LN(x) * (1 + scale1) + shift1 (B, N, D)
          mod       ``self.modulation(c)``: this block's six (B, N|1|K, D) chunks
          next_mod  (shift, scale) of the module after the block, applied to the new stream
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # (shift1, scale1, gate1, shift2, scale2, gate2), each (B, N|1|K, D): strided views of
        # one (B, N|1|K, 6D) tensor, which the kernels read as they are.
        return self.adaLN_modulation(c).chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, h: torch.Tensor, mod, next_mod, index: torch.Tensor | None = None):
        _, _, gate1, shift2, scale2, gate2 = mod  # shift1, scale1 are already in h
        next_shift, next_scale = next_mod
        x, h = residual_modulate(x, gate1, self.attn(h), shift2, scale2, index)  # (B, N, D) each
        return residual_modulate(x, gate2, self.mlp(h), next_shift, next_scale, index)


class FinalLayer(nn.Module):
    """AdaLN then Linear(D, p*p*C_out). The AdaLN (``modulation(c)``) is applied by the last
    block's fused residual update, so ``forward`` takes its result h (B, N, D)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adaLN_modulation(c).chunk(2, dim=-1)  # (shift, scale), each (B, N|1|K, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h)  # (B, N, p*p*C_out)


#################################################################################
#            Deduplicated conditioning: one modulation per distinct time         #
#################################################################################
# At sampling time the patches of a sample share only a few distinct times; the timestep
# embedding, ``c`` and every block's Linear(D, 6D) modulation are then computed once per
# distinct time, as a (B, K, *) table read per token by the indexed forms of the fused ops
# (pf.models.dedup: how the table is found without host syncs, eager and static). This is
# exact and removes about a third of each block's FLOPs.


#################################################################################
#                                  The model                                    #
#################################################################################


class PatchForcingDiT(DistinctTimes, nn.Module):
    """DiT with one timestep per patch and a per-pixel log-variance (difficulty) channel.

    ``forward(x, t, y, return_uncertainty=False)``: x (B, C, H, W); t (B, N) per patch or
    (B,) per sample (broadcast to every token); y (B,) class ids in [0, num_classes]
    (``num_classes`` is the null class). Returns the velocity (B, C, H, W), and
    ``(v, logvar)`` with logvar (B, 1, H, W) when ``return_uncertainty``.
    """

    per_token = True
    cond_kind = "class"  # samplers and guidance: the condition is class ids, the null one num_classes
    # Deduplicated conditioning (pf.models.dedup.DistinctTimes): used outside training when a
    # sample has at most dedup_max_distinct distinct times and N >= K * dedup_min_tokens_per_time.
    # Set dedup_max_distinct = 0 for the plain per-token path everywhere.

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
        b, n = check_image(x, self.in_channels, self.patch_size)
        h, w = x.shape[-2:]
        if n != self.pos_embed.shape[1]:
            raise ValueError(
                f"x of size {h}x{w} gives {n} patches; the model was built for "
                f"{self.input_size}x{self.input_size} ({self.pos_embed.shape[1]} patches)"
            )
        self._check_t(t, b, n)
        if y.shape != (b,):
            raise ValueError(f"y must have shape ({b},), got {tuple(y.shape)}")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"y must hold integer class ids, got dtype {y.dtype}")
        if not t.is_floating_point():
            raise TypeError(f"t must hold floating-point times in [0, 1], got dtype {t.dtype}")
        if b > 0 and self.may_read_host(y):
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
        times, index = self.conditioning_times(t)  # (B, N|1|K); (B, N) row per token when a table
        c = self.embed_time(times) + self.y_embedder(y)[:, None, :]  # (B, N|1|K, D)
        c = c.to(tokens.dtype)
        # Each module's input is made by the fused call that ends the one before it, so the
        # modulation of the module after a block is computed before that block runs.
        following = [*self.blocks[1:], self.final_layer]
        mod = (self.blocks[0] if len(self.blocks) else self.final_layer).modulation(c)
        hidden = modulate(tokens, mod[0], mod[1], index)  # the first module's input (B, N, D)
        tapped = None
        for i, (block, after) in enumerate(zip(self.blocks, following)):
            next_mod = after.modulation(c)
            tokens, hidden = block(tokens, hidden, mod, next_mod[:2], index)  # (B, N, D) each
            mod = next_mod
            if i + 1 == tap_after:
                tapped = tokens
        return self.unpatchify(self.final_layer(hidden), h, w), tapped  # (B, C_out, H, W)

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


__all__ = ["PatchForcingDiT", "GlobalTimeDiT", "get_2d_sincos_pos_embed"]
