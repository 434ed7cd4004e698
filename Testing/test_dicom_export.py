"""The DICOM results of an exam read from DICOM (files.dicomout, ``fit --dicom-out``, ``batch --dicom-out``),
read back the way a PACS or another tool reads them - with pydicom alone, frame by frame by position, not
with our writer's code: every map's values equal the NRRD map's (NaN where not fitted), the geometry
equals the DCE grid's, the UIDs link to the source study, frame of reference and series, the units and
quantities are coded; the SEG reloads as the same masks. Sources as scanners and converters write them:
classic files in shuffled order, an enhanced multi-frame file, headers without the optional patient and
study attributes or without a Frame of Reference UID; refusals of what cannot be exported."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest

import dicomdata as dd
from DCEPerfusionLib import phantom
from DCEPerfusionLib.apps import demo
from DCEPerfusionLib.core.options import AnalysisOptions
from DCEPerfusionLib.core.registry import MAPS
from DCEPerfusionLib.files import dicomcodes, dicomout, dicomref, exam, images

pytest.importorskip("highdicom")

PY = [sys.executable, "-m", "DCEPerfusionLib"]
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
FIT_ARGS = ["--baseline-frames", "6", "--aif", "segment", "--aif-segment", "aorta", "--blood-t10", "1.6",
            "--r1", "4.5", "--fit-delay"]
#: The UCUM unit the issue asks for, per map.
UCUM = {"ktrans": "/min", "kep": "/min", "ps": "/min", "ve": "1", "vp": "1", "fp": "mL/(100.mL)/min",
        "delay_s": "s", "r2": "1", "status": "{code}"}


def _run(*args):
    return subprocess.run([*PY, *map(str, args)], capture_output=True, text=True, encoding="utf-8", timeout=600)


def _exam(root, shape=(4, 40, 28), seed=3, matrix=None):
    """(phantom, NRRD inputs, the matrix): a small spine exam whose DCE series is then written as DICOM."""
    ph = phantom.make_spine_phantom(shape=shape, seed=seed, snr=40.0)
    matrix = phantom.spine_matrix((3.0, 3.0, 4.0)) if matrix is None else matrix
    return ph, demo.write_exam_inputs(str(root), ph, matrix), matrix


def _options(ph):
    return AnalysisOptions(n_baseline=6, aif_source="segment", blood_t10_s=1.6, r1_per_mM_s=4.5)


def _files(folder, **kw):
    return exam.ExamFiles(dce=str(folder), segmentation=kw.pop("segmentation"), aif_segment="aorta", **kw)


# ------------------------------------------------------------------------------- reading back (pydicom only)
def _frame_geometry(ds):
    shared = ds.SharedFunctionalGroupsSequence[0]
    orient = np.array([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    spacing = [float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing]        # row, column (mm)
    positions = np.array([[float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient]
                          for f in ds.PerFrameFunctionalGroupsSequence])
    return orient, spacing, positions


def _volume(ds, ijk_to_ras):
    """The frames of a multi-frame object placed on the DCE grid by their positions: (K, J, I[, ...])
    array, frames per slice k, and the grid the object's own geometry gives (IJK->RAS)."""
    orient, spacing, positions = _frame_geometry(ds)
    ras_to_ijk = np.linalg.inv(LPS @ ijk_to_ras)
    ks = [(ras_to_ijk @ np.r_[p, 1.0])[2] for p in positions]
    order = np.argsort(ks)
    normal = np.cross(orient[:3], orient[3:])
    step = positions[order[1]] - positions[order[0]] if len(order) > 1 else normal
    matrix = np.eye(4)
    matrix[:3, 0] = orient[:3] * spacing[1]
    matrix[:3, 1] = orient[3:] * spacing[0]
    matrix[:3, 2] = step
    matrix[:3, 3] = positions[order[0]]
    return np.asarray(ks), LPS @ matrix


