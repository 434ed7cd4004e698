"""DCEPerfusion.py's widget on a real slicer-core scene, with the Qt-only parts of Slicer replaced by the
stand-ins of ``slicergui`` (which reproduce Slicer 5.8.1's signal order, the parameter-node wrapper's
ModifiedEvent refresh and the node and segment selectors' emissions; sources cited there and below).

What a user does is done the way the widgets receive it: ``choose`` picks a node or segment (the same
index change, and so the same signals, as a click in the list), ``check`` ticks segments, ``click`` presses
a button."""

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (python3 run.py test)")

import vtk  # noqa: E402
import slicergui  # noqa: E402

from DCEPerfusionLib import phantom  # noqa: E402
from DCEPerfusionLib.core import multivolume as mv  # noqa: E402
from DCEPerfusionLib.core import fitting  # noqa: E402
from DCEPerfusionLib.scene import headless  # noqa: E402
from DCEPerfusionLib.scene import phantom as scene_phantom  # noqa: E402


OPEN = []


@pytest.fixture
def gui(monkeypatch):
    hs = headless.headless_scene()
    mod, app = slicergui.install(monkeypatch, hs)
    yield mod, app, hs
    # every exception a slot raised was shown to the user in an error dialog (tryWithErrorDisplay re-raises it
    # and PythonQt prints it); nothing else went wrong in a slot
    assert [str(e) for e in slicergui.SLOT_ERRORS] == [text for _, text in app.errors]
    while OPEN:                                     # Slicer calls cleanup() when the module widget goes away
        w = OPEN.pop()
        w.cleanup()
        slicergui.detach(w.ui)


def open_module(mod):
    """Slicer creates the widget, calls setup(), then enter() when the module is shown."""
    w = mod.DCEPerfusionWidget()
    w.setup()
    w.enter()
    OPEN.append(w)
    return w


def add_exam(hs, name, seed=3, tr_ms=None, flip_deg=None, shape=(3, 20, 24)):
    ph = phantom.make_phantom(shape=shape, snr=80.0, seed=seed)
    nodes = scene_phantom.add_phantom(hs.scene, ph, name=name)
    if tr_ms is not None:
        nodes.sequence.SetAttribute(mv.TR_KEY, f"{tr_ms:g}")
    if flip_deg is not None:
        nodes.sequence.SetAttribute(mv.FLIP_KEY, f"{flip_deg:g}")
    return ph, nodes


def add_segmentation(hs, name, segments):
    """A segmentation with segments {ID: name} (empty masks: only the choice of segments matters here)."""
    node = hs.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    for segment_id, segment_name in segments.items():
        node.GetSegmentation().AddEmptySegment(segment_id, segment_name)
    return node


def used_tr_flip(w):
    """The TR (s) and flip angle (deg) Apply would use: the ones entered, else the sequence's DICOM values."""
    p = w._parameterNode
    options = w.logic.analysisOptions(p)
    header = w.logic.acquisitionParameters(p.dceSequence)
    return options.tr_s or header["tr_s"], options.flip_angle_deg or header["flip_angle_deg"]


# ============================================================================ 1. the sequence selector
def test_choosing_another_dce_sequence_keeps_it_and_its_acquisition(gui):
    """Issue 11, bug 1. The pick makes qMRMLNodeComboBox emit currentNodeChanged (qMRMLNodeComboBox.cxx:752-771)
    to its slots in connection order; a widget slot connected before ``connectGui`` that writes TR/flip runs
    while the node still holds the old sequence, the write's ModifiedEvent makes the wrapper rewrite every bound
    widget from the node (wrapper.py:181-191: setCurrentNode(old)), and the wrapper's own slot then reads the
    old node back (wrapper.py:172-178, guiConnectors.py:702-706): the selector snapped back."""
    mod, app, hs = gui
    _, a = add_exam(hs, "DCE A", tr_ms=4.5, flip_deg=25)
    _, b = add_exam(hs, "DCE B", tr_ms=3.1, flip_deg=12)
    w = open_module(mod)
    assert w.ui.dceSequenceSelector.currentNode() is a.sequence          # the first sequence, selected for the user
    assert used_tr_flip(w) == (pytest.approx(0.0045), 25.0)
    w.ui.dceSequenceSelector.choose(b.sequence)
    assert w.ui.dceSequenceSelector.currentNode() is b.sequence
    assert w._parameterNode.dceSequence is b.sequence
    assert used_tr_flip(w) == (pytest.approx(0.0031), 12.0)              # B's own, not A's left behind
    assert "3.1 ms" in w.ui.trSpinBox.displayText() and "12" in w.ui.flipAngleSpinBox.displayText()
    w.ui.dceSequenceSelector.choose(a.sequence)                          # and back
    assert w._parameterNode.dceSequence is a.sequence and used_tr_flip(w) == (pytest.approx(0.0045), 25.0)


