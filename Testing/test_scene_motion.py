"""A motion correction in a real Slicer scene (the slicer-core wheel): the per-frame transforms as a sequence of
linear transform nodes browsed with the DCE, in Slicer's direction, their table, re-runs and removal.

Slicer behaviour these tests rely on (Slicer v5.8.1 source):
- a synchronised sequence's proxy shows the item at the master's selected index value, the nearest earlier
  one when none is equal (Modules/Loadable/Sequences/Logic/vtkSlicerSequencesLogic.cxx:327, :428), so the
  transform sequence must have the DCE's index values;
- the proxy is made on the first update after ``AddSynchronizedSequenceNode`` (the browser's ModifiedEvent,
  vtkSlicerSequencesLogic.cxx:733-736; vtkMRMLSequenceBrowserNode.cxx:847-868) and removed by
  ``RemoveSynchronizedSequenceNode`` (vtkMRMLSequenceBrowserNode.cxx:902, :767-778);
- an ITK (LPS) resampling transform is Slicer's transform *from parent* after Tras = lps2ras Tlps ras2lps
  (Libs/MRML/Core/vtkMRMLTransformStorageNode.cxx:465, vtkITKTransformConverter.h:257-268), and
  ``SetMatrixTransformFromParent`` stores the inverse as the transform to parent (vtkMRMLTransformNode.cxx:1609-1614).
"""

import dataclasses

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the scene tests need the slicer-core wheel (python3 run.py test)")
import vtk  # noqa: E402
from scipy import ndimage  # noqa: E402
from slicer import util  # noqa: E402

from DCEPerfusionLib.core import motion, multivolume, phantom  # noqa: E402
from DCEPerfusionLib.core.options import AnalysisOptions  # noqa: E402
from DCEPerfusionLib.scene import analysis, headless, render  # noqa: E402
from DCEPerfusionLib.scene import motion as scene_motion  # noqa: E402
from DCEPerfusionLib.scene import output as scene_output  # noqa: E402
from DCEPerfusionLib.scene import phantom as scene_phantom  # noqa: E402
from DCEPerfusionLib.scene.series import add_volume_sequence, index_values_in_time_order  # noqa: E402

SHAPE = (8, 48, 32)        # small: one rigid registration of the 24 frames takes a few seconds
N_FRAMES = 24
LESION = phantom.SPINE_LABELS["L2 metastasis"]
#: Registration error allowed for the lesion centre (mm); measured up to 0.8 mm on this phantom.
TOLERANCE_MM = 1.5


def _matrix(getter) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    getter(m)
    return util.arrayFromVTKMatrix(m)


@pytest.fixture(scope="module")
def moving():
    """The spine phantom (anatomy that varies across slices) moved by breathing and a step; the truth
    ``transforms_lps`` (reference position -> frame, LPS) and the still series."""
    ph = phantom.make_spine_phantom(shape=SHAPE, snr=30.0, vertebra_width_slices=5, n_frames=N_FRAMES,
                                    frame_s=5.0, bolus_s=20.0)
    matrix = scene_phantom.oblique_matrix(spacing_mm=(1.5, 1.5, 4.0))   # oblique: RAS/LPS mix-ups show
    truth = motion.euler_matrix(phantom.breathing_and_step_motion(ph.t_s), motion.centre_lps(SHAPE, matrix))
    moved = dataclasses.replace(ph, signal=phantom.move_series(ph.signal, matrix, truth))
    return {"still": ph, "moved": moved, "matrix": matrix, "truth_lps": truth}


def _add_study(hs, moving):
    return scene_phantom.add_phantom(hs.scene, moving["moved"], matrix=moving["matrix"], segments={"L2": LESION})


