"""The response SR of 'assess' (files.dicomsr): written from hand-made DICOM records and response rows, read
back with pydicom (a walk of the content tree) and highdicom (srread), on highdicom 0.22 and 0.28:
every number of the rows at its lesion and time point, the call and its reason, the follow-up's study,
the referenced SEG segments and vp Parametric Maps; the refusals; 'assess --dicom-out'."""

import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("highdicom")
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from DCEPerfusionLib.apps import cli  # noqa: E402
from DCEPerfusionLib.files import dicomsr  # noqa: E402

PM, SEG = "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.66.4"
SEGMENTS = {"L1": 1, "L2": 2, "marrow": 3}


def record(patient_id="P-17", name="Müller^Anna", segments=SEGMENTS, maps=("ktrans", "ve", "vp", "kep")):
    """A DICOM record as 'fit --dicom-out' stores it in summary.json["dicom"] (new UIDs)."""
    ps = {"PatientName": name, "PatientID": patient_id, "PatientBirthDate": "19580214", "PatientSex": "F",
          "StudyInstanceUID": generate_uid(), "StudyDate": "20260301", "StudyTime": "101500", "StudyID": "4",
          "AccessionNumber": "ACC9", "ReferringPhysicianName": ""}
    pm_series = generate_uid()
    objects = [{"kind": "parametric map", "map": m, "file": f"{m}.dcm", "sop_class_uid": PM,
                "sop_instance_uid": generate_uid(), "series_instance_uid": pm_series} for m in maps]
    objects.append({"kind": "segmentation", "map": None, "file": "segmentation.dcm", "sop_class_uid": SEG,
                    "sop_instance_uid": generate_uid(), "series_instance_uid": generate_uid()})
    return {"folder": "/exams/x", "patient_study": ps, "frame_of_reference_uid": generate_uid(),
            "source_series_uid": generate_uid(), "objects": objects, "segments": dict(segments), "notes": []}


def rows():
    """Response rows as results.response_rows gives them: L1 complete (odd numbers), L2 with gaps (None and
    NaN), L3 missing from both SEGs (indeterminate)."""
    full = {"lesion": "L1", "statistic": "median", "vp_baseline": 0.0512345678901, "vp_followup": 0.0187654321,
            "ktrans_baseline": 0.1234567891, "ktrans_followup": 0.0850123457, "ve_baseline": 0.3123456789,
            "ve_followup": 0.3279012345, "kep_baseline": 0.3952571234, "kep_followup": 0.2592634567,
            "delta_vp_pct": -63.37234567891, "delta_ktrans_pct": -31.123456789, "delta_ve_pct": 4.987654321,
            "delta_kep_pct": -12.5e-3, "call": "success", "reason": "ΔVp -63.4 % (95 % CI -70.2 to -51.9 %) <= -20 %",
            "longest_diameter_baseline_mm": 21.21320343559, "longest_diameter_followup_mm": 18.384776310850,
            "delta_longest_diameter_pct": -13.33333333333, "size_call": "no progression",
            "delta_vp_ci_lower_pct": -70.1987654321, "delta_vp_ci_upper_pct": -51.9123456789,
            "reference_segment": "marrow", "vp_reference_baseline": 0.0123456789, "vp_reference_followup": 0.0134567891,
            "vp_ratio_baseline": 4.150000000001, "vp_ratio_followup": 1.394495412844, "delta_vp_ratio_pct": -66.397,
            "warnings": "flip angle 14 vs 12 degrees | frame interval 3.1 vs 4.2 s"}
    gaps = {**full, "lesion": "L2", "vp_baseline": 0.003, "vp_followup": 0.0045, "delta_vp_pct": None,
            "ktrans_followup": None, "ve_baseline": float("nan"),
            "delta_ktrans_pct": float("nan"), "delta_ve_pct": None, "delta_kep_pct": None, "call": "indeterminate",
            "reason": "baseline vp 0.0030 is below 0.005", "longest_diameter_baseline_mm": None,
            "longest_diameter_followup_mm": None, "delta_longest_diameter_pct": None, "size_call": None,
            "delta_vp_ci_lower_pct": None, "delta_vp_ci_upper_pct": None, "vp_ratio_baseline": 0.243,
            "vp_ratio_followup": None, "delta_vp_ratio_pct": None, "warnings": ""}
    missing = {k: None for k in full}
    missing.update(lesion="L3", statistic="median", call="indeterminate", warnings="",
                   reason="the baseline exam has no statistics for lesion 'L3'", reference_segment="marrow",
                   vp_reference_baseline=full["vp_reference_baseline"],
                   vp_reference_followup=full["vp_reference_followup"])
    return [full, gaps, missing]