def test_an_entered_tr_is_kept_across_sequences_and_saved(gui):
    mod, app, hs = gui
    _, a = add_exam(hs, "DCE A", tr_ms=4.5, flip_deg=25)
    _, b = add_exam(hs, "DCE B", tr_ms=3.1)
    b.sequence.RemoveAttribute(mv.FLIP_KEY)
    w = open_module(mod)
    w.ui.trSpinBox.value = 5.0                                           # the user types a TR
    w.ui.dceSequenceSelector.choose(b.sequence)
    assert w.ui.dceSequenceSelector.currentNode() is b.sequence
    assert used_tr_flip(w) == (pytest.approx(0.005), None)               # entered TR kept; B has no flip angle
    assert "not in" in w.ui.flipAngleSpinBox.displayText().lower()      # ... and the box says so
    w.ui.flipAngleSpinBox.value = 20.0
    w.ui.applyButton.click()                                             # the result warns that 5 ms replaced 3.1 ms
    assert app.errors == [] and "the given 5 ms replaces the 3.1 ms in the header" in w.ui.resultLabel.text
    assert w._parameterNode.parameterNode.GetParameter("repetitionTime_ms") == "5.0"


# ======================================================================= the segmentation selector
@pytest.mark.parametrize("second", [{"Segment_1": "paraspinal muscle", "Segment_2": "L3 metastasis"},
                                    {"Segment_7": "L3 metastasis", "Segment_8": "aorta"}],
                         ids=["same segment IDs", "other segment IDs"])
def test_choosing_another_segmentation_keeps_it_and_clears_the_segment_choice(gui, second):
    """Issue 11, bug 1 (segmentations). A new segmentation in a segment selector keeps the stored segment IDs
    that exist in it - silently - or selects its first segment and emits (qMRMLSegmentSelectorWidget.cxx:
    181-283); a slot writing the segment parameters from that emission fired the wrapper's refresh, which put
    the old segmentation back in its combobox. Where the IDs coincide the lesion choice carried over to a
    different structure (Segment_1: the muscle)."""
    mod, app, hs = gui
    add_exam(hs, "DCE A")
    first = add_segmentation(hs, "exam 1 segments", {"Segment_1": "L2 metastasis", "Segment_2": "aorta"})
    other = add_segmentation(hs, "exam 2 segments", second)
    w = open_module(mod)
    w.ui.segmentationSelector.choose(first)
    w.ui.lesionSegmentsSelector.check(["Segment_1"])
    w.ui.aifSegmentSelector.choose("Segment_2")
    assert w.logic.segmentChoices(w._parameterNode) == (["Segment_1"], "Segment_2")
    w.ui.segmentationSelector.choose(other)
    assert w.ui.segmentationSelector.currentNode() is other and w._parameterNode.segmentation is other
    assert w.ui.lesionSegmentsSelector.currentNode() is other and w.ui.aifSegmentSelector.currentNode() is other
    assert w.logic.segmentChoices(w._parameterNode) == ([], "")          # nothing chosen in the new segmentation
    assert w.ui.lesionSegmentsSelector.selectedSegmentIDs() == [] and w.ui.aifSegmentSelector.currentSegmentID() == ""
    w.ui.lesionSegmentsSelector.check([next(iter(second))])              # a new choice is kept
    assert w.logic.segmentChoices(w._parameterNode) == ([next(iter(second))], "")
    w.ui.segmentationSelector.choose(first)                              # back to the first: its old choice is gone
    assert w.logic.segmentChoices(w._parameterNode) == ([], "")


# ======================================================================== 2. saved and loaded scenes
def _choose_segments(w, segmentation):
    w.ui.segmentationSelector.choose(segmentation)
    w.ui.lesionSegmentsSelector.check(["Segment_1", "Segment_3"])
    w.ui.aifSegmentSelector.choose("Segment_2")


SEGMENTS = {"Segment_1": "L2 metastasis", "Segment_2": "aorta", "Segment_3": "L3 metastasis"}


def test_a_saved_scene_opens_with_its_segment_choices(gui, monkeypatch, tmp_path):
    """Issue 11, bug 2. Restoring the lesion selection made the lesion selector emit segmentSelectionChanged
    (qMRMLSegmentSelectorWidget.cxx:398-452), whose slot wrote the AIF parameter from the AIF selector - still
    empty - before the saved AIF segment was read: the AIF choice was lost on every scene load."""
    mod, app, hs = gui
    add_exam(hs, "DCE A")
    segmentation = add_segmentation(hs, "segments", SEGMENTS)
    w = open_module(mod)
    _choose_segments(w, segmentation)
    w.exit()
    path = headless.save_bundle(hs.scene, str(tmp_path / "saved.mrml"))

    loaded = headless.load_bundle(path)
    mod2, _ = slicergui.install(monkeypatch, loaded)
    w2 = open_module(mod2)
    seg2 = w2._parameterNode.segmentation
    assert seg2 is not None and seg2.GetName() == "segments"
    assert w2.logic.segmentChoices(w2._parameterNode) == (["Segment_1", "Segment_3"], "Segment_2")
    assert w2.ui.lesionSegmentsSelector.currentNode() is seg2
    assert w2.ui.lesionSegmentsSelector.selectedSegmentIDs() == ["Segment_1", "Segment_3"]
    assert w2.ui.aifSegmentSelector.currentSegmentID() == "Segment_2"


