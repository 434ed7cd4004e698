"""The Slicer module's "Export to DICOM" on a real slicer-core scene: a DCE sequence loaded from DICOM - files written
by ``dicomdata.classic_series``, imported into a DICOM database, frames carrying the attributes Slicer's importer
leaves on them - is fitted, and its maps and segments are written as DICOM objects into the database (or a
folder), in the source's study.

How the importer leaves the attributes (imitated by :func:`load_as_slicer_does`, with Slicer's own MRML calls):
DICOMScalarVolumePlugin.py:496-510 (Slicer 5.8.1) sets ``DICOM.instanceUIDs`` - the frame's SOP Instance UIDs in
slice order - on the volume it loads; MultiVolumeImporterPlugin.py:605-611 (fedorov/MultiVolumeImporter 144b2e4)
makes the sequence and copies the MultiVolume attributes (frame labels, TR, flip angle, the file list of :343)
onto it, :649 loads each frame with DICOMScalarVolumePlugin and :664-676 add an empty data node and
``UpdateDataNodeAtValue(frame, value, shallowCopy=True)``, whose CopyContent carries the attributes over
(vtkMRMLSequenceNode.cxx:362-380, vtkMRMLNode.cxx:132-139). The DICOM database, its indexer and
DICOMUtils.importDicom are the stand-ins of ``slicerdicom`` (CTK's and Slicer's sources cited there)."""

import os

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (python3 run.py test)")
pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

import dicomdata  # noqa: E402
import slicerdicom  # noqa: E402
import slicergui  # noqa: E402

from DCEPerfusionLib import phantom  # noqa: E402
from DCEPerfusionLib.scene import dicom as scene_dicom  # noqa: E402
from DCEPerfusionLib.scene import headless  # noqa: E402
from DCEPerfusionLib.scene import phantom as scene_phantom  # noqa: E402
from DCEPerfusionLib.scene.series import read_sequence  # noqa: E402

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


def write_exam(folder, seed=3):
    """A small phantom exam as scanner files (one classic MR file per slice and frame)."""
    ph = phantom.make_phantom(shape=(3, 14, 16), n_frames=24, snr=80.0, seed=seed)
    dicomdata.classic_series(str(folder), np.round(ph.signal), scene_phantom.oblique_matrix(), ph.t_s)
    return ph


def frame_uids(folder):
    """The SOP Instance UIDs of each time frame in slice order, as the importer lists them: the files grouped by
    frame (Acquisition Number, the Siemens files' frame tag) and sorted along the slice normal
    (DICOMScalarVolumePlugin's geometric sort)."""
    frames = {}
    for name in os.listdir(folder):
        ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
        o = np.array(ds.ImageOrientationPatient, dtype=float)
        along = float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), np.cross(o[:3], o[3:])))
        frames.setdefault(int(ds.AcquisitionNumber), []).append((along, str(ds.SOPInstanceUID)))
    return [[uid for _, uid in sorted(frames[t])] for t in sorted(frames)]


def load_as_slicer_does(scene, ph, folder, name="DCE"):
    """The sequence MultiVolumeImporter makes of the series: its frames (the phantom's signal on the files' grid),
    every data node carrying its frame's ``DICOM.instanceUIDs`` through UpdateDataNodeAtValue, the MultiVolume
    attributes - with the file list - on the sequence node."""
    nodes = scene_phantom.add_phantom(scene, ph, name=name)
    seq = nodes.sequence
    uids = frame_uids(folder)
    assert len(uids) == seq.GetNumberOfDataNodes()
    for i, frame_uids_in_slice_order in enumerate(uids):
        value = seq.GetNthIndexValue(i)
        frame = slicer.vtkMRMLScalarVolumeNode()                      # the frame DICOMScalarVolumePlugin loaded
        frame.Copy(seq.GetNthDataNode(i))
        frame.SetAttribute("DICOM.instanceUIDs", " ".join(frame_uids_in_slice_order))
        seq.UpdateDataNodeAtValue(frame, value, True)
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder))
    seq.SetAttribute("MultiVolume.FrameFileList", ",".join(files))
    return nodes, uids