def _pm_values(path, ijk_to_ras, shape_kji):
    ds = pydicom.dcmread(path)
    ks, matrix = _volume(ds, ijk_to_ras)
    frames = ds.pixel_array.reshape(-1, *shape_kji[1:])
    out = np.full(shape_kji, -1e30, dtype=np.float32)
    for f, k in enumerate(ks):
        assert abs(k - round(k)) < 1e-4, f"{path}: frame {f} is between slices ({k})"
        out[int(round(k))] = frames[f]
    return ds, out, matrix


def _seg_masks(path, ijk_to_ras, shape_kji):
    """{segment label: mask (K, J, I)} of a binary SEG, each frame placed by its position and segment."""
    ds = pydicom.dcmread(path)
    ks, _ = _volume(ds, ijk_to_ras)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    frames = ds.pixel_array.reshape(-1, *shape_kji[1:])
    masks = {label: np.zeros(shape_kji, dtype=bool) for label in labels.values()}
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        masks[labels[number]][int(round(ks[f]))] |= frames[f].astype(bool)
    return ds, masks


def _tree_hash(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cli_exam(tmp_path_factory):
    """A classic DICOM exam fitted by ``dceperfusion fit --dicom-out`` (AIF from the aorta, delay fitted,
    standard errors): (phantom, inputs, DICOM folder, result folder, DICOM out folder, run, source hash)."""
    root = tmp_path_factory.mktemp("dicom_exam")
    ph, files, matrix = _exam(root / "nrrd")
    folder = dd.classic_series(str(root / "dce"), np.round(ph.signal), matrix, ph.t_s, "siemens")
    before = _tree_hash(folder)
    run = _run("fit", folder, "--segmentation", files.segmentation, "--out", root / "out", "--dicom-out",
               root / "dicom", *FIT_ARGS)
    return ph, files, folder, root / "out", root / "dicom", run, before


def _nrrd(out, name):
    return images.read_volume(os.path.join(out, f"{name}.nrrd"))


# ------------------------------------------------------------------------------------------------ tests
def test_fit_writes_a_parametric_map_per_map_and_a_seg(cli_exam):
    ph, files, folder, out, dicom_dir, run, before = cli_exam
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    summary = json.load(open(os.path.join(out, "summary.json")))
    maps = list(summary["maps"])
    assert {"ktrans", "ve", "vp", "kep", "ktrans_se", "vp_se", "r2", "status", "delay_s"} <= set(maps)
    assert sorted(os.listdir(dicom_dir)) == sorted([f"{m}.dcm" for m in maps] + ["segmentation.dcm",
                                                                                dicomout.RECORD])
    assert printed["dicom_files"] == [f"{m}.dcm" for m in maps] + ["segmentation.dcm"]
    record = summary["dicom"]
    assert record == json.load(open(os.path.join(dicom_dir, dicomout.RECORD)))
    assert record["source_series_uid"] == dd.SERIES_UID
    assert record["frame_of_reference_uid"] == dd.FRAME_OF_REFERENCE_UID
    assert record["patient_study"]["StudyInstanceUID"] == dd.STUDY_UID
    assert record["patient_study"]["PatientID"] == "DCE001"
    assert record["notes"] == []
    assert _tree_hash(folder) == before, "the source DICOM files were changed"


def test_the_maps_read_back_equal_the_nrrd_maps_in_the_source_study_and_frame(cli_exam):
    ph, files, folder, out, dicom_dir, run, _ = cli_exam
    record = json.load(open(os.path.join(dicom_dir, dicomout.RECORD)))
    source = sorted((pydicom.dcmread(os.path.join(folder, n), stop_before_pixels=True) for n in os.listdir(folder)),
                    key=lambda d: int(d.InstanceNumber))
    first_frame = {str(d.SOPInstanceUID) for d in source if int(d.AcquisitionNumber) == 1}
    series_uids = set()
    for entry in (o for o in record["objects"] if o["kind"] == "parametric map"):
        name = entry["map"]
        nrrd, matrix = _nrrd(out, name)
        ds, values, pm_matrix = _pm_values(os.path.join(dicom_dir, entry["file"]), matrix, nrrd.shape)
        assert ds.SOPClassUID == PARAMETRIC_MAP and str(ds.SOPInstanceUID) == entry["sop_instance_uid"]
        assert ds.StudyInstanceUID == dd.STUDY_UID and ds.FrameOfReferenceUID == dd.FRAME_OF_REFERENCE_UID
        assert ds.PatientID == "DCE001" and str(ds.PatientName) == "DCE^Phantom"
        assert ds.SeriesInstanceUID != dd.SERIES_UID
        series_uids.add(str(ds.SeriesInstanceUID))
        # values: float32, NaN where the NRRD map is NaN (not fitted), else equal within 1e-6 relative
        assert ds.pixel_array.dtype == np.float32 and "FloatPixelData" in ds
        fitted = np.isfinite(nrrd)
        assert np.array_equal(np.isnan(values), ~fitted), name
        np.testing.assert_allclose(values[fitted], nrrd[fitted].astype(np.float32), rtol=1e-6, atol=0, err_msg=name)
        # geometry: the DCE grid (position, orientation, spacing)
        np.testing.assert_allclose(pm_matrix, matrix, atol=1e-4, err_msg=name)
        # the source: its series, and its first frame's images
        refs = ds.ReferencedSeriesSequence[0]
        assert refs.SeriesInstanceUID == dd.SERIES_UID
        assert {str(i.ReferencedSOPInstanceUID) for i in refs.ReferencedInstanceSequence} == first_frame
        # the real-world value mapping: unit (UCUM), quantity, label
        mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        unit = mapping.MeasurementUnitsCodeSequence[0]
        base = name[:-3] if name.endswith("_se") else name
        assert (unit.CodingSchemeDesignator, unit.CodeValue) == ("UCUM", UCUM[base]), name
        assert mapping.LUTLabel == name
        assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)
        quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
        assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == dicomcodes.quantity(name)[:2]
        if fitted.any():                                  # the range mapped holds the values (float data: FD)
            assert mapping.DoubleFloatRealWorldValueFirstValueMapped == np.nanmin(values)
            assert mapping.DoubleFloatRealWorldValueLastValueMapped == np.nanmax(values)
    assert len(series_uids) == len([o for o in record["objects"] if o["kind"] == "parametric map"])
    ktrans = pydicom.dcmread(os.path.join(dicom_dir, "ktrans.dcm"), stop_before_pixels=True)
    code = ktrans.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].QuantityDefinitionSequence[0]
    assert (code.ConceptCodeSequence[0].CodeValue, code.ConceptCodeSequence[0].CodingSchemeDesignator) == \
        ("126312", "DCM")                                   # CID 4107 Ktrans