@pytest.mark.parametrize("how", ["import", "close and load"])
def test_a_scene_loaded_while_the_module_is_open_restores_its_choices(gui, tmp_path, how):
    """Issue 11, bug 2 (second part), and what a load does to node selectors. Loading copies the file's
    parameter node onto the open one (a singleton), with or without closing the scene first; meanwhile every
    node selector ignores the new nodes and then rebuilds its list, losing its choice (qMRMLSceneModel.cxx:
    1203-1219, :1499-1507; Slicer issues #4570, #7492). Bound to the parameter node, the DCE selector (no
    "None" item) put the first sequence into it - a follow-up scene reopened on the baseline sequence."""
    mod, app, hs = gui
    _, base = add_exam(hs, "DCE baseline")
    _, follow = add_exam(hs, "DCE follow-up", seed=4)
    segmentation = add_segmentation(hs, "segments", SEGMENTS)
    w = open_module(mod)
    w.ui.dceSequenceSelector.choose(follow.sequence)
    w.ui.anatomySelector.choose(follow.anatomy)
    w.ui.examLabelLineEdit.text = "follow-up"
    _choose_segments(w, segmentation)
    path = headless.save_bundle(hs.scene, str(tmp_path / "saved.mrml"))
    w.ui.dceSequenceSelector.choose(base.sequence)                       # the user goes on with other choices
    w.ui.segmentationSelector.setCurrentNode(None)
    w.ui.examLabelLineEdit.text = "baseline"
    hs.scene.SetURL(path)
    assert hs.scene.Import() if how == "import" else hs.scene.Connect()
    app.processEvents()                                                  # back in Slicer's event loop
    p = w._parameterNode
    assert p.dceSequence.GetName() == "DCE follow-up" and p.examLabel == "follow-up"
    assert w.ui.dceSequenceSelector.currentNode() is p.dceSequence
    assert p.anatomyVolume.GetName() == "DCE follow-up anatomy"
    assert w.ui.anatomySelector.currentNode() is p.anatomyVolume
    seg = p.segmentation
    assert seg.GetName() == "segments" and w.ui.segmentationSelector.currentNode() is seg
    assert w.logic.segmentChoices(p) == (["Segment_1", "Segment_3"], "Segment_2")
    assert w.ui.lesionSegmentsSelector.currentNode() is seg
    assert w.ui.lesionSegmentsSelector.selectedSegmentIDs() == ["Segment_1", "Segment_3"]
    assert w.ui.aifSegmentSelector.currentSegmentID() == "Segment_2"
    assert slicergui.SLOT_ERRORS == []


def test_the_aif_choice_is_never_made_by_the_selector_itself(gui):
    """When its AIF segment is removed, or the first segment of an empty segmentation is painted, the single
    segment selector picks a segment itself and emits (qMRMLSegmentSelectorWidget.cxx:263-280): that was
    stored as the AIF - the lesion became the artery."""
    mod, app, hs = gui
    add_exam(hs, "DCE")
    segmentation = add_segmentation(hs, "segments", SEGMENTS)
    empty = add_segmentation(hs, "new segments", {})
    w = open_module(mod)
    _choose_segments(w, segmentation)
    segmentation.GetSegmentation().RemoveSegment("Segment_2")           # the aorta deleted in Segment Editor
    app.processEvents()
    assert w.logic.segmentChoices(w._parameterNode) == (["Segment_1", "Segment_3"], "")
    assert w.ui.aifSegmentSelector.currentSegmentID() == ""
    w.ui.segmentationSelector.choose(empty)
    empty.GetSegmentation().AddEmptySegment("Segment_1", "L2 metastasis")   # the first segment painted
    app.processEvents()
    assert w.logic.segmentChoices(w._parameterNode) == ([], "")
    assert w.ui.aifSegmentSelector.currentSegmentID() == ""
    w.ui.aifSegmentSelector.choose("Segment_1")                          # a user's pick is kept
    assert w.logic.segmentChoices(w._parameterNode) == ([], "Segment_1")


