"""The MRML adapter on a real Slicer scene (the slicer-core wheel): a synthetic DCE study with an
oblique geometry and MultiVolume attributes goes through the same logic the module uses."""

import dataclasses
import logging

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the scene tests need the slicer-core wheel (python3 run.py test)")
from slicer import util  # noqa: E402

from conftest import KTRANS_TOL, VE_TOL, VP_TOL, within  # noqa: E402
from DCEPerfusionLib import fitting, phantom, regionstats, registry  # noqa: E402
from DCEPerfusionLib.core import multivolume  # noqa: E402
from DCEPerfusionLib.core.geometry import Volume, t1_on_grid  # noqa: E402
from DCEPerfusionLib.core.options import AnalysisOptions  # noqa: E402
from DCEPerfusionLib.scene import analysis, headless, render  # noqa: E402
from DCEPerfusionLib.scene import output as scene_output  # noqa: E402
from DCEPerfusionLib.scene import phantom as scene_phantom  # noqa: E402
from DCEPerfusionLib.scene.series import frame_times_s, read_sequence  # noqa: E402

SHAPE = (4, 24, 28)  # phantom (K, J, I)


@pytest.fixture
def hs():
    """A fresh headless scene with the module logics attached."""
    return headless.headless_scene()


@pytest.fixture(scope="module")
def ph():
    return phantom.make_phantom(shape=SHAPE, snr=60.0, seed=3)


def _t1_node(hs, ph, nodes, scale=1.0):
    node = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 map")
    util.updateVolumeFromArray(node, (ph.t10_s * scale).astype(np.float32))
    scene_output.set_ijk_to_ras(node, nodes.ijk_to_ras)
    return node


SCENE_FIELDS = {f.name for f in dataclasses.fields(analysis.SceneInputs)}


def _inputs(ph, nodes, t1=None, **kw):
    """(scene inputs, analysis options) of a run on the phantom; ``kw`` may set fields of either."""
    acq = ph.acquisition
    args = dict(dce_sequence=nodes.sequence, n_baseline=acq["n_baseline"], anatomy=nodes.anatomy, t1_map=t1,
                segmentation=nodes.segmentation, lesion_segment_ids=[nodes.lesion_segment_id], aif_source="segment",
                aif_segment_id=nodes.artery_segment_id, r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"],
                exam_label="baseline")
    args.update(kw)
    return (analysis.SceneInputs(**{k: v for k, v in args.items() if k in SCENE_FIELDS}),
            AnalysisOptions(**{k: v for k, v in args.items() if k not in SCENE_FIELDS}))


@pytest.fixture
def study(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    t1 = _t1_node(hs, ph, nodes)
    out = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1))
    return hs, nodes, t1, out