def in_slice_order(ds, ijk_to_ras):
    """A multi-frame object's pixels (K, J, I) with frame f at the slice its Plane Position names (highdicom 0.28
    orders the frames along the slice normal; 0.22 keeps the order given)."""
    m = np.asarray(ijk_to_ras, dtype=float)
    lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3]
    frames = ds.pixel_array.astype(np.float64).reshape((-1, ds.Rows, ds.Columns))
    out = np.full_like(frames, np.nan)
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        p = np.array(group.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        k = np.linalg.lstsq(lps[:, :3], p - lps[:, 3], rcond=None)[0]
        assert np.allclose(k[:2], 0.0, atol=1e-3) and abs(k[2] - round(k[2])) < 1e-3    # on the DCE grid
        out[int(round(k[2]))] = frames[f]
    return out


@pytest.fixture
def module(monkeypatch):
    hs = headless.headless_scene()
    mod, app = slicergui.install(monkeypatch, hs)
    yield mod, app, hs


@pytest.fixture
def exam(module, tmp_path):
    """The exam's files imported into an open DICOM database (copied in, as the DICOM browser's "Copy" import
    does), the sequence loaded from them."""
    mod, app, hs = module
    source = tmp_path / "scanner"
    ph = write_exam(source)
    app.dicomDatabase.openDatabase(str(tmp_path / "database" / "ctkDICOM.sql"))
    assert slicerdicom.import_dicom(str(source), app.dicomDatabase, copyFiles=True)
    nodes, uids = load_as_slicer_does(hs.scene, ph, str(source))
    return ph, nodes, uids


def fit(mod, nodes, ph, label="baseline"):
    logic = mod.DCEPerfusionLogic()
    p = logic.getParameterNode()
    p.dceSequence, p.anatomyVolume, p.segmentation = nodes.sequence, nodes.anatomy, nodes.segmentation
    p.t10Constant_s, p.baselineFrames, p.examLabel = 1.6, ph.acquisition["n_baseline"], label
    p.contrastAgent, p.relaxivity_per_mM_s = mod.OTHER_AGENT, ph.acquisition["r1_per_mM_s"]
    p.aifSource, p.model, p.method = mod.AIFSource.PARKER, mod.KineticModel.PATLAK, mod.FitMethod.LLS
    return logic, logic.process(p, lesionSegmentIDs=[nodes.lesion_segment_id])


# ============================================================================================ the scene part
def test_the_instances_are_those_of_the_frames_and_the_database_has_their_files(exam, module):
    _, app, _ = module
    ph, nodes, uids = exam
    assert scene_dicom.instance_uids(nodes.sequence) == [u for frame in uids for u in frame]
    files = scene_dicom.source_files(nodes.sequence, app.dicomDatabase)
    database_folder = app.dicomDatabase.databaseDirectory
    assert all(f.startswith(database_folder) and os.path.isfile(f) for f in files)       # the database's copies
    assert [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files[:3]] == uids[0]


def test_the_source_is_the_first_frame_in_slice_order_and_becomes_the_series_dicom(exam, module):
    _, app, _ = module
    ph, nodes, uids = exam
    series = read_sequence(nodes.sequence)
    source = scene_dicom.dicom_source(nodes.sequence, app.dicomDatabase, series)
    assert series.dicom is source
    assert [str(h.SOPInstanceUID) for h in source.headers] == uids[0]
    assert source.study_instance_uid == dicomdata.STUDY_UID and source.series_instance_uid == dicomdata.SERIES_UID
    assert source.frame_of_reference_uid == dicomdata.FRAME_OF_REFERENCE_UID


def test_a_converted_multivolume_has_the_uids_on_the_sequence_node(module):
    """MultiVolumeImporterPlugin.py:617-624 puts all files' UIDs on the MultiVolume node; sequence_from_multivolume
    copies its attributes onto the sequence (the frames then have none)."""
    _, _, hs = module
    nodes = scene_phantom.add_phantom(hs.scene, phantom.make_phantom(shape=(2, 6, 7), n_frames=5))
    nodes.sequence.SetAttribute("DICOM.instanceUIDs", "1.2.3 Unknown 1.2.4")
    assert scene_dicom.instance_uids(nodes.sequence) == ["1.2.3", "1.2.4"]


def test_without_a_database_the_importers_file_list_is_used(exam, module, tmp_path):
    _, app, _ = module
    ph, nodes, uids = exam
    files = scene_dicom.source_files(nodes.sequence, None)
    assert files == nodes.sequence.GetAttribute("MultiVolume.FrameFileList").split(",")
    assert all(f.startswith(str(tmp_path / "scanner")) for f in files)


def test_a_sequence_not_from_dicom_or_not_in_the_database_is_one_line(exam, module, tmp_path):
    _, app, hs = module
    ph, nodes, uids = exam
    plain = scene_phantom.add_phantom(hs.scene, phantom.make_phantom(shape=(2, 6, 7), n_frames=5), name="NRRD DCE")
    with pytest.raises(ValueError, match="the DCE sequence 'NRRD DCE' was not loaded from DICOM") as e:
        scene_dicom.source_files(plain.sequence, app.dicomDatabase)
    assert "\n" not in str(e.value)
    nodes.sequence.RemoveAttribute("MultiVolume.FrameFileList")
    other = slicerdicom.DICOMDatabase()
    other.openDatabase(str(tmp_path / "other" / "ctkDICOM.sql"))
    with pytest.raises(ValueError, match=r"72 of the 72 DICOM images sequence 'DCE' was loaded from are not in the "
                                         r"DICOM database .* open the DICOM database it was loaded from") as e:
        scene_dicom.source_files(nodes.sequence, other)
    assert "\n" not in str(e.value)


def test_a_sequence_resampled_after_loading_no_longer_belongs_to_its_images(exam, module):
    """The attributes travel with the content (CopyContent): a cropped or moved copy still carries them."""
    _, app, _ = module
    ph, nodes, uids = exam
    series = read_sequence(nodes.sequence)
    series.ijk_to_ras = series.ijk_to_ras.copy()
    series.ijk_to_ras[:3, 3] += [0.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="no longer has the geometry of the DICOM images"):
        scene_dicom.dicom_source(nodes.sequence, app.dicomDatabase, series)
    assert series.dicom is None


def test_a_sequence_whose_slices_slicer_reversed_still_belongs_to_its_images(exam, module):
    """DICOMScalarVolumePlugin reverses the slices of a left-handed volume (DICOMScalarVolumePlugin.py:496-510
    in Slicer 5.8.1): the same positions in the other order are the same images."""
    _, app, _ = module
    ph, nodes, uids = exam
    series = read_sequence(nodes.sequence)
    m = series.ijk_to_ras.copy()
    m[:3, 3] += m[:3, 2] * (series.shape_kji[0] - 1)                    # origin at the last slice
    m[:3, 2] = -m[:3, 2]
    series.ijk_to_ras = m
    scene_dicom.dicom_source(nodes.sequence, app.dicomDatabase, series)
    assert series.dicom is not None


# ============================================================================================ the module's logic
def test_export_writes_the_objects_into_the_database_under_the_patient(exam, module):
    mod, app, hs = module
    ph, nodes, uids = exam
    logic, out = fit(mod, nodes, ph)
    before = set(app.dicomDatabase.images)
    files = logic.exportToDICOM(out)
    database = app.dicomDatabase
    assert len(files) == len(out.map_nodes) + 1                               # the maps and the SEG
    assert all(f.startswith(database.databaseDirectory) and os.path.isfile(f) for f in files)
    new = set(database.images) - before
    assert len(new) == len(files)
    assert database.patients() == ["DCE001"] and database.studiesForPatient("DCE001") == [dicomdata.STUDY_UID]
    assert len(database.seriesForStudy(dicomdata.STUDY_UID)) == 1 + len(files)    # beside the DCE series
    matched = []
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.StudyInstanceUID == dicomdata.STUDY_UID and ds.PatientID == "DCE001"
        assert ds.FrameOfReferenceUID == dicomdata.FRAME_OF_REFERENCE_UID
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == dicomdata.SERIES_UID
        if ds.SOPClassUID == SEGMENTATION:
            assert [str(s.SegmentLabel) for s in ds.SegmentSequence] == ["lesion"]
            continue
        assert ds.SOPClassUID == PARAMETRIC_MAP
        values = in_slice_order(ds, out.exam.series.ijk_to_ras)
        matched += [name for name, expected in out.exam.maps.items()          # NaN where not fitted, as the map
                    if np.array_equal(np.isnan(values), np.isnan(expected))
                    and np.allclose(values[np.isfinite(values)], expected[np.isfinite(expected)], rtol=1e-6, atol=0)]
    assert sorted(matched) == sorted(out.exam.maps)                           # each map once, its values


def test_without_a_database_the_objects_go_to_the_folder_given(exam, module, tmp_path):
    mod, app, hs = module
    ph, nodes, uids = exam
    logic, out = fit(mod, nodes, ph)
    app.dicomDatabase.isOpen = False                                          # no database chosen in Slicer
    with pytest.raises(ValueError, match="no DICOM database is open - choose a folder"):
        logic.exportToDICOM(out)
    files = logic.exportToDICOM(out, folder=str(tmp_path / "exported"))
    assert sorted(os.path.basename(f) for f in files) == sorted(
        [f"{m}.dcm" for m in out.exam.maps] + ["segmentation.dcm"])
    assert {os.path.dirname(f) for f in files} == {str(tmp_path / "exported" / "baseline")}   # one folder per exam
    assert all(pydicom.dcmread(f).StudyInstanceUID == dicomdata.STUDY_UID for f in files)
    again = logic.exportToDICOM(out, folder=str(tmp_path / "exported"))       # an earlier export is replaced
    assert sorted(again) == sorted(files)
    _, follow_up = fit(mod, nodes, ph, label="follow-up/2")                    # another exam: beside it
    other = logic.exportToDICOM(follow_up, folder=str(tmp_path / "exported"))
    assert {os.path.dirname(f) for f in other} == {str(tmp_path / "exported" / "follow-up_2")}
    assert all(os.path.isfile(f) for f in files)


def test_highdicom_is_asked_for_and_the_console_is_told_how_to_install_it(module, monkeypatch):
    import importlib.util

    import numpy
    mod, app, hs = module
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "highdicom"
                        else find_spec(name, *a))
    command = f"slicer.util.pip_install('highdicom>=0.22 pydicom=={pydicom.__version__} numpy=={numpy.__version__}')"
    with pytest.raises(ValueError, match="DICOM export needs the Python package") as e:
        mod.DCEPerfusionLogic().exportToDICOM(None)
    assert command in str(e.value) and "bundles" not in str(e.value)
    app.confirm = False
    assert mod.DCEPerfusionLogic.ensureDICOMExport(askUser=True) is False
    assert "highdicom" in app.questions[0] and app.installs == []
    app.confirm, app.online = True, False
    with pytest.raises(ValueError, match=r"Could not install highdicom \(pip exited with status 1") as e:
        mod.DCEPerfusionLogic.ensureDICOMExport(askUser=True)
    assert app.installs == [f"highdicom>=0.22 pydicom=={pydicom.__version__} numpy=={numpy.__version__}"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"DCE Perfusion needs .* scipy.*pip_install\('scipy'\) \(or use Slicer 5.8"):
        mod.DCEPerfusionLogic.ensureDependencies()                            # the required ones: as before


