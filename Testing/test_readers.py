"""Bad real inputs refused in one line naming the file and the fix - one test per finding of the fuzzing
run ("Real inputs, clean failures"): header text that is not UTF-8, segment layers and label values
out of range, JSON sidecars of the wrong shape, truncated and size-mismatched files (NRRD raw and gzip,
.nii and .nii.gz), images given as segmentations, folders and binary files given as files, CSV tables
(the prescribed AIF, the manifest, the cohort) and JSON summaries. Files are never read partially and
never changed by reading."""

import gzip
import hashlib
import json
import os
import re
import struct

import numpy as np
import pytest
import SimpleITK as sitk

import fuzzing
from DCEPerfusionLib.apps import batch
from DCEPerfusionLib.core import cohort
from DCEPerfusionLib.core import tables
from DCEPerfusionLib.files import exam, images, results, series

T_S = np.array(fuzzing.T_S)


def exact(message: str) -> str:
    """A pytest.raises ``match`` for exactly this one-line message."""
    return "^" + re.escape(message) + "$"


@pytest.fixture
def unchanged(tmp_path):
    """Checks at the end of the test that no file under tmp_path was changed, added or removed by reading."""
    def snapshot():
        out = {}
        for root, dirs, files in os.walk(tmp_path):
            for name in files:
                p = os.path.join(root, name)
                with open(p, "rb") as f:
                    out[p] = hashlib.sha1(f.read()).hexdigest()
            out.update({os.path.join(root, d): "dir" for d in dirs})
        return out
    state = {}
    yield lambda: state.update(before=snapshot())
    if "before" in state:
        assert snapshot() == state["before"]


def write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _header_and_data(nrrd: bytes):
    end = nrrd.index(b"\n\n") + 2
    return nrrd[:end], nrrd[end:]


# ============================================================================================ NRRD header text
def test_nrrd_keys_that_are_not_utf8_are_skipped_and_needed_values_refused(tmp_path, unchanged):
    head, data = _header_and_data(fuzzing.slicer_dce_nrrd())
    odd = head.replace(b"MultiVolume.NumberOfFrames", b"Scanner\xe9Note:=caf\xe9\nMultiVolume.NumberOfFrames")
    ok = write(tmp_path / "odd_key.nrrd", odd + data)
    bad_value = head.replace(b"MultiVolume.FrameIdentifyingDICOMTagUnits:=ms",
                             b"MultiVolume.FrameIdentifyingDICOMTagUnits:=m\xe9")
    bad = write(tmp_path / "bad_value.nrrd", bad_value + data)
    unchanged()
    s = series.read_dce(ok)                                  # a key nobody needs: skipped
    np.testing.assert_allclose(s.t_s, T_S)
    with pytest.raises(ValueError, match=exact(f"{bad}: its header value MultiVolume.FrameIdentifyingDICOMTagUnits "
                                               "is not UTF-8 text - set it again (e.g. in Slicer) and save the file")):
        series.read_dce(bad)


def test_segment_name_that_is_not_utf8_is_refused(tmp_path, unchanged):
    seg = fuzzing.slicer_seg_nrrd().replace(b"Segment1_Name:=aorta", b"Segment1_Name:=aort\xe9")
    path = write(tmp_path / "s.seg.nrrd", seg)
    unchanged()
    with pytest.raises(ValueError, match=exact(f"{path}: its header value Segment1_Name is not UTF-8 text - set it "
                                               "again (e.g. in Slicer) and save the file")):
        images.read_segmentation(path)


def test_slicer_segmentation_with_layers_reads(tmp_path):
    masks, m = images.read_segmentation(write(tmp_path / "s.seg.nrrd", fuzzing.slicer_seg_nrrd()))
    assert list(masks) == ["lesion", "aorta", "L2 metastasis"]
    assert masks["lesion"].sum() == 24 and masks["aorta"].sum() == 18 and masks["L2 metastasis"].sum() == 1
    assert masks["lesion"].shape == fuzzing.SHAPE


