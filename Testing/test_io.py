"""File input/output: 4D NIfTI with a JSON sidecar, 4D NRRD with MultiVolume keys, map writing,
segmentations, and bad files (the DICOM reader is tested in test_dicom.py)."""

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from DCEPerfusionLib.files import images, series

from conftest import GRID_SHAPE as SHAPE, GRID_T_S as T_S, grid_matrix as _matrix, grid_signal as _signal


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
