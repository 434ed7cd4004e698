"""The DICOM reader (files/dicom.py): classic series as the vendors write them (Siemens Acquisition Time,
GE Trigger Time, Philips Temporal Position Identifier; files in shuffled order; past midnight), frames
lacking the timing tag (the 1,321-frame single-slice series whose first frame has no Trigger Time),
enhanced multi-frame MR (one file, or one file per time point) with the geometry of the classic
reader, field strength, compressed files, files that are not DICOM, damaged and colour files refused
in one line - and a seeded fuzz test over mutated files (DCEPERFUSION_FUZZ_CASES cases)."""

import io
import logging
import os
import random
import re
import time
import traceback

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import DataElement

import dicomdata as dd
from DCEPerfusionLib.files import images, series

from conftest import GRID_SHAPE as SHAPE, GRID_T_S as T_S, grid_matrix as _matrix, grid_signal as _signal


def _oblique():
    """An oblique IJK->RAS: rotated about two axes, anisotropic voxels."""
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = rz @ rx @ np.diag([0.7, 0.95, 2.5])
    m[:3, 3] = [10.0, -20.0, 35.0]
    return m


def _exact(message):
    """A pytest.raises pattern for exactly ``message``."""
    return "^" + re.escape(message) + "$"


# ------------------------------------------------------------------- files written by SimpleITK/GDCM
def write_dicom_series(folder, signal, matrix, t_s, vendor="siemens", series_uid="1.2.826.0.1.3680043.2.1125.1",
                       tr_ms=4.2, flip_deg=14.0, start="101500.000000", compressor=None):
    """A dynamic series as one 2D DICOM file per slice and frame written by SimpleITK (GDCM), in
    shuffled order. siemens: Acquisition Time only; ge: Trigger Time (ms); philips: Temporal Position
    Identifier + Trigger Time. ``compressor`` (e.g. "JPEG") writes compressed files."""
    os.makedirs(folder, exist_ok=True)
    m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix                            # LPS
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = m[:3, :3] / spacing
    orient = "\\".join(f"{x:.6f}" for x in np.r_[direction[:, 0], direction[:, 1]])
    h0 = 3600 * int(start[:2]) + 60 * int(start[2:4]) + float(start[4:])
    jobs = [(k, t) for k in range(signal.shape[0]) for t in range(signal.shape[-1])]
    random.Random(1).shuffle(jobs)
    for n, (k, t) in enumerate(jobs):
        img = sitk.GetImageFromArray(signal[k, :, :, t].astype(np.int16))
        img.SetSpacing([float(spacing[0]), float(spacing[1])])
        pos = m[:3, 3] + m[:3, 2] * k
        tags = {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.9", "0020|000e": series_uid,
                "0008|0018": f"{series_uid}.{n + 1}", "0020|0013": str(n + 1), "0020|0032":
                "\\".join(f"{x:.4f}" for x in pos), "0020|0037": orient, "0018|0050": f"{spacing[2]:.4f}",
                "0018|0080": f"{tr_ms}", "0018|1314": f"{flip_deg}", "0008|0008": "ORIGINAL\\PRIMARY"}
        acq = h0 + t_s[t] + 0.01 * k                                         # 2D: slices a little apart in time
        hh, rem = divmod(acq, 3600)
        mm, ss = divmod(rem, 60)
        if vendor == "siemens":
            tags["0008|0032"] = f"{int(hh):02d}{int(mm):02d}{ss:09.6f}"
        elif vendor == "ge":
            tags["0018|1060"] = f"{1000 * t_s[t]:.1f}"
        elif vendor == "philips":
            tags["0020|0100"] = str(t + 1)
            tags["0018|1060"] = f"{1000 * t_s[t]:.1f}"
        for key, value in tags.items():
            img.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        if compressor:
            writer.SetUseCompression(True)
            writer.SetCompressor(compressor)
        writer.SetFileName(os.path.join(folder, f"IM{n:04d}.dcm"))
        writer.Execute(img)
    return folder


@pytest.mark.parametrize("vendor,tag", [("siemens", "Acquisition Time"), ("ge", "Trigger Time"),
                                        ("philips", "Temporal Position Identifier")])
def test_dicom_series_in_shuffled_order(tmp_path, vendor, tag):
    signal = _signal()
    folder = write_dicom_series(str(tmp_path / vendor), signal, _matrix(), T_S, vendor)
    s = series.read_dce(folder)
    assert tag in s.time_source
    np.testing.assert_allclose(s.t_s, T_S, atol=0.02)
    np.testing.assert_array_equal(s.signal, signal)
    np.testing.assert_allclose(s.ijk_to_ras, _matrix(), atol=1e-4)
    assert s.tr_s == pytest.approx(0.0042) and s.flip_angle_deg == pytest.approx(14.0)
    assert s.field_strength_t is None                                      # GDCM writes no field strength


