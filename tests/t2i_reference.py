"""An independent float64 implementation of the T2I model of SPEC.md section 11, in numpy.

Written from the SPEC (and the layout choices the SPEC leaves free, stated in the model's
docstrings), not from ``pf.models.t2i``: explicit loops over batch, patches, heads and
tokens, rotation written per channel pair, softmax by hand. It reads the model's weights by
their state-dict names. Small shapes only.
"""

from __future__ import annotations

import math

import numpy as np


def _w(state: dict, name: str) -> np.ndarray:
    return state[name].detach().double().cpu().numpy()


def rms(x: np.ndarray, weight: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    out = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return out * weight if weight is not None else out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def swiglu(state: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    up = x @ _w(state, f"{prefix}.up.weight").T
    half = up.shape[-1] // 2
    return (up[..., :half] * silu(up[..., half:])) @ _w(state, f"{prefix}.down.weight").T


def softmax_rows(s: np.ndarray) -> np.ndarray:
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def rope_pairs(v: np.ndarray, angles: list[float]) -> np.ndarray:
    """Rotate channel j with channel j + r (r = len(angles)) by angles[j]; the rest unchanged."""
    out = v.copy()
    r = len(angles)
    for j, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        out[j] = v[j] * c - v[j + r] * s
        out[j + r] = v[j] * s + v[j + r] * c
    return out


def patch_centres(H: int, W: int, p: int) -> list[tuple[float, float]]:
    """Mean of the pixel centres of each patch on the relative canvas, raster order."""
    longest = max(H, W)
    ys = [((i + 0.5) / H * 2 - 1) * H / longest for i in range(H)]
    xs = [((j + 0.5) / W * 2 - 1) * W / longest for j in range(W)]
    out = []
    for gi in range(H // p):
        for gj in range(W // p):
            out.append((float(np.mean(ys[gi * p:(gi + 1) * p])), float(np.mean(xs[gj * p:(gj + 1) * p]))))
    return out


def axial_angles(pos: tuple[float, float], head_dim: int) -> list[float]:
    n = head_dim // 8
    if n == 1:
        freqs = [math.pi]
    else:
        freqs = [math.exp(math.log(math.pi) + m * (math.log(10 * math.pi) - math.log(math.pi)) / (n - 1)) for m in range(n)]
    return [pos[0] * f for f in freqs] + [pos[1] * f for f in freqs]


def time_mapping(state: dict, t: float, depth: int) -> np.ndarray:
    w = _w(state, "time_mapping.fourier.weight")[:, 0]
    f = 2 * math.pi * t * w
    c = np.concatenate([np.cos(f), np.sin(f)]) @ _w(state, "time_mapping.proj.weight").T
    c = rms(c, _w(state, "time_mapping.in_norm.weight"))
    for i in range(depth):
        c = c + swiglu(state, f"time_mapping.blocks.{i}.ff", rms(c, _w(state, f"time_mapping.blocks.{i}.norm.weight")))
    return rms(c, _w(state, "time_mapping.out_norm.weight"))


def text_refiner(state: dict, tokens: np.ndarray, mask: np.ndarray, head_dim: int, depth: int) -> np.ndarray:
    h = tokens @ _w(state, "text_refiner.proj.weight").T  # (L, D)
    L, D = h.shape
    heads = D // head_dim
    for li in range(depth):
        pre = f"text_refiner.layers.{li}"
        a = rms(h, _w(state, f"{pre}.norm1.weight")) @ _w(state, f"{pre}.qkv.weight").T  # (L, 3D)
        out = np.zeros((L, D))
        for hh in range(heads):
            sl = slice(hh * head_dim, (hh + 1) * head_dim)
            q = a[:, :D][:, sl]
            k = a[:, D:2 * D][:, sl]
            v = a[:, 2 * D:][:, sl]
            ang = lambda pos: [pos * 10000.0 ** (-2 * j / head_dim) for j in range(head_dim // 2)]  # noqa: E731
            q = np.stack([rope_pairs(q[i], ang(i)) for i in range(L)])
            k = np.stack([rope_pairs(k[i], ang(i)) for i in range(L)])
            s = q @ k.T / math.sqrt(head_dim)
            s[:, ~mask] = -np.inf
            out[:, sl] = softmax_rows(s) @ v
        h = h + out @ _w(state, f"{pre}.out.weight").T
        h = h + swiglu(state, f"{pre}.ff", rms(h, _w(state, f"{pre}.norm2.weight")))
    return h


def cos_normalise(v: np.ndarray, s: float, eps: float = 1e-6) -> np.ndarray:
    return v / np.sqrt((v * v).sum() + eps) * math.sqrt(s)


def forward(model, x, t, tokens, mask) -> np.ndarray:
    """The model's full output (B, C+1, H, W) in float64; ``t`` (B, N), ``tokens`` (B, L, C_txt), ``mask`` (B, L)."""
    state = model.state_dict()
    x, t = x.double().numpy(), t.double().numpy()
    tokens, mask = tokens.double().numpy(), mask.numpy().astype(bool)
    B, C, H, W = x.shape
    p, D, hd = model.patch_size, model.hidden_size, model.head_dim
    gh, gw = H // p, W // p
    heads = D // hd
    c_out = model.out_channels
    centres = patch_centres(H, W, p)
    out = np.zeros((B, c_out, H, W))
    for b in range(B):
        # patches in raster order, each flattened (row a, col q, channel)
        vecs = []
        for gi in range(gh):
            for gj in range(gw):
                vecs.append([x[b, ch, gi * p + a, gj * p + q] for a in range(p) for q in range(p) for ch in range(C)])
        tok = np.array(vecs) @ _w(state, "patch_in.weight").T  # (N, D)
        cond = np.stack([time_mapping(state, float(t[b, n]), model.mapping_depth) for n in range(gh * gw)])  # (N, W)
        text = text_refiner(state, tokens[b], mask[b], model.text_head_dim, model.text_depth)  # (L, D)
        for li in range(model.depth):
            pre = f"blocks.{li}"

            def ada(name, h):
                return rms(h) * (1 + cond @ _w(state, f"{pre}.{name}.linear.weight").T)

            # self-attention
            a = ada("norm_attn", tok) @ _w(state, f"{pre}.attn.qkv.weight").T
            sc = _w(state, f"{pre}.attn.scale")
            att = np.zeros_like(tok)
            for hh in range(heads):
                sl = slice(hh * hd, (hh + 1) * hd)
                q = np.stack([rope_pairs(cos_normalise(a[n, :D][sl], sc[hh]), axial_angles(centres[n], hd))
                              for n in range(len(tok))])
                k = np.stack([rope_pairs(cos_normalise(a[n, D:2 * D][sl], sc[hh]), axial_angles(centres[n], hd))
                              for n in range(len(tok))])
                att[:, sl] = softmax_rows(q @ k.T) @ a[:, 2 * D:][:, sl]
            tok = tok + att @ _w(state, f"{pre}.attn.out.weight").T
            # cross-attention to the refined text (padding masked)
            qx = ada("norm_cross", tok) @ _w(state, f"{pre}.cross.q.weight").T
            kv = rms(text, _w(state, f"{pre}.cross.text_norm.weight")) @ _w(state, f"{pre}.cross.kv.weight").T
            sc = _w(state, f"{pre}.cross.scale")
            att = np.zeros_like(tok)
            for hh in range(heads):
                sl = slice(hh * hd, (hh + 1) * hd)
                q = np.stack([rope_pairs(cos_normalise(qx[n][sl], sc[hh]), axial_angles(centres[n], hd))
                              for n in range(len(tok))])
                k = np.stack([cos_normalise(kv[j, :D][sl], sc[hh]) for j in range(len(text))])
                s = q @ k.T
                s[:, ~mask[b]] = -np.inf
                att[:, sl] = softmax_rows(s) @ kv[:, D:][:, sl]
            tok = tok + att @ _w(state, f"{pre}.cross.out.weight").T
            tok = tok + swiglu(state, f"{pre}.ff", ada("norm_ff", tok))
        y = rms(tok, _w(state, "out_norm.weight")) @ _w(state, "patch_out.weight").T  # (N, p*p*C_out)
        for gi in range(gh):
            for gj in range(gw):
                vec = y[gi * gw + gj]
                for a in range(p):
                    for q in range(p):
                        for ch in range(c_out):
                            out[b, ch, gi * p + a, gj * p + q] = vec[(a * p + q) * c_out + ch]
    return out