def _value(item):
    if item.ValueType == "NUM":
        return float(item.MeasuredValueSequence[0].NumericValue), item.MeasuredValueSequence[0] \
            .MeasurementUnitsCodeSequence[0].CodeValue
    if item.ValueType == "CODE":
        c = item.ConceptCodeSequence[0]
        return c.CodeValue, c.CodingSchemeDesignator
    if item.ValueType == "TEXT":
        return item.TextValue
    if item.ValueType == "IMAGE":
        ref = item.ReferencedSOPSequence[0]
        return ref.ReferencedSOPInstanceUID, int(ref.get("ReferencedSegmentNumber", 0))
    return getattr(item, "UID", None)


def _concept(item):
    c = item.ConceptNameCodeSequence[0]
    return c.CodeValue, c.CodingSchemeDesignator


def groups(ds):
    """{(tracking identifier, time point): {"items": [(concept, value)], "sources": {concept: [uids]},
    "derivations": {concept: code}}} of every measurement group of the SR, walked with pydicom alone."""
    out = {}
    container = next(i for i in ds.ContentSequence if _concept(i) == ("126010", "DCM"))     # Imaging Measurements
    for group in container.ContentSequence:
        items, sources, derivations, context = [], {}, {}, {}
        for item in group.ContentSequence:
            concept = _concept(item)
            if item.RelationshipType == "HAS OBS CONTEXT":
                context[item.ConceptNameCodeSequence[0].CodeMeaning] = _value(item)
                continue
            items.append((concept, _value(item)))
            for sub in item.get("ContentSequence", []):
                if _concept(sub) == ("121112", "DCM"):                 # Source of Measurement
                    sources.setdefault(concept, []).append(_value(sub)[0])
                if _concept(sub) == ("121401", "DCM"):                 # Derivation
                    derivations[concept] = _value(sub)
        key = (context["Tracking Identifier"], context["Time Point"])
        assert key not in out
        out[key] = {"items": items, "sources": sources, "derivations": derivations, "context": context}
    return out


def numbers(group, code):
    return [v for c, v in group["items"] if c == code]


#: Where each number of a row is: (time point, concept, unit).
WHERE = {"vp_baseline": ("baseline", ("126331", "DCM"), "1"), "vp_followup": ("follow-up", ("126331", "DCM"), "1"),
         "ktrans_baseline": ("baseline", ("126312", "DCM"), "/min"),
         "ktrans_followup": ("follow-up", ("126312", "DCM"), "/min"),
         "ve_baseline": ("baseline", ("126314", "DCM"), "1"), "ve_followup": ("follow-up", ("126314", "DCM"), "1"),
         "kep_baseline": ("baseline", ("126313", "DCM"), "/min"),
         "kep_followup": ("follow-up", ("126313", "DCM"), "/min"),
         "delta_vp_pct": ("follow-up", ("DVP", dicomsr.SCHEME), "%"),
         "delta_vp_ci_lower_pct": ("follow-up", ("DVPCILO", dicomsr.SCHEME), "%"),
         "delta_vp_ci_upper_pct": ("follow-up", ("DVPCIHI", dicomsr.SCHEME), "%"),
         "delta_ktrans_pct": ("follow-up", ("DKTRANS", dicomsr.SCHEME), "%"),
         "delta_ve_pct": ("follow-up", ("DVE", dicomsr.SCHEME), "%"),
         "delta_kep_pct": ("follow-up", ("DKEP", dicomsr.SCHEME), "%"),
         "longest_diameter_baseline_mm": ("baseline", ("103339001", "SCT"), "mm"),
         "longest_diameter_followup_mm": ("follow-up", ("103339001", "SCT"), "mm"),
         "delta_longest_diameter_pct": ("follow-up", ("DLONGAX", dicomsr.SCHEME), "%"),
         "vp_ratio_baseline": ("baseline", ("VPRATIO", dicomsr.SCHEME), "1"),
         "vp_ratio_followup": ("follow-up", ("VPRATIO", dicomsr.SCHEME), "1"),
         "delta_vp_ratio_pct": ("follow-up", ("DVPRATIO", dicomsr.SCHEME), "%")}
