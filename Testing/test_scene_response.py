"""Response and cohort on a real MRML scene: two analysed exams of a lesion, the response table, the
lesion carried over by registration, the lesion figure, and a cohort turned into tables and charts."""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (python3 run.py test)")
from slicer import util  # noqa: E402

from DCEPerfusionLib import cohort, figures, phantom, response  # noqa: E402
from DCEPerfusionLib.core.options import AnalysisOptions  # noqa: E402
from DCEPerfusionLib.core.size import NO_PROGRESSION  # noqa: E402
from DCEPerfusionLib.scene import analysis, headless, render  # noqa: E402
from DCEPerfusionLib.scene import output as scene_output  # noqa: E402
from DCEPerfusionLib.scene import phantom as scene_phantom  # noqa: E402
from DCEPerfusionLib.scene import response as scene_response  # noqa: E402

KT, VE, VP, T10 = phantom.TISSUES["lesion"]


def _exam(hs, label, lesion_vp, seed, matrix=None):
    ph = phantom.make_phantom(shape=(4, 24, 28), snr=60.0, seed=seed, tissues={"lesion": (KT, VE, lesion_vp, T10)})
    nodes = scene_phantom.add_phantom(hs.scene, ph, name=f"DCE {label}", matrix=matrix)
    acq = ph.acquisition
    analysis.run_analysis(hs.scene, analysis.SceneInputs(
        dce_sequence=nodes.sequence, anatomy=nodes.anatomy, segmentation=nodes.segmentation,
        lesion_segment_ids=[nodes.lesion_segment_id], exam_label=label), AnalysisOptions(
        n_baseline=acq["n_baseline"], t10_s=1.6, aif_source="parker", r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"]))
    return ph, nodes


@pytest.fixture
def pair():
    hs = headless.headless_scene()
    ph_b, base = _exam(hs, "baseline", VP, 1)
    ph_f, follow = _exam(hs, "follow-up", VP / 2, 2)
    return hs, base, follow


def test_response_table_from_two_analysed_exams(pair):
    hs, base, follow = pair
    results, table, prop = scene_response.assess_exams(
        hs.scene, "baseline", "follow-up", base.segmentation, [base.lesion_segment_id],
        followup_segmentation=follow.segmentation)
    assert prop is None and len(results) == 1
    r = results[0]
    assert r.lesion == "lesion" and r.call.call == response.SUCCESS
    assert r.change_pct["vp"] == pytest.approx(-50.0, abs=6.0)
    assert r.size.call == NO_PROGRESSION and r.size.change_pct["volume"] == pytest.approx(0.0)
    assert table.GetName() == "DCE response (baseline to follow-up)" and table.GetNumberOfRows() == 1
    col = {table.GetColumnName(c): c for c in range(table.GetNumberOfColumns())}
    assert table.GetCellText(0, col["Call"]) == response.SUCCESS
    assert table.GetTable().GetValue(0, col["delta vp %"]).ToDouble() == pytest.approx(r.change_pct["vp"])
    assert table.GetColumnUnitLabel("longest diameter baseline") == "mm"
    # a re-run updates the same table; swapping the exams turns the halving into a doubling (failure)
    back, table2, _ = scene_response.assess_exams(hs.scene, "follow-up", "baseline", follow.segmentation,
                                                  [follow.lesion_segment_id], followup_segmentation=base.segmentation)
    assert back[0].call.call == response.FAILURE and table2 is not table
    # a follow-up segmentation without the lesion: indeterminate, with the reason
    follow.segmentation.GetSegmentation().GetSegment(follow.lesion_segment_id).SetName("renamed")
    missing, _, _ = scene_response.assess_exams(hs.scene, "baseline", "follow-up", base.segmentation,
                                                [base.lesion_segment_id], followup_segmentation=follow.segmentation)
    assert missing[0].call.call == response.INDETERMINATE
    assert "follow-up exam has no statistics for lesion 'lesion'" in missing[0].call.reason


def test_lesion_carried_to_a_moved_follow_up_by_registration(pair):
    hs, base, _ = pair
    moved = base.ijk_to_ras.copy()
    moved[:3, 3] += [6.0, -4.0, 3.0]      # the follow-up patient lies 6 mm right, 4 mm posterior, 3 mm up
    ph_m, follow = _exam(hs, "moved", VP * 1.6, 3, matrix=moved)
    results, table, prop = scene_response.assess_exams(
        hs.scene, "baseline", "moved", base.segmentation, [base.lesion_segment_id],
        baseline_image=base.anatomy, followup_image=follow.anatomy)
    shift = prop.registration.followup_to_baseline_ras[:3, 3]
    assert np.allclose(shift, [-6.0, 4.0, -3.0], atol=1.0)
    assert prop.registration.rotation_deg < 1.0
    tf = util.arrayFromVTKMatrix(prop.transform_node.GetMatrixTransformToParent())
    np.testing.assert_allclose(tf, prop.registration.followup_to_baseline_ras)
    carried = prop.masks["lesion"]
    truth = follow.labels == phantom.LABELS["lesion"]      # same voxels: the phantom itself moved
    assert 2 * (carried & truth).sum() / (carried.sum() + truth.sum()) > 0.9
    assert prop.segmentations["lesion"].GetSegmentation().GetNthSegment(0).GetName() == "lesion"
    assert prop.segmentations["lesion"].GetName() == "lesion carried to follow-up (baseline to moved)"
    assert results[0].call.call == response.FAILURE
    assert results[0].change_pct["vp"] == pytest.approx(60.0, abs=10.0)
    with pytest.raises(ValueError, match="follow-up anatomy: select it"):
        scene_response.assess_exams(hs.scene, "baseline", "moved", base.segmentation, [base.lesion_segment_id],
                                    baseline_image=base.anatomy)


def test_lesion_pair_figure_shows_both_exams(pair, tmp_path):
    hs, base, follow = pair
    lesion = base.labels == phantom.LABELS["lesion"]
    images = render.lesion_pair_images(hs.scene, hs.app_logic, "baseline", "follow-up", "lesion", lesion, lesion,
                                       base.anatomy, follow.anatomy)
    fig = figures.image_pair(*images, titles=("vp: baseline", "vp: follow-up"), suptitle="Lesion lesion",
                             colour_range=(0.0, 0.2), colour_label="vp")
    paths = figures.save(fig, str(tmp_path / "lesion_vp"))
    assert [p.rsplit(".", 1)[1] for p in paths] == ["png", "svg"]
    left, right = (np.asarray(ax.get_images()[0].get_array()) for ax in fig.axes[:2])
    c = left.shape[0] // 2
    # the lesion centre is brighter (higher vp) at baseline than at follow-up
    assert np.abs(left[c - 5:c + 5, c - 5:c + 5].astype(int) - right[c - 5:c + 5, c - 5:c + 5]).mean() > 10


def test_unknown_exam_labels_are_refused(pair):
    hs, base, follow = pair
    with pytest.raises(ValueError, match="exam 'week 12': no DCE Perfusion result"):
        scene_response.assess_exams(hs.scene, "baseline", "week 12", base.segmentation, [base.lesion_segment_id],
                                    followup_segmentation=follow.segmentation)
    with pytest.raises(ValueError, match="baseline and follow-up are both"):
        scene_response.assess_exams(hs.scene, "baseline", "baseline", base.segmentation, [base.lesion_segment_id],
                                    followup_segmentation=follow.segmentation)


def test_cohort_csv_to_tables_and_charts(tmp_path):
    hs = headless.headless_scene()
    rows = cohort.synthetic_cohort(seed=4)
    path = tmp_path / "cohort.csv"
    path.write_text(",".join(rows[0]) + "\n" + "\n".join(",".join(r.values()) for r in rows) + "\n")
    table = scene_response.load_cohort_table(hs.scene, str(path))
    assert table.GetNumberOfRows() == 49
    report, (stats_table, roc_chart, wf_chart) = scene_response.cohort_in_scene(hs.scene, table)
    expect = cohort.cohort_report(cohort.cohort_from_rows(rows))
    assert report.measures["vp"].roc.auc == pytest.approx(expect.measures["vp"].roc.auc)
    col = {stats_table.GetColumnName(c): c for c in range(stats_table.GetNumberOfColumns())}
    found = {(stats_table.GetCellText(r, col["Measure"]), stats_table.GetCellText(r, col["Quantity"])): r
             for r in range(stats_table.GetNumberOfRows())}
    sens = stats_table.GetTable().GetValue(found[("vp", "sensitivity")], col["Value"]).ToDouble()
    assert sens == pytest.approx(expect.measures["vp"].performance.sensitivity.estimate)
    assert ("vp vs size", "McNemar exact p") in found
    assert roc_chart.GetNumberOfPlotSeriesNodes() == 2 and wf_chart.GetNumberOfPlotSeriesNodes() == 3
    for chart in (roc_chart, wf_chart):
        for i in range(chart.GetNumberOfPlotSeriesNodes()):
            s = chart.GetNthPlotSeriesNode(i)
            t = s.GetTableNode()
            names = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
            assert s.GetXColumnName() in names and s.GetYColumnName() in names
    fpr = util.arrayFromTableColumn(roc_chart.GetNthPlotSeriesNode(0).GetTableNode(), "false positive rate")
    np.testing.assert_allclose(fpr, expect.measures["vp"].roc.fpr)
    # bad rows in the table name the row
    table.GetTable().SetValue(3, 2, "maybe")
    with pytest.raises(ValueError, match="row 4 \\(L004\\): outcome 'maybe'"):
        scene_response.cohort_in_scene(hs.scene, table)
    assert scene_output.find_output(hs.scene, "cohort", "") is table
