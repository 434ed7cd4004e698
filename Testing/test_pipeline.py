"""The one chain (core.pipeline): options checked once, provenance, the same result through the files and
the scene adapters, the response chain of two exams, and the demo fitting each exam exactly once (and
running to its end without the slicer-core wheel)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from DCEPerfusionLib import phantom, pipeline
from DCEPerfusionLib.apps import cli, demo
from DCEPerfusionLib.core.options import AnalysisOptions
from DCEPerfusionLib.core.series import Series4D
from DCEPerfusionLib.files import exam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_analyse_returns_maps_statistics_curves_and_provenance(small):
    ph, series, masks = small
    acq = ph.acquisition
    opts = AnalysisOptions(n_baseline=acq["n_baseline"], t10_s=1.6, aif_source="segment", blood_t10_s=1.9,
                           r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"], model="etm")
    res = pipeline.analyse(series, opts, lesions={"lesion": masks["lesion"]}, aif_mask=masks["artery"],
                           aif_name="artery")
    assert res.options.model == "extended_tofts"                       # the alias resolved once
    assert set(res.maps) == {"ktrans", "ve", "vp", "kep", "ktrans_se", "ve_se", "vp_se", "kep_se", "r2", "status"}
    lesion = masks["lesion"]
    assert abs(np.median(res.maps["vp"][lesion]) - np.median(ph.truth["vp"][lesion])) < 0.01
    assert {r.map for r in res.statistics} == {"ktrans", "ve", "vp", "kep", "r2"}
    assert list(res.curves) == ["AIF plasma", "lesion mean C", "lesion fit"]
    np.testing.assert_allclose(res.curves["AIF plasma"][0], res.cp_mM)
    p = res.provenance
    assert p["tr_s"] == {"value": acq["tr_s"], "source": "header of phantom"}
    assert p["r1_per_mM_s"] == {"value": acq["r1_per_mM_s"], "source": "given"}
    assert p["t10"] == {"source": "constant", "value_s": 1.6, "blood_t10_s": 1.9}
    assert p["aif"]["voxels"] == int(masks["artery"].sum()) and "artery" in p["aif"]["description"]
    # the preset when no r1 is given, and TR from the options when given
    preset = pipeline.analyse(series, AnalysisOptions(n_baseline=acq["n_baseline"], tr_s=0.005, method="lls",
                                                      field_strength_t=1.5))
    assert preset.provenance["r1_per_mM_s"]["value"] == 5.2 and "gadobutrol at 1.5 T" in \
        preset.provenance["r1_per_mM_s"]["source"]
    assert preset.provenance["tr_s"] == {"value": 0.005, "source": "given"}
    assert preset.statistics == [] and list(preset.curves) == ["AIF plasma"]


@pytest.mark.parametrize("change, message", [
    ({"aif_source": "bogus"}, "AIF source 'bogus': use one of parker"),
    ({"hct": 42}, "hematocrit = 42: must be a fraction"),
    ({"model": "2cxm", "method": "lls"}, r"method='lls' \(Linear least squares \(fast\)\) is available for extended_tofts \(Extended Tofts\), tofts"),
    ({"model": "gamma"}, "model='gamma': choose one of"),
    ({"n_baseline": 58}, "number of baseline frames = 58: must be between 1 and 57"),
    ({"t10_s": -1}, "T10 \\(constant pre-contrast T1\\)"),
    ({"contrast_agent": "gadoxetate"}, "no preset for agent='gadoxetate'"),
    ({"aif_source": "segment"}, "AIF source 'segment': no artery segment given"),
    ({"fit_lesions_only": True}, "fit inside the lesions only: no lesion segment given"),
])
def test_bad_options_are_refused_before_any_work(small, change, message):
    ph, series, _ = small
    opts = AnalysisOptions(**{"n_baseline": ph.acquisition["n_baseline"], **change})
    with pytest.raises(ValueError, match=message):
        pipeline.analyse(series, opts)


def test_a_header_without_tr_names_the_fix(small):
    ph, series, _ = small
    bare = Series4D(series.signal, series.t_s, series.ijk_to_ras, None, None, "", "scan")
    with pytest.raises(ValueError, match="TR: the series 'scan' has no TR in its header - enter TR \\(ms; --tr-ms"):
        pipeline.analyse(bare, AnalysisOptions(n_baseline=6))
    with pytest.raises(ValueError, match="flip angle: .* enter the flip angle \\(degrees; --flip-deg"):
        pipeline.analyse(bare, AnalysisOptions(n_baseline=6, tr_s=0.004))


def test_compare_exams_pairs_lesions_by_name_with_their_size():
    def rows(vp, n=50):
        from DCEPerfusionLib.core.regionstats import RegionStats
        return [RegionStats("L1", "vp", "1", n, 1.0, 0, {s: vp for s in ("mean", "median", "percentile_90")})]
    mask = np.zeros((3, 20, 20), bool)
    mask[1, 5:15, 5:15] = True
    grown = np.zeros_like(mask)
    grown[1, 3:17, 3:17] = True
    m = np.diag([1.0, 1.0, 3.0, 1.0])
    base = pipeline.ExamLesions(rows(0.10), {"L1": mask}, m)
    follow = pipeline.ExamLesions(rows(0.05), {"L1": grown}, m)
    (r,) = pipeline.compare_exams(base, follow, name_prefix="P7/")
    assert r.lesion == "P7/L1" and r.call.call == "success" and r.change_pct["vp"] == pytest.approx(-50.0)
    from DCEPerfusionLib.core.size import size_measures
    d0, d1 = (size_measures(x, m).longest_diameter_mm for x in (mask, grown))   # squares: the diagonals
    assert r.size.call == "progression" and r.size.change_pct["longest_diameter"] == pytest.approx(100 * (d1 / d0 - 1))
    assert d1 / d0 == pytest.approx(1.4, abs=0.05)
    (no_masks,) = pipeline.compare_exams(pipeline.ExamLesions(rows(0.10)), pipeline.ExamLesions(rows(0.15)))
    assert no_masks.size is None and no_masks.call.call == "suspected failure"
    (missing,) = pipeline.compare_exams(base, None)
    assert missing.call.call == "indeterminate" and "follow-up exam has no statistics" in missing.call.reason


def test_files_and_scene_adapters_run_the_same_chain(tmp_path):
    """The same exam as files and as scene nodes gives the same maps, statistics and curves."""
    pytest.importorskip("slicer", reason="the scene adapter needs the slicer-core wheel")
    from slicer import util

    from DCEPerfusionLib.scene import analysis, headless
    from DCEPerfusionLib.scene import phantom as scene_phantom
    from DCEPerfusionLib.scene.output import set_ijk_to_ras

    ph = phantom.make_spine_phantom(shape=(4, 48, 32), seed=5, snr=40.0)
    matrix = phantom.spine_matrix((3.0, 3.0, 4.0))
    files = demo.write_exam_inputs(str(tmp_path), ph, matrix)
    opts = demo.demo_options(ph)
    from_files = exam.fit_exam(files, opts)
    hs = headless.headless_scene()
    nodes = scene_phantom.add_phantom(hs.scene, ph, matrix=matrix,
                                      segments={n: phantom.SPINE_LABELS[n] for n in (*files.lesions, "aorta")})
    t1 = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    util.updateVolumeFromArray(t1, ph.t10_s.astype(np.float32))
    set_ijk_to_ras(t1, matrix)
    ids = nodes.segment_ids
    in_scene = analysis.run_analysis(hs.scene, analysis.SceneInputs(
        nodes.sequence, nodes.anatomy, t1, nodes.segmentation, [ids[n] for n in files.lesions], ids["aorta"],
        "baseline"), opts).exam
    for name, values in from_files.maps.items():
        np.testing.assert_array_equal(in_scene.maps[name], values, err_msg=name)
    assert [(r.segment, r.map, r.voxel_count) for r in in_scene.statistics] == \
        [(r.segment, r.map, r.voxel_count) for r in from_files.statistics]
    for a, b in zip(in_scene.statistics, from_files.statistics):
        assert a.values == b.values
    for name, (values, _) in from_files.curves.items():
        np.testing.assert_array_equal(in_scene.curves[name][0], values)
    assert in_scene.aif_description == from_files.aif_description


def test_the_demo_fits_each_exam_once_and_builds_its_scenes_from_that_fit(demo_run):
    out, calls = demo_run, demo_run["fit_calls"]                   # (the conftest fixture counts fitting.fit)
    assert len(calls) == 2, calls                                   # baseline and follow-up, once each
    assert calls[0][0] == calls[1][0] == out["phantoms"]["baseline"].signal.shape
    assert calls[0][1] != calls[1][1]                               # two different exams' data
    if out["mrb"]:                                                   # the scenes hold the files' result
        from DCEPerfusionLib.scene import headless
        from slicer import util
        loaded = headless.load_bundle(out["mrb"][1])
        vp = util.arrayFromVolume(loaded.scene.GetFirstNodeByName("vp (follow-up)"))
        np.testing.assert_array_equal(vp, np.nan_to_num(out["results"]["follow-up"].maps["vp"]).astype(np.float32))


def test_the_demo_runs_to_its_end_without_slicer_core(tmp_path):
    """As after `pip install .` with no extras: `import slicer` (and vtk) fail."""
    pytest.importorskip("matplotlib", reason="the demo's figures need matplotlib (Slicer does not bundle it)")
    code = ("import sys; sys.modules['slicer'] = None; sys.modules['vtk'] = None\n"
            "from DCEPerfusionLib import cli\n"
            f"sys.exit(cli.main(['demo', '--out', {str(tmp_path / 'out')!r}]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "-> success (truth: success)" in run.stdout and "-> suspected failure (truth: failure)" in run.stdout
    notes = [line for line in run.stdout.splitlines() if "pip install 'dceperfusion[scene]'" in line]
    assert len(notes) == 1 and "no .mrb scenes" in notes[0]         # said once, in one line
    o = tmp_path / "out"
    assert not list(o.glob("*.mrb"))
    html = (o / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 6 and "drawn from the map arrays" in html
    assert (o / "baseline" / "vp.nrrd").exists() and (o / "figures" / "vp_maps.png").exists()
    with open(o / "responses.json", encoding="utf-8") as f:
        assert [r["call"] for r in json.load(f)] == ["success", "suspected failure", "indeterminate"]


def test_one_set_of_defaults_for_the_command_line():
    args = cli.build_parser().parse_args(["fit", "x.nrrd", "--out", "o", "--baseline-frames", "6"])
    assert cli._options(args) == AnalysisOptions(n_baseline=6).checked()


def test_summary_json_is_strict_json_even_for_an_empty_lesion(tmp_path):
    ph = phantom.make_spine_phantom(shape=(4, 48, 32), seed=2, snr=40.0)
    files = demo.write_exam_inputs(str(tmp_path / "in"), ph, phantom.spine_matrix((3.0, 3.0, 4.0)))
    from DCEPerfusionLib.files import images
    masks, m = images.read_segmentation(files.segmentation)
    masks["empty"] = np.zeros_like(masks["aorta"])
    images.write_segmentation(files.segmentation, masks, m)
    drawn = list(files.lesions)
    files.lesions = [*drawn, "empty"]
    result = exam.fit_exam(files, demo.demo_options(ph))
    assert any("'empty' has no voxel" in w for w in result.warnings)
    exam.write_exam(result, str(tmp_path / "out"), files=files)

    def refuse(constant):
        raise AssertionError(f"{constant} in summary.json")
    with open(tmp_path / "out" / "summary.json", encoding="utf-8") as f:
        summary = json.load(f, parse_constant=refuse)
    empty = [r for r in summary["statistics"] if r["segment"] == "empty"]
    assert empty and all(r["mean"] is None and r["voxel_count"] == 0 for r in empty)
    assert summary["values_used"]["t10"]["unit"] == "s" and summary["inputs"]["aif_segment"] == "aorta"
    back = exam.read_exam_lesions(str(tmp_path / "out"))
    assert set(back.masks) == {*drawn, "empty"} and np.isnan(
        [r.values["mean"] for r in back.statistics if r.segment == "empty"][0])