NUMERIC = set(WHERE) | {"vp_reference_baseline", "vp_reference_followup"}
RESPONSE, REASON, WARNING = ("112020", "DCM"), ("REASON", dicomsr.SCHEME), ("WARNING", dicomsr.SCHEME)


@pytest.fixture
def written(tmp_path):
    base, follow = record(), record()
    path = dicomsr.write_response_sr(rows(), base, follow, str(tmp_path / "sr.dcm"))
    return path, base, follow


def test_every_number_of_the_rows_is_at_its_lesion_and_time_point(written):
    path, base, follow = written
    got = groups(pydicom.dcmread(path))
    assert set(got) == {(les, tp) for les in ("L1", "L2", "L3", "reference region marrow")
                        for tp in ("baseline", "follow-up")}
    for row in rows():
        for key, (tp, code, unit) in WHERE.items():
            found = numbers(got[(row["lesion"], tp)], code)
            if row[key] is None or not math.isfinite(row[key]):
                assert found == [], (row["lesion"], key)                 # left out, not NaN
            else:
                assert len(found) == 1 and found[0][1] == unit, (row["lesion"], key, found)
                assert found[0][0] == pytest.approx(row[key], rel=1e-9, abs=0), (row["lesion"], key)
    ref = rows()[0]
    for tp, key in (("baseline", "vp_reference_baseline"), ("follow-up", "vp_reference_followup")):
        (value, unit), = numbers(got[("reference region marrow", tp)], ("126331", "DCM"))
        assert unit == "1" and value == pytest.approx(ref[key], rel=1e-9, abs=0)
    # the statistic as the Derivation of vp (Median, SCT 373099004); none on a diameter
    g = got[("L1", "follow-up")]
    assert g["derivations"][("126331", "DCM")] == ("373099004", "SCT")
    assert ("103339001", "SCT") not in g["derivations"]
    # no NaN anywhere, and every number of the SR is one of the rows'
    values = [v[0] for grp in got.values() for c, v in grp["items"] if isinstance(v, tuple) and isinstance(v[0], float)]
    assert all(math.isfinite(v) for v in values)
    given = [r[k] for r in rows() for k in NUMERIC if r[k] is not None and math.isfinite(r[k])]
    assert all(any(math.isclose(v, x, rel_tol=1e-9) for x in given) for v in values)


def test_the_call_its_reason_the_size_call_and_the_warnings(written):
    path, _, _ = written
    got = groups(pydicom.dcmread(path))
    want = {"L1": (("SUCCESS", dicomsr.SCHEME), ("NOPROG", dicomsr.SCHEME)),
            "L2": (("82334004", "SCT"), None), "L3": (("82334004", "SCT"), None)}
    for row in rows():
        follow, base = got[(row["lesion"], "follow-up")], got[(row["lesion"], "baseline")]
        assert [v for c, v in follow["items"] if c == RESPONSE] == [want[row["lesion"]][0]]
        size = [v for c, v in follow["items"] if c == ("SIZERESP", dicomsr.SCHEME)]
        assert size == ([want[row["lesion"]][1]] if want[row["lesion"]][1] else [])
        assert [v for c, v in follow["items"] if c == REASON] == [row["reason"]]        # ΔVp in UTF-8
        assert [v for c, v in follow["items"] if c == WARNING] == [w for w in row["warnings"].split(" | ") if w]
        assert not [v for c, v in base["items"] if c in (RESPONSE, REASON)]              # the call is a follow-up's