def _inputs(nodes, acq, correction, label="baseline"):
    inputs = analysis.SceneInputs(dce_sequence=nodes.sequence, anatomy=nodes.anatomy, segmentation=nodes.segmentation,
                                  lesion_segment_ids=[nodes.segment_ids["L2"]], exam_label=label)
    options = AnalysisOptions(n_baseline=acq["n_baseline"], t10_s=1.4, r1_per_mM_s=acq["r1_per_mM_s"],
                              aif_source="parker", hct=acq["hct"], motion_correction=correction, uncertainty=False,
                              fit_lesions_only=True)
    return inputs, options


@pytest.fixture(scope="module")
def study(moving):
    """One rigid run (the only registration of this module), shared by the tests that only read the scene."""
    hs = headless.headless_scene()
    nodes = _add_study(hs, moving)
    out = analysis.run_analysis(hs.scene, *_inputs(nodes, moving["moved"].acquisition, "rigid"))
    return hs, nodes, out


def _lesion_centre_ras(moving):
    k, j, i = np.nonzero(moving["still"].labels == LESION)
    return (moving["matrix"] @ np.array([i.mean(), j.mean(), k.mean(), 1.0]))[:3]


def _motion_nodes(scene):
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
            if (scene.GetNthNode(i).GetAttribute(scene_output.ROLE_ATTRIBUTE) or "").startswith("motion")]


def test_one_transform_per_frame_in_slicers_direction(study):
    hs, nodes, out = study
    est = out.exam.motion
    seq = out.motion_transforms
    assert seq.GetName() == "motion (baseline)" and seq.IsA("vtkMRMLSequenceNode")
    assert scene_output.find_output(hs.scene, scene_motion.TRANSFORMS_ROLE, "baseline") is seq
    dce = nodes.sequence
    assert seq.GetNumberOfDataNodes() == dce.GetNumberOfDataNodes() == N_FRAMES == len(est.transforms_lps)
    assert (seq.GetIndexName(), seq.GetIndexUnit(), seq.GetIndexType()) == \
        (dce.GetIndexName(), dce.GetIndexUnit(), dce.GetIndexType())
    assert [seq.GetNthIndexValue(f) for f in range(N_FRAMES)] == [dce.GetNthIndexValue(f) for f in range(N_FRAMES)]
    for f in range(N_FRAMES):
        item = seq.GetNthDataNode(f)
        assert item.IsA("vtkMRMLLinearTransformNode")
        from_parent = motion.LPS @ est.transforms_lps[f] @ motion.LPS          # reference RAS -> frame RAS
        np.testing.assert_allclose(_matrix(item.GetMatrixTransformFromParent), from_parent, atol=1e-9)
        np.testing.assert_allclose(_matrix(item.GetMatrixTransformToParent), np.linalg.inv(from_parent), atol=1e-9)
    assert not np.allclose(est.transforms_lps[0], np.eye(4), atol=1e-3)    # the phantom did move
    assert float(seq.GetAttribute(scene_motion.MAX_DISPLACEMENT_MM_ATTRIBUTE)) == \
        pytest.approx(est.max_displacement_mm, rel=1e-5)
    assert float(seq.GetAttribute(scene_motion.MAX_DISPLACEMENT_VOXELS_ATTRIBUTE)) == \
        pytest.approx(est.max_displacement_voxels, rel=1e-5)
    assert est.max_displacement_voxels > 1 and any(w.startswith("motion:") for w in out.exam.warnings)