def test_dicom_without_timing_needs_the_frame_interval(tmp_path):
    folder = write_dicom_series(str(tmp_path / "none"), _signal(), _matrix(), T_S, vendor="none")
    with pytest.raises(ValueError, match="no timing tag varies.*--frame-interval"):
        series.read_dce(folder)
    s = series.read_dce(folder, frame_interval_s=6.0)
    np.testing.assert_allclose(s.t_s, 6.0 * np.arange(T_S.size))


def test_bad_dicom_folders(tmp_path):
    two = str(tmp_path / "two")
    write_dicom_series(two, _signal(), _matrix(), T_S, "ge", series_uid="1.2.3.4.1")
    write_dicom_series(two + "_b", _signal(1), _matrix(), T_S, "ge", series_uid="1.2.3.4.2")
    for f in os.listdir(two + "_b"):
        os.replace(os.path.join(two + "_b", f), os.path.join(two, "b" + f))
    with pytest.raises(ValueError, match="has 2 series"):
        series.read_dce(two)
    broken = write_dicom_series(str(tmp_path / "broken"), _signal(), _matrix(), T_S, "ge")
    victim = sorted(os.listdir(broken))[3]
    with open(os.path.join(broken, victim), "r+b") as f:
        f.truncate(400)
    with pytest.raises(ValueError, match="cannot be read|truncated|incomplete|different numbers of frames"):
        series.read_dce(broken)
    with pytest.raises(ValueError, match="does not exist"):
        series.read_dce(str(tmp_path / "nowhere"))


def test_jpeg_lossless_files_are_decoded_by_gdcm(tmp_path):
    """pydicom has no JPEG Lossless decoder here: SimpleITK/GDCM decodes the classic files."""
    signal = _signal(5, low=-200)
    folder = write_dicom_series(str(tmp_path / "jpeg"), signal, _matrix(), T_S, "ge", compressor="JPEG")
    assert pydicom.dcmread(os.path.join(folder, "IM0000.dcm")).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    s = series.read_dce(folder)
    np.testing.assert_array_equal(s.signal, signal)


# --------------------------------------------------------------- classic files written like scanners
@pytest.mark.parametrize("vendor,source", [
    ("siemens", "DICOM Acquisition Time (0008,0032)"),
    ("ge", "DICOM Trigger Time (0018,1060)"),
    ("philips", "DICOM Trigger Time (0018,1060) (order by Temporal Position Identifier (0020,0100))")])
def test_vendor_conventions(tmp_path, vendor, source):
    signal = _signal(2, low=-300)                                          # signed data: negatives allowed
    folder = dd.classic_series(str(tmp_path / vendor), signal, _oblique(), T_S, vendor, field_t=1.5)
    s = series.read_dce(folder)
    assert s.time_source == source
    np.testing.assert_allclose(s.t_s, T_S, atol=0.02)
    np.testing.assert_array_equal(s.signal, signal)
    assert s.signal.dtype == np.float32 and s.signal.shape == SHAPE + (T_S.size,)
    np.testing.assert_allclose(s.ijk_to_ras, _oblique(), atol=1e-4)
    assert s.tr_s == pytest.approx(0.0042) and s.flip_angle_deg == pytest.approx(14.0)
    assert s.field_strength_t == pytest.approx(1.5)
    assert s.source == folder


def test_files_without_preamble(tmp_path):
    """Old-style files: the bare data set (implicit VR), no 'DICM' preamble or file meta."""
    signal = _signal(25, low=-40)
    folder = dd.classic_series(str(tmp_path / "raw"), signal, _matrix(), T_S, "siemens", raw=True)
    with open(os.path.join(folder, os.listdir(folder)[0]), "rb") as f:
        assert f.read(132)[128:] != b"DICM"
    s = series.read_dce(folder)
    np.testing.assert_array_equal(s.signal, signal)
    np.testing.assert_allclose(s.t_s, T_S, atol=0.02)


def _sitk_matrix(files):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return images.matrix_of(reader.Execute())


def test_geometry_is_simpleitks(tmp_path):
    """IJK->RAS equals SimpleITK's series reader on the same files (oblique, and with a slice order that is
    the reverse of the position order in the files)."""
    m = _oblique()
    m[:3, 2] *= -1                                                         # slices run against the normal
    folder = dd.classic_series(str(tmp_path / "c"), _signal(3), m, T_S, "ge")
    s = series.read_dce(folder)
    frame0 = [os.path.join(folder, f) for f in os.listdir(folder)
              if float(pydicom.dcmread(os.path.join(folder, f)).TriggerTime) == 0.0]
    normal = np.cross(*np.reshape(np.array(pydicom.dcmread(frame0[0]).ImageOrientationPatient, float), (2, 3)))
    frame0.sort(key=lambda f: float(np.dot(np.array(pydicom.dcmread(f).ImagePositionPatient, float), normal)))
    np.testing.assert_allclose(s.ijk_to_ras, _sitk_matrix(frame0), atol=1e-6)
    # the slices come out along the normal: the reversed stack, same voxels in space
    np.testing.assert_array_equal(s.signal, _signal(3)[::-1])