def test_study_patient_references_and_evidence(written):
    path, base, follow = written
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"                           # Comprehensive 3D SR
    assert ds.StudyInstanceUID == follow["patient_study"]["StudyInstanceUID"]
    assert ds.SeriesInstanceUID not in {o["series_instance_uid"] for r in (base, follow) for o in r["objects"]}
    for key in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber"):
        assert str(ds[key].value) == follow["patient_study"][key], key
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    uid = {name: {o.get("map") or o["kind"]: o["sop_instance_uid"] for o in r["objects"]}
           for name, r in (("baseline", base), ("follow-up", follow))}
    got = groups(ds)
    for lesion, number in (("L1", 1), ("L2", 2), ("reference region marrow", 3)):
        for tp, rec in (("baseline", base), ("follow-up", follow)):
            g = got[(lesion, tp)]
            assert [v for c, v in g["items"] if c == ("121191", "DCM")] == [(uid[tp]["segmentation"], number)]
            assert [v for c, v in g["items"] if c == ("121232", "DCM")] == [rec["source_series_uid"]]
            assert g["sources"][("126331", "DCM")] == [uid[tp]["vp"]]
    assert got[("L1", "follow-up")]["sources"][("DVP", dicomsr.SCHEME)] == [uid["baseline"]["vp"],
                                                                           uid["follow-up"]["vp"]]
    for tp in ("baseline", "follow-up"):      # L3 is in neither SEG: a group without an ROI reference
        assert not [v for c, v in got[("L3", tp)]["items"] if c == ("121191", "DCM")]
    # the SR's evidence: both SEGs and both vp maps, each under its own study and series
    listed = {}
    for seq in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(seq, []):
            for series in study.ReferencedSeriesSequence:
                for inst in series.ReferencedSOPSequence:
                    listed[inst.ReferencedSOPInstanceUID] = (study.StudyInstanceUID, series.SeriesInstanceUID)
    for rec in (base, follow):
        for obj in rec["objects"]:
            if obj["kind"] == "segmentation" or obj["map"] == "vp":
                assert listed.pop(obj["sop_instance_uid"]) == (rec["patient_study"]["StudyInstanceUID"],
                                                               obj["series_instance_uid"])
    assert listed == {}


def test_the_private_codes_are_declared_and_apart_from_the_maps(written):
    from DCEPerfusionLib.files import dicomcodes
    maps = {v for v, scheme, _ in dicomcodes.QUANTITIES.values() if scheme == dicomcodes.SCHEME}
    assert not maps & set(dicomsr.PRIVATE_CODES) and all(len(m) <= 64 for m in dicomsr.PRIVATE_CODES.values())
    ds = pydicom.dcmread(written[0])
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == [dicomcodes.SCHEME]
    used = set()

    def walk(items):
        for item in items:
            for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                for c in item.get(seq, []):
                    used.add((c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning))
            walk(item.get("ContentSequence", []))
    walk(ds.ContentSequence)
    private = {(v, m) for v, scheme, m in used if scheme == dicomcodes.SCHEME}
    assert private and private <= set(dicomsr.PRIVATE_CODES.items())
    assert {scheme for _, scheme, _ in used} <= {"DCM", "SCT", "UMLS", "RFC5646", dicomcodes.SCHEME}   # (language)


