"""Figures of the response assessment (matplotlib, no pyplot state): the ΔVp waterfall, ROC curves of
vp and size on one chart, the box-and-strip plot of ΔVp by outcome, and a baseline / follow-up pair of
map images. :func:`save` writes a figure as PNG and SVG."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

COLOURS = {"success": "#1b9e77", "failure": "#d95f02", "size": "#7570b3", "vp": "#d95f02"}


def save(fig: Figure, stem: str, dpi: int = 120) -> list[str]:
    """Write ``stem.png`` and ``stem.svg``; returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)) or ".", exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = f"{stem}.{ext}"
        tmp = f"{stem}.partial.{ext}"
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)   # no half-written figure under the final name
        paths.append(path)
    return paths


def waterfall(delta_vp_pct, failure, cutoff_pct: float = -20.0, labels=None) -> Figure:
    """ΔVp per lesion, sorted from the largest rise to the largest drop, coloured by outcome, with the
    cut-off line (failure suspected above it)."""
    v = np.asarray(delta_vp_pct, dtype=float)
    f = np.asarray(failure, dtype=bool)
    keep = np.isfinite(v)
    v, f = v[keep], f[keep]
    order = np.argsort(-v, kind="stable")
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    x = np.arange(v.size)
    ax.bar(x, v[order], color=[COLOURS["failure"] if f[i] else COLOURS["success"] for i in order], width=0.85)
    ax.axhline(cutoff_pct, color="0.2", ls="--", lw=1)
    ax.text(v.size - 0.5, cutoff_pct, f" cut-off {cutoff_pct:+g} %", va="bottom", ha="right", fontsize=8)
    ax.axhline(0, color="0.5", lw=0.6)
    if labels is not None:
        lab = np.asarray(labels, dtype=object)[keep][order]
        ax.set_xticks(x, lab, rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    ax.set_ylabel("ΔVp (%)")
    ax.set_xlabel("lesions, sorted by ΔVp")
    for name in ("failure", "success"):
        ax.bar([], [], color=COLOURS[name], label=f"treatment {name} (n = {int(np.sum(f == (name == 'failure')))})")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("Change in plasma volume after treatment")
    fig.tight_layout()
    return fig


def roc_curves(rocs: dict) -> Figure:
    """ROC curves on one chart: ``rocs`` {name: cohort.ROC}, e.g. {"vp": ..., "size": ...}."""
    fig = Figure(figsize=(4.4, 4.2))
    ax = fig.add_subplot()
    for name, r in rocs.items():
        ax.plot(r.fpr, r.tpr, drawstyle="steps-post", color=COLOURS.get(name), lw=2,
                label=f"{name}: AUC {r.auc:.2f} ({r.auc_ci[0]:.2f}-{r.auc_ci[1]:.2f})")
        ax.plot(1 - r.youden_specificity, r.youden_sensitivity, "o", color=COLOURS.get(name), ms=5)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity (failure detected)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right", frameon=False)
    ax.set_title("ROC (dot: Youden cut-off)")
    fig.tight_layout()
    return fig


def box_strip(delta_vp_pct, failure, cutoff_pct: float = -20.0, seed: int = 0) -> Figure:
    """Box plot of ΔVp by outcome with every lesion drawn as a jittered point."""
    v = np.asarray(delta_vp_pct, dtype=float)
    f = np.asarray(failure, dtype=bool)
    groups = [v[~f & np.isfinite(v)], v[f & np.isfinite(v)]]
    fig = Figure(figsize=(3.8, 4.2))
    ax = fig.add_subplot()
    ax.boxplot(groups, positions=[1, 2], widths=0.5, showfliers=False)
    rng = np.random.default_rng(seed)
    for pos, g, name in zip((1, 2), groups, ("success", "failure")):
        ax.plot(pos + rng.uniform(-0.15, 0.15, g.size), g, "o", ms=4, alpha=0.8, color=COLOURS[name])
    ax.axhline(cutoff_pct, color="0.2", ls="--", lw=1)
    ax.set_xticks([1, 2], [f"success\n(n = {groups[0].size})", f"failure\n(n = {groups[1].size})"])
    ax.set_ylabel("ΔVp (%)")
    ax.set_title("ΔVp by outcome")
    fig.tight_layout()
    return fig


def image_pair(left_rgb, right_rgb, titles=("baseline", "follow-up"), suptitle: str = "",
               colour_range=None, colour_label: str = "") -> Figure:
    """Two rendered slices side by side (e.g. baseline and follow-up vp over the anatomy), with an
    optional Viridis colour bar for ``colour_range`` (min, max)."""
    fig = Figure(figsize=(8, 4.2))
    axes = fig.subplots(1, 2)
    for ax, img, title in zip(axes, (left_rgb, right_rgb), titles):
        ax.imshow(img)
        ax.set_title(title)
        ax.set_axis_off()
    if colour_range is not None:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        fig.colorbar(ScalarMappable(Normalize(*colour_range), "viridis"), ax=list(axes), fraction=0.03, pad=0.02,
                     label=colour_label)
    if suptitle:
        fig.suptitle(suptitle)
    return fig