def test_the_seg_reloads_as_the_same_masks(cli_exam):
    ph, files, folder, out, dicom_dir, run, _ = cli_exam
    record = json.load(open(os.path.join(dicom_dir, dicomout.RECORD)))
    given, seg_matrix = images.read_segmentation(files.segmentation)
    ref = _nrrd(out, "ktrans")
    ds, masks = _seg_masks(os.path.join(dicom_dir, "segmentation.dcm"), ref[1], ref[0].shape)
    assert ds.SOPClassUID == SEGMENTATION_STORAGE
    assert ds.StudyInstanceUID == dd.STUDY_UID and ds.FrameOfReferenceUID == dd.FRAME_OF_REFERENCE_UID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == dd.SERIES_UID
    lesions = [n for n in given if n != "aorta"]
    assert list(record["segments"]) == [*lesions, "AIF"]
    assert sorted(masks) == sorted(record["segments"])
    for name in lesions:
        assert np.array_equal(masks[name], given[name]), name
    assert np.array_equal(masks["AIF"], given["aorta"])
    types = {str(s.SegmentLabel): (s.SegmentedPropertyTypeCodeSequence[0].CodeValue, str(s.SegmentAlgorithmType))
             for s in ds.SegmentSequence}
    assert types["AIF"] == ("51114001", "MANUAL") and types[lesions[0]] == ("52988006", "MANUAL")