def test_the_transform_proxy_follows_the_frame_slider(study):
    hs, nodes, out = study
    seq, browser = out.motion_transforms, nodes.browser
    assert browser.IsSynchronizedSequenceNode(seq) and browser.GetMasterSequenceNode() is nodes.sequence
    proxy = browser.GetProxyNode(seq)
    assert proxy is not None and proxy.IsA("vtkMRMLLinearTransformNode")
    assert scene_motion.transform_proxies(hs.scene, seq) == [proxy]
    for f in (0, N_FRAMES // 2, N_FRAMES - 1, 3):
        browser.SetSelectedItemNumber(f)
        np.testing.assert_allclose(_matrix(proxy.GetMatrixTransformToParent),
                                   _matrix(seq.GetNthDataNode(f).GetMatrixTransformToParent), atol=1e-12)


def test_motion_table_holds_the_rows_of_motion_csv(study):
    _, _, out = study
    rows = out.exam.motion.rows(out.exam.t_s)
    table = out.motion_table
    assert table.GetName() == "motion parameters (baseline)"
    assert table.GetNumberOfRows() == N_FRAMES
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == ["frame", "time_s", "tx_mm", "ty_mm", "tz_mm", "rx_deg", "ry_deg", "rz_deg", "displacement_mm"]
    assert [table.GetColumnUnitLabel(n) for n in names] == ["", "s", "mm", "mm", "mm", "deg", "deg", "deg", "mm"]
    for name in names:
        np.testing.assert_allclose(util.arrayFromTableColumn(table, name), [r[name] for r in rows], rtol=1e-12)
    assert float(table.GetAttribute(scene_motion.MAX_DISPLACEMENT_MM_ATTRIBUTE)) == \
        pytest.approx(max(r["displacement_mm"] for r in rows), rel=1e-5)


def test_a_frame_under_its_transform_lands_in_the_reference_position(study, moving):
    """Direction check against the phantom's truth: the lesion centre as frame f shows it goes back to where the
    reference (and the segmentation) has it, through Slicer's own transform chain of the DCE proxy volume."""
    hs, nodes, out = study
    browser, seq = nodes.browser, out.motion_transforms
    centre = _lesion_centre_ras(moving)
    truth_ras = np.einsum("ij,fjk,kl->fil", motion.LPS, moving["truth_lps"], motion.LPS)   # reference -> frame
    in_frame = (truth_ras @ np.r_[centre, 1.0])[:, :3]
    f = int(np.argmax(np.linalg.norm(in_frame - centre, axis=1)))
    assert np.linalg.norm(in_frame[f] - centre) > 3 * TOLERANCE_MM        # the wrong direction would fail below
    browser.SetSelectedItemNumber(f)
    volume = browser.GetProxyNode(nodes.sequence)
    try:
        assert scene_motion.show_corrected_frames(hs.scene, nodes.sequence, seq) == 1
        transform = volume.GetParentTransformNode()
        assert transform is browser.GetProxyNode(seq)
        to_world = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(transform, None, to_world)
        assert np.linalg.norm(np.array(to_world.TransformPoint(*in_frame[f])) - centre) < TOLERANCE_MM
        # the image: frame f sampled through the transform matches the still phantom's frame f
        world_to_local = _matrix(lambda m: slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, transform,
                                                                                                    m))
        ras_to_ijk = _matrix(volume.GetRASToIJKMatrix)
        k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
        ijk = np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
        src = (ras_to_ijk @ world_to_local @ moving["matrix"] @ ijk)[:3]
        frame = util.arrayFromVolume(volume).astype(float)
        aligned = ndimage.map_coordinates(frame, src[::-1], order=3, mode="nearest").reshape(SHAPE)
        still = moving["still"].signal[..., f]
        inside = np.all((src > 1) & (src < np.array(SHAPE[::-1])[:, None] - 2), axis=0).reshape(SHAPE)
        inside[:1] = inside[-1:] = False
        err_aligned = np.mean(np.abs(aligned - still)[inside])
        err_raw = np.mean(np.abs(frame - still)[inside])
        assert err_aligned < 0.5 * err_raw, (err_aligned, err_raw)
        assert scene_motion.show_corrected_frames(hs.scene, nodes.sequence, seq, corrected=False) == 1
        assert volume.GetParentTransformNode() is None
    finally:
        volume.SetAndObserveTransformNodeID(None)