def test_read_sequence_uses_frame_labels_and_dicom_attributes(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    series = read_sequence(nodes.sequence)
    assert series.time_source.startswith("MultiVolume.FrameLabels")
    np.testing.assert_allclose(series.t_s, ph.t_s)
    assert series.tr_s == pytest.approx(ph.acquisition["tr_s"])
    assert series.flip_angle_deg == pytest.approx(ph.acquisition["flip_angle_deg"])
    np.testing.assert_allclose(series.signal, ph.signal.astype(np.float32))
    np.testing.assert_allclose(series.ijk_to_ras, nodes.ijk_to_ras, atol=1e-9)


def test_frame_times_from_index_values_and_units(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph, with_attributes=False)
    t, source = frame_times_s(nodes.sequence)
    assert "index values (s)" in source
    np.testing.assert_allclose(t, ph.t_s)
    nodes.sequence.SetIndexUnit("ms")
    np.testing.assert_allclose(frame_times_s(nodes.sequence)[0], ph.t_s / 1000)
    nodes.sequence.SetIndexUnit("")
    with pytest.raises(ValueError, match="no frame times.*frame interval"):
        read_sequence(nodes.sequence)
    t, source = frame_times_s(nodes.sequence, frame_interval_s=2.5)
    np.testing.assert_allclose(t, 2.5 * np.arange(ph.t_s.size))


def test_frame_labels_in_the_importers_units_and_a_contradicting_interval(hs, ph):
    """MultiVolumeImporter writes FrameLabels in FrameIdentifyingDICOMTagUnits (MultiVolumeImporterPlugin.py
    lines 63-78 and 968 at 144b2e4): "ms" for the times, "sec" for DeltaStartTime, "count" for Temporal
    Position Identifier - which is no time and must not become 0.001 s frames."""
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    seq = nodes.sequence
    seq.SetAttribute(multivolume.FRAME_LABELS, ",".join(f"{t:g}" for t in ph.t_s))
    seq.SetAttribute(multivolume.TAG_UNITS_KEY, "sec")
    np.testing.assert_allclose(read_sequence(seq).t_s, ph.t_s)
    seq.SetAttribute(multivolume.FRAME_LABELS, ",".join(str(i + 1) for i in range(ph.t_s.size)))
    seq.SetAttribute(multivolume.TAG_UNITS_KEY, "count")
    seq.SetAttribute(multivolume.TAG_NAME_KEY, "TemporalPositionIdentifier")
    with pytest.raises(ValueError, match=r"FrameLabels are in 'count' \(TemporalPositionIdentifier\), not a time"):
        read_sequence(seq)
    np.testing.assert_allclose(read_sequence(seq, frame_interval_s=5.0).t_s, ph.t_s)
    seq.SetAttribute(multivolume.FRAME_LABELS, ",".join(f"{1000 * t:g}" for t in ph.t_s))
    seq.SetAttribute(multivolume.TAG_UNITS_KEY, "ms")
    with pytest.raises(ValueError, match="the given frame interval 2.5 s contradicts the frame times"):
        read_sequence(seq, frame_interval_s=2.5)
    forced = read_sequence(seq, frame_interval_s=2.5, override_frame_times=True)
    np.testing.assert_allclose(forced.t_s, 2.5 * np.arange(ph.t_s.size))
    assert "agrees" in read_sequence(seq, frame_interval_s=5.0).time_source


def test_maps_match_truth_with_the_dce_geometry(study, ph):
    hs, nodes, _, out = study
    lesion = nodes.labels == phantom.LABELS["lesion"]
    tissue = np.isin(nodes.labels, [phantom.LABELS["lesion"], phantom.LABELS["muscle"]])
    truth = nodes.truth
    for key, tol in (("ktrans", KTRANS_TOL), ("ve", VE_TOL), ("vp", VP_TOL)):
        node = out.map_nodes[key]
        arr = util.arrayFromVolume(node)
        ok = within(arr[tissue], truth[key][tissue], **tol)
        assert ok.mean() > 0.97, f"{key}: {ok.mean():.3f} of tissue voxels within OSIPI tolerance"
        assert within(np.median(arr[lesion]), np.median(truth[key][lesion]), **tol)
        # exactly the DCE grid: Slicer's own geometry comparison finds nothing to report
        frame = nodes.sequence.GetNthDataNode(0)
        assert hs.logics["Volumes"].CompareVolumeGeometry(node, frame) == ""
        np.testing.assert_allclose(scene_output.ijk_to_ras(node), nodes.ijk_to_ras, atol=1e-9)
    assert set(out.map_nodes) == {"ktrans", "ve", "vp", "kep", "ktrans_se", "ve_se", "vp_se", "kep_se", "r2", "status"}
    assert out.map_nodes["vp"].GetName() == "vp (baseline)"
    for name in ("ktrans_se", "vp_se"):                  # the standard errors: unit, window and name from the registry
        node, info = out.map_nodes[name], registry.MAPS[name]
        assert node.GetAttribute("DCEPerfusion.Unit") == info.unit == registry.MAPS[name[:-3]].unit
        assert (node.GetDisplayNode().GetWindowLevelMin(), node.GetDisplayNode().GetWindowLevelMax()) == info.window
        assert node.GetName() == f"{info.title} (baseline)"
        fitted = out.result.maps["status"] == 0
        np.testing.assert_allclose(util.arrayFromVolume(node)[fitted], out.result.maps[name][fitted], rtol=1e-6)
    status = util.arrayFromVolume(out.map_nodes["status"])
    np.testing.assert_array_equal(status, out.result.maps["status"])


def test_map_display_colour_legend_and_overlay(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    t1 = _t1_node(hs, ph, nodes)
    red = hs.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    red.SetLayoutName("Red")
    out = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, overlay_map="ktrans", overlay_opacity=0.4))
    vp = out.map_nodes["vp"]
    display = vp.GetDisplayNode()
    colour = display.GetColorNode()
    assert colour.GetName() == scene_output.BUILT_VIRIDIS_NAME and colour.GetNumberOfColors() == 256
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == registry.MAPS["vp"].window
    assert display.GetApplyThreshold() and display.GetLowerThreshold() > 0
    legends = [vp.GetNthDisplayNode(i) for i in range(vp.GetNumberOfDisplayNodes())
               if vp.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode")]
    assert len(legends) == 1 and legends[0].GetTitleText().startswith("vp")
    assert red.GetForegroundVolumeID() == out.map_nodes["ktrans"].GetID()
    assert red.GetBackgroundVolumeID() == nodes.anatomy.GetID()
    assert red.GetForegroundOpacity() == pytest.approx(0.4)


def test_statistics_table_equals_numpy_on_the_same_mask(study):
    hs, nodes, _, out = study
    lesion = nodes.labels == phantom.LABELS["lesion"]
    masks = scene_output.segment_masks(nodes.segmentation, [nodes.lesion_segment_id], out.map_nodes["vp"])
    np.testing.assert_array_equal(masks["lesion"], lesion)  # the export on the map grid is the drawn lesion
    table = out.statistics_table
    assert table.GetNumberOfRows() == len(registry.MODELS["extended_tofts"].maps) + 1  # + r2
    col = {table.GetColumnName(c): c for c in range(table.GetNumberOfColumns())}
    voxel_mm3 = abs(np.linalg.det(nodes.ijk_to_ras[:3, :3]))
    for r in range(table.GetNumberOfRows()):
        name = table.GetCellText(r, col["Map"])
        assert table.GetCellText(r, col["Segment"]) == "lesion"
        assert table.GetCellText(r, col["Unit"]) == registry.MAPS[name].unit
        v = out.result.maps[name][lesion]
        cell = lambda c: table.GetTable().GetValue(r, col[c]).ToDouble()  # noqa: E731
        assert int(cell("voxel_count")) == v.size
        assert cell("volume_cm3") == pytest.approx(v.size * voxel_mm3 / 1000)
        assert cell("mean") == pytest.approx(v.mean(), rel=1e-6)
        assert cell("stdev") == pytest.approx(v.std(ddof=1), rel=1e-6)
        assert cell("median") == pytest.approx(np.median(v), rel=1e-6)
        assert cell("percentile_90") == pytest.approx(np.percentile(v, 90), rel=1e-6)
        assert cell("min") == pytest.approx(v.min(), rel=1e-6) and cell("max") == pytest.approx(v.max(), rel=1e-6)
    assert table.GetColumnUnitLabel("volume_cm3") == "cm3"


def test_statistics_leave_out_failed_voxels_and_count_them():
    maps = {"vp": np.array([[0.1, np.nan, 0.3, 0.5]]), "status": np.array([[0, 3, 0, 0]])}
    masks = {"lesion": np.array([[True, True, True, False]]), "empty": np.zeros((1, 4), bool)}
    rows = regionstats.region_statistics(maps, masks, voxel_volume_mm3=2.0)
    lesion, empty = rows
    assert (lesion.voxel_count, lesion.excluded_voxel_count) == (2, 1)
    assert lesion.values["mean"] == pytest.approx(0.2) and lesion.volume_cm3 == pytest.approx(0.004)
    assert empty.voxel_count == 0 and np.isnan(empty.values["mean"])


def test_plot_series_reference_the_curve_table(study):
    hs, nodes, _, out = study
    table, chart = out.curves_table, out.chart
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == ["time_s", "AIF plasma", "lesion mean C", "lesion fit"]
    np.testing.assert_allclose(util.arrayFromTableColumn(table, "time_s"), out.t_s)
    np.testing.assert_allclose(util.arrayFromTableColumn(table, "AIF plasma"), out.cp)
    lesion = nodes.labels == phantom.LABELS["lesion"]
    mean_c = util.arrayFromTableColumn(table, "lesion mean C")
    fit_c = util.arrayFromTableColumn(table, "lesion fit")
    assert np.max(np.abs(mean_c - fit_c)) < 0.05 * mean_c.max()  # the fit follows the measured mean
    assert lesion.any()
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    for i in range(3):
        series = chart.GetNthPlotSeriesNode(i)
        assert series.GetTableNode() is table
        assert series.GetXColumnName() == "time_s"
        assert series.GetYColumnName() in names[1:]
    assert chart.GetXAxisTitle() == "time (s)"


def test_rerun_replaces_its_outputs_and_keeps_the_inputs(study, ph):
    hs, nodes, t1, out = study
    before = hs.scene.GetNumberOfNodes()
    signal = read_sequence(nodes.sequence).signal.copy()
    anatomy = util.arrayFromVolume(nodes.anatomy).copy()
    out2 = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1))
    assert hs.scene.GetNumberOfNodes() == before
    assert out2.map_nodes["vp"] is out.map_nodes["vp"]
    np.testing.assert_array_equal(read_sequence(nodes.sequence).signal, signal)
    np.testing.assert_array_equal(util.arrayFromVolume(nodes.anatomy), anatomy)
    # another exam label writes a second set next to the first
    out3 = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, exam_label="follow-up"))
    assert out3.map_nodes["vp"].GetName() == "vp (follow-up)" and out3.map_nodes["vp"] is not out.map_nodes["vp"]