@pytest.mark.parametrize("key,value,message", [
    ("Segment1_Layer", "2", "segment 'aorta': layer 2 does not exist (the file has 2 layer(s)) - save the "
                            "segmentation again from Slicer"),
    ("Segment1_Layer", "-1", "segment 'aorta': layer -1 does not exist (the file has 2 layer(s)) - save the "
                             "segmentation again from Slicer"),
    ("Segment1_Layer", "one", "segment 'aorta': Segment1_Layer = 'one' is not a whole number - save the "
                              "segmentation again from Slicer"),
    ("Segment1_LabelValue", "1.5", "segment 'aorta': Segment1_LabelValue = '1.5' is not a whole number - save the "
                                   "segmentation again from Slicer"),
    ("Segment1_LabelValue", "300", "segment 'aorta': label value 300 is not a label of its uint8 layers (1-255) - "
                                   "save the segmentation again from Slicer"),
    ("Segment1_LabelValue", "0", "segment 'aorta': label value 0 is not a label of its uint8 layers (1-255) - "
                                 "save the segmentation again from Slicer"),
    ("Segment1_Name", "lesion", "two segments are named 'lesion' - rename one in Slicer and save again"),
])
def test_segment_layer_and_label_value_out_of_range(tmp_path, unchanged, key, value, message):
    seg = re.sub(f"{key}:=[^\n]*".encode(), f"{key}:={value}".encode(), fuzzing.slicer_seg_nrrd(), count=1)
    path = write(tmp_path / "s.seg.nrrd", seg)
    unchanged()
    with pytest.raises(ValueError, match=exact(f"{path}: {message}")):
        images.read_segmentation(path)


def test_segment_without_a_name_is_refused(tmp_path):
    seg = fuzzing.slicer_seg_nrrd().replace(b"Segment0_Name:=lesion\n", b"")
    path = write(tmp_path / "s.seg.nrrd", seg)
    with pytest.raises(ValueError, match=exact(f"{path}: segment 0 (Segment_1) has no name (Segment0_Name) - name it "
                                               "in Slicer and save the segmentation again")):
        images.read_segmentation(path)


def test_float_image_given_as_segmentation_is_refused(tmp_path, unchanged):
    t1 = np.random.default_rng(0).uniform(0.3, 2.5, fuzzing.SHAPE).astype(np.float32)
    path = images.write_volume(str(tmp_path / "t1.nii.gz"), t1, np.eye(4))
    whole = images.write_volume(str(tmp_path / "labels_float.nrrd"), (t1 > 1).astype(np.float32) * 2, np.eye(4))
    unchanged()
    with pytest.raises(ValueError, match=exact(f"{path}: holds non-integer values - give a labelmap or .seg.nrrd, "
                                               "not an image")):
        images.read_segmentation(path)
    masks, _ = images.read_segmentation(whole)                # a labelmap stored as float: whole numbers, fine
    assert list(masks) == ["label 2"] and masks["label 2"].sum() == (t1 > 1).sum()


def test_image_with_many_values_is_not_a_labelmap(tmp_path):
    arr = np.arange(np.prod(fuzzing.SHAPE) * 20, dtype=np.int16).reshape((4 * 20,) + fuzzing.SHAPE[1:])
    path = images.write_volume(str(tmp_path / "anatomy.nrrd"), arr, np.eye(4))
    with pytest.raises(ValueError, match=exact(f"{path}: holds {arr.size - 1} distinct values over 100% of its voxels "
                                               "- it looks like an image; give a labelmap or .seg.nrrd")):
        images.read_segmentation(path)
    few = (np.arange(arr.size).reshape(arr.shape) % 40 + 1).astype(np.int16)   # 40 grey levels everywhere
    path = images.write_volume(str(tmp_path / "levels.nrrd"), few, np.eye(4))
    with pytest.raises(ValueError, match="holds 40 distinct values over 100% of its voxels - it looks like an image"):
        images.read_segmentation(path)
    atlas = np.zeros(arr.shape, np.int16)                                         # 117 structures, most voxels 0
    atlas.reshape(-1)[: 117 * 10] = np.repeat(np.arange(1, 118), 10)
    path = images.write_volume(str(tmp_path / "atlas.nrrd"), atlas, np.eye(4))
    assert len(images.read_segmentation(path)[0]) == 117                         # a TotalSegmentator-like labelmap