def test_highdicom_reads_the_lesion_groups_back(written):
    import highdicom as hd
    path, base, follow = written
    sr = hd.sr.srread(path)
    seg = {name: next(o for o in r["objects"] if o["kind"] == "segmentation")["sop_instance_uid"]
           for name, r in (("baseline", base), ("follow-up", follow))}
    l1 = [g for g in sr.content.get_volumetric_roi_measurement_groups() if g.tracking_identifier == "L1"]
    assert len(l1) == 2 and l1[0].tracking_uid == l1[1].tracking_uid          # one lesion tracked over two exams
    assert {g.referenced_segment.referenced_sop_instance_uid for g in l1} == set(seg.values())
    assert all(g.referenced_segment.referenced_segment_numbers == [1] for g in l1)
    vp = {g.referenced_segment.referenced_sop_instance_uid: g.get_measurements(name=hd.sr.CodedConcept(
        "126331", "DCM", "vp"))[0].value for g in l1}
    assert vp == {seg["baseline"]: pytest.approx(rows()[0]["vp_baseline"], rel=1e-9),
                  seg["follow-up"]: pytest.approx(rows()[0]["vp_followup"], rel=1e-9)}
    assert len(sr.content.get_image_measurement_groups()) == 2                # L3 at both exams, no ROI


@pytest.mark.parametrize("case", ["baseline missing", "follow-up missing", "patients differ", "no segments",
                                  "no rows"])
def test_refusals_write_nothing(tmp_path, case):
    base, follow, given = record(), record(), rows()
    if case == "baseline missing":
        base = None
    elif case == "follow-up missing":
        follow = None
    elif case == "patients differ":
        follow = record(patient_id="P-18")
    elif case == "no segments":
        del base["segments"]
    else:
        given = []
    expected = {"baseline missing": "baseline exam: was fitted without --dicom-out - fit it again with --dicom-out",
                "follow-up missing": "follow-up exam: was fitted without --dicom-out",
                "patients differ": "different patients (PatientID 'P-17' and 'P-18')",
                "no segments": "baseline exam: its DICOM record (summary.json 'dicom') has no valid 'segments'",
                "no rows": "no lesion responses"}[case]
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")) as err:
        dicomsr.write_response_sr(given, base, follow, str(tmp_path / "sr.dcm"))
    assert "\n" not in str(err.value)
    assert os.listdir(tmp_path) == []


def test_an_existing_file_is_kept_without_overwrite(tmp_path):
    path = str(tmp_path / "sr.dcm")
    with open(path, "wb") as f:
        f.write(b"not mine")
    with pytest.raises(FileExistsError, match="sr.dcm exists"):
        dicomsr.write_response_sr(rows(), record(), record(), path)
    with open(path, "rb") as f:
        assert f.read() == b"not mine" and os.listdir(tmp_path) == ["sr.dcm"]
    dicomsr.write_response_sr(rows(), record(), record(), path, overwrite=True)
    assert pydicom.dcmread(path).Modality == "SR" and os.listdir(tmp_path) == ["sr.dcm"]


