"""Figures that show the truth: the concentration-curve figure draws every curve whole (the plasma AIF,
several mM, beside lesion curves of about 1 mM), with units and a legend coloured like its lines; the
lesion outlines lie on the lesion's boundary, in the lesion's colour, also on a Slicer rendering; the
demo's report holds both for each exam."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("matplotlib", reason="the figures need matplotlib (Slicer does not bundle it)")
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from DCEPerfusionLib import aif, figures, models  # noqa: E402

T_S = np.arange(60) * 5.0


def _curves(rng):
    cp = aif.parker(T_S, hct=0.42, delay_s=30.0)
    lesions = {}
    for name, (ktrans, ve, vp) in {"L2": (0.18, 0.3, 0.10), "L3": (0.30, 0.3, 0.16)}.items():
        fit = models.extended_tofts(T_S, cp, ktrans, ve, vp)
        lesions[name] = (fit + rng.normal(0, 0.02, T_S.size), fit)
    return cp, lesions


def _drawn(fig):
    fig.savefig(io.BytesIO(), format="png")   # lays out and draws: the limits and legends as shown
    return fig


def _labelled_lines(ax):
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def _colour(line):
    """What a reader sees of a line or marker: its line colour, or the marker's edge for open points."""
    return to_rgb(line.get_color() if line.get_linestyle() not in ("None", "") else line.get_markeredgecolor())


def _assert_whole_and_forwards(ax, line):
    x, y = (np.asarray(v, dtype=float) for v in line.get_data())
    ok = np.isfinite(y)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert np.all(np.diff(x) > 0), f"{line.get_label()} is not drawn forwards in time"
    assert x0 <= x[ok].min() and x[ok].max() <= x1, f"{line.get_label()} leaves the time axis"
    assert y0 <= y[ok].min() and y[ok].max() <= y1, \
        f"{line.get_label()} leaves the chart ({y[ok].min():.2f}..{y[ok].max():.2f} beyond {y0:.2f}..{y1:.2f})"


def _find(fig, values):
    """The one (axes, line) of ``fig`` that draws ``values``."""
    hits = [(ax, line) for ax in fig.axes for line in ax.get_lines()
            if np.shape(line.get_ydata()) == np.shape(values) and np.allclose(line.get_ydata(), values)]
    assert len(hits) == 1, f"{len(hits)} lines draw this curve"
    return hits[0]


def test_curve_figure_draws_every_curve_whole_with_units_and_a_matching_legend(rng):
    cp, lesions = _curves(rng)
    assert cp.max() > 3 * max(c.max() for pair in lesions.values() for c in pair)  # on one axis one would be lost
    colours = figures.lesion_colours(lesions)
    fig = _drawn(figures.concentration_curves(T_S, cp, lesions, fit_label="Extended Tofts fit", colours=colours))
    ax_aif, line = _find(fig, cp)
    _assert_whole_and_forwards(ax_aif, line)
    assert "AIF" in line.get_label()
    for name, (mean_c, fit) in lesions.items():
        for values, style in ((mean_c, "points"), (fit, "line")):
            ax, line = _find(fig, values)
            _assert_whole_and_forwards(ax, line)
            assert _colour(line) == to_rgb(colours[name])
            assert (line.get_linestyle() == "None") == (style == "points")
        assert ax.get_title(loc="left") == name
    for ax in fig.axes:
        assert ax.get_ylabel().endswith("(mM)")
        legend = ax.get_legend()
        assert legend is not None
        lines = {line.get_label(): line for line in _labelled_lines(ax)}
        texts = [t.get_text() for t in legend.get_texts()]
        assert sorted(texts) == sorted(lines)  # every curve named, nothing else
        for text, handle in zip(texts, legend.legend_handles):
            assert _colour(handle) == _colour(lines[text]), f"legend entry {text!r} is not coloured like its line"
    assert fig.axes[-1].get_xlabel() == "time (s)"
    # frames given out of order are still drawn forwards; a common scale for another exam only widens
    shuffled = rng.permutation(T_S.size)
    again = _drawn(figures.concentration_curves(T_S[shuffled], cp[shuffled],
                                                {k: (m[shuffled], f[shuffled]) for k, (m, f) in lesions.items()},
                                                c_top_mM=3.0))
    for ax in again.axes:
        for line in _labelled_lines(ax):
            _assert_whole_and_forwards(ax, line)
    assert all(ax.get_ylim()[1] >= 3.0 for ax in again.axes[1:])
    assert again.axes[1].get_ylim() == again.axes[2].get_ylim()  # the lesions on one scale