def test_a_scene_saved_by_the_previous_version_keeps_its_choices(gui, monkeypatch, tmp_path):
    """Its parameter node has the segment IDs without the segmentation they belong to, and TR/flip angle filled
    in from the sequence's DICOM values (they now mean "entered": 0 is "from DICOM")."""
    mod, app, hs = gui
    _, nodes = add_exam(hs, "DCE", tr_ms=4.5, flip_deg=25)
    node = mod.DCEPerfusionLogic().getParameterNode().parameterNode
    for key, value in (("LesionSegmentIDs", nodes.lesion_segment_id), ("AIFSegmentID", nodes.artery_segment_id),
                       ("repetitionTime_ms", "4.5"), ("flipAngle_deg", "25.0")):
        node.SetParameter(key, value)
    node.SetNodeReferenceID("segmentation", nodes.segmentation.GetID())
    node.SetNodeReferenceID("dceSequence", nodes.sequence.GetID())
    node.UnsetParameter("ParameterNodeVersion")
    w = open_module(mod)
    assert w.logic.segmentChoices(w._parameterNode) == ([nodes.lesion_segment_id], nodes.artery_segment_id)
    assert w._parameterNode.repetitionTime_ms == 0.0 and w._parameterNode.flipAngle_deg == 0.0
    assert used_tr_flip(w) == (pytest.approx(0.0045), 25.0)


# ============================================================================================ Apply
def _ready(mod, hs, **exam):
    """The module open on one phantom exam, its lesion and artery chosen as a user would."""
    ph, nodes = add_exam(hs, "DCE", **exam)
    w = open_module(mod)
    w.ui.segmentationSelector.choose(nodes.segmentation)
    w.ui.lesionSegmentsSelector.check([nodes.lesion_segment_id])
    w.ui.aifSegmentSelector.choose(nodes.artery_segment_id)
    w.ui.t10SpinBox.value = 1.6
    w.ui.contrastAgentComboBox.currentIndex = len(mod.CONTRAST_AGENTS) - 1    # other: enter r1
    w.ui.relaxivitySpinBox.value = ph.acquisition["r1_per_mM_s"]
    return ph, nodes, w


def _maps(hs):
    return [hs.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName()
            for i in range(hs.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
            if "(" in hs.scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName()]


def test_apply_fits_with_the_chosen_segments_and_finds_the_bolus(gui):
    mod, app, hs = gui
    ph, nodes, w = _ready(mod, hs)
    assert w.ui.baselineFramesSpinBox.displayText().startswith("detect")
    w.ui.applyButton.click()
    assert app.errors == []
    assert "vp (baseline)" in _maps(hs)
    vp = slicer.util.arrayFromVolume(hs.scene.GetFirstNodeByName("vp (baseline)"))
    lesion = nodes.labels == phantom.LABELS["lesion"]
    assert abs(np.median(vp[lesion]) - np.median(nodes.truth["vp"][lesion])) < 0.025
    assert f"Baseline: {ph.acquisition['n_baseline']} frames" in w.ui.resultLabel.text   # found from the curves
    dialog = app.dialogs[-1]
    assert dialog.windowModality == app.ApplicationModal and dialog.closed


def test_apply_is_modal_and_cannot_start_twice(gui):
    """QProgressDialog is modal only with windowModality set (slicer.util.createProgressDialog, util.py:3113-3141
    in 5.8.1, sets only what it is given); the button is disabled while the fit runs, and a second press
    (a queued click, a script) does nothing."""
    mod, app, hs = gui
    _, _, w = _ready(mod, hs)
    seen = {}

    def while_fitting():
        seen["enabled"] = w.ui.applyButton.enabled
        w.onApplyButton()                                   # even a direct call does not start a second fit
    app.during_events = while_fitting
    w.ui.applyButton.click()
    assert seen == {"enabled": False} and len(app.dialogs) == 1 and app.errors == []
    assert w.ui.applyButton.enabled                         # and enabled again afterwards


def test_closing_the_scene_during_a_fit_cancels_it_writing_nothing(gui):
    mod, app, hs = gui
    _, _, w = _ready(mod, hs)
    app.during_events = lambda: hs.scene.Clear(0)
    w.ui.applyButton.click()
    assert app.errors == [] and _maps(hs) == []
    assert w._parameterNode is not None and w._parameterNode.dceSequence is None   # a fresh parameter node


def test_a_model_the_method_cannot_fit_disables_apply_with_the_reason(gui):
    mod, app, hs = gui
    _, _, w = _ready(mod, hs)
    assert w.ui.applyButton.enabled
    models = [m for m in mod.KineticModel]
    w.ui.modelComboBox.currentIndex = models.index(mod.KineticModel.TWO_COMPARTMENT_EXCHANGE)
    w.ui.methodComboBox.currentIndex = [m for m in mod.FitMethod].index(mod.FitMethod.LLS)
    assert not w.ui.applyButton.enabled
    assert "use method='nlls'" in w.ui.applyButton.toolTip            # the Lib's own message, also shown
    assert w.ui.applyProblemLabel.visible and "Two-compartment exchange" in w.ui.applyProblemLabel.text
    w.ui.methodComboBox.currentIndex = [m for m in mod.FitMethod].index(mod.FitMethod.NLLS)
    assert w.ui.applyButton.enabled and not w.ui.applyProblemLabel.visible


def test_apply_does_not_need_the_internet_or_optional_packages(gui, monkeypatch):
    """Slicer 5.8 bundles numpy, scipy, SimpleITK and pydicom; threadpoolctl is optional (the Lib falls back),
    so its absence neither asks nor installs anything."""
    import importlib.util
    mod, app, hs = gui
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "threadpoolctl"
                        else find_spec(name, *a))
    _, _, w = _ready(mod, hs)
    w.ui.applyButton.click()
    assert app.errors == [] and app.questions == [] and app.installs == []
    assert "vp (baseline)" in _maps(hs)