def test_midnight_rollover(tmp_path):
    signal = _signal(4)
    folder = dd.classic_series(str(tmp_path / "night"), signal, _matrix(), T_S, "siemens",
                               start_s=23 * 3600 + 59 * 60 + 51.0)               # 23:59:51 + 18 s
    s = series.read_dce(folder)
    np.testing.assert_allclose(s.t_s, T_S, atol=0.02)
    np.testing.assert_array_equal(s.signal, signal)


# ------------------------------------------------------------------------------ missing frame times
def _drop(tag_keyword, which):
    """An ``edit`` for :func:`dd.classic_series` removing ``tag_keyword`` from the files where
    ``which(k, t)``."""
    def edit(ds, k, t):
        if which(k, t):
            delattr(ds, tag_keyword)
    return edit


def test_first_of_1321_frames_without_trigger_time(tmp_path, caplog):
    """The real case: a single-slice series of 1,321 frames whose first frame has no Trigger Time; the
    others have 500 ... 660,000 ms."""
    n = 1321
    t_s = 0.5 * np.arange(n)
    signal = _signal(6, shape=(1, 8, 8), n=n)
    folder = dd.classic_series(str(tmp_path / "long"), signal, _matrix(), t_s, "ge",
                               edit=_drop("TriggerTime", lambda k, t: t == 0))
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="DCEPerfusionLib.files.dicom"):
        s = series.read_dce(folder)
    elapsed = time.perf_counter() - start
    assert s.time_source == ("DICOM Trigger Time (0018,1060); frame 0 had none, extrapolated from frames 1-2 "
                             "(placed by Instance Number)")
    np.testing.assert_allclose(s.t_s, t_s, atol=1e-9)
    np.testing.assert_array_equal(s.signal, signal)
    assert s.signal.shape == (1, 8, 8, n)
    assert s.ijk_to_ras[2, 2] == pytest.approx(3.0)                      # one slice: Spacing Between Slices
    assert any("without Trigger Time (0018,1060): frame 0 had none" in r.getMessage() for r in caplog.records)
    assert elapsed < 60, f"{n} files took {elapsed:.1f} s"


def test_frames_without_the_tag_are_filled_from_their_neighbours(tmp_path):
    signal = _signal(7)
    t_s = np.array([0.0, 4.5, 9.0, 13.5, 18.0, 22.5, 27.0, 31.5])
    signal = _signal(7, n=t_s.size)
    # frame 3: no slice has it; frame 7 (the last): slice 2 lacks it
    folder = dd.classic_series(str(tmp_path / "gaps"), signal, _matrix(), t_s, "ge",
                               edit=_drop("TriggerTime", lambda k, t: t == 3 or (t == 7 and k == 2)))
    s = series.read_dce(folder)
    assert s.time_source == ("DICOM Trigger Time (0018,1060); frame 3 had none, interpolated from frames 2 and 4; "
                             "frame 7 (1 of 4 slices) had none, extrapolated from frames 5-6 (placed by Instance "
                             "Number)")
    np.testing.assert_allclose(s.t_s, t_s, atol=1e-9)
    np.testing.assert_array_equal(s.signal, signal)


def test_a_complete_timing_tag_is_preferred_to_one_with_gaps(tmp_path):
    """Philips-like: Trigger Time missing from the first frame, Acquisition Time complete and varying."""
    signal = _signal(8)
    folder = dd.classic_series(str(tmp_path / "p"), signal, _matrix(), T_S, "philips",
                               edit=_drop("TriggerTime", lambda k, t: t == 0))
    s = series.read_dce(folder)
    assert s.time_source == ("DICOM Acquisition Time (0008,0032) (order by Temporal Position Identifier "
                             "(0020,0100))")
    np.testing.assert_allclose(s.t_s, T_S, atol=1e-6)
    np.testing.assert_array_equal(s.signal, signal)


def test_frame_times_that_cannot_be_filled_are_refused(tmp_path):
    signal = _signal(9, shape=(1, 4, 4), n=8)
    t_s = 2.0 * np.arange(8)
    many = dd.classic_series(str(tmp_path / "many"), signal, _matrix(), t_s, "ge",
                             edit=_drop("TriggerTime", lambda k, t: t in (0, 3, 5)))
    names = sorted(os.listdir(many))
    lacking = [f for f in names if "TriggerTime" not in pydicom.dcmread(os.path.join(many, f))]
    with pytest.raises(ValueError, match=_exact(
            f"DICOM folder {many!r}: 3 of 8 images have no Trigger Time (0018,1060) (e.g. "
            f"{', '.join(os.path.join(many, f) for f in lacking)}) - too many to fill in; give the frame interval in "
            "seconds (--frame-interval)")):
        series.read_dce(many)
    s = series.read_dce(many, frame_interval_s=2.0)                     # ordered by Instance Number
    np.testing.assert_array_equal(s.signal, signal)
    assert s.time_source == "frame interval 2 s (given)"

    def unordered(ds, k, t):                                          # no Instance/Acquisition Number to place it
        del ds.InstanceNumber
        if t == 0:
            del ds.TriggerTime
    lost = dd.classic_series(str(tmp_path / "lost"), signal, _matrix(), t_s, "ge", edit=unordered)
    victim = next(f for f in sorted(os.listdir(lost)) if "TriggerTime" not in pydicom.dcmread(os.path.join(lost, f)))
    with pytest.raises(ValueError, match=_exact(
            f"DICOM folder {lost!r}: 1 image ({os.path.join(lost, victim)}) without Trigger Time (0018,1060), and "
            "their place in time cannot be told (no Instance Number or Acquisition Number that orders the frames as "
            "the others' times do) - remove those frames from the folder")):
        series.read_dce(lost)


