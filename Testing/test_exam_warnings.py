"""Between two exams (core.examchecks): each warning raised by the case designed for it and absent
otherwise; the normal-marrow reference through the chain (analyse, compare_exams) and the command line
(fit --reference-segment, assess --call-on reference-normalised)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from DCEPerfusionLib import phantom, pipeline
from DCEPerfusionLib.apps import cli, demo
from DCEPerfusionLib.core import examchecks
from DCEPerfusionLib.core.geometry import Volume
from DCEPerfusionLib.core.options import AnalysisOptions
from DCEPerfusionLib.core.regionstats import RegionStats
from DCEPerfusionLib.files import images

SAME = examchecks.ExamConditions(tr_s=0.004, flip_angle_deg=15.0, frame_interval_s=5.0, duration_s=295.0,
                                 aif_peak_mM=5.0, t10_constant=False,
                                 region_t10_s={"L1": 1.0, "normal marrow": 0.8})


@pytest.mark.parametrize("change, expected", [
    ({"tr_s": 0.0045}, "TR differs between the exams (4 ms -> 4.5 ms"),
    ({"flip_angle_deg": 12.0}, "flip angle differs between the exams (15 deg -> 12 deg"),
    ({"frame_interval_s": 4.0}, "frame interval differs between the exams (5 s -> 4 s"),
    ({"duration_s": 200.0}, "duration differs between the exams (295 s -> 200 s"),
    ({"aif_peak_mM": 8.0}, "AIF peak differs between the exams (5.00 -> 8.00 mM"),
    ({"region_t10_s": {"L1": 0.7, "normal marrow": 0.8}}, "T10 of 'L1' from the T1 maps changed by -30 %"),
    ({"region_t10_s": {"L1": 1.0, "normal marrow": 0.5}}, "T10 of 'normal marrow' from the T1 maps changed by -38 %"),
])
def test_each_warning_comes_from_its_case_alone(change, expected):
    assert examchecks.exam_warnings(SAME, SAME, ["L1", "normal marrow"]) == []
    warnings = examchecks.exam_warnings(SAME, dataclasses.replace(SAME, **change), ["L1", "normal marrow"])
    assert len(warnings) == 1 and warnings[0].startswith(expected), warnings


def test_differences_within_the_tolerances_are_not_warned_about():
    close = dataclasses.replace(SAME, tr_s=0.0041, flip_angle_deg=15.5, frame_interval_s=5.2, duration_s=300.0,
                                aif_peak_mM=7.0, region_t10_s={"L1": 0.85, "normal marrow": 0.9})
    assert examchecks.exam_warnings(SAME, close, ["L1", "normal marrow"]) == []
    assert examchecks.exam_warnings(SAME, None, ["L1"]) == []               # unknown conditions: nothing to say


def test_constant_t10_on_both_exams_is_warned_about_but_not_on_one():
    const = dataclasses.replace(SAME, t10_constant=True, region_t10_s={})
    (w,) = examchecks.exam_warnings(const, const, ["L1"])
    assert w.startswith("constant T10 on both exams: radiation turns marrow fatty")
    assert examchecks.exam_warnings(const, SAME, ["L1"]) == []


def _rows(segment, vp, n=50):
    return [RegionStats(segment, "vp", "1", n, 1.0, 0, {s: vp for s in ("mean", "median", "percentile_90")})]


def test_reference_ratio_and_the_normalised_call():
    base = pipeline.ExamLesions(_rows("L1", 0.10) + _rows("marrow", 0.05), reference="marrow")
    # lesion vp halves (success on ΔVp), but so does the whole marrow's: the ratio stays 2 (0 % -> failure)
    follow = pipeline.ExamLesions(_rows("L1", 0.05) + _rows("marrow", 0.025), reference="marrow")
    (plain,) = pipeline.compare_exams(base, follow)
    assert plain.lesion == "L1" and plain.call.call == "success"            # the reference is not assessed
    assert plain.reference["vp_ratio_baseline"] == pytest.approx(2.0)
    assert plain.reference["vp_ratio_followup"] == pytest.approx(2.0)
    assert plain.reference["delta_vp_ratio_pct"] == pytest.approx(0.0, abs=1e-9)
    (norm,) = pipeline.compare_exams(base, follow, normalise_to_reference=True)
    assert norm.call.call == "suspected failure" and norm.call.reason.startswith("reference-normalised call:")
    assert norm.change_pct["vp"] == pytest.approx(-50.0)                     # ΔVp itself is still reported
    # a reference with a baseline vp too small to divide by: indeterminate, as for the lesion's own vp
    tiny = pipeline.ExamLesions(_rows("L1", 0.10) + _rows("marrow", 0.001), reference="marrow")
    (r,) = pipeline.compare_exams(tiny, follow, normalise_to_reference=True)
    assert r.call.call == "indeterminate" and "reference 'marrow' has baseline vp 0.0010" in r.call.reason
    few = pipeline.ExamLesions(_rows("L1", 0.10) + _rows("marrow", 0.05, n=3), reference="marrow")
    (r,) = pipeline.compare_exams(few, follow, normalise_to_reference=True)
    assert r.call.call == "indeterminate" and "baseline: 3 voxels with a good fit" in r.call.reason
    with pytest.raises(ValueError, match="no reference segment - fit them with a normal-marrow reference"):
        pipeline.compare_exams(pipeline.ExamLesions(_rows("L1", 0.1)), pipeline.ExamLesions(_rows("L1", 0.1)),
                               normalise_to_reference=True)


def test_a_tiny_baseline_vp_stays_one_indeterminate_call_not_a_warning():
    base = pipeline.ExamLesions(_rows("L1", 0.001), conditions=SAME)
    (r,) = pipeline.compare_exams(base, pipeline.ExamLesions(_rows("L1", 0.01), conditions=SAME))
    assert r.call.call == "indeterminate" and "baseline vp 0.0010 is below" in r.call.reason and r.warnings == []


def _analyse(small, t1_scale=None, tr_s=None, reference_name="muscle"):
    ph, series, masks = small
    acq = ph.acquisition
    opts = AnalysisOptions(n_baseline=acq["n_baseline"], tr_s=tr_s, aif_source="segment", blood_t10_s=1.9,
                           r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"], method="lls")
    t1 = None if t1_scale is None else Volume(ph.t10_s * t1_scale, series.ijk_to_ras, "T1 map (test)")
    muscle = ph.labels == phantom.LABELS["muscle"]
    return pipeline.analyse(series, opts, lesions={"lesion": masks["lesion"]}, aif_mask=masks["artery"],
                            aif_name="artery", t1_map=t1, reference_mask=muscle, reference_name=reference_name)


def test_analyse_reports_the_reference_like_a_lesion_and_carries_the_conditions(small):
    ph, series, masks = small
    res = _analyse(small, t1_scale=1.0)
    assert res.reference == "muscle" and {r.segment for r in res.statistics} == {"lesion", "muscle"}
    region_t10 = res.provenance["t10"]["region_median_s"]
    assert region_t10["lesion"] == pytest.approx(np.median(ph.t10_s[masks["lesion"]]))
    data = res.lesion_data()
    assert data.reference == "muscle" and data.conditions.t10_constant is False
    assert data.conditions.aif_peak_mM == pytest.approx(res.cp_mM.max())
    assert data.conditions.frame_interval_s == pytest.approx(ph.t_s[1] - ph.t_s[0])
    (same,) = pipeline.compare_exams(data, data)
    assert same.warnings == [] and same.reference["delta_vp_ratio_pct"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="reference segment 'lesion': is also a lesion"):
        _analyse(small, reference_name="lesion")


def test_t1_maps_and_tr_differing_between_exams_are_warned_about_with_the_call(small):
    base = _analyse(small, t1_scale=1.0).lesion_data()
    follow = _analyse(small, t1_scale=0.7, tr_s=small[0].acquisition["tr_s"] * 1.1).lesion_data()
    (r,) = pipeline.compare_exams(base, follow)
    assert len(r.warnings) == 3, r.warnings
    assert r.warnings[0].startswith("T10 of 'lesion' from the T1 maps changed by -30 %")
    assert r.warnings[1].startswith("T10 of 'muscle' from the T1 maps changed by -30 %")
    assert r.warnings[2].startswith("TR differs between the exams")


def test_fit_with_a_reference_segment_and_assess_on_the_normalised_change(tmp_path, capsys):
    folders = {}
    for label, vp, seed in (("baseline", None, 1), ("follow-up", {"L2 metastasis": 0.02}, 2)):
        ph = phantom.make_spine_phantom(lesion_vp=vp, shape=(4, 48, 32), seed=seed, snr=40.0)
        matrix = phantom.spine_matrix((3.0, 3.0, 4.0))
        files = demo.write_exam_inputs(str(tmp_path / label), ph, matrix)
        masks, seg_matrix = images.read_segmentation(files.segmentation)
        j = np.arange(ph.labels.shape[1])[None, :, None]
        masks["L1 marrow"] = (ph.labels == phantom.SPINE_LABELS["marrow"]) & (j < ph.labels.shape[1] / 4)
        seg = images.write_segmentation(str(tmp_path / label / "with_reference.seg.nrrd"), masks, seg_matrix)
        out = tmp_path / f"fit-{label}"
        code = cli.main(["fit", files.dce, "--segmentation", seg, "--lesion", "L2 metastasis", "--reference-segment",
                         "L1 marrow", "--out", str(out), "--baseline-frames", "6", "--aif-segment", "aorta",
                         "--blood-t10", "1.6", "--r1", "4.5", "--method", "lls"])
        assert code == 0
        folders[label] = out
    with open(folders["baseline"] / "summary.json") as f:
        summary = json.load(f)
    assert summary["reference_segment"] == "L1 marrow"
    assert {(r["segment"], r["role"]) for r in summary["statistics"]} == {("L2 metastasis", "lesion"),
                                                                          ("L1 marrow", "reference")}
    capsys.readouterr()
    code = cli.main(["assess", str(folders["baseline"]), str(folders["follow-up"]), "--call-on",
                     "reference-normalised", "--out", str(tmp_path / "assess")])
    assert code == 0
    shown = capsys.readouterr().out
    with open(tmp_path / "assess" / "responses.json") as f:
        (row,) = json.load(f)
    assert row["lesion"] == "L2 metastasis" and row["reference_segment"] == "L1 marrow"
    assert row["vp_ratio_baseline"] == pytest.approx(row["vp_baseline"] / row["vp_reference_baseline"])
    assert row["reason"].startswith("reference-normalised call:")
    assert row["warnings"].startswith("constant T10 on both exams")          # no --t1: T10 constant on both
    assert "warnings: constant T10 on both exams" in shown
    assert os.path.exists(tmp_path / "assess" / "responses.csv")


def test_scene_response_has_the_reference_ratio_and_the_warnings():
    pytest.importorskip("slicer", reason="needs the slicer-core wheel (python3 run.py test)")
    from DCEPerfusionLib.scene import analysis, headless
    from DCEPerfusionLib.scene import phantom as scene_phantom
    from DCEPerfusionLib.scene import response as scene_response
    hs = headless.headless_scene()
    exams = {}
    for label, vp, seed, flip in (("baseline", 0.10, 1, 15.0), ("follow-up", 0.05, 2, 18.0)):
        ph = phantom.make_phantom(shape=(4, 24, 28), snr=60.0, seed=seed, flip_angle_deg=flip,
                                  tissues={"lesion": (0.25, 0.35, vp, 1.6)})
        nodes = scene_phantom.add_phantom(hs.scene, ph, name=f"DCE {label}", segments={
            "lesion": phantom.LABELS["lesion"], "muscle": phantom.LABELS["muscle"]})
        muscle_id = nodes.segmentation.GetSegmentation().GetSegmentIdBySegmentName("muscle")
        acq = ph.acquisition
        out = analysis.run_analysis(hs.scene, analysis.SceneInputs(
            dce_sequence=nodes.sequence, segmentation=nodes.segmentation, lesion_segment_ids=[nodes.lesion_segment_id],
            reference_segment_id=muscle_id, exam_label=label), AnalysisOptions(
            n_baseline=acq["n_baseline"], t10_s=1.6, aif_source="parker", r1_per_mM_s=acq["r1_per_mM_s"],
            hct=acq["hct"], method="lls"))
        assert out.exam.reference == "muscle"
        exams[label] = (nodes, muscle_id)
    (base, ref_id), (follow, _) = exams["baseline"], exams["follow-up"]
    results, table, _ = scene_response.assess_exams(
        hs.scene, "baseline", "follow-up", base.segmentation, [base.lesion_segment_id],
        followup_segmentation=follow.segmentation, reference_segment_id=ref_id)
    (r,) = results
    assert r.lesion == "lesion" and r.reference["segment"] == "muscle"
    assert r.reference["vp_ratio_baseline"] == pytest.approx(r.baseline["vp"] / r.reference["vp_baseline"])
    assert [w.split(" (")[0] for w in r.warnings] == ["constant T10 on both exams: radiation turns marrow fatty and "
                                                      "shortens its T1, which biases ΔVp - give T1 maps", "flip angle "
                                                      "differs between the exams"]
    col = {table.GetColumnName(c): c for c in range(table.GetNumberOfColumns())}
    assert "flip angle differs" in table.GetCellText(0, col["Warnings"]) and "vp ratio baseline" in col
