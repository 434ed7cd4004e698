"""File input/output: DICOM series with known timing in shuffled file order (Siemens, GE and Philips
conventions), 4D NIfTI with a JSON sidecar, 4D NRRD with MultiVolume keys, map writing, segmentations,
and bad files."""

import json
import os
import random

import numpy as np
import pytest
import SimpleITK as sitk

from DCEPerfusionLib.files import images, series

SHAPE = (4, 6, 8)   # K, J, I
T_S = np.array([0.0, 4.5, 9.0, 13.5, 18.0])


def _matrix():
    m = np.diag([0.8, 0.9, 3.0, 1.0])
    m[:3, 3] = [-12.0, 30.0, -7.5]
    return m


def _signal(seed=0):
    return np.random.default_rng(seed).integers(50, 900, SHAPE + (T_S.size,)).astype(np.float32)


def write_dicom_series(folder, signal, matrix, t_s, vendor="siemens", series_uid="1.2.826.0.1.3680043.2.1125.1",
                       tr_ms=4.2, flip_deg=14.0, start="101500.000000"):
    """A dynamic series as one 2D DICOM file per slice and frame, written in shuffled order.

    siemens: Acquisition Time only; ge: Trigger Time (ms); philips: Temporal Position Identifier
    + Trigger Time."""
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


def test_nifti_with_json_sidecar(tmp_path):
    signal = _signal(2)
    img = sitk.GetImageFromArray(np.moveaxis(signal, -1, 0), isVector=False)  # 4D (T, K, J, I) -> x, y, z, t
    m = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _matrix()
    img.SetSpacing(list(np.linalg.norm(m[:3, :3], axis=0)) + [4.5])
    d = np.eye(4)
    d[:3, :3] = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    img.SetDirection(d.ravel().tolist())
    img.SetOrigin(list(m[:3, 3]) + [0.0])
    path = str(tmp_path / "dce.nii.gz")
    sitk.WriteImage(img, path)
    with open(str(tmp_path / "dce.json"), "w") as f:
        json.dump({"RepetitionTimeExcitation": 0.0039, "FlipAngle": 12, "VolumeTiming": list(T_S + 30.0)}, f)
    s = series.read_dce(path)
    np.testing.assert_allclose(s.t_s, T_S)
    np.testing.assert_array_equal(s.signal, signal)
    np.testing.assert_allclose(s.ijk_to_ras, _matrix(), atol=1e-5)
    assert (s.tr_s, s.flip_angle_deg) == (0.0039, 12.0)
    os.remove(str(tmp_path / "dce.json"))
    with pytest.raises(ValueError, match="no frame times.*--frame-interval"):
        series.read_dce(path)
    with open(str(tmp_path / "dce.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="dce.json: not valid JSON"):
        series.read_dce(path)


def test_multivolume_nrrd(tmp_path):
    signal = _signal(3)
    header = ("NRRD0004\ntype: float\ndimension: 4\nspace: right-anterior-superior\n"
              f"sizes: {T_S.size} {SHAPE[2]} {SHAPE[1]} {SHAPE[0]}\n"
              "space directions: none (0.8,0,0) (0,0.9,0) (0,0,3)\nkinds: list domain domain domain\n"
              "endian: little\nencoding: raw\nspace origin: (-12,30,-7.5)\n"
              f"MultiVolume.FrameLabels:={','.join(str(int(1000 * t)) for t in T_S)}\n"
              "MultiVolume.DICOM.RepetitionTime:=4.1\nMultiVolume.DICOM.FlipAngle:=15\n\n")
    path = tmp_path / "dce.nrrd"
    path.write_bytes(header.encode() + signal.tobytes())
    s = series.read_dce(str(path))
    np.testing.assert_allclose(s.t_s, T_S)
    np.testing.assert_array_equal(s.signal, signal)
    np.testing.assert_allclose(s.ijk_to_ras, _matrix(), atol=1e-6)
    assert s.tr_s == pytest.approx(0.0041) and s.flip_angle_deg == 15.0
    path.write_bytes(header.encode() + signal.tobytes()[:1000])
    with pytest.raises(ValueError, match="cannot be read"):
        series.read_dce(str(path))


@pytest.mark.parametrize("name", ["vp.nrrd", "vp.nii.gz"])
def test_maps_keep_their_geometry(tmp_path, name):
    vp = np.random.default_rng(4).random(SHAPE).astype(np.float32)
    path = images.write_volume(str(tmp_path / name), vp, _matrix(), {"DCEPerfusion.Unit": "1"})
    arr, m = images.read_volume(path)
    np.testing.assert_array_equal(arr, vp)
    np.testing.assert_allclose(m, _matrix(), atol=1e-5)
    assert not [f for f in os.listdir(tmp_path) if "partial" in f]
    with pytest.raises(ValueError, match="write maps as"):
        images.write_volume(str(tmp_path / "vp.png"), vp, _matrix())


def test_segmentations_and_labelmaps(tmp_path):
    slicer = pytest.importorskip("slicer")
    from slicer import util

    from DCEPerfusionLib.scene import headless, output
    hs = headless.headless_scene()
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 2:4, 2:5] = 1
    labels[2, 4:6, 6:8] = 2
    label = hs.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    util.updateVolumeFromArray(label, labels)
    output.set_ijk_to_ras(label, _matrix())
    seg = hs.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg)
    seg.GetSegmentation().GetNthSegment(0).SetName("lesion")
    seg.GetSegmentation().GetNthSegment(1).SetName("aorta")
    storage = hs.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "lesions.seg.nrrd"))
    assert storage.WriteData(seg)
    masks, m = images.read_segmentation(str(tmp_path / "lesions.seg.nrrd"))
    assert set(masks) == {"lesion", "aorta"}
    on_grid = {k: images.resample_mask(v, m, SHAPE, _matrix()) for k, v in masks.items()}
    np.testing.assert_array_equal(on_grid["lesion"], labels == 1)
    np.testing.assert_array_equal(on_grid["aorta"], labels == 2)
    images.write_volume(str(tmp_path / "labels.nrrd"), labels, _matrix())
    masks, m = images.read_segmentation(str(tmp_path / "labels.nrrd"))
    assert set(masks) == {"label 1", "label 2"} and masks["label 1"].sum() == (labels == 1).sum()


def test_overlapping_segments_are_written_in_layers(tmp_path):
    a = np.zeros(SHAPE, bool)
    a[1:3, 1:4, 1:5] = True
    b = np.zeros(SHAPE, bool)
    b[2:4, 2:5, 3:7] = True                                 # overlaps a
    c = np.zeros(SHAPE, bool)
    c[0, 5, 7] = True                                       # one voxel, apart
    path = images.write_segmentation(str(tmp_path / "s.seg.nrrd"), {"a": a, "b": b, "c": c}, _matrix())
    masks, m = images.read_segmentation(path)
    for name, mask in (("a", a), ("b", b), ("c", c)):
        np.testing.assert_array_equal(masks[name], mask)
    np.testing.assert_allclose(m, _matrix(), atol=1e-6)
    pytest.importorskip("slicer")                           # and Slicer's own reader sees the same segments
    from DCEPerfusionLib.scene import headless
    from DCEPerfusionLib.scene.output import reference_volume, segment_masks
    hs = headless.headless_scene()
    seg = hs.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = hs.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    assert storage.ReadData(seg)
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 2
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    read = segment_masks(seg, ids, reference_volume(SHAPE, _matrix()))
    for name, mask in (("a", a), ("b", b), ("c", c)):
        np.testing.assert_array_equal(read[name], mask)