def test_a_given_interval_that_contradicts_the_filled_times_is_refused(tmp_path):
    folder = dd.classic_series(str(tmp_path / "g"), _signal(10), _matrix(), T_S, "ge",
                               edit=_drop("TriggerTime", lambda k, t: t == 4))
    with pytest.raises(ValueError, match="contradicts the frame times in the file"):
        series.read_dce(folder, frame_interval_s=2.0)
    s = series.read_dce(folder, frame_interval_s=4.5)
    assert s.time_source.endswith("extrapolated from frames 2-3 (placed by Instance Number); the given interval "
                                  "4.5 s agrees")


# ------------------------------------------------------------------------------ enhanced multi-frame
@pytest.mark.parametrize("kwargs,source", [
    (dict(), "DICOM Frame Acquisition DateTime (0018,9074) (order by Temporal Position Index (0020,9128))"),
    (dict(shared_geometry=False, frame_order="shuffled", time="reference", vendor="siemens"),
     "DICOM Frame Reference DateTime (0018,9151) (order by Temporal Position Index (0020,9128))"),
    (dict(time="cardiac", frame_order="slice", rescale=(2.0, -10.0)),
     "DICOM Trigger Time (0018,1060) (order by Temporal Position Index (0020,9128))"),
    (dict(time="mr-timing", temporal_index=False, rescale=(0.5, 3.0), rescale_per_frame=True),
     "DICOM Trigger Time (0018,1060)")])
