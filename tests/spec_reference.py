"""An independent float64 implementation of SPEC.md sections 2, 4, 5, 6 and 12, for the tests.

Written from the SPEC text with plain tensor arithmetic: it shares no code with ``pf`` or
``pf_kernels`` (no modules, no LayerNorm/SDPA/GELU calls, explicit pixel loops where the
SPEC speaks of pixels), so agreement means both read the SPEC the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch

f64 = torch.float64


# ----------------------------------------------------------------------------- section 2
def pos_embed(dim: int, gh: int, gw: int) -> torch.Tensor:
    """(N, D): first half column index, second half row index; each [sin, cos]."""
    quarter = dim // 4
    omega = torch.tensor([1.0 / 10000 ** (k / quarter) for k in range(quarter)], dtype=f64)
    rows = []
    for i in range(gh):
        for j in range(gw):
            col = [math.sin(j * w) for w in omega] + [math.cos(j * w) for w in omega]
            row = [math.sin(i * w) for w in omega] + [math.cos(i * w) for w in omega]
            rows.append(col + row)
    return torch.tensor(rows, dtype=f64)


def time_features(t: torch.Tensor) -> torch.Tensor:
    freqs = torch.tensor([math.exp(-math.log(10000) * k / 128) for k in range(128)], dtype=f64)
    a = t.to(f64)[..., None] * freqs
    return torch.cat([torch.cos(a), torch.sin(a)], -1)


def _lin(sd, name, h):
    return h @ sd[name + ".weight"].to(f64).T + sd[name + ".bias"].to(f64)


def _silu(h):
    return h / (1 + torch.exp(-h))


def _gelu_tanh(h):
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def _ln(h):
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + 1e-6)


def model_forward(sd: dict, cfg: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tap: int = 0):
    """Returns (v, logvar) of PatchForcingDiT with state dict ``sd`` (float64); with ``tap=k``
    also the tokens after block k (1-based), SPEC section 9's input to the REPA projector."""
    b, c, h, w = x.shape
    p, d, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
    gh, gw = h // p, w // p
    n = gh * gw
    x = x.to(f64)
    if t.dim() == 1:
        t = t[:, None].expand(b, n)
    # patch embedding: token (i, j) sees x[:, :, i*p:(i+1)*p, j*p:(j+1)*p] flattened (c, a, q)
    conv_w = sd["x_embedder.proj.weight"].to(f64).reshape(d, -1)
    toks = torch.zeros(b, n, d, dtype=f64)
    for i in range(gh):
        for j in range(gw):
            patch = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
            toks[:, i * gw + j] = patch @ conv_w.T + sd["x_embedder.proj.bias"].to(f64)
    toks = toks + sd["pos_embed"].to(f64)[0]  # stored (float32) like the released files; formula checked apart
    temb = _lin(sd, "t_embedder.mlp.2", _silu(_lin(sd, "t_embedder.mlp.0", time_features(t))))
    cond = temb + sd["y_embedder.embedding_table.weight"].to(f64)[y][:, None, :]  # (B, N, D)
    hd = d // heads
    for k in range(cfg["depth"]):
        pre = f"blocks.{k}."
        mod = _lin(sd, pre + "adaLN_modulation.1", _silu(cond))
        sh1, sc1, g1, sh2, sc2, g2 = [mod[..., i * d:(i + 1) * d] for i in range(6)]
        a_in = _ln(toks) * (1 + sc1) + sh1
        qkv = _lin(sd, pre + "attn.qkv", a_in).reshape(b, n, 3, heads, hd)
        q, kk, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        att = torch.softmax(q @ kk.transpose(-1, -2) * hd**-0.5, dim=-1) @ v  # (B, H, N, hd)
        toks = toks + g1 * _lin(sd, pre + "attn.proj", att.transpose(1, 2).reshape(b, n, d))
        m_in = _ln(toks) * (1 + sc2) + sh2
        toks = toks + g2 * _lin(sd, pre + "mlp.fc2", _gelu_tanh(_lin(sd, pre + "mlp.fc1", m_in)))
        if k + 1 == tap:
            tapped = toks
    fmod = _lin(sd, "final_layer.adaLN_modulation.1", _silu(cond))
    out_tok = _lin(sd, "final_layer.linear", _ln(toks) * (1 + fmod[..., d:]) + fmod[..., :d])
    co = c + 1
    out = torch.zeros(b, co, h, w, dtype=f64)
    for i in range(gh):
        for j in range(gw):
            vec = out_tok[:, i * gw + j].reshape(b, p, p, co)  # (row a, col q, channel)
            out[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = vec.permute(0, 3, 1, 2)
    if tap:
        return out[:, :c], out[:, c:], tapped
    return out[:, :c], out[:, c:]


def repa_projection(sd: dict, hidden: torch.Tensor) -> torch.Tensor:
    """SPEC section 9: Linear(D, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, z_dim)."""
    h = _silu(_lin(sd, "projector.0", hidden))
    h = _silu(_lin(sd, "projector.2", h))
    return _lin(sd, "projector.4", h)


def repa_loss(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """-mean over (b, n) of cos(z[b, n], h[b, n]), float64."""
    z, h = z.to(f64), h.to(f64)
    cos = (z * h).sum(-1) / (z.norm(dim=-1) * h.norm(dim=-1))
    return -cos.mean()


# ----------------------------------------------------------------------------- section 4
def ltg(batch: int, n: int, gen: torch.Generator, loc=0.7, scale=1.0, std=0.6):
    """Returns (t (B, N), tbar (B,), resampled mask)."""
    out = torch.empty(batch, n, dtype=f64)
    tbars = torch.empty(batch, dtype=f64)
    resampled = torch.zeros(batch, n, dtype=torch.bool)
    for b in range(batch):
        tbar = 1 / (1 + math.exp(-(loc + scale * torch.randn((), generator=gen, dtype=f64).item())))
        sd = min(tbar / 2, std)
        tbars[b] = tbar
        for i in range(n):
            ti = tbar - abs(torch.randn((), generator=gen, dtype=f64).item()) * sd
            if ti < 0:
                ti = torch.rand((), generator=gen, dtype=f64).item() * tbar
                resampled[b, i] = True
            out[b, i] = ti
    return out, tbars, resampled


# ------------------------------------------------------------------------ sections 5, 6
class RefSampler:
    """SPEC section 6 with a per-pixel time grid, as the text describes it."""

    def __init__(self, sd, cfg, y, cfg_scale, interval=None):
        self.sd, self.cfg, self.y, self.scale = sd, cfg, y, cfg_scale
        self.interval = interval  # section 10: guide only the outer steps with lo <= s_k <= hi
        self.s = cfg_scale
        self.p = cfg["patch_size"]
        self.nfe = 0

    def step(self, s32_k):
        """Section 10 for outer step k (s32_k the float32 schedule value)."""
        if self.interval is None:
            self.s = self.scale
            return
        lo, hi = (torch.tensor(v, dtype=torch.float32) for v in self.interval)
        self.s = self.scale if bool(lo <= s32_k) and bool(s32_k <= hi) else 1.0

    def _patch_times(self, grid):  # (B, 1, H, W) -> (B, N): patch mean, raster order
        b, _, h, w = grid.shape
        p = self.p
        return grid.reshape(b, h // p, p, w // p, p).mean(dim=(2, 4)).reshape(b, -1)

    def guided(self, x, grid):
        """Returns (v, logvar, v_c)."""
        self.nfe += 1
        t = self._patch_times(grid)
        if self.s == 1.0:
            v, lv = model_forward(self.sd, self.cfg, x, t, self.y)
            return v, lv, v
        null = torch.full_like(self.y, self.cfg["num_classes"])
        vu, lu = model_forward(self.sd, self.cfg, x, t, null)
        vc, lc = model_forward(self.sd, self.cfg, x, t, self.y)
        return vu + self.s * (vc - vu), lu + self.s * (lc - lu), vc

    def certain(self, logvar, p_frac, kept=None):
        """(B, 1, H, W) float mask of certain pixels. ``kept`` (B, 1, H, W) float, 1 on kept
        patches (inpainting): the quantile is over the other pixels, kept ones never certain."""
        b, _, h, w = logvar.shape
        p = self.p
        u = torch.exp(logvar)
        pm = u.reshape(b, h // p, p, w // p, p).mean(dim=(2, 4), keepdim=True)
        u_px = pm.expand(b, h // p, p, w // p, p).reshape(b, 1, h, w)
        mask = torch.zeros_like(u_px)
        for i in range(b):
            free = np.ones(h * w, dtype=bool) if kept is None else kept[i].reshape(-1).numpy() == 0
            values = u_px[i].reshape(-1).numpy().astype(np.float64)
            thr = np.quantile(values[free], p_frac)  # linear
            mask[i] = torch.from_numpy((values < thr) & free).reshape(1, h, w).to(f64)
        return mask

    def schedule(self, k_steps):
        s = torch.linspace(0, 1, k_steps + 1, dtype=torch.float32)
        return [float(v) for v in s], [float(s[k + 1] - s[k]) for k in range(k_steps)]

    def euler_pf(self, x, k_steps):
        s, dt = self.schedule(k_steps)
        s32 = torch.linspace(0, 1, k_steps + 1, dtype=torch.float32)
        for k in range(k_steps):
            self.step(s32[k])
            v, _, _ = self.guided(x, torch.full((x.shape[0], 1, *x.shape[2:]), s[k], dtype=f64))
            x = x + dt[k] * v
        return x

    def dual_loop(self, x, k_steps, p_frac=0.4, n_inner=4, kept=None, x_cond=None):
        """``kept`` (B, 1, H, W) float 1 on kept patches, which start at ``x_cond``, sit at
        t = 1 and never move (section 12's inpainting with an adaptive sampler)."""
        s, dt = self.schedule(k_steps)
        s32 = torch.linspace(0, 1, k_steps + 1, dtype=torch.float32)
        gen = torch.ones((x.shape[0], 1, *x.shape[2:]), dtype=f64) if kept is None else 1 - kept
        if kept is not None:
            x = kept * x_cond + gen * x
        for k in range(k_steps):
            self.step(s32[k])
            grid = gen * s[k] + (1 - gen)
            v, lv, _ = self.guided(x, grid)
            cert = self.certain(lv, p_frac, kept)
            x = x + gen * (cert * dt[k] * v + (1 - cert) * (dt[k] / n_inner) * v)
            grid = (1 - gen) + gen * (cert * s[k + 1] + (1 - cert) * (grid + dt[k] / n_inner))
            for _ in range(n_inner - 1):
                v, _, _ = self.guided(x, grid)
                x = x + gen * (1 - cert) * (dt[k] / n_inner) * v
                grid = grid + gen * (1 - cert) * (dt[k] / n_inner)
        return x

    def look_ahead(self, x, k_steps, p_frac=0.4, ratio=1.4, kept=None, x_cond=None):
        """``kept``, ``x_cond``: as :meth:`dual_loop`."""
        s, dt = self.schedule(k_steps)
        s32 = torch.linspace(0, 1, k_steps + 1, dtype=torch.float32)
        gen = torch.ones((x.shape[0], 1, *x.shape[2:]), dtype=f64) if kept is None else 1 - kept
        if kept is not None:
            x = kept * x_cond + gen * x
        for k in range(k_steps):
            self.step(s32[k])
            grid = gen * s[k] + (1 - gen)
            v, lv, vc = self.guided(x, grid)
            if s32[k] <= torch.tensor(0.05, dtype=torch.float32):
                x = x + gen * dt[k] * vc
                continue
            d = min(s[k] * ratio, 1.0) - s[k]
            cert = self.certain(lv, p_frac, kept)
            x_ctx = x + d * vc * cert
            v_ctx, _, _ = self.guided(x_ctx, grid + d * cert)
            x = x + gen * dt[k] * (v * cert + v_ctx * (1 - cert))
        return x

    # ------------------------------------------------------------------- section 12
    def _pixels(self, times, h, w):
        """(B, N) patch times -> (B, 1, H, W): each patch's time on its p x p pixels, by loops."""
        b, p = times.shape[0], self.p
        gw = w // p
        out = torch.zeros(b, 1, h, w, dtype=f64)
        for i in range(h // p):
            for j in range(gw):
                out[:, 0, i * p:(i + 1) * p, j * p:(j + 1) * p] = times[:, i * gw + j, None, None]
        return out

    def scheduled(self, x, table, x_cond=None):
        """Section 12: ``table`` the float32 (K+1, N) or (B, K+1, N) schedule, x the noise."""
        b, _, h, w = x.shape
        sched = table.to(torch.float32)
        sched = sched[None].expand(b, -1, -1) if sched.dim() == 2 else sched  # (B, K+1, N)
        st = sched.to(f64)
        if bool((st[:, 0] != 0).any()):
            s0 = self._pixels(st[:, 0], h, w)
            x = s0 * x_cond + (1 - s0) * x
        for k in range(st.shape[1] - 1):
            self.step(sched[:, k].min())  # the step's earliest time decides its guidance
            v, _, _ = self.guided(x, self._pixels(st[:, k], h, w))
            dt = (sched[:, k + 1] - sched[:, k]).to(f64)  # the float32 schedule's steps, as section 6's dt_k
            x = x + self._pixels(dt, h, w) * v
        return x