def test_a_missing_required_package_is_asked_for_and_an_offline_install_is_one_line(gui, monkeypatch):
    import importlib.util
    mod, app, hs = gui
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else find_spec(name, *a))
    _, _, w = _ready(mod, hs)
    app.confirm = False                                          # the user says no: nothing happens
    w.ui.applyButton.click()
    assert len(app.questions) == 1 and "scipy" in app.questions[0] and app.installs == [] and app.errors == []
    assert _maps(hs) == []
    app.confirm, app.online = True, False                        # yes, but offline: one line naming the fix
    w.ui.applyButton.click()
    assert app.installs == ["scipy"] and len(app.errors) == 1
    title, text = app.errors[0]
    assert "Could not install scipy" in text and "pip_install('scipy')" in text and "\n" not in text
    with pytest.raises(ValueError, match=r"install them with slicer.util.pip_install\('scipy'\)"):
        w.logic.process(w._parameterNode)                        # from the console: never installed silently
    assert len(app.installs) == 1


# ==================================================================================== frame labels
def test_frame_labels_in_count_are_refused_until_an_interval_is_given(gui):
    """The importer writes MultiVolume.FrameLabels in MultiVolume.FrameIdentifyingDICOMTagUnits
    (MultiVolumeImporterPlugin.py:63-78): Temporal Position Identifiers 1, 2, 3 ... are a count, not ms."""
    mod, app, hs = gui
    ph, nodes, w = _ready(mod, hs)
    n = nodes.sequence.GetNumberOfDataNodes()
    nodes.sequence.SetAttribute(mv.FRAME_LABELS, ",".join(str(k + 1) for k in range(n)))
    nodes.sequence.SetAttribute(mv.TAG_UNITS_KEY, "count")
    nodes.sequence.SetIndexUnit("")                              # no time in the index either
    w.ui.applyButton.click()
    assert len(app.errors) == 1 and "'count'" in app.errors[0][1] and "frame interval" in app.errors[0][1]
    assert _maps(hs) == []
    w.ui.frameIntervalSpinBox.value = float(np.diff(ph.t_s)[0])
    w.ui.applyButton.click()
    assert len(app.errors) == 1 and "vp (baseline)" in _maps(hs)


# ====================================================================================== MultiVolume
def _as_multivolume(hs, nodes, name="DCE MultiVolume"):
    """What the importer makes with "multi-volume" as the preferred format: one volume whose voxels hold one
    component per frame, with the MultiVolume attributes (MultiVolumeImporterPlugin.py:332-347, :686-700;
    MultiVolumeExplorer's node class is a vtkMRMLScalarVolumeNode, which slicer-core lacks - a vector volume
    with the same attributes stands in)."""
    from vtk.util import numpy_support

    from DCEPerfusionLib.scene.output import ijk_to_ras, set_ijk_to_ras
    seq = nodes.sequence
    frames = np.stack([slicer.util.arrayFromVolume(seq.GetNthDataNode(k)) for k in range(seq.GetNumberOfDataNodes())],
                      axis=-1)                                        # (K, J, I, frames)
    image = vtk.vtkImageData()
    image.SetDimensions(frames.shape[2], frames.shape[1], frames.shape[0])
    scalars = numpy_support.numpy_to_vtk(frames.reshape(-1, frames.shape[-1]), deep=True)
    image.GetPointData().SetScalars(scalars)
    volume = slicer.vtkMRMLVectorVolumeNode()
    volume.SetName(name)
    volume.SetAndObserveImageData(image)
    set_ijk_to_ras(volume, ijk_to_ras(seq.GetNthDataNode(0)))
    for key in seq.GetAttributeNames():
        volume.SetAttribute(key, seq.GetAttribute(key))
    volume.SetAttribute("MultiVolume.NumberOfFrames", str(frames.shape[-1]))
    hs.scene.AddNode(volume)                                          # complete when added, as the importer does
    return volume