def test_enhanced_multiframe_file(tmp_path, kwargs, source):
    slope, intercept = kwargs.get("rescale", (1.0, 0.0))
    stored = _signal(11, low=-100, high=400)
    signal = stored * np.float32(slope) + np.float32(intercept)
    dd.enhanced_file(str(tmp_path / "en" / "IM_0001.dcm"), signal, _oblique(), T_S, field_t=3.0, **kwargs)
    s = series.read_dce(str(tmp_path / "en"))
    classic = series.read_dce(dd.classic_series(str(tmp_path / "classic"), signal, _oblique(), T_S, "ge"))
    assert s.time_source == source
    np.testing.assert_allclose(s.t_s, T_S, atol=1e-6)
    np.testing.assert_array_equal(s.signal, signal)
    np.testing.assert_allclose(s.ijk_to_ras, classic.ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(s.ijk_to_ras, _oblique(), atol=1e-4)
    assert (s.tr_s, s.flip_angle_deg, s.field_strength_t) == (pytest.approx(0.0042), pytest.approx(14.0), 3.0)


def test_enhanced_single_slice_geometry_is_the_classic_one(tmp_path):
    signal = _signal(12, shape=(1, 6, 8))
    dd.enhanced_file(str(tmp_path / "en" / "one.dcm"), signal, _oblique(), T_S)
    s = series.read_dce(str(tmp_path / "en"))
    classic = series.read_dce(dd.classic_series(str(tmp_path / "classic"), signal, _oblique(), T_S, "ge"))
    np.testing.assert_allclose(s.ijk_to_ras, classic.ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(s.ijk_to_ras, _oblique(), atol=1e-4)
    np.testing.assert_array_equal(s.signal, signal)


@pytest.mark.parametrize("time_field,source", [("acquisition", "DICOM Frame Acquisition DateTime (0018,9074)"),
                                               (None, "DICOM Acquisition DateTime (0008,002A)")])
def test_folder_of_enhanced_files_one_per_time_point(tmp_path, time_field, source):
    signal = _signal(13)
    folder = dd.enhanced_folder(str(tmp_path / "ef"), signal, _matrix(), T_S, time=time_field, field_t=None)
    s = series.read_dce(folder)
    assert s.time_source == source
    np.testing.assert_allclose(s.t_s, T_S, atol=1e-6)
    np.testing.assert_array_equal(s.signal, signal)
    np.testing.assert_allclose(s.ijk_to_ras, _matrix(), atol=1e-4)
    assert s.field_strength_t is None


def test_enhanced_frame_without_its_time_is_filled(tmp_path):
    def edit(item, k, t):
        if t == 2:
            del item.FrameContentSequence[0].FrameAcquisitionDateTime
    signal = _signal(14, shape=(2, 4, 5))
    folder = str(tmp_path / "en")
    dd.enhanced_file(os.path.join(folder, "f.dcm"), signal, _matrix(), T_S, edit_frame=edit)
    s = series.read_dce(folder)
    assert s.time_source == ("DICOM Frame Acquisition DateTime (0018,9074) (order by Temporal Position Index "
                             "(0020,9128)); frame 2 had none, interpolated from frames 1 and 3")
    np.testing.assert_allclose(s.t_s, T_S, atol=1e-6)


def test_compressed_enhanced_file_without_a_decoder_is_refused(tmp_path):
    from pydicom.encaps import encapsulate
    path = dd.enhanced_file(str(tmp_path / "jp" / "en.dcm"), _signal(15, shape=(1, 4, 4)), _matrix(), T_S)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3\x00\x0b\x08\x00\x04\x00\x04\x01\x01\x11\x00\xff\xd9"] * 5)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"
    dd.save(ds, path, "1.2.840.10008.1.2.4.70")
    with pytest.raises(ValueError, match=_exact(
            f"{path}: pixel data compressed as JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 "
            "[Selection Value 1]), for which no decoder is installed - convert it to uncompressed DICOM first (e.g. "
            "gdcmconv --raw IN OUT, or dcmdjpeg IN OUT); or install one (pip install pylibjpeg pylibjpeg-libjpeg "
            "pylibjpeg-openjpeg)")):
        series.read_dce(str(tmp_path / "jp"))


def test_rle_compressed_classic_files(tmp_path):
    from pydicom.uid import RLELossless
    signal = _signal(16, low=-20)
    folder = dd.classic_series(str(tmp_path / "rle"), signal, _matrix(), T_S, "siemens")
    for f in os.listdir(folder):
        ds = pydicom.dcmread(os.path.join(folder, f))
        ds.compress(RLELossless)
        ds.save_as(os.path.join(folder, f))
    assert pydicom.dcmread(os.path.join(folder, f)).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(series.read_dce(folder).signal, signal)


# ------------------------------------------------------------------------- field, TR, odd and bad files
@pytest.mark.parametrize("value,tesla", [(None, None), (1.5, 1.5), (15000, 1.5), (-3.0, None), (0.0, None),
                                         (3.0, 3.0)])
def test_magnetic_field_strength(tmp_path, value, tesla):
    folder = dd.classic_series(str(tmp_path / "f"), _signal(17, shape=(1, 3, 3)), _matrix(), T_S, "ge",
                               field_t=value)
    s = series.read_dce(folder)
    assert s.field_strength_t == (pytest.approx(tesla) if tesla else None)


def test_other_files_in_the_folder_are_ignored(tmp_path, caplog):
    signal = _signal(18)
    folder = dd.classic_series(str(tmp_path / "exp"), signal, _matrix(), T_S, "ge")
    dd.non_dicom_files(folder)
    os.makedirs(os.path.join(folder, "subfolder"))
    with caplog.at_level(logging.INFO, logger="DCEPerfusionLib.files.dicom"):
        s = series.read_dce(folder)
    np.testing.assert_array_equal(s.signal, signal)
    assert any("3 file(s) that are not DICOM images ignored (DICOMDIR, README.txt, thumbnail.png)" in r.getMessage()
               for r in caplog.records)
    only = str(tmp_path / "only")
    dd.non_dicom_files(only)
    with pytest.raises(ValueError, match=_exact(
            f"DICOM folder {only!r}: no DICOM images found (3 other file(s)) - give the folder holding the DCE "
            "series' DICOM files")):
        series.read_dce(only)


def test_colour_file_is_refused(tmp_path):
    folder = str(tmp_path / "rgb")
    os.makedirs(folder)
    path = dd.rgb_file(os.path.join(folder, "screenshot.dcm"))
    with pytest.raises(ValueError, match=_exact(
            f"{path}: a colour image (3 samples per pixel, RGB; e.g. a secondary capture or screenshot) - give the "
            "folder of the grey-scale DCE series")):
        series.read_dce(folder)
    dd.classic_series(folder, _signal(19), _matrix(), T_S, "ge")        # with the series: another series
    with pytest.raises(ValueError,
                       match=r"has 2 series \(.*'DCE dynamic'.*\); put the DCE series in a folder of its own$"):
        series.read_dce(folder)


def test_truncated_files_are_refused(tmp_path):
    folder = dd.classic_series(str(tmp_path / "t"), _signal(20), _matrix(), T_S, "ge")
    victim = os.path.join(folder, sorted(os.listdir(folder))[5])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size - 10)                                           # in the pixel data
    with pytest.raises(ValueError, match=_exact(
            f"{victim}: 86 bytes of pixel data for 1 frame(s) of 6x8 pixels at 16 bits (96 bytes) - the file is "
            "incomplete or its Bits Allocated is wrong; copy it again from the scanner or PACS")):
        series.read_dce(folder)
    with open(victim, "r+b") as f:
        f.truncate(300)                                                 # in the header
    with pytest.raises(ValueError, match=f"^{re.escape(victim)}: .*(incomplete|damaged|cannot be read)"):
        series.read_dce(folder)


def test_bits_allocated_that_does_not_match_the_pixel_data(tmp_path):
    def edit(ds, k, t):
        if (k, t) == (1, 2):
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    folder = dd.classic_series(str(tmp_path / "b"), _signal(21), _matrix(), T_S, "ge", edit=edit)
    victim = next(os.path.join(folder, f) for f in os.listdir(folder)
                  if pydicom.dcmread(os.path.join(folder, f)).BitsAllocated == 32)
    with pytest.raises(ValueError, match=_exact(
            f"{victim}: 96 bytes of pixel data for 1 frame(s) of 6x8 pixels at 32 bits (192 bytes) - the file is "
            "incomplete or its Bits Allocated is wrong; copy it again from the scanner or PACS")):
        series.read_dce(folder)
    folder = dd.classic_series(str(tmp_path / "b12"), _signal(21), _matrix(), T_S, "ge",
                               edit=lambda ds, k, t: setattr(ds, "BitsAllocated", 12) if (k, t) == (0, 0) else None)
    with pytest.raises(ValueError, match=r"Bits Allocated 12 / Bits Stored 16 cannot be read"):
        series.read_dce(folder)


def test_two_echoes_in_one_series_are_refused(tmp_path):
    folder = dd.classic_series(str(tmp_path / "e1"), _signal(22), _matrix(), T_S, "ge")
    dd.classic_series(str(tmp_path / "e2"), _signal(23), _matrix(), T_S, "ge", seed=2)
    for f in os.listdir(tmp_path / "e2"):
        os.replace(tmp_path / "e2" / f, os.path.join(folder, "E2" + f))
    with pytest.raises(ValueError, match=r"share a slice position and a Trigger Time \(0018,1060\) with another "
                                         r"image .*several echoes"):
        series.read_dce(folder)


def test_a_missing_slice_is_refused(tmp_path):
    folder = dd.classic_series(str(tmp_path / "gap"), _signal(24), _matrix(), T_S, "ge",
                               edit=lambda ds, k, t: k != 2)
    with pytest.raises(ValueError, match=_exact(
            f"DICOM folder {folder!r}: slice positions are not evenly spaced along the slice normal (3 to 6 mm "
            "apart) - a slice is missing, or the series holds several stacks; export the complete DCE series into a "
            "folder of its own")):
        series.read_dce(folder)


# -------------------------------------------------------------------------------------------- fuzz
FUZZ_CASES = int(os.environ.get("DCEPERFUSION_FUZZ_CASES", "1400"))
FUZZ_SEED = 20260314

#: Header elements worth damaging, with values of their VR or of none.
_TARGETS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
            "PhotometricInterpretation", "NumberOfFrames", "ImagePositionPatient", "ImageOrientationPatient",
            "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "TriggerTime", "AcquisitionTime", "ContentTime",
            "AcquisitionDateTime", "TemporalPositionIdentifier", "InstanceNumber", "AcquisitionNumber",
            "SeriesInstanceUID", "SOPClassUID", "RescaleSlope", "RescaleIntercept", "MagneticFieldStrength",
            "RepetitionTime", "FlipAngle", "PixelData", "TransferSyntaxUID", "PerFrameFunctionalGroupsSequence",
            "SharedFunctionalGroupsSequence", "FrameContentSequence", "PlanePositionSequence",
            "PlaneOrientationSequence", "PixelMeasuresSequence", "FrameAcquisitionDateTime", "TemporalPositionIndex",
            "PixelValueTransformationSequence", "MRTimingAndRelatedParametersSequence")