def test_rerun_with_another_model_removes_the_maps_it_no_longer_makes(study, ph):
    hs, nodes, t1, out = study
    assert out.aif_segmentation is not None and out.statistics_table is not None
    out2 = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, model="patlak", aif_source="parker",
                                                    lesion_segment_ids=[]))
    names = {hs.scene.GetNthNode(i).GetName() for i in range(hs.scene.GetNumberOfNodes())}
    assert {"Ktrans (baseline)", "vp (baseline)"} <= names
    assert not names & {"ve (baseline)", "kep (baseline)", "DCE statistics (baseline)", "AIF voxels (baseline)"}
    assert out2.map_nodes["ktrans"] is out.map_nodes["ktrans"]
    assert util.arrayFromVolume(nodes.anatomy).size  # inputs untouched


def test_bundle_reloads_in_a_fresh_scene(study, ph, tmp_path):
    hs, nodes, _, out = study
    for name in ("scene.mrb", "mrml/scene.mrml"):
        path = headless.save_bundle(hs.scene, str(tmp_path / name))
        fresh = headless.load_bundle(path)
        for key, node in out.map_nodes.items():
            loaded = fresh.scene.GetFirstNodeByName(node.GetName())
            assert loaded is not None, f"{name}: {node.GetName()} missing"
            np.testing.assert_array_equal(util.arrayFromVolume(loaded), util.arrayFromVolume(node))
            np.testing.assert_allclose(scene_output.ijk_to_ras(loaded), nodes.ijk_to_ras, atol=1e-6)
        table = fresh.scene.GetFirstNodeByName(out.statistics_table.GetName())
        assert table.GetNumberOfRows() == out.statistics_table.GetNumberOfRows()
        assert table.GetCellText(0, 6) == out.statistics_table.GetCellText(0, 6)
        seq = fresh.scene.GetFirstNodeByName(nodes.sequence.GetName())
        assert seq.GetNumberOfDataNodes() == ph.t_s.size
        assert seq.GetAttribute(multivolume.FRAME_LABELS) == nodes.sequence.GetAttribute(multivolume.FRAME_LABELS)
        seg = fresh.scene.GetFirstNodeByName(nodes.segmentation.GetName())
        assert seg.GetSegmentation().GetNumberOfSegments() == 2


