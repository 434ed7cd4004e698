"""Make Resources/Screenshots/DCEPerfusion.png: the synthetic phantom through the module's logic, the
maps over the anatomy rendered by Slicer's vtkMRMLSliceLogic, with colour bars and the lesion outlined,
and the lesion's curves (``figures.concentration_curves``: the AIF above, the lesion below, in the
outline's colour).

    .venv/bin/python Resources/Screenshots/make_screenshot.py
"""

import os

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from slicer import util

from DCEPerfusionLib import figures, phantom
from DCEPerfusionLib.core.options import AnalysisOptions
from DCEPerfusionLib.core.registry import MAPS, MODELS
from DCEPerfusionLib.scene import analysis, headless, render
from DCEPerfusionLib.scene import output as scene_output
from DCEPerfusionLib.scene import phantom as scene_phantom

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    hs = headless.headless_scene()
    ph = phantom.make_phantom(shape=(6, 80, 96), snr=40.0, seed=11)
    nodes = scene_phantom.add_phantom(hs.scene, ph, matrix=scene_phantom.oblique_matrix((1.0, 1.0, 4.0)))
    acq = ph.acquisition
    t1 = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 map")
    util.updateVolumeFromArray(t1, ph.t10_s.astype(np.float32))
    scene_output.set_ijk_to_ras(t1, nodes.ijk_to_ras)
    out = analysis.run_analysis(hs.scene, analysis.SceneInputs(
        dce_sequence=nodes.sequence, anatomy=nodes.anatomy, t1_map=t1, segmentation=nodes.segmentation,
        lesion_segment_ids=[nodes.lesion_segment_id], exam_label="baseline"), AnalysisOptions(
        n_baseline=acq["n_baseline"], aif_source="automatic", r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"]))
    exam = out.exam
    lesion = nodes.labels == phantom.LABELS["lesion"]
    centre = (nodes.ijk_to_ras @ np.r_[np.argwhere(lesion).mean(axis=0)[::-1], 1.0])[:3]
    view = {"ras_point": centre, "size": (360, 360)}
    outline = {name: render.render_mask(hs.scene, hs.app_logic, nodes.anatomy, exam.lesions[name], **view)
               for name in exam.lesions}
    colours = figures.lesion_colours(exam.lesions)

    fig = Figure(figsize=(16, 4.0), layout="constrained")
    maps_fig, curves_fig = fig.subfigures(1, 2, width_ratios=[4, 1.35], wspace=0.02)
    for ax, name in zip(maps_fig.subplots(1, 4), ["ktrans", "ve", "vp", "kep"]):
        rgb = render.render_slice(hs.scene, hs.app_logic, nodes.anatomy, out.map_nodes[name], opacity=0.75, **view)
        ax.imshow(figures.outline_rgb(rgb, outline, colours))
        ax.set_axis_off()
        info = MAPS[name]
        ax.set_title(info.title + (f" ({info.unit})" if info.unit != "1" else ""))
        maps_fig.colorbar(ScalarMappable(Normalize(*info.window), "viridis"), ax=ax, fraction=0.046, pad=0.02)
    figures.concentration_curves(exam.t_s, exam.cp_mM, figures.lesion_curves_of(exam.curves, exam.lesions),
                                 fit_label=f"{MODELS[exam.fit.model].title} fit", aif_label="AIF (plasma, automatic)",
                                 colours=colours, fig=curves_fig)
    fig.suptitle("DCE Perfusion - synthetic phantom: maps over the anatomy (lesion outlined) and the lesion's curves")
    path = os.path.join(HERE, "DCEPerfusion.png")
    fig.savefig(path, dpi=100)
    print(path)


if __name__ == "__main__":
    main()