_TEXT = ("", "abc", "0", "-1", "1e308", "-1e-300", "nan", "inf", "1\\2", "1\\2\\3\\4\\5\\6\\7", "3.5\\", "235960",
         "2400", "20241399", "20240314250000", "0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0", "\0\0\0\0", "9" * 40,
         "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.2", "1.2.3", "RGB", "PALETTE COLOR", "MONOCHROME1")
_NUMBERS = (0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 31, 32, 64, 255, 4096, 65535)


def _elements(ds, out=None):
    """(dataset, element) pairs anywhere in ``ds`` (sequence items too)."""
    out = [] if out is None else out
    for elem in ds:
        out.append((ds, elem))
        if elem.VR == "SQ":
            for item in elem.value:
                _elements(item, out)
    return out


def _edit_header(data, rng):
    """Parse, damage one element (delete it, drop a sequence item, give it a value of another kind), write."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    pairs = _elements(ds) + ([(ds.file_meta, e) for e in ds.file_meta] if hasattr(ds, "file_meta") else [])
    targeted = [(d, e) for d, e in pairs if e.keyword in _TARGETS]
    d, elem = (targeted or pairs)[rng.integers(len(targeted or pairs))] if rng.random() < 0.75 or not pairs else \
        pairs[rng.integers(len(pairs))]
    settings = pydicom.config.settings
    mode, settings.writing_validation_mode = settings.writing_validation_mode, pydicom.config.IGNORE
    try:
        return _damage(ds, d, elem, rng)
    finally:
        settings.writing_validation_mode = mode


def _damage(ds, d, elem, rng):
    how = rng.integers(5)
    tag = elem.tag
    if how == 0 or (elem.VR == "SQ" and how < 3):
        if elem.VR == "SQ" and len(elem.value) and rng.random() < 0.6:
            del elem.value[int(rng.integers(len(elem.value)))]
            what = f"drop an item of {elem.keyword}"
        else:
            del d[tag]
            what = f"delete {elem.keyword or tag}"
    elif how in (1, 2):
        value = _TEXT[rng.integers(len(_TEXT))]
        d[tag] = DataElement(tag, "UI" if elem.VR == "UI" else "LO", value)
        what = f"{elem.keyword or tag} = {value!r} (text)"
    elif how == 3 and elem.VR in ("US", "SS", "UL", "SL"):
        value = int(_NUMBERS[rng.integers(len(_NUMBERS))])
        d[tag] = DataElement(tag, elem.VR, value if elem.VR[0] == "U" else min(value, 32767))
        what = f"{elem.keyword or tag} = {value}"
    else:
        value = rng.bytes(int(rng.integers(0, 12)))
        d[tag] = DataElement(tag, "OB", value)
        what = f"{elem.keyword or tag} = {len(value)} random bytes"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    return buf.getvalue(), what


def _mutate(files, rng):
    """Damage ``files`` ({name: bytes}) in place once; returns what was done."""
    names = sorted(files)
    name = names[rng.integers(len(names))]
    data = bytearray(files[name])
    kind = rng.choice(["bits", "truncate", "run", "shift", "header", "header", "header", "files"])
    if len(data) < 2:                                   # emptied by an earlier mutation
        kind = "files"
    header_end = min(len(data), 2048)
    if kind == "bits":
        for _ in range(int(rng.integers(1, 9))):
            pos = int(rng.integers(header_end if rng.random() < 0.7 else len(data)))
            data[pos] ^= 1 << int(rng.integers(8))
        what = "bit flips"
    elif kind == "truncate":
        cut = int(rng.integers(len(data)))
        data = data[:cut]
        what = f"truncated at {cut}"
    elif kind == "run":
        pos, n = int(rng.integers(len(data))), int(rng.integers(1, 65))
        fill = rng.bytes(n) if rng.random() < 0.5 else bytes([int(rng.choice([0, 0xFF, 0x20, 0x5C]))]) * n
        data[pos:pos + n] = fill[:len(data) - pos]
        what = f"{n} bytes overwritten at {pos}"
    elif kind == "shift":
        pos, n = int(rng.integers(header_end)), int(rng.integers(1, 17))
        if rng.random() < 0.5:
            data[pos:pos] = rng.bytes(n)
            what = f"{n} bytes inserted at {pos}"
        else:
            del data[pos:pos + n]
            what = f"{n} bytes deleted at {pos}"
    elif kind == "header":
        try:
            new, what = _edit_header(bytes(data), rng)
            data = bytearray(new)
        except Exception as exc:                       # the writer refused the edit: flip a bit instead
            data[int(rng.integers(header_end))] ^= 0x10
            what = f"bit flip (header edit not written: {type(exc).__name__})"
    else:
        op = rng.integers(4)
        if op == 0 and len(files) > 1:
            del files[name]
            return f"removed {name}"
        if op == 1:
            files["copy_" + name] = bytes(data)
            return f"duplicated {name}"
        if op == 2:
            files["junk.dcm"] = b"\0" * 128 + b"DICM" + rng.bytes(int(rng.integers(0, 300)))
            return "added a junk file with a DICM preamble"
        files["notes.txt"] = b"\x08\x00" + rng.bytes(int(rng.integers(0, 300)))
        return "added a junk file that starts like raw DICOM"
    files[name] = bytes(data)
    return f"{name}: {what}"


def _check_series(s):
    """What every read series must satisfy."""
    assert s.signal.dtype == np.float32 and s.signal.ndim == 4 and np.all(np.isfinite(s.signal))
    t = np.asarray(s.t_s)
    assert t.size == s.signal.shape[-1] >= 3 and t[0] == 0 and np.all(np.diff(t) > 0) and np.all(np.isfinite(t))
    m = np.asarray(s.ijk_to_ras)
    assert m.shape == (4, 4) and np.all(np.isfinite(m)) and abs(np.linalg.det(m[:3, :3])) > 0
    assert s.tr_s is None or s.tr_s > 0
    assert s.flip_angle_deg is None or s.flip_angle_deg > 0
    assert s.field_strength_t is None or 0 < s.field_strength_t <= 25
    assert isinstance(s.time_source, str) and s.time_source


def _export(s, folder, case) -> bool:
    """A read series' DICOM export of one map (values 0.1, one lesion voxel), as ``fit --dicom-out`` writes it:
    True when written (and read back), False without highdicom; a refusal is a one-line ValueError."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return False
    from types import SimpleNamespace
    from DCEPerfusionLib.files import dicomout
    lesion = np.zeros(s.shape_kji, dtype=bool)
    lesion[0, 0, 0] = True
    result = SimpleNamespace(series=s, maps={"vp": np.full(s.shape_kji, 0.1, dtype=np.float32)},
                             fit=SimpleNamespace(model="extended_tofts"), lesions={"lesion": lesion}, reference=None,
                             aif_mask=None, options=SimpleNamespace(aif_source="parker"))
    out = os.path.join(folder, str(case))
    dicomout.write_dicom_exam(result, out)
    back = pydicom.dcmread(os.path.join(out, "vp.dcm"))
    assert back.pixel_array.shape == s.shape_kji and np.all(back.pixel_array == np.float32(0.1))
    return True