def test_a_sparse_enhanced_source_exports_with_a_derived_frame_of_reference(tmp_path):
    """An enhanced multi-frame file (Philips, pixel measures and orientation per frame) whose converter
    dropped the Frame of Reference UID and the optional patient/study attributes: exported, the frame of reference derived (the same on a second
    export, with a note), the file untouched; the automatic AIF's voxels in the SEG as AUTOMATIC."""
    ph, files, matrix = _exam(tmp_path / "nrrd", shape=(3, 32, 24), seed=5)
    path = str(tmp_path / "dce" / "enhanced.dcm")
    os.makedirs(os.path.dirname(path))

    def strip(ds):
        for kw in ("FrameOfReferenceUID", "PatientBirthDate", "PatientSex", "StudyTime", "StudyID",
                   "ReferringPhysicianName", "AccessionNumber"):
            if kw in ds:
                delattr(ds, kw)

    dd.enhanced_file(path, np.round(ph.signal), matrix, ph.t_s, shared_geometry=False)    # geometry per frame
    ds = pydicom.dcmread(path)
    strip(ds)
    ds.save_as(path)
    before = _tree_hash(os.path.dirname(path))
    result = exam.fit_exam(exam.ExamFiles(dce=os.path.dirname(path), segmentation=files.segmentation,
                                          lesions=["L2 metastasis"]),
                           AnalysisOptions(n_baseline=6, aif_source="automatic", r1_per_mM_s=4.5))
    assert result.series.dicom.headers[0].SOPInstanceUID == ds.SOPInstanceUID
    one = dicomout.write_dicom_exam(result, str(tmp_path / "a"))
    two = dicomout.write_dicom_exam(result, str(tmp_path / "b"))
    assert one["frame_of_reference_uid"] == two["frame_of_reference_uid"] == \
        dicomref.derived_frame_of_reference(ds.SeriesInstanceUID)
    assert any("no Frame of Reference UID" in n for n in one["notes"])
    assert one["patient_study"]["PatientBirthDate"] == ""
    assert _tree_hash(os.path.dirname(path)) == before
    pm, values, pm_matrix = _pm_values(str(tmp_path / "a" / "vp.dcm"), result.series.ijk_to_ras,
                                       result.series.shape_kji)
    assert pm.FrameOfReferenceUID == one["frame_of_reference_uid"] and pm.StudyInstanceUID == ds.StudyInstanceUID
    assert pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    vp = result.maps["vp"]
    assert np.array_equal(np.isnan(values), np.isnan(vp))
    np.testing.assert_allclose(values[np.isfinite(vp)], vp[np.isfinite(vp)].astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(pm_matrix, result.series.ijk_to_ras, atol=1e-4)
    seg, masks = _seg_masks(str(tmp_path / "a" / "segmentation.dcm"), result.series.ijk_to_ras,
                            result.series.shape_kji)
    assert np.array_equal(masks["AIF (detected)"], result.aif_mask)
    kinds = {str(s.SegmentLabel): str(s.SegmentAlgorithmType) for s in seg.SegmentSequence}
    assert kinds == {"L2 metastasis": "MANUAL", "AIF (detected)": "AUTOMATIC"}


def test_an_oblique_series_keeps_its_geometry(tmp_path):
    angle = np.deg2rad(20.0)
    rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rot @ np.diag([1.1, 1.3, 4.0])
    matrix[:3, 3] = [-20.0, 15.0, 7.5]
    ph, files, matrix = _exam(tmp_path / "nrrd", shape=(3, 28, 20), seed=6, matrix=matrix)
    folder = dd.classic_series(str(tmp_path / "dce"), np.round(ph.signal), matrix, ph.t_s, "ge")
    result = exam.fit_exam(_files(folder, segmentation=files.segmentation), _options(ph))
    dicomout.write_dicom_exam(result, str(tmp_path / "out"))
    _, values, pm_matrix = _pm_values(str(tmp_path / "out" / "ktrans.dcm"), result.series.ijk_to_ras,
                                      result.series.shape_kji)
    np.testing.assert_allclose(pm_matrix, matrix, atol=1e-4)
    k = result.maps["ktrans"]
    assert np.array_equal(np.isnan(values), np.isnan(k))


def _refused(capsys, *args):
    """``dceperfusion`` in this process (its refusals come before any fit): (exit code, stderr)."""
    from DCEPerfusionLib.apps import cli
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_refusals_are_one_line_and_write_nothing(cli_exam, tmp_path, capsys):
    """Before the fit: an input that is not DICOM, a --dicom-out that is, holds or lies inside --out or an
    input folder, one holding other files or an earlier export (without --overwrite). (In this process: the
    fixture ran the command as a user does.)"""
    ph, files, folder, out, dicom_dir, run, _ = cli_exam
    for place in (tmp_path / "o5" / "dicom", tmp_path, os.path.join(folder, "derived"), tmp_path / "o5"):
        code, err = _refused(capsys, "fit", folder, "--segmentation", files.segmentation, "--out", tmp_path / "o5",
                             "--dicom-out", place, *FIT_ARGS)
        assert code == 2 and err.startswith("dceperfusion: error: --dicom-out"), err
        assert "folder of their own" in err and len(err.strip().splitlines()) == 1
        assert not os.path.exists(tmp_path / "o5") and not os.path.exists(os.path.join(folder, "derived"))
    # a DCE series not read from DICOM (the 4D NRRD)
    code, err = _refused(capsys, "fit", files.dce, "--segmentation", files.segmentation, "--out", tmp_path / "o1",
                         "--dicom-out", tmp_path / "d1", *FIT_ARGS)
    assert code == 2 and "was not read from DICOM" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "d1")
    # a folder with other files is never replaced, a previous export only with --overwrite
    other = tmp_path / "d3"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = _refused(capsys, "fit", folder, "--segmentation", files.segmentation, "--out", tmp_path / "o3",
                         "--dicom-out", other, *FIT_ARGS)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--dicom-out" in err
    assert os.listdir(other) == ["notes.txt"] and not os.path.exists(tmp_path / "o3")
    code, err = _refused(capsys, "fit", folder, "--segmentation", files.segmentation, "--out", tmp_path / "o4",
                         "--dicom-out", dicom_dir, *FIT_ARGS)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "o4")
    assert "--dicom-out" in err and "--overwrite" in err