def test_slicer_shows_the_corrected_frame_in_the_reference_position(study, moving):
    """What the user sees: Slicer's own slice logic draws the DCE proxy (frame f) under the transform proxy; in
    the same field of view that picture matches the still phantom's frame f, the uncorrected one does not."""
    hs, nodes, out = study
    browser, seq = nodes.browser, out.motion_transforms
    f = int(np.argmax(out.exam.motion.displacement_mm))
    browser.SetSelectedItemNumber(f)
    volume = browser.GetProxyNode(nodes.sequence)
    still = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "still frame")
    try:
        util.updateVolumeFromArray(still, moving["still"].signal[..., f].astype(np.float32))
        scene_output.set_ijk_to_ras(still, moving["matrix"])
        high = float(np.percentile(moving["still"].signal[..., f], 99.5))
        for node in (volume, still):
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetAutoWindowLevel(False)
            node.GetDisplayNode().SetWindowLevelMinMax(0.0, high)
        view = dict(ras_point=_lesion_centre_ras(moving), orientation="Sagittal", size=(128, 128), fit_to=still)
        pictures = {}
        for corrected in (False, True):
            scene_motion.show_corrected_frames(hs.scene, nodes.sequence, seq, corrected)
            pictures[corrected] = render.render_slice(hs.scene, hs.app_logic, volume, **view).mean(axis=-1)
        reference = render.render_slice(hs.scene, hs.app_logic, still, **view).mean(axis=-1)
        common = (pictures[False] > 5) & (pictures[True] > 5) & (reference > 5)     # inside all three volumes
        assert common.sum() > 0.2 * common.size
        raw, aligned = (np.mean(np.abs(pictures[c] - reference)[common]) for c in (False, True))
        assert aligned < 0.3 * raw, (aligned, raw)            # measured: 4.1 vs 31 grey levels
    finally:
        volume.SetAndObserveTransformNodeID(None)
        hs.scene.RemoveNode(still)


def test_rerun_replaces_and_a_run_without_correction_removes_the_motion_outputs(study, moving):
    """On a second scene (the shared one stays as it is): the same result written twice with the same label
    keeps one sequence, one table and one proxy; another label adds its own; a re-run without correction
    removes that label's motion outputs and proxy; the inputs are untouched."""
    exam = study[2].exam
    hs = headless.headless_scene()
    nodes = _add_study(hs, moving)
    scene = hs.scene
    frame0 = util.arrayFromVolume(nodes.sequence.GetNthDataNode(0)).copy()
    first = analysis.write_exam(scene, exam, "baseline", nodes.anatomy, dce_sequence=nodes.sequence)
    again = analysis.write_exam(scene, exam, "baseline", nodes.anatomy, dce_sequence=nodes.sequence)
    assert again.motion_transforms is first.motion_transforms and again.motion_table is first.motion_table
    assert len(_motion_nodes(scene)) == 2
    assert scene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode") == 1     # the one proxy
    assert nodes.browser.GetNumberOfSynchronizedSequenceNodes() == 1
    assert first.motion_transforms.GetNumberOfDataNodes() == N_FRAMES
    other = analysis.write_exam(scene, exam, "follow-up", nodes.anatomy, dce_sequence=nodes.sequence)
    assert other.motion_transforms.GetName() == "motion (follow-up)"
    assert len(_motion_nodes(scene)) == 4 and nodes.browser.GetNumberOfSynchronizedSequenceNodes() == 2
    assert scene_motion.show_corrected_frames(scene, nodes.sequence, first.motion_transforms) == 1   # shown corrected

    out = analysis.run_analysis(scene, *_inputs(nodes, moving["moved"].acquisition, "none"))
    assert out.exam.motion is None and out.motion_transforms is None and out.motion_table is None
    assert scene_output.find_output(scene, scene_motion.TRANSFORMS_ROLE, "baseline") is None
    assert scene_output.find_output(scene, scene_motion.TABLE_ROLE, "baseline") is None
    assert [n.GetName() for n in _motion_nodes(scene)] == ["motion (follow-up)", "motion parameters (follow-up)"]
    assert scene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode") == 1     # only follow-up's proxy
    assert nodes.browser.IsSynchronizedSequenceNode(other.motion_transforms)
    assert nodes.browser.GetNumberOfSynchronizedSequenceNodes() == 1
    # inputs untouched
    assert nodes.browser.GetMasterSequenceNode() is nodes.sequence
    assert nodes.sequence.GetNumberOfDataNodes() == N_FRAMES
    assert nodes.sequence.GetAttribute(scene_output.ROLE_ATTRIBUTE) is None
    np.testing.assert_array_equal(util.arrayFromVolume(nodes.sequence.GetNthDataNode(0)), frame0)
    assert nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 1
    assert nodes.browser.GetProxyNode(nodes.sequence).GetParentTransformNode() is None   # its transform went too