def test_png_shows_the_overlay_inside_the_lesion(study, tmp_path):
    hs, nodes, _, out = study
    lesion = nodes.labels == phantom.LABELS["lesion"]
    kji = np.argwhere(lesion).mean(axis=0)
    centre = (nodes.ijk_to_ras @ np.r_[kji[::-1], 1.0])[:3]
    png = tmp_path / "overlay.png"
    with_map = render.render_slice(hs.scene, hs.app_logic, nodes.anatomy, out.map_nodes["vp"], str(png),
                                        ras_point=centre, size=(200, 200))
    plain = render.render_slice(hs.scene, hs.app_logic, nodes.anatomy, None, ras_point=centre,
                                     size=(200, 200))
    assert png.stat().st_size > 1000 and with_map.shape == (200, 200, 3)
    centre_px = with_map[95:105, 95:105].astype(int)  # the slice is centred on the lesion
    assert np.abs(centre_px - plain[95:105, 95:105]).mean() > 20
    assert plain.std() > 0  # the anatomy itself is drawn


def test_automatic_aif_is_shown_as_a_segment(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    t1 = _t1_node(hs, ph, nodes)
    out = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, aif_source="automatic", aif_segment_id=None))
    seg = out.aif_segmentation
    assert seg is not None and seg.GetSegmentation().GetNumberOfSegments() == 1
    ref = out.map_nodes["vp"]
    mask = next(iter(scene_output.segment_masks(seg, [seg.GetSegmentation().GetNthSegmentID(0)], ref).values()))
    artery = nodes.labels == phantom.LABELS["artery"]
    assert mask.sum() >= 3 and (mask & artery).sum() / mask.sum() > 0.8
    assert "automatic" in out.aif_description


