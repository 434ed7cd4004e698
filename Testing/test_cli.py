"""The command line run as a user runs it: demo, fit, assess, cohort and batch (on a local Dask cluster
of two workers), their files, and bad input with exit codes and one-line errors."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from DCEPerfusionLib import phantom
from DCEPerfusionLib.apps import demo
from DCEPerfusionLib.core.options import AnalysisOptions
from DCEPerfusionLib.files import exam, images

PY = [sys.executable, "-m", "DCEPerfusionLib"]


def _run(*args, cwd=None):
    return subprocess.run([*PY, *map(str, args)], capture_output=True, text=True, encoding="utf-8", timeout=600,
                          cwd=cwd)


def _small_exam(folder, lesion_vp=None, seed=0):
    ph = phantom.make_spine_phantom(lesion_vp=lesion_vp, shape=(4, 48, 32), seed=seed, snr=40.0)
    return demo.write_exam_inputs(str(folder), ph, phantom.spine_matrix((3.0, 3.0, 4.0))), ph


FIT_ARGS = ["--baseline-frames", "6", "--aif", "segment", "--aif-segment", "aorta", "--blood-t10", "1.6",
            "--r1", "4.5"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base, ph_b = _small_exam(root / "P1" / "baseline", seed=1)
    follow, ph_f = _small_exam(root / "P1" / "follow-up", {"L2 metastasis": 0.06, "L3 metastasis": 0.19}, seed=2)
    return root, base, follow


@pytest.fixture(scope="module")
def fitted(inputs, tmp_path_factory):
    """Both exams of ``inputs`` fitted by `dceperfusion fit` (T1 map, AIF from the aorta), each run once for
    the tests that check a fit's files and those that assess the two: {"b"/"f": (run, out folder)}."""
    root, base, follow = inputs
    out = tmp_path_factory.mktemp("fitted")
    runs = {}
    for name, files in (("b", base), ("f", follow)):
        runs[name] = _run("fit", files.dce, "--segmentation", files.segmentation, "--t1", files.t1_map, "--out",
                          out / name, *FIT_ARGS), out / name
    return runs