# ============================================================================================ the command
@pytest.fixture(scope="module")
def fitted_pair(tmp_path_factory):
    """A baseline and a follow-up (lesion vp halved) of a small phantom fitted and written by files.exam,
    with a DICOM record put into each summary.json as 'fit --dicom-out' stores it: (folders, records)."""
    from DCEPerfusionLib import phantom
    from DCEPerfusionLib.core import pipeline
    from DCEPerfusionLib.core.options import AnalysisOptions
    from DCEPerfusionLib.core.series import Series4D
    from DCEPerfusionLib.files import exam, results
    out = tmp_path_factory.mktemp("pair")
    folders, records = [], []
    for name, tissues in (("baseline", None), ("follow-up", {"lesion": (0.25, 0.35, 0.05, 1.6)})):
        ph = phantom.make_phantom(shape=(2, 20, 24), snr=60.0, seed=4, tissues=tissues)
        acq = ph.acquisition
        series = Series4D(ph.signal.astype(np.float32), ph.t_s, np.diag([1.5, 1.5, 4.0, 1.0]), acq["tr_s"],
                          acq["flip_angle_deg"], "frame labels (test)", name)
        options = AnalysisOptions(n_baseline=acq["n_baseline"], method="lls", aif_source="parker",
                                  r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"], uncertainty=False)
        result = pipeline.analyse(series, options, lesions={"lesion": ph.labels == phantom.LABELS["lesion"]})
        folder = str(out / name)
        exam.write_exam(result, folder)
        summary = os.path.join(folder, exam.SUMMARY)
        data = results.read_json(summary, "exam summary")
        data["dicom"] = record(segments={"lesion": 1})
        results.write_json(summary, data, overwrite=True)
        folders.append(folder)
        records.append(data["dicom"])
    return folders, records


def test_assess_dicom_out_writes_the_sr_of_responses_json(fitted_pair, tmp_path, capsys):
    (base, follow), (b_rec, f_rec) = fitted_pair
    code = cli.main(["assess", base, follow, "--out", str(tmp_path / "a"), "--dicom-out", str(tmp_path / "dicom")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    path = str(tmp_path / "dicom" / cli.DICOM_SR)
    assert f"DICOM SR (TID 1500 measurement report): {path}" in printed.out
    with open(tmp_path / "a" / "responses.json", encoding="utf-8") as f:
        (row,) = json.load(f)
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == f_rec["patient_study"]["StudyInstanceUID"]
    got = groups(ds)
    assert row["vp_followup"] < row["vp_baseline"] and row["delta_vp_pct"] is not None
    for key, (tp, code_, unit) in WHERE.items():
        found = numbers(got[("lesion", tp)], code_)
        assert found == ([] if row[key] is None else [(pytest.approx(row[key], rel=1e-9, abs=0), unit)]), key
    assert [v for c, v in got[("lesion", "follow-up")]["items"] if c == REASON] == [row["reason"]]
    assert [v for c, v in got[("lesion", "follow-up")]["items"] if c == ("121191", "DCM")] == \
        [(next(o for o in f_rec["objects"] if o["kind"] == "segmentation")["sop_instance_uid"], 1)]
    again = cli.main(["assess", base, follow, "--out", str(tmp_path / "b"), "--dicom-out", str(tmp_path / "dicom")])
    err = capsys.readouterr().err
    assert again == 2 and err.count("\n") == 1 and "response_sr.dcm exists" in err
    assert not os.path.exists(tmp_path / "b")                    # refused before the tables were written


def test_assess_dicom_out_refuses_an_exam_fitted_without_it(fitted_pair, tmp_path, capsys):
    from DCEPerfusionLib.files import exam, results
    (base, follow), _ = fitted_pair
    plain = str(tmp_path / "plain")
    os.mkdir(plain)
    for name in os.listdir(follow):
        with open(os.path.join(follow, name), "rb") as src, open(os.path.join(plain, name), "wb") as dst:
            dst.write(src.read())
    summary = os.path.join(plain, exam.SUMMARY)
    data = results.read_json(summary, "exam summary")
    del data["dicom"]
    results.write_json(summary, data, overwrite=True)
    code = cli.main(["assess", base, plain, "--out", str(tmp_path / "a"), "--dicom-out", str(tmp_path / "dicom")])
    err = capsys.readouterr().err
    assert code == 2 and err == ("dceperfusion: error: follow-up exam: was fitted without --dicom-out - fit it again "
                                 "with --dicom-out DICOM_DIR\n")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "dicom")


def test_fit_dicom_out_then_assess_dicom_out(tmp_path, capsys):
    """End to end from scanner-like DICOM: both exams fitted with 'fit --dicom-out', then 'assess
    --dicom-out': the SR is in the follow-up's study and references the SEGs and vp maps fit wrote."""
    import dicomdata as dd
    from DCEPerfusionLib import phantom
    from DCEPerfusionLib.files import images
    matrix = np.diag([1.5, 1.5, 4.0, 1.0])
    follow_study = dd.ROOT + ".77"
    folders, dicom_dirs = {}, {}
    for name, tissues, series_uid in (("baseline", None, dd.ROOT + ".20"),
                                      ("follow-up", {"lesion": (0.25, 0.35, 0.05, 1.6)}, dd.ROOT + ".30")):
        ph = phantom.make_phantom(shape=(2, 20, 24), snr=60.0, seed=4, tissues=tissues)
        acq = ph.acquisition
        study = dd.STUDY_UID if name == "baseline" else follow_study
        source = dd.classic_series(str(tmp_path / name / "dicom"), ph.signal, matrix, ph.t_s, series_uid=series_uid,
                                   tr_ms=acq["tr_s"] * 1000, flip_deg=acq["flip_angle_deg"],
                                   edit=lambda ds, k, t, study=study: setattr(ds, "StudyInstanceUID", study))
        seg = images.write_segmentation(str(tmp_path / name / "lesions.seg.nrrd"),
                                        {"lesion": ph.labels == phantom.LABELS["lesion"]}, matrix)
        folders[name], dicom_dirs[name] = str(tmp_path / name / "fit"), str(tmp_path / name / "fit-dicom")
        code = cli.main(["fit", source, "--segmentation", seg, "--out", folders[name], "--dicom-out", dicom_dirs[name],
                         "--baseline-frames", str(acq["n_baseline"]), "--aif", "parker", "--r1",
                         str(acq["r1_per_mM_s"]), "--method", "lls", "--no-uncertainty"])
        assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    sr_dir = str(tmp_path / "sr")
    code = cli.main(["assess", folders["baseline"], folders["follow-up"], "--out", str(tmp_path / "a"),
                     "--dicom-out", sr_dir])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert os.path.join(sr_dir, cli.DICOM_SR) in printed.out and os.listdir(sr_dir) == [cli.DICOM_SR]
    ds = pydicom.dcmread(os.path.join(sr_dir, cli.DICOM_SR))
    assert ds.StudyInstanceUID == follow_study and ds.PatientID == "DCE001"
    with open(tmp_path / "a" / "responses.json", encoding="utf-8") as f:
        (row,) = json.load(f)
    assert row["call"] == "success"
    assert row["delta_vp_ci_lower_pct"] < row["delta_vp_pct"] < row["delta_vp_ci_upper_pct"]   # ΔVp with its CI
    got = groups(ds)
    for tp, name in (("baseline", "baseline"), ("follow-up", "follow-up")):
        seg = pydicom.dcmread(os.path.join(dicom_dirs[name], "segmentation.dcm"))
        vp = pydicom.dcmread(os.path.join(dicom_dirs[name], "vp.dcm"))
        number = next(int(s.SegmentNumber) for s in seg.SegmentSequence if s.SegmentLabel == "lesion")
        g = got[("lesion", tp)]
        assert [v for c, v in g["items"] if c == ("121191", "DCM")] == [(seg.SOPInstanceUID, number)]
        assert g["sources"][("126331", "DCM")] == [vp.SOPInstanceUID]
        assert seg.StudyInstanceUID == vp.StudyInstanceUID == (dd.STUDY_UID if tp == "baseline" else follow_study)
    for key, (tp, code_, unit) in WHERE.items():
        found = numbers(got[("lesion", tp)], code_)
        assert found == ([] if row[key] is None else [(pytest.approx(row[key], rel=1e-9, abs=0), unit)]), key
    into_fit = cli.main(["assess", folders["baseline"], folders["follow-up"], "--out", str(tmp_path / "b"),
                         "--dicom-out", dicom_dirs["follow-up"]])
    err = capsys.readouterr().err
    assert into_fit == 2 and "holds the DICOM objects of a fit - give the SR a folder of its own" in err
    assert not os.path.exists(tmp_path / "b") and cli.DICOM_SR not in os.listdir(dicom_dirs["follow-up"])