# ============================================================================================ the panel
def _panel(mod, nodes, ph):
    w = mod.DCEPerfusionWidget()
    w.setup()
    w.enter()
    w.ui.dceSequenceSelector.choose(nodes.sequence)
    w.ui.segmentationSelector.choose(nodes.segmentation)
    w.ui.lesionSegmentsSelector.check([nodes.lesion_segment_id])
    w.ui.t10SpinBox.value = 1.6
    w.ui.contrastAgentComboBox.currentIndex = len(mod.CONTRAST_AGENTS) - 1
    w.ui.relaxivitySpinBox.value = ph.acquisition["r1_per_mM_s"]
    w.ui.methodComboBox.currentIndex = [m for m in mod.FitMethod].index(mod.FitMethod.LLS)
    w.ui.modelComboBox.currentIndex = [m for m in mod.KineticModel].index(mod.KineticModel.PATLAK)
    return w


@pytest.fixture
def panels():
    opened = []
    yield opened
    for w in opened:
        w.cleanup()
        slicergui.detach(w.ui)


def test_the_button_exports_after_a_fit_into_the_database(exam, module, panels):
    mod, app, hs = module
    ph, nodes, uids = exam
    w = _panel(mod, nodes, ph)
    panels.append(w)
    assert not w.ui.exportDICOMButton.enabled                                 # nothing fitted yet
    w.ui.applyButton.click()
    assert app.errors == [] and w.ui.exportDICOMButton.enabled
    before = len(app.dicomDatabase.images)
    w.ui.exportDICOMButton.click()
    assert app.errors == [] and app.folder_questions == []                     # a database: no folder asked
    n = len(app.dicomDatabase.images) - before
    assert n > 1 and w.ui.exportDICOMResultLabel.text.startswith(f"{n} DICOM objects written into the DICOM database")
    hs.scene.Clear(0)                                                         # the fit goes with the scene
    assert not w.ui.exportDICOMButton.enabled and w.ui.exportDICOMResultLabel.text == ""