# ============================================================================================ JSON sidecar
def _nifti_exam(tmp_path, sidecar, name="dce.nii.gz"):
    path = write(tmp_path / name, fuzzing._nifti_4d(compressed=name.endswith(".gz")))
    stem = str(tmp_path / name).split(".nii")[0]
    with open(stem + ".json", "w", encoding="utf-8") as f:
        f.write(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return path, stem + ".json"


def test_nifti_reads_field_strength_tr_flip_and_times_from_the_sidecar(tmp_path):
    path, _ = _nifti_exam(tmp_path, fuzzing.dcm2niix_sidecar().decode())
    s = series.read_dce(path)
    assert (s.field_strength_t, s.tr_s, s.flip_angle_deg) == (3.0, 0.0041, 15.0)
    np.testing.assert_allclose(s.t_s, T_S)
    assert s.signal.shape == fuzzing.SHAPE + (T_S.size,)


@pytest.mark.parametrize("sidecar,message", [
    ([1, 2, 3], "is a list, not an object - give the BIDS sidecar as dcm2niix writes it, or remove it and give the "
                "frame interval (--frame-interval)"),
    ("3.0", "is the number 3.0, not an object - give the BIDS sidecar as dcm2niix writes it, or remove it and give "
            "the frame interval (--frame-interval)"),
])
def test_sidecar_that_is_not_an_object(tmp_path, unchanged, sidecar, message):
    path, js = _nifti_exam(tmp_path, sidecar)
    unchanged()
    with pytest.raises(ValueError, match=exact(f"JSON sidecar {js}: {message}")):
        series.read_dce(path)


@pytest.mark.parametrize("field,value,message", [
    ("RepetitionTime", "4.1", "RepetitionTime is the text '4.1' - give the repetition time in s as a number"),
    ("RepetitionTime", [0.004], "RepetitionTime is a list - give the repetition time in s as a number"),
    ("RepetitionTimeExcitation", {"value": 4}, "RepetitionTimeExcitation is an object - give the excitation "
                                               "repetition time in s as a number"),
    ("RepetitionTimeExcitation", 4.1, "RepetitionTimeExcitation is 4.1, more than 1 s - values in ms? give seconds"),
    ("FlipAngle", True, "FlipAngle is true - give the flip angle in degrees as a number"),
    ("FlipAngle", -15, "FlipAngle is -15 - give the flip angle in degrees as a number"),
    ("MagneticFieldStrength", "3T", "MagneticFieldStrength is the text '3T' - give the field strength in T as a "
                                    "number"),
    ("MagneticFieldStrength", 3000, "MagneticFieldStrength is 3000, more than 20 T - give the field strength in T as "
                                    "a number"),
    ("VolumeTiming", "0, 4.5, 9", "VolumeTiming is the text '0, 4.5, 9', not a list - give VolumeTiming as a list "
                                  "of frame times in s"),
    ("VolumeTiming", [0, "4.5", 9], "VolumeTiming[1] is the text '4.5', not a finite number - give VolumeTiming as "
                                    "a list of frame times in s"),
    ("VolumeTiming", [0, [4.5], 9], "VolumeTiming[1] is a list, not a finite number - give VolumeTiming as a list "
                                    "of frame times in s"),
])
def test_sidecar_fields_of_the_wrong_type(tmp_path, unchanged, field, value, message):
    meta = json.loads(fuzzing.dcm2niix_sidecar())
    meta[field] = value
    path, js = _nifti_exam(tmp_path, meta)
    unchanged()
    with pytest.raises(ValueError, match=exact(f"{js}: {message}")):
        series.read_dce(path)


def test_frame_times_start_of_the_wrong_type(tmp_path):
    meta = json.loads(fuzzing.dcm2niix_sidecar())
    del meta["VolumeTiming"]
    meta["FrameTimesStart"] = {"0": 0}
    path, js = _nifti_exam(tmp_path, meta)
    with pytest.raises(ValueError, match=exact(f"{js}: FrameTimesStart is an object, not a list - give "
                                               "FrameTimesStart as a list of frame times in s")):
        series.read_dce(path)


def test_sidecar_that_is_not_utf8_or_a_folder(tmp_path):
    path, js = _nifti_exam(tmp_path, "")
    write(js, '{"FlipAngle": 15, "SeriesDescription": "dyn \xe9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=exact(f"JSON sidecar {js}: is not UTF-8 text (byte 0xe9 on line 1; Latin-1 "
                                               "or Windows encoding?) - save it as UTF-8 (in Excel: CSV UTF-8)")):
        series.read_dce(path)
    os.remove(js)
    os.mkdir(js)
    with pytest.raises(ValueError, match=exact(f"JSON sidecar {js}: is a folder - give a file")):
        series.read_dce(path)