@pytest.fixture(scope="module")
def fuzz_corpus(tmp_path_factory):
    """Clean inputs to damage: {name: {file name: bytes}}."""
    base = tmp_path_factory.mktemp("fuzz_clean")
    signal = _signal(30, shape=(2, 5, 6), n=4, low=-100, high=400)
    t_s = np.array([0.0, 3.0, 6.0, 9.0])
    folders = {
        "siemens": dd.classic_series(str(base / "siemens"), signal, _oblique(), t_s, "siemens"),
        "ge_gap": dd.classic_series(str(base / "ge_gap"), signal, _matrix(), t_s, "ge", slope=2.0, intercept=-1.0,
                                    edit=_drop("TriggerTime", lambda k, t: t == 0 and k == 0)),
        "philips_implicit": dd.classic_series(str(base / "philips"), signal, _matrix(), t_s, "philips",
                                              transfer_syntax=pydicom.uid.ImplicitVRLittleEndian),
        "siemens_raw": dd.classic_series(str(base / "raw"), signal, _matrix(), t_s, "siemens", raw=True),
        "enhanced": os.path.dirname(dd.enhanced_file(str(base / "enhanced" / "en.dcm"), signal, _oblique(), t_s,
                                                     shared_geometry=False, rescale=(2.0, 0.0))),
        "enhanced_folder": dd.enhanced_folder(str(base / "enhanced_folder"), signal, _matrix(), t_s),
    }
    corpus = {}
    for name, folder in folders.items():
        corpus[name] = {}
        for f in sorted(os.listdir(folder)):
            with open(os.path.join(folder, f), "rb") as fh:
                corpus[name][f] = fh.read()
        series.read_dce(folder)                                         # the clean input reads
    return corpus