def test_curve_figure_draws_into_a_panel_of_a_larger_figure(rng):
    from matplotlib.figure import Figure

    cp, lesions = _curves(rng)
    fig = Figure(figsize=(12, 4), layout="constrained")
    left, right = fig.subfigures(1, 2)
    left.subplots().plot([0, 1])
    assert figures.concentration_curves(T_S, cp, {"L2": lesions["L2"]}, fig=right) is right
    _drawn(fig)
    assert len(right.axes) == 2
    for ax in right.axes:
        for line in _labelled_lines(ax):
            _assert_whole_and_forwards(ax, line)


def _disk(shape, centre, radius):
    jj, ii = np.indices(shape)
    return (jj - centre[0]) ** 2 + (ii - centre[1]) ** 2 <= radius ** 2


def test_outline_lies_on_the_mask_boundary_in_its_colour():
    shape = (120, 160)
    rgb = np.full((*shape, 3), 90, dtype=np.uint8)
    masks = {"L2": _disk(shape, (40, 50), 18), "L3": _disk(shape, (80, 110), 12)}
    colours = figures.lesion_colours(masks)
    out = figures.outline_rgb(rgb, masks, colours, width=2)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert not np.shares_memory(out, rgb) and np.all(rgb == 90)
    changed = np.any(out != rgb, axis=-1)
    for name, mask in masks.items():
        colour = np.round(255 * np.array(to_rgb(colours[name]))).astype(np.uint8)
        painted = np.all(out == colour, axis=-1)
        # the mask's outer edge, from the distance to it (not from the dilation the figure uses)
        steps = ndimage.distance_transform_cdt(~mask, metric="taxicab")
        assert np.array_equal(painted, (steps >= 1) & (steps <= 2))
        assert not np.any(painted & mask)                      # the lesion's own pixels keep their value
        ring1 = ndimage.binary_dilation(mask) & ~mask
        assert np.all(painted[ring1])                          # closed: every pixel touching the lesion
    assert np.array_equal(changed, np.any([np.all(out == np.round(255 * np.array(to_rgb(c))), axis=-1)
                                           for c in colours.values()], axis=0))
    # the default width grows with the image (3 pixels on a 360-pixel rendering); a mask off the grid is refused
    disk = _disk((360, 360), (180, 180), 50)
    big = figures.outline_rgb(np.zeros((360, 360, 3), np.uint8), {"L2": disk})
    steps = ndimage.distance_transform_cdt(~disk, metric="taxicab")
    assert np.array_equal(np.any(big, axis=-1), (steps >= 1) & (steps <= 3))
    with pytest.raises(ValueError, match="grid"):
        figures.outline_rgb(rgb, {"L2": masks["L2"][::2]})


def test_touching_lesions_keep_their_pixels():
    shape = (60, 60)
    a, b = _disk(shape, (30, 20), 10), _disk(shape, (30, 41), 10)
    out = figures.outline_rgb(np.zeros((*shape, 3), np.uint8), {"a": a, "b": b}, width=3)
    assert not np.any(out[a | b])


def test_image_pair_outlines_each_exam_and_names_the_lesions():
    shape = (90, 90)
    left = np.full((*shape, 3), 60, np.uint8)
    right = np.full((*shape, 3), 120, np.uint8)
    base = {"L2 metastasis": _disk(shape, (30, 45), 10), "L3 metastasis": _disk(shape, (65, 45), 9)}
    follow = {"L2 metastasis": _disk(shape, (30, 45), 8), "L3 metastasis": np.zeros(shape, bool)}
    colours = figures.lesion_colours(base)
    fig = figures.image_pair(left, right, outlines=(base, follow), outline_colours=colours,
                             colour_range=(0, 0.2), colour_label="vp")
    for ax, img, masks in zip(fig.axes, (left, right), (base, follow)):
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), figures.outline_rgb(img, masks, colours))
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == list(base)
    assert [to_rgb(h.get_color()) for h in legend.legend_handles] == [to_rgb(c) for c in colours.values()]
    plain = figures.image_pair(left, right)
    assert not plain.legends and np.array_equal(np.asarray(plain.axes[0].images[0].get_array()), left)