# ============================================================================================ truncated, mismatched
def test_nii_gz_cut_in_half_is_refused(tmp_path, unchanged):
    data = fuzzing._nifti_4d()
    path, _ = _nifti_exam(tmp_path, fuzzing.dcm2niix_sidecar().decode())
    write(path, data[: len(data) // 2])
    unchanged()
    with pytest.raises(ValueError, match=exact(f"{path}: cannot be read (the compressed data ends early) - is the "
                                               "file complete?")):
        series.read_dce(path)


def test_nii_gz_whose_content_is_short_or_long(tmp_path):
    inner = gzip.decompress(fuzzing._nifti_4d())
    need = len(inner) - 352
    path, _ = _nifti_exam(tmp_path, fuzzing.dcm2niix_sidecar().decode())
    write(path, gzip.compress(inner[:-100]))                 # a complete gzip stream of a short file
    with pytest.raises(ValueError, match=exact(f"{path}: cannot be read (its data has {need - 100} bytes, its dims "
                                               f"6 5 4 8 of datatype 4 need {need}) - is the file complete?")):
        series.read_dce(path)
    write(path, gzip.compress(inner + b"\0" * 10))
    with pytest.raises(ValueError, match=exact(f"{path}: holds more data than its header says (its dims 6 5 4 8 of "
                                               f"datatype 4 need {need} bytes, the file has more) - the header is "
                                               "wrong or the file damaged; save it again")):
        series.read_dce(path)


def test_uncompressed_nii_cut_or_with_a_wrong_dim(tmp_path):
    data = fuzzing._nifti_4d("float32", compressed=False)
    path, _ = _nifti_exam(tmp_path, fuzzing.dcm2niix_sidecar().decode(), "dce.nii")
    write(path, data[:-4])
    with pytest.raises(ValueError, match=r"dce.nii: cannot be read \(its data has \d+ bytes, its dims 6 5 4 8 of "
                                         r"datatype 16 need \d+\) - is the file complete\?$"):
        series.read_dce(path)
    smaller = bytearray(data)
    smaller[42:44] = struct.pack("<h", 5)                   # dim[1] 6 -> 5: the data is longer than the header says
    write(path, bytes(smaller))
    with pytest.raises(ValueError, match="dce.nii: holds more data than its header says"):
        series.read_dce(path)


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_nrrd_data_shorter_or_longer_than_its_sizes(tmp_path, unchanged, encoding):
    head, data = _header_and_data(fuzzing.slicer_dce_nrrd(encoding))
    raw = gzip.decompress(data) if encoding == "gzip" else data
    pack = (lambda b: gzip.compress(b)) if encoding == "gzip" else (lambda b: b)
    short = write(tmp_path / "short.nrrd", head + pack(raw[:-2]))
    long = write(tmp_path / "long.nrrd", head + pack(raw + raw[:480]))
    smaller = write(tmp_path / "smaller.nrrd", head.replace(b"sizes: 8 6 5 4", b"sizes: 8 6 5 3") + data)
    unchanged()
    what = f"its sizes 8 6 5 4 of short need {len(raw)}"
    with pytest.raises(ValueError, match=exact(f"{short}: cannot be read (its data has {len(raw) - 2} bytes, {what}) "
                                               "- is the file complete?")):
        series.read_dce(short)
    with pytest.raises(ValueError, match=exact(f"{long}: holds more data than its header says ({what} bytes, the file "
                                               "has more) - the header is wrong or the file damaged; save it again")):
        series.read_dce(long)
    with pytest.raises(ValueError, match=re.escape(f"{smaller}: holds more data than its header says (its sizes "
                                                   "8 6 5 3")):
        series.read_dce(smaller)


def test_gzip_nrrd_cut_short_is_refused(tmp_path):
    nrrd = fuzzing.slicer_dce_nrrd("gzip")
    path = write(tmp_path / "cut.nrrd", nrrd[: len(nrrd) - 30])
    with pytest.raises(ValueError, match=exact(f"{path}: cannot be read (the compressed data ends early) - is the file "
                                               "complete?")):
        series.read_dce(path)


def test_nrrd_header_line_that_would_crash_simpleitk(tmp_path):
    head, data = _header_and_data(fuzzing.slicer_volume_nrrd())
    path = write(tmp_path / "long.nrrd", head.replace(b"kinds: domain", b"kinds: domain" + b"1" * 2000) + data)
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot be read (its header has a line of 2027 "
                                                   "characters")):
        images.read_volume(path)


def test_nrrd_space_directions_that_overflow(tmp_path):
    head, data = _header_and_data(fuzzing.slicer_volume_nrrd())
    path = write(tmp_path / "huge.nrrd", head.replace(b"(-0.8,0,0)", b"(" + b"1" * 300 + b",0,0)") + data)
    with pytest.raises(ValueError, match=re.escape(f"{path}: its space directions give spacings 1.111e+299, 0.9, 3 mm, "
                                                   "SimpleITK read 1, 0.9, 3 - save the file again")):
        images.read_volume(path)


def test_nrrd_whose_detached_data_file_is_missing(tmp_path):
    head, _ = _header_and_data(fuzzing.slicer_volume_nrrd())
    path = write(tmp_path / "v.nhdr", head.replace(b"encoding: raw", b"encoding: raw\ndata file: v.raw"))
    with pytest.raises(ValueError, match=exact(f"{path}: its data file 'v.raw' does not exist next to it - copy it "
                                               "along")):
        images.read_volume(path)


# ============================================================================================ not files
@pytest.mark.parametrize("reader", [images.read_volume, images.read_segmentation, series.read_nrrd_4d,
                                    series.read_nifti_4d])
def test_folder_or_binary_given_as_an_image(tmp_path, reader):
    folder = tmp_path / "x.nrrd"
    folder.mkdir()
    with pytest.raises(ValueError, match=exact(f"{folder}: is a folder - give a file")):
        reader(str(folder))
    binary = write(tmp_path / "b.nrrd", bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=exact(f"{binary}: is not a NRRD file (it does not begin with NRRD000) - give "
                                               "a .nrrd written by Slicer or ITK")):
        reader(binary)
    nii = write(tmp_path / "b.nii", bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=re.escape(f"{nii}: cannot be read (")):
        reader(nii)
    with pytest.raises(ValueError, match=exact(f"{tmp_path / 'none.nrrd'} does not exist - check the path")):
        reader(str(tmp_path / "none.nrrd"))


def test_a_good_nrrd_and_nifti_read_whole(tmp_path):
    head, data = _header_and_data(fuzzing.slicer_dce_nrrd("raw"))
    s = series.read_dce(write(tmp_path / "dce.nrrd", head + data))
    expected = np.frombuffer(data, "<i2").reshape(fuzzing.SHAPE + (T_S.size,))
    np.testing.assert_array_equal(s.signal, expected)
    assert s.tr_s == pytest.approx(0.0041) and s.flip_angle_deg == 15.0
    s = series.read_dce(write(tmp_path / "gz.nrrd", fuzzing.slicer_dce_nrrd("gzip")))
    np.testing.assert_array_equal(s.signal, expected)


# ============================================================================================ the AIF CSV
def _aif(tmp_path, text, name="aif.csv", encoding="utf-8"):
    return write(tmp_path / name, text.encode(encoding))


AIF = "time_s,concentration_mM\n0,0\n4.5,-0.02\n9,0.1\n13.5,5.2\n18,3.1\n"


def test_aif_csv_comma_semicolon_tab(tmp_path, unchanged):
    a = _aif(tmp_path, AIF)
    b = _aif(tmp_path, "\ufefftime_s;concentration_mM\r\n0;0\r\n4,5;-0,02\r\n9;0,1\r\n13,5;5,2\r\n18;3,1\r\n", "b.csv")
    c = _aif(tmp_path, AIF.replace(",", "\t"), "c.tsv")
    d = _aif(tmp_path, "concentration_mM,time_s\n0,0\n-0.02,4.5\n0.1,9\n5.2,13.5\n3.1,18\n", "d.csv")
    unchanged()
    for path in (a, b, c, d):
        t, cp, description = tables.read_aif_csv(path)
        np.testing.assert_allclose(t, [0, 4.5, 9, 13.5, 18])
        np.testing.assert_allclose(cp, [0, -0.02, 0.1, 5.2, 3.1])
        assert description == f"prescribed AIF {path} (5 points, 0-18 s, peak 5.2 mM)"


@pytest.mark.parametrize("text,message", [
    ("time_s,concentration_mM\n0,0\n9,0.1\n4.5,5\n", "row 3 (line 4): time 4.5 s is not after the previous row's 9 s "
                                                      "- the times must increase"),
    ("time_s,concentration_mM\n0,0\n4.5,5\n", ": has 2 row(s) - an AIF needs at least 3 time points"),
    ("time_s,concentration_mM\n0,0\n4.5,abc\n9,1\n", "row 2 (line 3): concentration_mM = 'abc' is not a number - give "
                                                      "the concentration in mM"),
    ("time_s,concentration_mM\n0,0\n,1\n9,1\n", "row 2 (line 3): time_s = '' is not a number - give the time in "
                                                 "seconds"),
    ("time_s,concentration_mM\n0,0\n4500,5\n9000000,1\n", ": the times span 9e+06, more than an hour in seconds - "
                                                          "values in ms? give seconds"),
    ("time_ms,concentration_mM\n0,0\n4500,5\n9000,1\n", ": the time column 'time_ms' is in ms - give the times in "
                                                        "seconds (time_s)"),
    ("time_s,concentration_uM\n0,0\n4.5,5\n9,1\n", ": the concentration column 'concentration_uM' is in µM - give it "
                                                   "in mM (concentration_mM)"),
    ("time_s,concentration_mM\n0,0\n4.5,5\n9,-1\n", "row 3 (line 4): concentration -1 mM is negative beyond noise "
                                                     "(more than 10% of the peak 5 mM) - give concentrations in mM, "
                                                     "baseline 0"),
    ("time_s,concentration_mM\n0,0\n4.5,5000\n9,1\n", "row 2 (line 3): concentration 5000 is above 100 mM - values in "
                                                      "µM? give mM"),
    ("time_s,concentration_mM\n0,0\n4.5,inf\n9,1\n", "row 2 (line 3): concentration_mM = 'inf' is not a finite number "
                                                     "- give the concentration in mM"),
    ("0,0\n4.5,5\n9,1\n13.5,0.5\n", ": has no header row (the first row is numbers) - the first row must name the "
                                    "columns, e.g. time_s,concentration_mM"),
    ("time_s,cb_mM,cp_mM\n0,0,0\n4.5,5,6\n9,1,2\n", ": has 3 columns (time_s, cb_mM, cp_mM) - give two: time in s "
                                                    "and concentration in mM, e.g. time_s,concentration_mM"),
    ("time_s,concentration_mM\n0,0\n4.5,5,7\n9,1\n", " row 2 (line 3): has 3 cells, the header 2 - give every row one "
                                                     "cell per column (quote values that hold the delimiter)"),
    ("time_s concentration_mM\n0 0\n4.5 5\n", ": has one column ('time_s concentration_mM') - separate the columns by "
                                              "commas, semicolons or tabs, e.g. time_s,concentration_mM"),
    ("\n\n  \n", ": is empty - give a CSV table with a header row, e.g. time_s,concentration_mM"),
    (",,\n,\n", ": is empty - give a CSV table with a header row, e.g. time_s,concentration_mM"),
    ("time_s,concentration_mM\n0,0\n4.5,5\n9,0.1\x01\n",
     ": holds a control character (0x01 on line 4), not text - give a CSV table (comma, semicolon or tab separated, a "
     "header row, e.g. time_s,concentration_mM)"),
])
def test_bad_aif_csv(tmp_path, unchanged, text, message):
    path = _aif(tmp_path, text)
    unchanged()
    sep = "" if message.startswith((":", " ")) else " "
    with pytest.raises(ValueError, match=exact(f"AIF file {path}{sep}{message}")):
        tables.read_aif_csv(path)


def test_aif_csv_not_utf8_binary_folder(tmp_path):
    latin = _aif(tmp_path, "time_s,concentration_mM\n0,0\n4.5,5\n9,1 \xb5M\n", encoding="latin-1")
    with pytest.raises(ValueError, match=exact(f"AIF file {latin}: is not UTF-8 text (byte 0xb5 on line 4; Latin-1 or "
                                               "Windows encoding?) - save it as UTF-8 (in Excel: CSV UTF-8)")):
        tables.read_aif_csv(latin)
    utf16 = _aif(tmp_path, "\ufefftime_s,concentration_mM\n0,0\n", "u.csv", "utf-16")
    with pytest.raises(ValueError, match=exact(f"AIF file {utf16}: is UTF-16 text - save it as UTF-8 (in Excel: CSV "
                                               "UTF-8)")):
        tables.read_aif_csv(utf16)
    binary = write(tmp_path / "aif.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match=exact(f"AIF file {binary}: is a binary file, not text - give a CSV table "
                                               "(comma, semicolon or tab separated, a header row, e.g. "
                                               "time_s,concentration_mM)")):
        tables.read_aif_csv(binary)
    with pytest.raises(ValueError, match=exact(f"AIF file {tmp_path}: is a folder - give a file")):
        tables.read_aif_csv(str(tmp_path))