def test_the_button_asks_for_a_folder_without_a_database(exam, module, panels, tmp_path):
    mod, app, hs = module
    ph, nodes, uids = exam
    app.dicomDatabase.isOpen = False
    w = _panel(mod, nodes, ph)
    panels.append(w)
    w.ui.applyButton.click()
    app.folder = ""                                                           # Cancel: nothing written
    w.ui.exportDICOMButton.click()
    assert len(app.folder_questions) == 1 and app.errors == [] and w.ui.exportDICOMResultLabel.text == ""
    app.folder = str(tmp_path / "for PACS")
    w.ui.exportDICOMButton.click()
    assert app.errors == [] and w.ui.exportDICOMResultLabel.text.endswith(
        f"DICOM objects written to {os.path.join(app.folder, 'baseline')}.")
    assert "segmentation.dcm" in os.listdir(os.path.join(app.folder, "baseline"))


@pytest.mark.parametrize("database", [True, False], ids=["database open", "no database"])
def test_a_sequence_not_from_dicom_is_one_line_in_the_panel(module, panels, tmp_path, database):
    """Said before a folder is asked for."""
    mod, app, hs = module
    if database:
        app.dicomDatabase.openDatabase(str(tmp_path / "database" / "ctkDICOM.sql"))
    ph = phantom.make_phantom(shape=(3, 14, 16), n_frames=24, snr=80.0, seed=3)
    nodes = scene_phantom.add_phantom(hs.scene, ph, name="DCE from NRRD")
    w = _panel(mod, nodes, ph)
    panels.append(w)
    w.ui.applyButton.click()
    w.ui.exportDICOMButton.click()
    assert len(app.errors) == 1
    title, text = app.errors[0]
    assert title == "DICOM export failed." and "\n" not in text
    assert text.startswith("DICOM export: the DCE sequence 'DCE from NRRD' was not loaded from DICOM")
    assert app.folder_questions == [] and app.dicomDatabase.images == {}