def test_blood_t10_is_used_inside_the_aif_segment(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    tissue_only = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t10_s=1.6, fit_lesions_only=True))
    with_blood = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t10_s=1.6, blood_t10_s=1.9, fit_lesions_only=True))
    err = lambda cp: np.max(np.abs(cp - ph.cp)) / ph.cp.max()  # noqa: E731
    assert err(with_blood.cp) < 0.05 < err(tissue_only.cp)  # the phantom's blood T10 is 1.9 s
    with pytest.raises(ValueError, match="blood T10"):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, blood_t10_s=-1.0))


def test_population_aif_and_t1_map_in_ms(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    t1_ms = _t1_node(hs, ph, nodes, scale=1000.0)
    out = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1_ms, aif_source="parker", aif_segment_id=None))
    lesion = nodes.labels == phantom.LABELS["lesion"]
    # the phantom's AIF is Parker's starting after the baseline, so the population AIF is exact here
    np.testing.assert_allclose(out.cp, ph.cp, atol=1e-9)
    assert within(np.median(out.result.maps["vp"][lesion]), np.median(nodes.truth["vp"][lesion]), **VP_TOL)


def test_t1_map_and_segmentation_on_other_grids_are_resampled(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    # T1 map on a grid twice as fine in-plane: a linear ramp survives trilinear resampling exactly
    fine = nodes.ijk_to_ras.copy()
    fine[:3, :2] /= 2
    fine[:3, 3] -= 0.25 * (nodes.ijk_to_ras[:3, 0] + nodes.ijk_to_ras[:3, 1])  # voxel centres line up
    k, j, i = np.mgrid[:4, :48, :56]
    t1 = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fine T1")
    util.updateVolumeFromArray(t1, (1.2 + 0.004 * i + 0.002 * j).astype(np.float32))
    scene_output.set_ijk_to_ras(t1, fine)
    on_grid, unit = t1_on_grid(Volume(util.arrayFromVolume(t1), scene_output.ijk_to_ras(t1), "fine T1"), (4, 24, 28),
                               nodes.ijk_to_ras)
    assert unit == "s"
    kk, jj, ii = np.mgrid[:4, :24, :28]
    expect = 1.2 + 0.004 * (2 * ii + 0.5) + 0.002 * (2 * jj + 0.5)
    inside = (ii < 27) & (jj < 23)
    np.testing.assert_allclose(on_grid[inside], expect[inside], atol=1e-5)
    # a segment drawn on the fine grid is exported onto the DCE grid
    seg = hs.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "fine seg")
    label = hs.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "fine label")
    util.updateVolumeFromArray(label, ((i >= 20) & (i < 40) & (j >= 10) & (j < 30)).astype(np.uint8))
    scene_output.set_ijk_to_ras(label, fine)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg)
    ref = scene_output.reference_volume((4, 24, 28), nodes.ijk_to_ras)
    mask = next(iter(scene_output.segment_masks(seg, [seg.GetSegmentation().GetNthSegmentID(0)], ref).values()))
    np.testing.assert_array_equal(mask, (ii >= 10) & (ii < 20) & (jj >= 5) & (jj < 15))