# ============================================================================================ manifest, cohort
MANIFEST = ("patient,lesion,timepoint,dce,segmentation,outcome\n"
            "P1,L1,baseline,P1/b/dce.nrrd,P1/b/seg.seg.nrrd,success\n"
            "P1,L1,follow-up,P1/f/dce.nrrd,P1/f/seg.seg.nrrd,success\n")


def test_manifest_through_the_shared_reader(tmp_path, unchanged):
    semi = _aif(tmp_path, "\ufeff" + MANIFEST.replace(",", ";").replace("\n", "\r\n"), "m.csv")
    unchanged()
    jobs, rows = batch.read_manifest(semi, str(tmp_path / "out"))
    assert [j.exam_id for j in jobs] == ["P1_baseline", "P1_follow-up"] and rows[1]["timepoint"] == "follow-up"
    assert jobs[0].dce == str(tmp_path / "P1" / "b" / "dce.nrrd")


@pytest.mark.parametrize("text,message", [
    (MANIFEST.replace("success\n", "success,extra\n", 1), " row 1 (line 2): has 7 cells, the header 6 - give every row "
                                                         "one cell per column (quote values that hold the delimiter)"),
    (MANIFEST.replace(",outcome", "").replace(",success", ""),
     ": missing column(s) outcome; the header has patient, lesion, timepoint, dce, segmentation (need patient, lesion, "
     "timepoint, dce, segmentation, outcome)"),
    (MANIFEST.replace("follow-up", "week 6"), " row 2 (line 3): timepoint 'week 6' is not 'baseline' or 'follow-up'"),
    (MANIFEST.splitlines()[0] + "\n", ": has no rows - give one row per lesion and timepoint"),
    (MANIFEST.replace("patient,lesion", "patient,patient"), ": column 'patient' appears twice in the header - name "
                                                            "every column once"),
])
def test_bad_manifests(tmp_path, text, message):
    path = _aif(tmp_path, text, "manifest.csv")
    with pytest.raises(ValueError, match=exact(f"manifest {path}{message}")):
        batch.read_manifest(path, str(tmp_path / "out"))