@pytest.mark.parametrize("uid", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_a_series_without_a_study_or_series_uid_is_refused_before_the_fit(tmp_path, uid):
    ph, files, matrix = _exam(tmp_path / "nrrd", shape=(3, 24, 16), seed=7)

    def no_uid(ds, k, t):
        delattr(ds, uid)

    folder = dd.classic_series(str(tmp_path / "dce"), np.round(ph.signal), matrix, ph.t_s, "siemens", edit=no_uid)
    what = uid.replace("InstanceUID", " Instance UID")
    with pytest.raises(ValueError, match=f"no {what}") as err:
        dicomout.check_folder(folder)                        # what fit --dicom-out asks before the fit
    assert "\n" not in str(err.value)
    result = exam.fit_exam(_files(folder, segmentation=files.segmentation), _options(ph))
    with pytest.raises(ValueError, match=f"no {what}"):
        dicomout.write_dicom_exam(result, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_source_without_slice_thickness_exports_and_a_lesion_named_aif_keeps_its_segment(tmp_path):
    """Converters drop Slice Thickness (highdicom reads it): the slice spacing stands in. A lesion named "AIF"
    keeps that name; the artery's segment becomes "AIF (2)", and the record points each to its own."""
    ph = phantom.make_spine_phantom(shape=(3, 24, 16), seed=13, snr=40.0)
    matrix = phantom.spine_matrix((3.0, 3.0, 4.0))
    segs = {"AIF": ph.labels == phantom.SPINE_LABELS["L2 metastasis"], "aorta": ph.labels == phantom.SPINE_LABELS["aorta"]}
    seg = images.write_segmentation(str(tmp_path / "s.seg.nrrd"), segs, matrix)

    def no_thickness(ds, k, t):
        del ds.SliceThickness

    folder = dd.classic_series(str(tmp_path / "dce"), np.round(ph.signal), matrix, ph.t_s, "siemens",
                               edit=no_thickness)
    dicomout.check_folder(folder)
    result = exam.fit_exam(_files(folder, segmentation=seg, lesions=["AIF"]), _options(ph))
    record = dicomout.write_dicom_exam(result, str(tmp_path / "out"))
    assert record["segments"] == {"AIF": 1, "AIF (2)": 2}
    ds, masks = _seg_masks(str(tmp_path / "out" / "segmentation.dcm"), result.series.ijk_to_ras,
                           result.series.shape_kji)
    kinds = {str(s.SegmentLabel): s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in ds.SegmentSequence}
    assert kinds == {"AIF": "52988006", "AIF (2)": "51114001"}                   # the lesion, the artery
    assert np.array_equal(masks["AIF"], segs["AIF"]) and np.array_equal(masks["AIF (2)"], segs["aorta"])
    pm = pydicom.dcmread(str(tmp_path / "out" / "vp.dcm"), stop_before_pixels=True)
    assert float(pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == pytest.approx(4.0)


def test_the_objects_hold_what_a_validator_asks(cli_exam):
    """What dicom3tools' dciodvfy reported on the first exports: a window narrower than 1 needs the VOI LUT
    Function LINEAR_EXACT (PS3.3 C.11.2.1.2), a Parametric Map needs Frame Anatomy (laterality), and a
    decimal string is at most 16 characters (highdicom 0.22 wrote 17 for an oblique spacing)."""
    ph, files, folder, out, dicom_dir, run, _ = cli_exam
    for name in ("vp.dcm", "ktrans_se.dcm", "r2.dcm"):
        ds = pydicom.dcmread(os.path.join(dicom_dir, name), stop_before_pixels=True)
        shared = ds.SharedFunctionalGroupsSequence[0]
        voi = shared.FrameVOILUTSequence[0]
        assert voi.VOILUTFunction == "LINEAR_EXACT", name
        assert float(voi.WindowWidth) < 1 or name == "r2.dcm", name                  # r2: 0 to 1
        anatomy = shared.FrameAnatomySequence[0]
        assert anatomy.FrameLaterality == "U" and anatomy.AnatomicRegionSequence[0].CodeValue == "421060004"
    se = pydicom.dcmread(os.path.join(dicom_dir, "vp_se.dcm"), stop_before_pixels=True)     # a private quantity
    assert [i.CodingSchemeDesignator for i in se.CodingSchemeIdentificationSequence] == [dicomcodes.SCHEME]
    assert len(dicomout._ds(4.999998596110915)) <= 16 and float(dicomout._ds(4.999998596110915)) == \
        pytest.approx(4.999998596110915, rel=1e-9)


def test_without_highdicom_the_message_names_the_package(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_highdicom(name, *args, **kwargs):
        if name == "highdicom" or name.startswith("highdicom."):
            raise ImportError("No module named 'highdicom'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_highdicom)
    with pytest.raises(ValueError, match=r"pip install highdicom"):
        dicomout.check_highdicom()


def test_the_codes_cover_every_map_and_unit():
    for name, info in MAPS.items():
        value, scheme, meaning = dicomcodes.quantity(name)
        assert value and scheme in ("DCM", dicomcodes.SCHEME) and 0 < len(meaning) <= 64, name
        assert info.unit in dicomcodes.UNITS, name
    assert dicomcodes.quantity("vp") == ("126331", "DCM", "vp")
    assert dicomcodes.UNITS["1/min"][:2] == ("/min", "UCUM")


def test_patient_and_study_values_as_other_tools_write_them(tmp_path):
    """Values the derived objects cannot carry as they are - a sex spelled out, ISO dates and times, a date
    that is text, a one-word (anonymised) name, an over-long Study ID: coded, rewritten, left empty or
    copied, each with a note, without a warning per object; the files untouched."""
    ph, files, matrix = _exam(tmp_path / "nrrd", shape=(3, 24, 16), seed=8)
    odd = {"PatientSex": "Male", "StudyDate": "2024-03-14", "StudyTime": "10:15:00.5", "PatientBirthDate": "unknown",
           "StudyID": "STUDY-ID-FROM-A-RIS-2024", "PatientName": "ANONYMOUS"}

    def edit(ds, k, t):
        for keyword, value in odd.items():
            setattr(ds, keyword, value)

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the test's writer sets the over-long value
        folder = dd.classic_series(str(tmp_path / "dce"), np.round(ph.signal), matrix, ph.t_s, "philips", edit=edit)
    before = _tree_hash(folder)
    result = exam.fit_exam(_files(folder, segmentation=files.segmentation), _options(ph))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = dicomout.write_dicom_exam(result, str(tmp_path / "out"))
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    ps = record["patient_study"]
    assert (ps["PatientSex"], ps["StudyDate"], ps["StudyTime"], ps["PatientBirthDate"]) == \
        ("M", "20240314", "101500.5", "")
    assert ps["StudyID"] == odd["StudyID"] and ps["PatientName"] == "ANONYMOUS"
    notes = " | ".join(record["notes"])
    for keyword in ("PatientSex", "StudyDate", "StudyTime", "PatientBirthDate", "StudyID"):
        assert keyword in notes, keyword
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = pydicom.dcmread(str(tmp_path / "out" / "vp.dcm"), stop_before_pixels=True)
        assert (pm.PatientSex, pm.StudyDate, pm.StudyID) == ("M", "20240314", odd["StudyID"])
    assert _tree_hash(folder) == before


def test_batch_exports_each_exam_refits_one_whose_objects_are_gone_and_fits_a_nrrd_one_without(tmp_path):
    from DCEPerfusionLib.apps import batch
    ph, files, matrix = _exam(tmp_path / "nrrd", shape=(3, 24, 16), seed=9)
    folder = dd.classic_series(str(tmp_path / "dce"), np.round(ph.signal), matrix, ph.t_s, "siemens")
    options = _options(ph)

    def job(dce, exam_id):
        return batch.ExamJob(exam_id=exam_id, patient="P1", timepoint="baseline", dce=str(dce),
                             segmentation=files.segmentation, t1="", lesions=["L2 metastasis"],
                             out_dir=str(tmp_path / "results" / exam_id))

    dicom_dir = str(tmp_path / "dicom")
    first = batch.run_exam(job(folder, "P1_baseline"), options, aif_segment="aorta", dicom_dir=dicom_dir)
    assert first == {"exam_id": "P1_baseline", "status": "ok"}
    record = exam.dicom_record(str(tmp_path / "results" / "P1_baseline"), os.path.join(dicom_dir, "P1_baseline"))
    assert record is not None and os.path.isfile(os.path.join(dicom_dir, "P1_baseline", "vp.dcm"))
    again = batch.run_exam(job(folder, "P1_baseline"), options, aif_segment="aorta", dicom_dir=dicom_dir)
    assert again["status"] == "skipped"
    os.remove(os.path.join(dicom_dir, "P1_baseline", "vp.dcm"))
    refit = batch.run_exam(job(folder, "P1_baseline"), options, aif_segment="aorta", dicom_dir=dicom_dir)
    assert refit["status"] == "ok" and os.path.isfile(os.path.join(dicom_dir, "P1_baseline", "vp.dcm"))
    nrrd = batch.run_exam(job(files.dce, "P2_baseline"), options, aif_segment="aorta", dicom_dir=dicom_dir)
    assert nrrd["status"] == "ok" and "was not read from DICOM" in nrrd["dicom"]      # fitted, without DICOM
    assert os.path.isfile(tmp_path / "results" / "P2_baseline" / "vp.nrrd")
    assert not os.path.exists(os.path.join(dicom_dir, "P2_baseline"))
    again = batch.run_exam(job(files.dce, "P2_baseline"), options, aif_segment="aorta", dicom_dir=dicom_dir)
    assert again["status"] == "skipped" and "was not read from DICOM" in again["dicom"]


def test_batch_dicom_out_on_dask_writes_each_exams_objects_and_each_patients_sr(tmp_path):
    pytest.importorskip("dask.distributed", reason="batch runs on Dask (Slicer does not bundle it)")
    import csv
    rows = []
    for tp, seed, vp in (("baseline", 11, None), ("follow-up", 12, {"L2 metastasis": 0.05})):
        ph = phantom.make_spine_phantom(lesion_vp=vp, shape=(3, 28, 20), seed=seed, snr=40.0)
        matrix = phantom.spine_matrix((3.0, 3.0, 4.0))
        files = demo.write_exam_inputs(str(tmp_path / tp / "nrrd"), ph, matrix)
        folder = dd.classic_series(str(tmp_path / tp / "dce"), np.round(ph.signal), matrix, ph.t_s, "siemens",
                                   series_uid=f"{dd.ROOT}.{seed}")
        rows.append({"patient": "P1", "lesion": "L2 metastasis", "timepoint": tp, "dce": folder,
                     "segmentation": files.segmentation, "outcome": "success"})
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = _run("batch", manifest, "--out", tmp_path / "run", "--workers", "1", "--dicom-out", tmp_path / "dicom",
             *FIT_ARGS[:-1])
    assert r.returncode == 0, r.stderr
    summary = json.load(open(tmp_path / "run" / "batch_summary.json"))
    sr_path = str(tmp_path / "dicom" / "P1_response_sr.dcm")
    assert summary["dicom_sr"] == {"P1": sr_path}
    for exam_id in ("P1_baseline", "P1_follow-up"):
        assert os.path.isfile(tmp_path / "dicom" / exam_id / "vp.dcm")
    sr = pydicom.dcmread(sr_path)
    follow_vp = json.load(open(tmp_path / "dicom" / "P1_follow-up" / dicomout.RECORD))
    seg_uid = next(o["sop_instance_uid"] for o in follow_vp["objects"] if o["kind"] == "segmentation")
    text = str(sr)
    assert seg_uid in text and "L2 metastasis" in text and "P1/" not in text    # the lesion under its segment name
    response = json.load(open(tmp_path / "run" / "responses.json"))[0]

    def values(items, code):
        for item in items:
            if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == code and \
                    "MeasuredValueSequence" in item:
                yield float(item.MeasuredValueSequence[0].NumericValue)
            yield from values(item.get("ContentSequence", []), code)

    assert response["delta_vp_pct"] is not None
    assert list(values(sr.ContentSequence, "DVP")) == [pytest.approx(response["delta_vp_pct"], rel=1e-9)]


def test_non_ascii_names_and_an_empty_segment(tmp_path):
    """A Latin-1 source (ISO_IR 100) with an umlaut in the patient's name, a segment named 'Läsion 1' and
    one empty on the grid: written in UTF-8, read back with the same names; the empty segment is there,
    empty."""
    ph = phantom.make_spine_phantom(shape=(3, 24, 16), seed=10, snr=40.0)
    matrix = phantom.spine_matrix((3.0, 3.0, 4.0))
    segs = {"Läsion 1": ph.labels == phantom.SPINE_LABELS["L2 metastasis"], "empty": np.zeros(ph.labels.shape, bool),
            "aorta": ph.labels == phantom.SPINE_LABELS["aorta"]}
    seg = images.write_segmentation(str(tmp_path / "s.seg.nrrd"), segs, matrix)

    def latin1(ds, k, t):
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"

    folder = dd.classic_series(str(tmp_path / "dce"), np.round(ph.signal), matrix, ph.t_s, "siemens", edit=latin1)
    result = exam.fit_exam(_files(folder, segmentation=seg), _options(ph))
    dicomout.write_dicom_exam(result, str(tmp_path / "out"))
    for name in ("vp.dcm", "segmentation.dcm"):
        ds = pydicom.dcmread(str(tmp_path / "out" / name))
        assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Müller^Jürgen"
    seg_ds, masks = _seg_masks(str(tmp_path / "out" / "segmentation.dcm"), result.series.ijk_to_ras,
                               result.series.shape_kji)
    assert [str(s.SegmentLabel) for s in seg_ds.SegmentSequence] == ["Läsion 1", "empty", "AIF"]
    assert np.array_equal(masks["Läsion 1"], segs["Läsion 1"]) and not masks["empty"].any()
