"""Make Resources/Screenshots/DCEPerfusion.png: the synthetic phantom through the module's logic, the
maps over the anatomy rendered by Slicer's vtkMRMLSliceLogic, with colour bars and the lesion outline.

    .venv/bin/python Resources/Screenshots/make_screenshot.py
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from slicer import util  # noqa: E402

from DCEPerfusionLib import phantom  # noqa: E402
from DCEPerfusionLib.core.options import AnalysisOptions  # noqa: E402
from DCEPerfusionLib.core.registry import MAPS  # noqa: E402
from DCEPerfusionLib.scene import analysis, headless, render  # noqa: E402
from DCEPerfusionLib.scene import output as scene_output  # noqa: E402
from DCEPerfusionLib.scene import phantom as scene_phantom  # noqa: E402

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
    lesion = (nodes.labels == phantom.LABELS["lesion"]).astype(np.uint8)
    label = hs.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lesion outline")
    util.updateVolumeFromArray(label, lesion)
    scene_output.set_ijk_to_ras(label, nodes.ijk_to_ras)
    label.CreateDefaultDisplayNodes()
    centre = (nodes.ijk_to_ras @ np.r_[np.argwhere(lesion).mean(axis=0)[::-1], 1.0])[:3]

    names = ["ktrans", "ve", "vp", "kep"]
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.3]})
    for ax, name in zip(axes, names):
        rgb = render.render_slice(hs.scene, hs.app_logic, nodes.anatomy, out.map_nodes[name], ras_point=centre,
                                  size=(360, 360), label=label, opacity=0.75)
        ax.imshow(rgb)
        ax.set_axis_off()
        info = MAPS[name]
        lo, hi = info.window
        ax.set_title(info.title + (f" ({info.unit})" if info.unit != "1" else ""))
        fig.colorbar(plt.cm.ScalarMappable(Normalize(lo, hi), "viridis"), ax=ax, fraction=0.046, pad=0.02)
    table = util.arrayFromTableColumn
    t = table(out.curves_table, "time_s")
    ax = axes[-1]
    ax.plot(t, table(out.curves_table, "AIF plasma"), color="0.4", label="AIF (plasma, automatic)")
    ax.plot(t, table(out.curves_table, "lesion mean C"), "o", ms=3, color="tab:red", label="lesion mean C(t)")
    ax.plot(t, table(out.curves_table, "lesion fit"), color="tab:blue", label="Extended Tofts fit")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("concentration (mM)")
    ax.set_ylim(0, 1.1 * table(out.curves_table, "lesion mean C").max())
    ax.legend(fontsize=8)
    fig.suptitle("DCE Perfusion - synthetic phantom: maps over the anatomy (lesion outlined) and lesion curves")
    fig.tight_layout()
    path = os.path.join(HERE, "DCEPerfusion.png")
    fig.savefig(path, dpi=80)
    print(path)


if __name__ == "__main__":
    main()