def test_a_multivolume_is_explained_and_converted_to_a_sequence_that_fits_the_same(gui):
    mod, app, hs = gui
    ph, nodes, w = _ready(mod, hs)
    assert not w.ui.multiVolumeRow.visible
    volume = _as_multivolume(hs, nodes)
    assert w.ui.multiVolumeRow.visible and "'DCE MultiVolume': a MultiVolume" in w.ui.multiVolumeLabel.text
    w.ui.applyButton.click()
    reference = slicer.util.arrayFromVolume(hs.scene.GetFirstNodeByName("vp (baseline)")).copy()
    w.ui.convertMultiVolumeButton.click()
    seq = w._parameterNode.dceSequence
    assert seq is not nodes.sequence and seq.GetName() == "DCE MultiVolume sequence"
    assert w.ui.dceSequenceSelector.currentNode() is seq
    assert seq.GetNumberOfDataNodes() == nodes.sequence.GetNumberOfDataNodes()
    assert seq.GetAttribute(mv.TR_KEY) == nodes.sequence.GetAttribute(mv.TR_KEY)
    assert slicer.util.arrayFromVolume(volume).shape[-1] == seq.GetNumberOfDataNodes()   # the MultiVolume is kept
    assert not w.ui.multiVolumeRow.visible                             # converted: no second copy offered
    w.ui.examLabelLineEdit.text = "from MultiVolume"
    w.ui.applyButton.click()
    assert app.errors == []
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(hs.scene.GetFirstNodeByName("vp (from MultiVolume)")),
                                  reference)


def test_a_flip_angle_multivolume_is_not_offered_as_a_dce_series(gui):
    """Variable-flip-angle T1 series, echoes and b-values are MultiVolumes too (MultiVolumeImporterPlugin.py:63-79)."""
    mod, app, hs = gui
    _, nodes, w = _ready(mod, hs)
    volume = _as_multivolume(hs, nodes, name="VFA")
    assert w.ui.multiVolumeRow.visible
    volume.SetAttribute(mv.TAG_NAME_KEY, "FlipAngle")
    volume.SetAttribute(mv.TAG_UNITS_KEY, "degrees")
    w._updateMultiVolumeHint()
    assert not w.ui.multiVolumeRow.visible and w.logic.multiVolumeNodes() == []


def test_the_reference_segment_and_the_noise_correction_reach_the_lib(gui):
    """The normal-marrow reference is a one-segment choice like the AIF (kept with its segmentation); the Rician
    correction maps to the options' noise_sigma: off -> None, on at 0 -> "auto", on at a value -> that value."""
    mod, app, hs = gui
    ph = phantom.make_phantom(shape=(3, 20, 24), snr=80.0, seed=3)
    nodes = scene_phantom.add_phantom(hs.scene, ph, name="DCE", segments={
        "lesion": phantom.LABELS["lesion"], "artery": phantom.LABELS["artery"], "muscle": phantom.LABELS["muscle"]})
    w = open_module(mod)
    w.ui.segmentationSelector.choose(nodes.segmentation)
    w.ui.lesionSegmentsSelector.check([nodes.lesion_segment_id])
    w.ui.referenceSegmentSelector.choose(nodes.segment_ids["muscle"])
    app.processEvents()
    p = w._parameterNode
    assert w.logic.segmentChoice(p, mod.REFERENCE_SEGMENT_PARAMETER) == nodes.segment_ids["muscle"]
    assert w.logic.segmentChoices(p) == ([nodes.lesion_segment_id], "")           # the lesion choice stays
    assert w.ui.referenceSegmentSelector.currentSegmentID() == nodes.segment_ids["muscle"]
    assert w.logic.analysisOptions(p).noise_sigma is None
    w.ui.correctRicianNoiseCheckBox.checked = True
    assert w.ui.noiseSigmaSpinBox.enabled and w.logic.analysisOptions(p).noise_sigma == "auto"
    w.ui.noiseSigmaSpinBox.value = 12.5
    assert w.logic.analysisOptions(p).noise_sigma == 12.5
    w.ui.correctRicianNoiseCheckBox.checked = False
    w.ui.applyButton.click()
    assert app.errors == []
    table = hs.scene.GetFirstNodeByName("DCE statistics (baseline)")
    names = {table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())}
    assert {"lesion", "muscle"} <= names