def test_4d_nrrd_with_multivolume_keys_reads_as_a_sequence(hs, tmp_path):
    data = np.random.default_rng(0).random((3, 5, 6, 7)).astype(np.float32)  # (K, J, I, T)
    header = ("NRRD0004\ntype: float\ndimension: 4\nspace: right-anterior-superior\nsizes: 7 6 5 3\n"
              "space directions: none (1.5,0,0) (0,1.5,0) (0,0,3)\nkinds: list domain domain domain\n"
              "endian: little\nencoding: raw\nspace origin: (10,20,30)\n"
              "MultiVolume.FrameLabels:=0,4000,8000,12000,16000,20000,24000\nMultiVolume.NumberOfFrames:=7\n"
              "MultiVolume.DICOM.FlipAngle:=12\nMultiVolume.DICOM.RepetitionTime:=4.5\n\n")
    path = tmp_path / "dce.nrrd"
    path.write_bytes(header.encode() + data.tobytes())
    seq = hs.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "4D NRRD")
    storage = hs.scene.AddNewNodeByClass("vtkMRMLVolumeSequenceStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(seq)
    series = read_sequence(seq)
    np.testing.assert_allclose(series.t_s, 4.0 * np.arange(7))
    assert (series.tr_s, series.flip_angle_deg) == (pytest.approx(0.0045), 12.0)
    np.testing.assert_array_equal(series.signal, data)
    np.testing.assert_allclose(series.ijk_to_ras[:3, 3], [10, 20, 30])
    np.testing.assert_allclose(np.diag(series.ijk_to_ras)[:3], [1.5, 1.5, 3.0])


# ------------------------------------------------------------------------------------ bad input
def _frames_sequence(hs, arrays, matrices, times=None):
    seq = hs.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "bad")
    seq.SetIndexUnit("s")
    for k, (a, m) in enumerate(zip(arrays, matrices)):
        v = slicer.vtkMRMLScalarVolumeNode()
        util.updateVolumeFromArray(v, a)
        scene_output.set_ijk_to_ras(v, m)
        seq.SetDataNodeAtValue(v, str(k * 5.0 if times is None else times[k]))
    return seq


def test_bad_sequences_are_refused_with_a_clear_message(hs):
    eye = np.eye(4)
    flat = _frames_sequence(hs, [np.ones((1, 8, 8), np.float32)] * 4, [eye] * 4)
    with pytest.raises(ValueError, match="2D images"):
        read_sequence(flat)
    moved = eye.copy()
    moved[0, 3] = 3.0
    shifted = _frames_sequence(hs, [np.ones((3, 8, 8), np.float32)] * 4, [eye, eye, moved, eye])
    with pytest.raises(ValueError, match="frame 2 has a different position"):
        read_sequence(shifted)
    sizes = _frames_sequence(hs, [np.ones((3, 8, 8), np.float32)] * 3 + [np.ones((3, 8, 9), np.float32)], [eye] * 4)
    with pytest.raises(ValueError, match="frame 3 has dimensions"):
        read_sequence(sizes)
    with pytest.raises(ValueError, match="select a volume sequence"):
        read_sequence(None)
    rgb = hs.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "rgb")
    rgb.SetIndexUnit("s")
    for k in range(3):
        v = slicer.vtkMRMLVectorVolumeNode()
        util.updateVolumeFromArray(v, np.ones((3, 8, 8, 3), np.float32))
        rgb.SetDataNodeAtValue(v, str(5.0 * k))
    with pytest.raises(ValueError, match="components per voxel"):
        read_sequence(rgb)


