"""Figures of the response assessment (matplotlib, no pyplot state): the ΔVp waterfall, ROC curves of
vp and size on one chart, the box-and-strip plot of ΔVp by outcome, and a baseline / follow-up pair of
map images. :func:`save` writes a figure as PNG and SVG."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..core.registry import OUTCOME_COLOURS as COLOURS
from ..core.registry import VP_CUTOFF_PCT
from ..files.atomic import replacing


def save(fig: Figure, stem: str, dpi: int = 120) -> list[str]:
    """Write ``stem.png`` and ``stem.svg``; returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)) or ".", exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = f"{stem}.{ext}"
        with replacing(path) as tmp:        # no half-written figure under the final name, none left behind
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=ext)
        paths.append(path)
    return paths


def waterfall(delta_vp_pct, failure, cutoff_pct: float = VP_CUTOFF_PCT, labels=None) -> Figure:
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
    # the label under the line at the left end, where the bars (the largest rises) stand above it
    ax.text(-0.5, cutoff_pct, f" cut-off {cutoff_pct:+g} %", va="top", ha="left", fontsize=8)
    ax.axhline(0, color="0.5", lw=0.6)
    if labels is not None:
        lab = np.asarray(labels, dtype=object)[keep][order]
        ax.set_xticks(x, lab, rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    ax.set_ylabel("ΔVp (%)")
    ax.set_xlabel("lesions, sorted by ΔVp")
    counts = {"failure": int(f.sum()), "success": int((~f).sum())}
    ax.legend(handles=[Patch(color=COLOURS[name], label=f"treatment {name} (n = {n})") for name, n in counts.items()],
              fontsize=8, frameon=False)
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


def box_strip(delta_vp_pct, failure, cutoff_pct: float = VP_CUTOFF_PCT, seed: int = 0) -> Figure:
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


def overlay_rgb(anatomy, values=None, window=None, opacity: float = 0.75, zero_is_unfitted: bool = True) -> np.ndarray:
    """A 2D slice as Slicer would show it, drawn from arrays: the anatomy in grey (1st-99th percentile),
    and ``values`` (a map slice) in Viridis over ``window`` (min, max) where it is finite (and, for maps
    whose 0 means "not fitted" - ``registry.MapInfo.zero_is_unfitted`` - where it is > 0). Rows top to
    bottom as given. Returns RGB uint8 (H, W, 3)."""
    from matplotlib import colormaps

    a = np.asarray(anatomy, dtype=float)
    lo, hi = np.nanpercentile(a, [1, 99]) if np.isfinite(a).any() else (0.0, 1.0)
    grey = np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.repeat(np.nan_to_num(grey)[..., None], 3, axis=-1)
    if values is not None:
        v = np.asarray(values, dtype=float)
        vmin, vmax = window if window is not None else (np.nanmin(v), np.nanmax(v))
        shown = np.isfinite(v) & ((v > 0) if zero_is_unfitted else True)
        colour = colormaps["viridis"](np.clip((np.nan_to_num(v) - vmin) / ((vmax - vmin) or 1.0), 0, 1))[..., :3]
        rgb[shown] = (1 - opacity) * rgb[shown] + opacity * colour[shown]
    return (255 * rgb).round().astype(np.uint8)