def test_the_motion_correction_choices_reach_the_lib_and_the_result_line(gui):
    """Motion correction is a checkbox (off: "none") with the registry's kinds and the reference frames; the
    list and the spin box follow the checkbox; Apply with it on registers the frames (a phantom moved by a
    known 2 mm shift from the first half of the series on) and the result line reports the motion."""
    from DCEPerfusionLib.core import motion, registry
    mod, app, hs = gui
    ph = phantom.make_phantom(shape=(8, 24, 24), n_frames=30, snr=60.0, seed=4)
    shift = np.zeros((30, 6))
    shift[:15, 1] = 2.0                                           # 2 mm along y (LPS) before frame 15
    matrix = np.diag([1.5, 1.5, 3.0, 1.0])
    ph.signal = motion_phantom_series(ph.signal, matrix, shift)
    nodes = scene_phantom.add_phantom(hs.scene, ph, matrix=matrix, name="DCE",
                                      segments={"lesion": phantom.LABELS["lesion"]})
    w = open_module(mod)
    w.ui.segmentationSelector.choose(nodes.segmentation)
    w.ui.lesionSegmentsSelector.check([nodes.lesion_segment_id])
    app.processEvents()
    p = w._parameterNode
    combo = w.ui.motionCorrectionComboBox
    assert [combo.itemText(i) for i in range(combo.count())] == [                     # every kind but "none"
        title for key, title in registry.MOTION_CORRECTIONS.items() if key != "none"]
    assert not combo.enabled and not w.ui.motionReferenceFramesSpinBox.enabled
    assert w.logic.analysisOptions(p).motion_correction == "none"
    w.ui.correctMotionCheckBox.checked = True
    assert combo.enabled and w.ui.motionReferenceFramesSpinBox.enabled
    options = w.logic.analysisOptions(p)
    assert (options.motion_correction, options.motion_reference_frames) == ("rigid", motion.REFERENCE_FRAMES)
    w.ui.motionReferenceFramesSpinBox.value = 4
    assert w.logic.analysisOptions(p).motion_reference_frames == 4
    w.ui.motionCorrectionComboBox.currentIndex = [m for m in mod.MotionCorrection].index(mod.MotionCorrection.MODEL)
    assert w.logic.analysisOptions(p).motion_correction == "model"
    w.ui.motionCorrectionComboBox.currentIndex = 0
    w.ui.applyButton.click()
    assert app.errors == []
    assert "Motion (rigid): frames moved up to 2." in w.ui.resultLabel.text
    # the DCE's proxy volume is shown under the frame's transform (corrected) until the box is unticked
    from DCEPerfusionLib.scene import motion as scene_motion
    from DCEPerfusionLib.scene.output import browsers_of, find_output
    transforms = find_output(hs.scene, scene_motion.TRANSFORMS_ROLE, "baseline")
    browser = browsers_of(hs.scene, nodes.sequence)[0]
    volume, proxy = browser.GetProxyNode(nodes.sequence), browser.GetProxyNode(transforms)
    assert w.ui.showFramesCorrectedCheckBox.checked and volume.GetTransformNodeID() == proxy.GetID()
    w.ui.showFramesCorrectedCheckBox.checked = False
    assert volume.GetTransformNodeID() is None and not p.showFramesCorrected
    w.ui.showFramesCorrectedCheckBox.checked = True
    assert volume.GetTransformNodeID() == proxy.GetID()


def motion_phantom_series(signal, matrix, params):
    """The phantom's series moved by ``params`` (T, 6) about the volume's centre (core.phantom.move_series)."""
    from DCEPerfusionLib.core import motion
    from DCEPerfusionLib.core import phantom as core_phantom
    shape = signal.shape[:-1]
    return core_phantom.move_series(signal, matrix, motion.euler_matrix(params, motion.centre_lps(shape, matrix)))


# ============================================================================ the optional numba
@pytest.fixture
def no_numba(monkeypatch):
    """A Slicer whose Python has no numba (importlib.util.find_spec gives None for a None in sys.modules, and
    the import fails); ``installed()`` makes it importable again - what a successful pip install does."""
    import sys
    monkeypatch.setitem(sys.modules, "numba", None)
    return lambda requirements: monkeypatch.delitem(sys.modules, "numba")


def _restart(monkeypatch, hs, app):
    """Slicer started again: the module imported afresh, its settings file kept."""
    mod2, app2 = slicergui.install(monkeypatch, hs)
    app2.settings = app.settings
    return mod2, app2


def test_numba_is_offered_once_and_a_declined_offer_is_never_repeated(gui, no_numba, monkeypatch):
    mod, app, hs = gui
    _, _, w = _ready(mod, hs)
    assert w.ui.installNumbaButton.visible                      # missing: the button to install it later is there
    app.confirm = False                                         # "Cancel"
    w.ui.applyButton.click()
    assert len(app.questions) == 1 and app.installs == [] and app.errors == []
    question = app.questions[0]
    assert "numba" in question and "the fit works without it" in question and "PyPI" in question
    assert f"about {fitting.COMPILED_SPEEDUP} times faster" in question       # the Lib's measured factor
    assert "vp (baseline)" in _maps(hs)                         # the fit ran (numpy kernels)
    assert "Fit engine: numpy." in w.ui.resultLabel.text
    assert app.settings == {"DCEPerfusion/offerNumba": "false"}
    w.ui.applyButton.click()
    assert len(app.questions) == 1
    mod2, app2 = _restart(monkeypatch, hs, app)                 # the next session: not asked either
    w2 = open_module(mod2)
    w2.ui.applyButton.click()
    assert app2.questions == [] and app2.installs == [] and app2.errors == []
    assert w2.ui.installNumbaButton.visible