def test_the_transforms_survive_a_scene_bundle(study, tmp_path):
    """Saved in a .mrb and loaded back: the items of a sequence are written as the MRML of its own scene, a linear
    transform as its matrix to parent in a stream of default precision, 6 significant digits
    (vtkMRMLLinearTransformNode.cxx:44-70, Slicer 5.8.1) - micrometres, far below a voxel."""
    hs, nodes, out = study
    loaded = headless.load_bundle(headless.save_bundle(hs.scene, str(tmp_path / "motion.mrb")))
    seq = scene_output.find_output(loaded.scene, scene_motion.TRANSFORMS_ROLE, "baseline")
    assert seq is not None and seq.GetNumberOfDataNodes() == N_FRAMES
    for f in (0, N_FRAMES - 1):
        np.testing.assert_allclose(_matrix(seq.GetNthDataNode(f).GetMatrixTransformToParent),
                                   _matrix(out.motion_transforms.GetNthDataNode(f).GetMatrixTransformToParent),
                                   rtol=1e-5, atol=1e-5)
    browsers = scene_output.browsers_of(loaded.scene, seq)
    assert len(browsers) == 1 and browsers[0].GetMasterSequenceNode().GetName() == nodes.sequence.GetName()


def test_frames_of_a_sequence_out_of_time_order_get_their_own_transform(moving):
    """The transform of frame f (time order, as the series is read) is put at the index value of the DCE item
    that is frame f - here a sequence indexed by acquisition number whose frame labels run backwards."""
    hs = headless.headless_scene()
    ph = moving["still"]
    n = 4
    signal = np.asarray(ph.signal[..., :n], dtype=np.float32)
    times_ms = [15000, 10000, 5000, 0]                       # item k was acquired at times_ms[k]
    seq, browser = add_volume_sequence(hs.scene, "backwards", signal, moving["matrix"], [str(k) for k in range(n)],
                                       "frame", "", attributes={multivolume.FRAME_LABELS: ",".join(map(str, times_ms))})
    assert index_values_in_time_order(seq) == ["3", "2", "1", "0"]
    est = motion.estimate("rigid", moving["truth_lps"][:n], SHAPE, moving["matrix"], [n - 1])
    transforms, table = scene_motion.write_motion(hs.scene, est, np.array([0.0, 5.0, 10.0, 15.0]), "x", seq)
    assert browser.IsSynchronizedSequenceNode(transforms)
    for f in range(n):
        item = transforms.GetDataNodeAtValue(str(n - 1 - f))
        np.testing.assert_allclose(_matrix(item.GetMatrixTransformFromParent),
                                   motion.LPS @ moving["truth_lps"][f] @ motion.LPS, atol=1e-9)
    with pytest.raises(ValueError, match="has 4 frames, the motion correction 3 - write the result with the sequence"):
        scene_motion.write_motion(hs.scene, motion.estimate("rigid", moving["truth_lps"][:3], SHAPE,
                                                            moving["matrix"], [2]), [0.0, 5.0, 10.0], "x", seq)
    assert scene_output.find_output(hs.scene, scene_motion.TRANSFORMS_ROLE, "x") is transforms