def test_manifest_latin1(tmp_path):
    path = _aif(tmp_path, MANIFEST.replace("L1", "lésion"), "manifest.csv", "latin-1")
    with pytest.raises(ValueError, match=exact(f"manifest {path}: is not UTF-8 text (byte 0xe9 on line 2; Latin-1 or "
                                               "Windows encoding?) - save it as UTF-8 (in Excel: CSV UTF-8)")):
        batch.read_manifest(path, str(tmp_path / "out"))


def _cohort_text(delimiter=","):
    rows = cohort.synthetic_cohort(n_success=4, n_failure=3)
    return "\n".join([delimiter.join(rows[0])] + [delimiter.join(r.values()) for r in rows]) + "\n"


def test_cohort_csv_with_bom_tabs_and_trailing_empty_columns(tmp_path, unchanged):
    text = _cohort_text("\t").replace("\n", "\t\t\n")
    path = _aif(tmp_path, "\ufeff" + text, "c.tsv")
    unchanged()
    c = cohort.read_cohort_csv(path)
    assert c.n_success == 4 and c.n_failure == 3 and "delta_size_pct" in c.measures


@pytest.mark.parametrize("content,message", [
    (b"", ": is empty - give a CSV table with a header row, e.g. lesion_id,patient_id,outcome,delta_vp_pct"),
    (b",,,\n,,\n", ": is empty - give a CSV table with a header row, e.g. lesion_id,patient_id,outcome,delta_vp_pct"),
    (b"lesion_id,patient_id,outcome,delta_vp_pct\nL1,P1,success," + b"9" * 200000 + b"\n",
     ": is not a readable CSV table (field larger than field limit (131072)) - save it again as CSV, e.g. lesion_id,patient_id,outcome,delta_vp_pct"),
    (b"lesion_id patient_id outcome\nL1 P1 success\n", ": has one column ('lesion_id patient_id outcome') - separate the "
                                                        "columns by commas, semicolons or tabs, e.g. lesion_id,patient_id,outcome,delta_vp_pct"),
    ("lesion_id,patient_id,outcome,delta_vp_pct\nL1,P1,succès,-40\n".encode("latin-1"),
     ": is not UTF-8 text (byte 0xe8 on line 2; Latin-1 or Windows encoding?) - save it as UTF-8 (in Excel: CSV "
     "UTF-8)"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", ": is a binary file, not text - give a CSV table (comma, semicolon or tab separated, "
                                   "a header row, e.g. lesion_id,patient_id,outcome,delta_vp_pct)"),
    (b"L1,P1,success,-40\nL2,P2,failure,80\n", ": missing column(s) lesion_id, patient_id, outcome, delta_vp_pct; the "
                                               "header has L1, P1, success, -40 (need lesion_id, patient_id, outcome, "
                                               "delta_vp_pct)"),
    (b"1,2,3\n4,5,6\n", ": has no header row (the first row is numbers) - the first row must name the columns: "
                        "lesion_id, patient_id, outcome, delta_vp_pct"),
    (b"lesion_id,patient_id,outcome,delta_vp_pct\nL1,P1,success\n", " row 1 (line 2): has 3 cells, the header 4 - give "
                                                                    "every row one cell per column (quote values that "
                                                                    "hold the delimiter)"),
    (b'lesion_id,patient_id,outcome,delta_vp_pct\nL1,"P1,success,-40\nL2,P2,failure,80\n',
     " row 1 (line 3): has 2 cells, the header 4 - give every row one cell per column (quote values that hold the "
     "delimiter)"),
])
def test_bad_cohort_csv(tmp_path, unchanged, content, message):
    path = write(tmp_path / "cohort.csv", content)
    unchanged()
    with pytest.raises(ValueError, match=exact(f"cohort table {path}{message}")):
        cohort.read_cohort_csv(path)


def test_cohort_csv_folder(tmp_path):
    with pytest.raises(ValueError, match=exact(f"cohort table {tmp_path}: is a folder - give a file")):
        cohort.read_cohort_csv(str(tmp_path))


# ============================================================================================ JSON summaries
@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "is a list, not an object - give the output folder of 'dceperfusion fit'"),
    (b'{"statistics": {"a": 1}}', "its statistics are an object, not a list of rows as 'dceperfusion fit' writes "
                                  "them - fit the exam again"),
    (b'{"statistics": [1, 2]}', "its statistics are not as 'dceperfusion fit' writes them (row 1 is the number 1) - "
                                "fit the exam again"),
    (b"[" * 100000, "nested too deeply to be a JSON file of this package - give the output folder of 'dceperfusion "
                    "fit'"),
    (b'{"a": 1' + b"0" * 5000 + b"}", "not valid JSON (a number too long to read) - give the output folder of "
                                      "'dceperfusion fit'"),
    (b'{"a": 1,}', "not valid JSON (Expecting property name enclosed in double quotes, line 1) - give the output "
                   "folder of 'dceperfusion fit'"),
])
def test_bad_exam_summaries(tmp_path, unchanged, content, message):
    path = write(tmp_path / "summary.json", content)
    unchanged()
    with pytest.raises(ValueError, match=exact(f"exam summary {path}: {message}")):
        results.read_json(path, "exam summary")
    with pytest.raises(ValueError, match=re.escape(f"exam summary {path}: ")):
        exam.read_exam_lesions(path)


