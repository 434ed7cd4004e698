"""Figures of the response assessment (matplotlib, no pyplot state): the ΔVp waterfall, ROC curves of
vp and size on one chart, the box-and-strip plot of ΔVp by outcome, a baseline / follow-up pair of map
images with the lesions outlined, an exam's concentration curves (AIF, lesion means and fits) and its
motion correction over time. :func:`save` writes a figure as PNG and SVG."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..core.registry import OUTCOME_COLOURS as COLOURS
from ..core.registry import VP_CUTOFF_PCT
from ..files.atomic import replacing

#: Lesion colours, the same for a lesion's outline on the maps and its curves: none is in Viridis or the
#: grey anatomy (so an outline stands out on any map value), none is an outcome colour or the AIF's.
LESION_COLOURS = ("#e7298a", "#e31a1c", "#a6761d", "#f781bf")
AIF_COLOUR = "0.15"


def lesion_colours(names) -> dict:
    """{lesion: colour} in the order given (:data:`LESION_COLOURS`, repeating after four)."""
    return {name: LESION_COLOURS[i % len(LESION_COLOURS)] for i, name in enumerate(names)}


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


def waterfall(delta_vp_pct, failure, cutoff_pct: float = VP_CUTOFF_PCT, labels=None, ci=None) -> Figure:
    """ΔVp per lesion, sorted from the largest rise to the largest drop, coloured by outcome, with the
    cut-off line (failure suspected above it). ``ci``: optional (lower, upper) arrays of ΔVp's 95 % CI
    (%, one per lesion, NaN where unknown), drawn as error bars."""
    v = np.asarray(delta_vp_pct, dtype=float)
    f = np.asarray(failure, dtype=bool)
    if ci is not None:
        lower, upper = (np.asarray(c, dtype=float) for c in ci)
        if lower.shape != v.shape or upper.shape != v.shape:
            raise ValueError(f"ci: give (lower, upper) arrays of {v.size} values, one per lesion like delta_vp_pct")
    keep = np.isfinite(v)
    v, f = v[keep], f[keep]
    order = np.argsort(-v, kind="stable")
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    x = np.arange(v.size)
    ax.bar(x, v[order], color=[COLOURS["failure"] if f[i] else COLOURS["success"] for i in order], width=0.85)
    if ci is not None:
        lo, hi = lower[keep][order], upper[keep][order]
        has = np.isfinite(lo) & np.isfinite(hi)
        if has.any():
            ax.errorbar(x[has], v[order][has], yerr=[v[order][has] - lo[has], hi[has] - v[order][has]], fmt="none",
                        ecolor="0.1", elinewidth=0.9, capsize=2.5, label="95 % CI")
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
    handles = [Patch(color=COLOURS[name], label=f"treatment {name} (n = {n})") for name, n in counts.items()]
    if ci is not None and np.isfinite(lower[keep]).any():
        handles.append(Line2D([], [], color="0.1", marker="|", lw=0.9, label="95 % CI of ΔVp"))
    ax.legend(handles=handles, fontsize=8, frameon=False)
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
               colour_range=None, colour_label: str = "", outlines=None, outline_colours=None) -> Figure:
    """Two rendered slices side by side (e.g. baseline and follow-up vp over the anatomy), with an
    optional Viridis colour bar for ``colour_range`` (min, max). ``outlines`` (left masks, right masks),
    each {lesion: bool mask (H, W) on that image's pixel grid}: every lesion outlined in its colour
    (:func:`outline_rgb`, ``outline_colours`` or :func:`lesion_colours`) and named in a legend below."""
    fig = Figure(figsize=(8, 4.2))
    axes = fig.subplots(1, 2)
    images = (left_rgb, right_rgb)
    if outlines is not None:
        names = list(dict.fromkeys(name for masks in outlines for name, m in masks.items() if np.any(m)))
        colours = outline_colours or lesion_colours(names)
        images = tuple(outline_rgb(img, masks, colours) for img, masks in zip(images, outlines))
        if names:
            fig.legend(handles=[Line2D([], [], color=colours[n], lw=3, label=n) for n in names], loc="lower center",
                       ncols=len(names), fontsize=9, frameon=False, title="outlined", title_fontsize=9)
    for ax, img, title in zip(axes, images, titles):
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


def outline_rgb(rgb, masks: dict, colours: dict | None = None, width: int | None = None) -> np.ndarray:
    """A copy of ``rgb`` (H, W, 3) uint8 with each mask of ``masks`` {name: bool (H, W), on the image's
    pixel grid} outlined in its colour (default :func:`lesion_colours`): the ``width`` pixels just outside
    the mask (default one per 120 pixels of the larger side, at least 2; never inside another mask), so
    the lesions' own pixels keep their map colour. For a Slicer rendering the mask comes from
    ``render.render_mask``; for :func:`overlay_rgb` it is the map slice's own mask."""
    from matplotlib.colors import to_rgb
    from scipy import ndimage

    out = np.array(rgb, dtype=np.uint8, copy=True)
    colours = colours or lesion_colours(masks)
    bool_masks = {name: np.asarray(m, dtype=bool) for name, m in masks.items()}
    for name, m in bool_masks.items():
        if m.shape != out.shape[:2]:
            raise ValueError(f"outline of {name}: mask {m.shape} is not on the image's grid {out.shape[:2]}")
    width = width or max(2, round(max(out.shape[:2]) / 120))
    inside_any = np.logical_or.reduce(list(bool_masks.values())) if bool_masks else np.zeros(out.shape[:2], bool)
    for name, m in bool_masks.items():
        ring = ndimage.binary_dilation(m, iterations=width) & ~inside_any
        out[ring] = np.round(255 * np.array(to_rgb(colours[name])))
    return out


def lesion_curves_of(curves: dict, names) -> dict:
    """{lesion: (mean C (T,), fit (T,))} from an exam's curves (``pipeline.ExamResult.curves``: "<lesion>
    mean C" and "<lesion> fit"), for the lesions of ``names`` that have them (a lesion without fitted
    voxels has none)."""
    return {n: (curves[f"{n} mean C"][0], curves[f"{n} fit"][0]) for n in names
            if f"{n} mean C" in curves and f"{n} fit" in curves}


def concentration_curves(t_s, aif_mM, lesions: dict, *, fit_label: str = "model fit",
                         aif_label: str = "AIF (plasma)", title: str = "", colours: dict | None = None,
                         c_top_mM: float | None = None, fig=None) -> Figure:
    """An exam's concentration curves on one time axis: the plasma AIF in the top panel (it peaks at
    several mM), below it one panel per lesion of ``lesions`` {name: (mean C (T,), fit (T,))} (a tenth of
    that; on the AIF's axis they would be flat lines, on theirs the AIF would leave the chart), with the
    lesion's mean concentration as open points and its model fit as a line, in the lesion's colour
    (``colours`` or :func:`lesion_colours`, as its outline on the maps) - lesions with the same curve do
    not hide each other. The lesion panels share one scale, which reaches at least ``c_top_mM`` (the same
    scale for another exam); every panel shows all its points. Drawn into ``fig`` (a Figure or SubFigure,
    e.g. a panel of a larger picture) when given, else into a new Figure; returns it."""
    t = np.asarray(t_s, dtype=float)
    order = np.argsort(t, kind="stable")  # drawn forwards in time whatever order the frames came in
    colours = colours or lesion_colours(lesions)
    if fig is None:
        fig = Figure(figsize=(6.4, 2.2 + 1.9 * len(lesions)), layout="constrained")
    axes = fig.subplots(1 + len(lesions), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [1] + [1.3] * len(lesions)})[:, 0]
    ax_aif = axes[0]
    ax_aif.plot(t[order], np.asarray(aif_mM, dtype=float)[order], color=AIF_COLOUR, lw=1.5, label=aif_label)
    ax_aif.set_ylabel("AIF Cp (mM)")
    for ax, (name, (mean_c, fit)) in zip(axes[1:], lesions.items()):
        ax.plot(t[order], np.asarray(mean_c, dtype=float)[order], "o", ms=3.5, mfc="none", mew=1,
                color=colours[name], label="mean C(t)")
        ax.plot(t[order], np.asarray(fit, dtype=float)[order], "-", lw=1.5, color=colours[name], label=fit_label)
        ax.set_ylabel("C(t) (mM)")
        ax.set_title(name, loc="left", fontsize=10, color=colours[name], fontweight="bold")
        if ax is not axes[1]:
            ax.sharey(axes[1])
    for ax in axes:
        ax.grid(color="0.9", lw=0.6)
        ax.axhline(0, color="0.6", lw=0.6)
        ax.legend(fontsize=8, loc="best", frameon=True, framealpha=0.85, edgecolor="none")
    if c_top_mM is not None and len(axes) > 1:
        lo, hi = axes[1].get_ylim()
        axes[1].set_ylim(lo, max(hi, float(c_top_mM)))
    axes[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


#: Colours of the motion parameters (x, y, z), the displacement curve and the reference shading.
MOTION_AXIS_COLOURS = ("#1b9e77", "#7570b3", "#e6ab02")
MOTION_COLOUR = "0.15"
REFERENCE_SHADE = "#a6cee3"


def motion_figure(t_s, estimate, *, title: str = "", fig=None) -> Figure:
    """A motion correction over time (``estimate``: a :class:`core.motion.MotionEstimate`): on top the
    largest displacement of the fit region's corners per frame (mm) against the frame time (s), with the
    1-voxel line (the smallest spacing, dashed and labelled), the reference frames shaded and the frame of
    the largest displacement marked; below it the rigid parameters, translations tx, ty, tz (mm) and
    rotations rx, ry, rz (degrees; SimpleITK's Euler 3D about the volume's centre, LPS axes). Drawn into
    ``fig`` (a Figure or SubFigure) when given; returns it."""
    t = np.asarray(t_s, dtype=float)
    disp = np.asarray(estimate.displacement_mm, dtype=float)
    params = np.asarray(estimate.parameters, dtype=float).reshape(-1, 6)
    if t.shape != disp.shape or params.shape[0] != t.size:
        raise ValueError(f"motion figure: {t.size} frame times for a motion of {disp.size} frames - give the frame "
                         "times of the series the motion was estimated on")
    order = np.argsort(t, kind="stable")
    if fig is None:
        fig = Figure(figsize=(7.2, 6.4), layout="constrained")
    ax, ax_t, ax_r = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1.5, 1, 1]})
    ref = [int(f) for f in estimate.reference_frames]
    step = float(np.median(np.diff(t[order]))) if t.size > 1 else 1.0
    for a in (ax, ax_t, ax_r):
        a.axvspan(t[ref].min() - step / 2, t[ref].max() + step / 2, color=REFERENCE_SHADE, alpha=0.45, lw=0,
                  label=f"reference: mean of frames {ref[0]}-{ref[-1]}" if a is ax else None)
        a.grid(color="0.9", lw=0.6)
    ax.plot(t[order], disp[order], "-o", ms=3, lw=1.2, color=MOTION_COLOUR, label="largest displacement (fit region)")
    voxel = float(estimate.voxel_mm)
    ax.axhline(voxel, color="#d95f02", ls="--", lw=1.2, label=f"1 voxel ({voxel:g} mm)")
    ax.annotate("1 voxel", (0.0, voxel), xycoords=("axes fraction", "data"), xytext=(3, 2), textcoords="offset points",
                va="bottom", fontsize=8, color="#d95f02")
    worst = int(np.argmax(disp))
    ax.plot(t[worst], disp[worst], "o", ms=9, mfc="none", mew=1.6, color="#d95f02",
            label=f"largest: {disp[worst]:.1f} mm ({disp[worst] / voxel:.1f} voxels), frame {worst}")
    ax.set_ylim(0, 1.15 * max(float(np.nanmax(disp)), voxel))
    ax.set_ylabel("displacement (mm)")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, frameon=False)   # above the data
    for a, cols, unit, name in ((ax_t, slice(0, 3), "mm", "t"), (ax_r, slice(3, 6), "degrees", "r")):
        for colour, axis, values in zip(MOTION_AXIS_COLOURS, "xyz", params[:, cols].T):
            a.plot(t[order], values[order], "-", lw=1.3, color=colour, label=f"{name}{axis}")
        a.axhline(0, color="0.6", lw=0.6)
        a.set_ylabel(f"{'translation' if name == 't' else 'rotation'} ({unit})")
        a.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)   # beside the data
    ax_r.set_xlabel("time (s)")
    fig.suptitle(title or f"Motion ({estimate.kind} correction): each frame against the reference", fontsize=11)
    return fig
