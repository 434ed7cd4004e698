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

from DCEPerfusionLib import phantom, scene, scene_files, scene_output, scene_phantom  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    hs = scene_files.headless_scene()
    ph = phantom.make_phantom(shape=(96, 80, 6), snr=40.0, seed=11)
    nodes = scene_phantom.add_phantom(hs.scene, ph, matrix=scene_phantom.oblique_matrix((1.0, 1.0, 4.0)))
    acq = ph.acquisition
    t1 = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 map")
    util.updateVolumeFromArray(t1, np.transpose(ph.t10_s, (2, 1, 0)).astype(np.float32))
    scene_output.set_ijk_to_ras(t1, nodes.ijk_to_ras)
    out = scene.run_analysis(hs.scene, scene.AnalysisInputs(
        dce_sequence=nodes.sequence, n_baseline=acq["n_baseline"], anatomy=nodes.anatomy, t1_map=t1,
        segmentation=nodes.segmentation, segment_ids=[nodes.lesion_segment_id], aif_source="automatic",
        r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"], exam_label="baseline"))
    lesion = (nodes.labels_kji == phantom.LABELS["lesion"]).astype(np.uint8)
    label = hs.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lesion outline")
    util.updateVolumeFromArray(label, lesion)
    scene_output.set_ijk_to_ras(label, nodes.ijk_to_ras)
    label.CreateDefaultDisplayNodes()
    centre = (nodes.ijk_to_ras @ np.r_[np.argwhere(lesion).mean(axis=0)[::-1], 1.0])[:3]

    names = ["ktrans", "ve", "vp", "kep"]
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.3]})
    for ax, name in zip(axes, names):
        rgb = scene_files.render_slice(hs.scene, hs.app_logic, nodes.anatomy, out.map_nodes[name], ras_point=centre,
                                       size=(360, 360), label=label, opacity=0.75)
        ax.imshow(rgb)
        ax.set_axis_off()
        lo, hi = scene_output.WINDOW_PRESETS[name]
        unit = {"ktrans": " (1/min)", "kep": " (1/min)"}.get(name, "")
        ax.set_title(f"{scene_output.MAP_TITLES[name]}{unit}")
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