def test_a_mask_on_a_slicer_rendering_lies_where_slicer_outlines_it():
    pytest.importorskip("slicer", reason="Slicer's slice logic needs the slicer-core wheel")
    from slicer import util

    from DCEPerfusionLib import phantom
    from DCEPerfusionLib.scene import headless, render
    from DCEPerfusionLib.scene import phantom as scene_phantom
    from DCEPerfusionLib.scene.output import set_ijk_to_ras

    hs = headless.headless_scene()
    ph = phantom.make_phantom(shape=(4, 40, 48), snr=40.0, seed=3)
    nodes = scene_phantom.add_phantom(hs.scene, ph, matrix=scene_phantom.oblique_matrix((1.0, 1.0, 4.0)))
    lesion = nodes.labels == phantom.LABELS["lesion"]
    view = {"size": (240, 240)}  # the volume's centre: the lesion off the view's centre, so a flip would show
    n_nodes = hs.scene.GetNumberOfNodes()
    mask = render.render_mask(hs.scene, hs.app_logic, nodes.anatomy, lesion, **view)
    assert hs.scene.GetNumberOfNodes() == n_nodes                 # no temporary node left behind
    assert mask.dtype == bool and mask.shape == (240, 240) and 0.02 < mask.mean() < 0.5
    label = hs.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lesion")
    util.updateVolumeFromArray(label, lesion.astype(np.uint8))
    set_ijk_to_ras(label, nodes.ijk_to_ras)
    label.CreateDefaultDisplayNodes()
    plain = render.render_slice(hs.scene, hs.app_logic, nodes.anatomy, None, **view)
    outlined = render.render_slice(hs.scene, hs.app_logic, nodes.anatomy, None, label=label, **view)
    slicer_outline = np.any(plain != outlined, axis=-1)
    assert slicer_outline.sum() > 50
    near_edge = ndimage.distance_transform_cdt(mask, metric="chessboard") <= 4
    assert np.all(slicer_outline <= (mask & near_edge))           # Slicer's own outline: inside, at our edge
    with pytest.raises(ValueError, match="grid"):
        render.render_mask(hs.scene, hs.app_logic, nodes.anatomy, lesion[:, ::2], **view)


# ----------------------------------------------------------------------------------- the demo's report
# demo_run: the conftest fixture (the demo run once per session, shared with test_pipeline)


def _report_images(html):
    """{alt text: RGB float image} of every embedded figure."""
    found = re.findall(r'src="data:image/png;base64,([^"]+)" alt="([^"]*)"', html)
    return {alt: imread(io.BytesIO(base64.b64decode(data)), format="png")[..., :3] for data, alt in found}


def _has_colour(img, colour, tol=0.12, min_pixels=20):
    return int(np.all(np.abs(img - np.array(to_rgb(colour))) < tol, axis=-1).sum()) >= min_pixels


def test_the_report_shows_each_exams_curves_and_outlined_maps(demo_run):
    from DCEPerfusionLib.apps import demo

    with open(demo_run["report"], encoding="utf-8") as f:
        html = f.read()
    shown = _report_images(html)
    colours = figures.lesion_colours(demo.LESIONS)
    for exam in demo.EXAMS:
        curves = shown[f"concentration curves: {exam}"]
        for lesion in demo.LESIONS:
            assert _has_colour(curves, colours[lesion]), f"{exam}: no {lesion} curve"
        assert _has_colour(curves, figures.AIF_COLOUR, tol=0.05)
    for name in ("vp maps", "ktrans maps"):
        (alt,) = [a for a in shown if a.startswith(f"{name}:")]
        assert "lesions outlined" in alt
        img = shown[alt]
        half = img.shape[1] // 2
        for side in (img[:, :half], img[:, half:]):              # baseline and follow-up
            for lesion in demo.LESIONS:
                assert _has_colour(side, colours[lesion]), f"{name}: {lesion} not outlined"
    (anatomy,) = [a for a in shown if a.startswith("anatomy:")]
    assert not any(_has_colour(shown[anatomy], c) for c in colours.values())   # the anatomy stays clean


def test_the_demos_array_drawn_maps_outline_the_lesions_too(demo_run):
    from DCEPerfusionLib.apps import demo

    figs = demo._array_renders(demo_run["results"], demo_run["phantoms"])
    colours = figures.lesion_colours(demo.LESIONS)
    for label, ax in zip(demo.EXAMS, figs["vp maps"].axes):
        img = np.asarray(ax.images[0].get_array())
        res = demo_run["results"][label]
        k = res.lesions[demo.LESIONS[0]].shape[0] // 2
        f = img.shape[0] // res.lesions[demo.LESIONS[0]].shape[1]
        assert f >= 2                                              # voxels as blocks: the outline thinner than one
        for lesion in demo.LESIONS:
            mask = np.repeat(np.repeat(res.lesions[lesion][k][::-1], f, axis=0), f, axis=1)
            colour = np.round(255 * np.array(to_rgb(colours[lesion])))
            painted = np.all(img == colour, axis=-1)
            steps = ndimage.distance_transform_cdt(~mask, metric="taxicab")
            assert painted.any() and np.all((steps[painted] >= 1) & (steps[painted] <= 3))
