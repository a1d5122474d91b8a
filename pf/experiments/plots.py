"""What the studies' figures share: matplotlib set up to draw into files, one way to save a
figure, one colour per arm of the comparison, and grouped bars with error bars."""

from __future__ import annotations

from pathlib import Path

from pf.experiments.summary import mean_std

# One colour per arm in every figure that shows the comparison's arms.
ARM_COLORS = {"sit_uniform": "tab:gray", "sit_logit_normal": "tab:brown", "pf_ltg": "tab:blue",
              "pf_logit_normal": "tab:green", "pf_ltg_shifted": "tab:purple", "pf_ltg_marginal": "tab:olive"}


def pyplot():
    """``matplotlib.pyplot`` drawing into files (no display)."""
    # matplotlib is an optional dependency (the ``eval`` extra): imported when a figure is drawn,
    # so the studies import and run their stages without it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """Lay out, write as PNG (110 dpi) and close."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def bars(groups: list[tuple[str, list[tuple[str, list[float]]]]], path: Path, title: str, ylabel: str) -> None:
    """Grouped bars with std error bars: groups of (group name, [(bar name, values)]); a bar
    whose name says ``ltg`` or ``uncertainty`` (the method) is blue, the others grey."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (gname, group) in zip(axes[0], groups):
        ms = [mean_std(v) for _, v in group]
        ax.bar(range(len(group)), [m for m, _ in ms], yerr=[s for _, s in ms], capsize=3,
               color=["tab:blue" if "ltg" in b or "uncertainty" in b else "tab:gray" for b, _ in group])
        ax.set_xticks(range(len(group)), [b for b, _ in group], rotation=30, ha="right", fontsize=8)
        ax.set_title(gname, fontsize=9)
        ax.set_ylabel(ylabel)
        finite = [m + (sd if sd == sd else 0.0) for m, sd in ms if m == m]
        if finite:
            ax.set_ylim(0, 1.05 * max(finite))  # from zero: bar heights compare as the numbers do
    fig.suptitle(title, fontsize=9)
    save(fig, path)