def test_summary_statistics_row_of_the_wrong_type(tmp_path):
    rows = json.loads(fuzzing.seeds_for("read_summary")["summary.json"])
    rows["statistics"][1]["voxel_count"] = "40"
    path = write(tmp_path / "summary.json", json.dumps(rows).encode())
    with pytest.raises(ValueError, match=exact(f"exam summary {path}: its statistics are not as 'dceperfusion fit' "
                                               "writes them (row 2: voxel_count is the text '40') - fit the exam "
                                               "again")):
        exam.read_exam_lesions(path)
    rows["statistics"][1]["voxel_count"] = 40
    path = write(tmp_path / "summary.json", json.dumps(rows).encode())
    lesions = exam.read_exam_lesions(path)
    assert len(lesions.statistics) == 4 and np.isnan(lesions.statistics[2].values["stdev"])


@pytest.mark.parametrize("header", ["time_s,cb_mM", "time_s,blood_mM", "t,whole blood (mM)"])
def test_aif_csv_of_blood_concentrations_is_refused(tmp_path, header):
    path = tmp_path / "aif.csv"
    path.write_text(header + "\n" + "\n".join(f"{5 * i},{0.1 * i}" for i in range(10)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"is a blood concentration - give the plasma concentration, "
                                         r"cp = cb / \(1 - Hct\)"):
        tables.read_aif_csv(str(path))


@pytest.mark.parametrize("unit,scale", [("s", 1.0), ("ms", 1e-3), ("min", 60.0)])
def test_a_slicer_sequence_nrrd_gives_its_index_values_as_frame_times(tmp_path, unit, scale):
    """Slicer writes a volume sequence as NRRD with ``axis 0 index values`` and the axis unit in the
    ``units`` field (Libs/MRML/Core/vtkMRMLVolumeSequenceStorageNode.cxx:102-159 at v5.8.1 reads them)."""
    sig = np.random.default_rng(0).random((3, 4, 5, 4)).astype(np.float32)
    values = " ".join(repr(v / scale) for v in (0, 5, 10, 15))
    header = ("NRRD0004\ntype: float\ndimension: 4\nspace: right-anterior-superior\nsizes: 4 5 4 3\n"
              "space directions: none (1,0,0) (0,1,0) (0,0,1)\nkinds: list domain domain domain\n"
              f'labels: "time" "" "" ""\nunits: "{unit}" "" "" ""\nendian: little\nencoding: raw\n'
              f"space origin: (0,0,0)\naxis 0 index type:=numeric\naxis 0 index values:={values}\n\n")
    path = tmp_path / "dce.seq.nrrd"
    path.write_bytes(header.encode() + sig.tobytes())
    s = series.read_dce(str(path))
    np.testing.assert_allclose(s.t_s, [0, 5, 10, 15])
    assert s.time_source == f"sequence index values ({unit})"
    path.write_bytes(header.replace(f'"{unit}"', '"mm"').encode() + sig.tobytes())
    with pytest.raises(ValueError, match=r"sequence index \(axis 0, unit 'mm'\) is not a time .*--frame-interval"):
        series.read_dce(str(path))