# ============================================================================================ the response SR
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _numbers(ds):
    """{concept meaning: value} of every NUM item of an SR's content tree."""
    out = {}
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "NUM":
            out.setdefault(str(item.ConceptNameCodeSequence[0].CodeMeaning), []).append(
                float(item.MeasuredValueSequence[0].NumericValue))
        for k, v in _numbers(item).items():
            out.setdefault(k, []).extend(v)
    return out


def test_the_response_sr_references_both_exports(exam, module):
    mod, app, hs = module
    ph, nodes, uids = exam
    logic, base = fit(mod, nodes, ph, "baseline")
    logic.exportToDICOM(base)
    _, follow = fit(mod, nodes, ph, "follow-up")
    p = logic.getParameterNode()
    p.segmentation, p.followupSegmentation = nodes.segmentation, nodes.segmentation
    responses, _, _ = logic.assessResponse(p, [nodes.lesion_segment_id])
    with pytest.raises(ValueError, match="the exam 'follow-up' has not been exported to DICOM"):
        logic.exportResponseToDICOM(responses, "baseline", "follow-up")
    follow_files = logic.exportToDICOM(follow)
    [sr_file] = logic.exportResponseToDICOM(responses, "baseline", "follow-up")
    assert sr_file.startswith(app.dicomDatabase.databaseDirectory)
    sr = pydicom.dcmread(sr_file)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.StudyInstanceUID == dicomdata.STUDY_UID
    evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    follow_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in follow_files}
    assert evidence & follow_uids                                            # the follow-up's SEG and vp map
    numbers = _numbers(sr)
    delta = [v for k, v in numbers.items() if k.startswith("Percent change of vp")][0]
    assert delta == pytest.approx([responses[0].change_pct["vp"]], abs=1e-6)
    _, again = fit(mod, nodes, ph, "follow-up")                              # a new fit: its export is due again
    with pytest.raises(ValueError, match="the exam 'follow-up' has not been exported"):
        logic.exportResponseToDICOM(responses, "baseline", "follow-up")