def test_an_accepted_numba_install_runs_then_the_fit(gui, no_numba):
    mod, app, hs = gui
    _, _, w = _ready(mod, hs)
    app.confirm, app.online = True, True
    shown = []
    app.on_install = lambda requirements: (shown.append(app.dialogs[-1].labelText), no_numba(requirements))
    w.ui.applyButton.click()
    assert len(app.questions) == 1 and app.errors == []
    import numpy
    assert app.installs == [f"numba>=0.60 numpy=={numpy.__version__}"]   # Slicer's numpy stays as it is
    assert "Installing numba" in shown[0]                       # the progress dialog said what was going on
    assert "vp (baseline)" in _maps(hs)
    assert w.ui.resultLabel.text.startswith("numba installed")
    assert not w.ui.installNumbaButton.visible                  # importable now: nothing left to offer
    w.ui.applyButton.click()
    assert len(app.questions) == 1 and len(app.installs) == 1 and app.errors == []


def test_a_failed_numba_install_is_one_line_and_the_fit_still_runs(gui, no_numba, monkeypatch):
    mod, app, hs = gui
    _, _, w = _ready(mod, hs)
    app.confirm, app.online = True, False                       # yes, but offline: pip exits with status 1
    w.ui.applyButton.click()
    assert len(app.installs) == 1 and app.errors == []          # no error dialog: the fit ran
    assert "vp (baseline)" in _maps(hs)
    first = w.ui.resultLabel.text.split("<br>")[0]
    assert first.startswith("Could not install numba (pip exited with status 1")
    assert "the fit runs without it" in first and "slicer.util.pip_install(&#x27;numba&gt;=0.60 numpy==" in first
    assert "Fit engine: numpy." in w.ui.resultLabel.text
    assert app.status_messages == [first.replace("&#x27;", "'").replace("&gt;", ">")]
    w.ui.applyButton.click()                                    # not asked again this session ...
    assert len(app.questions) == 1 and len(app.installs) == 1
    assert "DCEPerfusion/offerNumba" not in app.settings        # ... but it was not declined: the next one asks
    mod2, app2 = _restart(monkeypatch, hs, app)
    app2.confirm = False
    open_module(mod2).ui.applyButton.click()
    assert len(app2.questions) == 1


def test_the_install_numba_button(gui, no_numba):
    """The way to get numba after declining it: the button in the Model section, shown while it is missing."""
    mod, app, hs = gui
    w = open_module(mod)
    app.online = False
    w.ui.installNumbaButton.click()
    assert len(app.errors) == 1 and app.errors[0][0] == "Could not install numba."
    assert "Could not install numba (pip exited with status 1" in app.errors[0][1] and "\n" not in app.errors[0][1]
    assert w.ui.installNumbaButton.visible
    app.online, app.on_install = True, no_numba
    w.ui.installNumbaButton.click()
    assert len(app.errors) == 1 and len(app.installs) == 2 and not w.ui.installNumbaButton.visible
    assert app.questions == []                                  # a click is the user's choice: nothing asked


def test_no_numba_offer_in_testing_mode(gui, no_numba):
    """In testing mode confirmOkCancelDisplay answers OK without a dialog (util.py:3061-3063, Slicer 5.8.1):
    a self-test must not install numba."""
    mod, app, hs = gui
    _, _, w = _ready(mod, hs)
    app.testing = True
    w.ui.applyButton.click()
    assert app.installs == [] and app.errors == [] and "vp (baseline)" in _maps(hs)


def test_numba_present_is_neither_offered_nor_shown(gui, monkeypatch):
    mod, app, hs = gui
    monkeypatch.setattr(mod.DCEPerfusionLogic, "compiledFitsAvailable", staticmethod(lambda: True))
    _, _, w = _ready(mod, hs)
    assert not w.ui.installNumbaButton.visible
    w.ui.applyButton.click()
    assert app.questions == [] and app.installs == [] and app.errors == []


def test_the_progress_dialog_says_when_numba_compiles_the_kernels(gui, monkeypatch):
    """With numba the first fit of a session first compiles the kernels (fitting.compile_kernels: seconds spent,
    0.0 afterwards); the dialog says so instead of standing at "fitting 0/N voxels"."""
    from DCEPerfusionLib.core import fitting
    mod, app, hs = gui
    monkeypatch.setattr(mod.DCEPerfusionLogic, "compiledFitsAvailable", staticmethod(lambda: True))
    _, _, w = _ready(mod, hs)
    calls = []
    monkeypatch.setattr(fitting, "compile_kernels", raising=False,
                        value=lambda: calls.append(app.dialogs[-1].labelText) or (0.0 if len(calls) > 1 else 12.5))
    w.ui.applyButton.click()
    w.ui.applyButton.click()
    assert app.errors == [] and len(calls) == 2 and calls[0].startswith("Compiling the fit kernels")