def test_demo_writes_the_report_maps_and_scenes(tmp_path):
    pytest.importorskip("matplotlib", reason="the demo's figures need matplotlib (Slicer does not bundle it)")
    pytest.importorskip("slicer", reason="the demo's .mrb scenes need the slicer-core wheel")
    out = _run("demo", "--out", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert "L2 metastasis: ΔVp" in out.stdout and "-> success (truth: success)" in out.stdout
    assert "-> suspected failure (truth: failure)" in out.stdout
    o = tmp_path / "out"
    html = (o / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 5 and "<table>" in html and "suspected failure" in html
    for label in ("baseline", "follow-up"):
        assert (o / f"{label}.mrb").stat().st_size > 10_000
        vp, m = images.read_volume(str(o / label / "vp.nrrd"))
        np.testing.assert_allclose(m, phantom.spine_matrix(), atol=1e-6)
    with open(o / "responses.json") as f:
        calls = {r["lesion"]: r["call"] for r in json.load(f)}
    # the paper's point: L2 grows (size says progression) while its vp halves (success); the small L1 changes by
    # -18 %, its 95 % CI straddles the -20 % cut-off
    assert calls == {"L2 metastasis": "success", "L3 metastasis": "suspected failure", "L1 metastasis": "indeterminate"}
    assert "L2 metastasis: ΔVp" in out.stdout and "size: progression" in out.stdout.split("L2 metastasis: ΔVp")[1]
    assert "straddles the cut-off" in html
    # the patient moved during the follow-up: registered (rigid), its motion.csv, summary entry and report section
    assert not (o / "baseline" / "motion.csv").exists() and (o / "follow-up" / "motion.csv").exists()
    with open(o / "follow-up" / "summary.json", encoding="utf-8") as f:
        moved = json.load(f)["motion"]
    with open(o / "baseline" / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["motion"] == {"correction": "none"}
    assert moved["correction"] == "rigid" and moved["max_displacement_voxels"] > 1
    assert f"Largest displacement of the fit region {moved['max_displacement_mm']:.1f} mm" in html
    assert 'alt="motion: follow-up (rigid correction)' in html and (o / "figures" / "motion_follow-up.png").exists()
    assert {p.suffix for p in (o / "figures").iterdir()} == {".png", ".svg"}
    again = _run("demo", "--out", o)                     # never overwrites without --overwrite
    assert again.returncode == 2 and "--overwrite" in again.stderr and again.stderr.count("\n") == 1


def test_fit_writes_the_same_maps_as_the_api(inputs, fitted, tmp_path):
    root, base, _ = inputs
    dce, seg, t1 = base.dce, base.segmentation, base.t1_map
    out, fit_dir = fitted["b"]
    assert out.returncode == 0, out.stderr
    api = exam.fit_exam(exam.ExamFiles(dce, seg, t1, aif_segment="aorta"),
                        AnalysisOptions(n_baseline=6, aif_source="segment", blood_t10_s=1.6, r1_per_mM_s=4.5))
    import SimpleITK as sitk
    from DCEPerfusionLib import registry
    for name in ("ktrans", "ve", "vp", "kep", "status", "ktrans_se", "ve_se", "vp_se", "kep_se"):
        arr, _ = images.read_volume(str(fit_dir / f"{name}.nrrd"))
        np.testing.assert_allclose(arr, api.fit.maps[name].astype(arr.dtype), equal_nan=True)
        keys = sitk.ReadImage(str(fit_dir / f"{name}.nrrd"))
        assert (keys.GetMetaData("DCEPerfusion.Map"), keys.GetMetaData("DCEPerfusion.Unit")) == \
            (name, registry.MAPS[name].unit)
    with open(fit_dir / "summary.json") as f:
        maps = json.load(f)["maps"]
    assert maps["ktrans_se"] == {"title": "Ktrans SE", "unit": "1/min", "description": "standard error of Ktrans"}
    assert list(maps) == list(api.fit.maps)
    with open(fit_dir / "statistics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["segment"] for r in rows} == {"L2 metastasis", "L3 metastasis"}
    nii = _run("fit", dce, "--segmentation", seg, "--t1", t1, "--out", tmp_path / "nii", "--format", "nii.gz",
               *FIT_ARGS)
    assert nii.returncode == 0, nii.stderr
    assert (tmp_path / "nii" / "vp.nii.gz").exists()
    vp_se, _ = images.read_volume(str(tmp_path / "nii" / "vp_se.nii.gz"))   # NaN at a bound: ITK reads it as 0
    np.testing.assert_array_equal(vp_se, np.nan_to_num(api.fit.maps["vp_se"]).astype(np.float32))


def test_fit_with_the_model_chosen_per_voxel_and_without_uncertainty(inputs, tmp_path):
    root, base, _ = inputs
    out = _run("fit", base.dce, "--segmentation", base.segmentation, "--out", tmp_path / "auto", "--model", "auto",
               "--no-uncertainty", *FIT_ARGS)
    assert out.returncode == 0, out.stderr
    files = {p.name for p in (tmp_path / "auto").iterdir()}
    assert {"ktrans.nrrd", "ve.nrrd", "vp.nrrd", "kep.nrrd", "model_choice.nrrd", "aicc.nrrd"} <= files
    assert not any(name.endswith("_se.nrrd") for name in files)
    choice, _ = images.read_volume(str(tmp_path / "auto" / "model_choice.nrrd"))
    assert choice.dtype == np.int16 and set(np.unique(choice)) <= {0, 1, 2, 3} and (choice > 0).any()
    with open(tmp_path / "auto" / "summary.json") as f:
        summary = json.load(f)
    assert summary["model"] == "auto" and summary["options_given"]["uncertainty"] is False
    assert sum(summary["model_counts"].values()) == choice.size
    with open(tmp_path / "auto" / "statistics.csv") as f:
        assert {r["map"] for r in csv.DictReader(f)} == {"ktrans", "ve", "vp", "kep", "r2"}


def test_assess(inputs, fitted, tmp_path):
    root, base, follow = inputs
    for r, _ in fitted.values():
        assert r.returncode == 0, r.stderr
    b_dir, f_dir = fitted["b"][1], fitted["f"][1]
    out = _run("assess", b_dir, f_dir, "--out", tmp_path / "a", "--baseline-seg",
               base.segmentation, "--followup-seg", follow.segmentation)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "a" / "responses.json") as f:
        rows = json.load(f)
    calls = {r["lesion"]: r["call"] for r in rows}
    assert calls == {"L2 metastasis": "success", "L3 metastasis": "suspected failure"}
    for r in rows:          # the ΔVp CI from the draws summary.json keeps, around the change, in the reason
        assert r["delta_vp_ci_lower_pct"] < r["delta_vp_pct"] < r["delta_vp_ci_upper_pct"]
        assert "95 % CI" in r["reason"]
    hot = _run("assess", b_dir, f_dir, "--out", tmp_path / "h", "--statistic", "hotspot_peak",
               "--no-ci-indeterminate")
    assert hot.returncode == 0, hot.stderr
    with open(tmp_path / "h" / "responses.json") as f:
        rows = json.load(f)
    assert {r["statistic"] for r in rows} == {"hotspot_peak"} and all(r["call"] != "indeterminate" for r in rows)


def test_cohort(tmp_path):
    pytest.importorskip("matplotlib", reason="the cohort command's figures need matplotlib (Slicer does not bundle it)")
    rows = [{"lesion_id": f"L{i}", "patient_id": f"P{i}", "outcome": "failure" if i % 3 == 0 else "success",
             "delta_vp_pct": str(40 - 50 * (i % 3 != 0) + i)} for i in range(15)]
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = _run("cohort", tmp_path / "c.csv", "--out", tmp_path / "co")
    assert out.returncode == 0, out.stderr and "AUC" in out.stdout
    with open(tmp_path / "co" / "cohort_statistics.json") as f:
        stats = json.load(f)
    assert stats["n_lesions"] == 15 and stats["measures"]["vp"]["sensitivity"]["n"] == 5
    assert (tmp_path / "co" / "roc.svg").exists()
    rows[2]["outcome"] = "unknown"
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    bad = _run("cohort", tmp_path / "bad.csv", "--out", tmp_path / "co2")
    assert bad.returncode == 2 and "row 3 (L2): outcome 'unknown'" in bad.stderr


def test_bad_inputs_exit_2_with_one_line(inputs, tmp_path):
    root, base, _ = inputs
    nii = tmp_path / "dce.nii.gz"
    import SimpleITK as sitk
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 3, 4, 4), np.float32), isVector=False), str(nii))
    cases = [
        (["fit", nii, "--out", tmp_path / "x", "--baseline-frames", "2"], "no frame times"),
        (["fit", tmp_path / "missing.nrrd", "--out", tmp_path / "x", "--baseline-frames", "2"], "does not exist"),
        (["fit", base.dce, "--out", tmp_path / "x", "--baseline-frames", "2", "--aif", "segment",
          "--aif-segment", "aorta"], "AIF segment 'aorta': not in the segmentation"),
        (["assess", tmp_path, tmp_path, "--out", tmp_path / "y"], "no summary.json"),
    ]
    trunc = tmp_path / "trunc.nrrd"
    trunc.write_bytes(open(base.dce, "rb").read()[:2000])
    cases.append((["fit", trunc, "--out", tmp_path / "x", "--baseline-frames", "6"], "cannot be read"))
    for args, message in cases:
        out = _run(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    for sub in ("fit", "assess", "cohort", "batch", "demo"):
        h = _run(sub, "--help")
        assert h.returncode == 0 and "--out" in h.stdout


def test_batch_on_a_local_dask_cluster(inputs, tmp_path):
    pytest.importorskip("dask.distributed", reason="batch runs on Dask (Slicer does not bundle it)")
    root, base, follow = inputs
    p2b, _ = _small_exam(root / "P2" / "baseline", seed=3)
    p2f, _ = _small_exam(root / "P2" / "follow-up", {"L2 metastasis": 0.05}, seed=4)
    rows = []
    for patient, files in (("P1", (base, follow)), ("P2", (p2b, p2f))):
        for tp, f in zip(("baseline", "follow-up"), files):
            for lesion, outcome in (("L2 metastasis", "success"), ("L3 metastasis", "failure" if patient == "P1"
                                                                    else "success")):
                rows.append({"patient": patient, "lesion": lesion, "timepoint": tp,
                             "dce": os.path.relpath(f.dce, root), "segmentation": os.path.relpath(f.segmentation, root),
                             "outcome": outcome})
    rows.append({"patient": "P3", "lesion": "L2 metastasis", "timepoint": "baseline", "dce": "P3/missing.nrrd",
                 "segmentation": "", "outcome": "success"})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    args = ["batch", manifest, "--out", tmp_path / "b", "--workers", "2", *FIT_ARGS]
    out = _run(*args)
    assert out.returncode == 1, out.stderr                       # one exam failed: listed, the others done
    with open(tmp_path / "b" / "batch_summary.json") as f:
        summary = json.load(f)
    assert summary["fitted"] == 4 and summary["exams"] == 5
    assert summary["failed"][0]["exam"] == "P3_baseline" and "does not exist" in summary["failed"][0]["error"]
    with open(tmp_path / "b" / "responses.json") as f:
        calls = {r["lesion"]: r["call"] for r in json.load(f)}
    assert calls["P1/L2 metastasis"] == "success" and calls["P1/L3 metastasis"] == "suspected failure"
    assert calls["P3/L2 metastasis"] == "indeterminate"
    with open(tmp_path / "b" / "responses.json") as f:            # the same response chain as assess: sizes too
        sizes = {r["lesion"]: r["size_call"] for r in json.load(f)}
    assert sizes["P1/L2 metastasis"] == "no progression" and sizes["P3/L2 metastasis"] is None
    assert os.path.exists(tmp_path / "b" / "cohort_statistics.json")
    again = _run(*args)                                          # resumable: finished exams are skipped
    with open(tmp_path / "b" / "batch_summary.json") as f:
        assert json.load(f)["skipped"] == 4
    assert again.returncode == 1
    (tmp_path / "b" / "exams" / "P2_follow-up" / "summary.json").write_text('{"statistics": [1, 2]}')
    damaged = _run(*args)                                        # a damaged earlier result fails its exam only
    with open(tmp_path / "b" / "batch_summary.json") as f:
        summary = json.load(f)
    assert damaged.returncode == 1 and {f["exam"] for f in summary["failed"]} == {"P3_baseline", "P2_follow-up"}
    errors = {f["exam"]: f["error"] for f in summary["failed"]}
    assert "P2_follow-up" in damaged.stderr and "fit the exam again" in errors["P2_follow-up"]