def _fit_both_and_assess(w, nodes, export_baseline: bool) -> None:
    """Apply (baseline), optionally Export, Apply as the follow-up, Assess response - as a user clicks."""
    p = w._parameterNode
    w.ui.applyButton.click()                                                  # baseline
    if export_baseline:
        w.ui.exportDICOMButton.click()
    p.examLabel = "follow-up"
    w.ui.applyButton.click()
    p.followupSegmentation = nodes.segmentation
    w.ui.assessButton.click()


def test_the_button_adds_the_response_sr_once_both_exams_are_exported(exam, module, panels):
    mod, app, hs = module
    ph, nodes, uids = exam
    w = _panel(mod, nodes, ph)
    panels.append(w)
    _fit_both_and_assess(w, nodes, export_baseline=True)
    assert app.errors == []
    w.ui.exportDICOMButton.click()
    lines = w.ui.exportDICOMResultLabel.text.split("<br>")
    assert app.errors == [] and lines[1] == "The response SR (baseline to follow-up) written into the DICOM database."
    srs = [r for r in app.dicomDatabase.images.values()
           if pydicom.dcmread(r["file"], stop_before_pixels=True).SOPClassUID == COMPREHENSIVE_3D_SR]
    assert len(srs) == 1


def test_the_panel_says_when_the_sr_waits_for_the_other_exam(exam, module, panels):
    mod, app, hs = module
    ph, nodes, uids = exam
    w = _panel(mod, nodes, ph)
    panels.append(w)
    _fit_both_and_assess(w, nodes, export_baseline=False)                    # baseline not exported
    w.ui.exportDICOMButton.click()
    assert app.errors == []
    assert w.ui.exportDICOMResultLabel.text.split("<br>")[1] == (
        "The response SR (baseline to follow-up) follows when &#x27;baseline&#x27; is exported too.")