def test_bad_analysis_inputs_are_refused_before_anything_is_written(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    t1 = _t1_node(hs, ph, nodes)
    two = np.zeros(nodes.labels.shape, np.uint8)
    two[1, 5, 5:7] = 1
    label = hs.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "two voxels")
    util.updateVolumeFromArray(label, two)
    scene_output.set_ijk_to_ras(label, nodes.ijk_to_ras)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, nodes.segmentation)
    tiny = nodes.segmentation.GetSegmentation().GetNthSegmentID(2)
    out = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, aif_segment_id=tiny))  # 2 voxels: accepted, warned
    assert any("only 2 voxel(s) on the DCE grid - the AIF is noisy" in w for w in out.exam.warnings)
    n_nodes = hs.scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="no segment with ID 'nope'"):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, lesion_segment_ids=["nope"]))
    with pytest.raises(ValueError, match="number of baseline frames"):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, n_baseline=0))
    with pytest.raises(ValueError, match="AIF source 'bogus'"):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, aif_source="bogus"))
    nodes.sequence.RemoveAttribute(multivolume.TR_KEY)
    with pytest.raises(ValueError, match="TR: .*enter TR"):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1))
    with pytest.raises(ValueError, match="AIF segment: only 0 of its .* voxels have a valid concentration.*blood T10"):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, tr_s=ph.acquisition["tr_s"], t10_s=1.0))
    with pytest.raises(ValueError, match="no voxel could be fitted.*nothing was written"):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, tr_s=ph.acquisition["tr_s"], t10_s=0.02,
                                                 aif_source="parker"))
    far = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 elsewhere")
    util.updateVolumeFromArray(far, np.full((4, 8, 8), 1.2, np.float32))
    shifted = np.eye(4)
    shifted[:3, 3] = 500.0
    scene_output.set_ijk_to_ras(far, shifted)
    with pytest.raises(ValueError, match="T1 map 'T1 elsewhere': has no positive T1 inside the DCE volume"):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, far, tr_s=ph.acquisition["tr_s"]))
    hs.scene.RemoveNode(far)
    with pytest.raises(fitting.FitCancelled):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, tr_s=ph.acquisition["tr_s"]),
                           progress=lambda frac, msg: frac < 0.5)
    assert hs.scene.GetNumberOfNodes() == n_nodes  # nothing written, no temporary node left behind


def test_an_output_selected_as_input_is_refused(study, ph):
    hs, nodes, _, out = study
    vp = out.map_nodes["vp"]
    before = util.arrayFromVolume(vp).copy()
    with pytest.raises(ValueError, match="T1 map: 'vp \\(baseline\\)' is an output.*would be overwritten"):
        analysis.run_analysis(hs.scene, *_inputs(ph, nodes, vp))
    np.testing.assert_array_equal(util.arrayFromVolume(vp), before)


def test_empty_segment_gives_a_zero_row_and_a_warning(study, ph, caplog):
    hs, nodes, t1, _ = study
    empty = nodes.segmentation.GetSegmentation().AddEmptySegment("empty", "empty")
    with caplog.at_level(logging.WARNING):
        out = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1,
                                                       lesion_segment_ids=[nodes.lesion_segment_id, empty]))
    rows = [r for r in out.statistics if r.segment == "empty"]
    assert rows and all(r.voxel_count == 0 and np.isnan(r.values["mean"]) for r in rows)
    assert any("empty" in rec.getMessage() for rec in caplog.records)
    assert out.statistics_table.GetNumberOfRows() == 2 * len(rows)


def test_fit_inside_segments_only(hs, ph):
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    t1 = _t1_node(hs, ph, nodes)
    out = analysis.run_analysis(hs.scene, *_inputs(ph, nodes, t1, fit_lesions_only=True))
    lesion = nodes.labels == phantom.LABELS["lesion"]
    status = out.result.maps["status"]
    assert np.all(status[~lesion] == fitting.MASKED_OUT) and np.all(status[lesion] <= fitting.AT_BOUND)
    assert np.all(util.arrayFromVolume(out.map_nodes["vp"])[~lesion] == 0)


def test_headless_scene_has_the_logics(hs):
    assert set(hs.logics) == {"Colors", "Sequences", "Segmentations", "Volumes", "Tables", "Plots"}
    assert hs.scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode")
