"""Guidance sweeps: one metric row per (cfg, guidance interval), as a Markdown table, a JSON
file and a plot of FID against the guidance scale (one line per interval)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

COLUMNS = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"), ("kid", "KID"), ("precision", "precision"),
           ("recall", "recall"))


def settings(cfg_scales, intervals) -> list[tuple[float, tuple[float, float] | None]]:
    """Every (cfg, interval) pair; ``intervals`` None or empty: no interval."""
    if not cfg_scales:
        raise ValueError("sweep.cfg needs at least one guidance scale, e.g. sweep.cfg=[1.0,1.5,2.0]")
    scales = [float(c) for c in cfg_scales]
    ivs = [None if iv is None else _interval(iv) for iv in (intervals or [None])]
    return list(itertools.product(scales, ivs))


def _interval(iv) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in iv)
    except (TypeError, ValueError):
        raise ValueError(f"sweep.guidance_interval entries are [lo,hi] or null, got {iv!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"a guidance interval needs 0 <= lo <= hi <= 1, got [{lo}, {hi}]")
    return lo, hi


def interval_label(iv) -> str:
    return "every step" if iv is None else f"[{iv[0]:g}, {iv[1]:g}]"


def table(rows: list[dict]) -> str:
    """Markdown: cfg, interval, then every metric the rows hold."""
    cols = [(k, name) for k, name in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = ["| cfg | guidance interval | " + " | ".join(n for _, n in cols) + " |",
             "|---:|:---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [f"{r[k]:.4g}" if r.get(k) is not None else "-" for k, _ in cols]
        lines.append(f"| {r['cfg']:g} | {interval_label(r['guidance_interval'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str = "") -> Path:
    """FID against cfg, one line per guidance interval."""
    import matplotlib  # optional (the eval extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for iv in dict.fromkeys(r["guidance_interval"] for r in rows):
        pts = sorted((r["cfg"], r["fid"]) for r in rows if r["guidance_interval"] == iv)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=interval_label(iv))
    ax.set_xlabel("guidance scale (cfg)")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(title="guided steps", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(rows: list[dict], out: Path, title: str = "") -> dict:
    """``sweep.md``, ``sweep.json`` and ``sweep.png`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text((f"{title}\n\n" if title else "") + table(rows))
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    return {"table": str(out / "sweep.md"), "json": str(out / "sweep.json"), "plot": str(plot(rows, out / "sweep.png",
                                                                                              title))}