@pytest.mark.filterwarnings("ignore")
def test_dicom_fuzz(tmp_path, fuzz_corpus, caplog):
    """Every damaged input reads (as a sane series) or is refused with a one-line ValueError naming the
    folder or a file in it. DCEPERFUSION_FUZZ_CASES sets the number of cases."""
    caplog.set_level(logging.CRITICAL)
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    names = sorted(fuzz_corpus)
    folder = str(tmp_path / "case")
    failures, outcomes = [], {"read": 0, "refused": 0}
    start = time.perf_counter()
    for case in range(FUZZ_CASES):
        rng = np.random.default_rng([FUZZ_SEED, case])
        corpus = names[case % len(names)]
        files = dict(fuzz_corpus[corpus])
        done = [_mutate(files, rng) for _ in range(int(rng.integers(1, 4)))]
        if os.path.isdir(folder):
            for f in os.listdir(folder):
                os.remove(os.path.join(folder, f))
        else:
            os.makedirs(folder)
        for f, data in files.items():
            with open(os.path.join(folder, f), "wb") as fh:
                fh.write(data)
        try:
            s = series.read_dce(folder)
            _check_series(s)
            outcomes["read"] += 1
            if case % 3 == 0 and _export(s, str(tmp_path / "export"), case):   # header values through highdicom
                outcomes["exported"] = outcomes.get("exported", 0) + 1
        except ValueError as exc:
            message = str(exc)
            if message.startswith("DICOM export") and "\n" not in message:
                outcomes["export refused"] = outcomes.get("export refused", 0) + 1
                continue
            if "\n" in message or folder not in message:
                failures.append(f"case {case} ({corpus}; {'; '.join(done)}): message not one line naming the input: "
                                f"{message!r}")
            outcomes["refused"] += 1
        except Exception as exc:                                      # noqa: BLE001 - what the test looks for
            where = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(f"case {case} ({corpus}; {'; '.join(done)}): {type(exc).__name__}: {exc} "
                            f"at {os.path.basename(where.filename)}:{where.lineno}")
    elapsed = time.perf_counter() - start
    logging.getLogger(__name__).info("DICOM fuzz: %d cases in %.1f s: %s", FUZZ_CASES, elapsed, outcomes)
    print(f"DICOM fuzz: {FUZZ_CASES} cases in {elapsed:.1f} s: {outcomes}")
    assert not failures, f"{len(failures)} of {FUZZ_CASES} cases failed:\n" + "\n".join(failures[:20])
