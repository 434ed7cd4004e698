"""DCE Perfusion - 3D Slicer scripted module (thin glue; the work is done in DCEPerfusionLib)."""

import enum
import html
import importlib
import importlib.util
import logging
import pathlib
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLSequenceNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# the Lib's catalogue of choices (plain Python: the module loads before anything else is imported)
from DCEPerfusionLib.core import registry
from DCEPerfusionLib.core.units import MS_PER_S

#: Python packages the module's computations import, {import name: pip name}. Slicer 5.8 and newer bundle every
#: one (SuperBuild/External_python-numpy.cmake, External_python-scipy.cmake, External_SimpleITK.cmake), so they
#: are only offered for install - after asking - in a Slicer built without them. Optional packages
#: (threadpoolctl, matplotlib, ...) are never installed: the Lib works without them.
REQUIRED_PACKAGES = {"numpy": "numpy", "scipy": "scipy", "SimpleITK": "SimpleITK"}
#: The one optional package the module offers: numba compiles the fit kernels (DCEPerfusionLib.core._compiled;
#: ``fitting.fit(engine="auto")`` uses them when numba imports, else the numpy kernels - the same results). The
#: widget asks once, on the first Apply; the logic (the Python console) never asks nor installs. The pin is the
#: Lib's (pyproject.toml).
NUMBA_REQUIREMENT = "numba>=0.60"
#: QSettings key, False once the user declined numba (read with slicer.util.settingsValue and toBool, written
#: with qt.QSettings().setValue - as ScreenCapture.py:345 and :649 do in Slicer 5.8.1)
OFFER_NUMBA_SETTING = "DCEPerfusion/offerNumba"
#: The package the DICOM export needs that Slicer does not bundle (Slicer 5.8.1 bundles pydicom 2.4.4 -
#: SuperBuild/External_python-dicom-requirements.cmake:43-45 - but not highdicom): highdicom writes the Parametric
#: Maps and the SEG (DCEPerfusionLib.files.dicomout). The panel asks before installing it, on the first export; the
#: pin is the Lib's (pyproject.toml). The packages it must leave as Slicer has them are pinned to their version.
DICOM_EXPORT_PACKAGES = {"highdicom": "highdicom>=0.22"}
DICOM_EXPORT_KEEP = ("pydicom", "numpy")
#: how the result line names FitResult.engine
ENGINE_TITLES = {"numba": "numba (compiled kernels)", "numpy": "numpy"}


#
# DCEPerfusion
#


class DCEPerfusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DCE Perfusion")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["Sequences", "Segmentations", "Plots", "Tables", "Colors"]
        self.parent.contributors = ["DCEPerfusion developers"]
        self.parent.helpText = _("""
Quantitative DCE-MRI perfusion. From a DCE-MRI volume sequence it computes, voxel by voxel, the
tracer-kinetic maps <b>Ktrans</b> and <b>kep</b> (1/min), <b>ve</b> and <b>vp</b> (fractions 0-1) with the
Tofts, Extended Tofts, Patlak or two-compartment exchange model, after converting the SPGR signal to
contrast-agent concentration (mM) with the pre-contrast T1 (a T1 map or a constant, s), TR, flip angle and
the agent's relaxivity. The arterial input function is a population curve (Parker, Georgiou, Weinmann,
Fritz-Hansen), the mean of an artery segment, or found automatically (shown as a segment to check).
Maps are shown over the anatomy with a colour legend; lesion statistics go to a table and the lesion's mean
concentration curve, its fit and the AIF to a plot. The fits pass the OSIPI reference tests.
For treated spine metastases a drop of the lesion's vp from baseline to follow-up indicates treatment
success and a rise failure (AJNR 2023;44:1451: vp sensitivity 91 %, specificity 87 %).
""")
        self.parent.acknowledgementText = _("""
Formulas follow the OSIPI DCE-DSC-MRI code collection and its reference data (Apache-2.0);
relaxivities from Rohrer et al., Invest Radiol 2005. Built with the Slicer scripted-module template.
""")


#
# Parameters
#


def _choices(name, keys, titles, ident=str.upper):
    """An enum of the registry's choices (member names as saved in the parameter node, values the Lib's
    keys) whose ``label`` gives the translated title, as the wrapper's combobox connector asks for it
    (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py:419 in Slicer 5.8.1; the
    parameter node stores the member name, serializers.py:1004)."""
    choices = enum.Enum(name, [(ident(k), k) for k in keys])
    choices.label = staticmethod(lambda member: _(titles[member.value]))
    return choices


# (a prescribed curve needs a table the module does not offer yet: command line only)
AIFSource = _choices("AIFSource", [k for k in registry.AIF_SOURCES if k not in registry.PRESCRIBED_AIF_SOURCES],
                     registry.AIF_SOURCES)
KineticModel = _choices("KineticModel", registry.MODELS, {k: m.title for k, m in registry.MODELS.items()},
                        ident=lambda k: registry.MODELS[k].ident)
FitMethod = _choices("FitMethod", registry.METHODS, registry.METHODS)
# (no motion correction is the checkbox unticked, not a choice of the list)
MotionCorrection = _choices("MotionCorrection", [k for k in registry.MOTION_CORRECTIONS if k != "none"],
                            registry.MOTION_CORRECTIONS)

OTHER_AGENT = "other (enter r1)"
_DEFAULTS = registry.DEFAULT_OPTIONS  # the Lib's defaults (core.options.AnalysisOptions uses the same)
CONTRAST_AGENTS = [*registry.CONTRAST_AGENTS, OTHER_AGENT]


@parameterNodeWrapper
class DCEPerfusionParameterNode:
    """Inputs and settings of one run (saved with the scene). Units are in the names."""

    dceSequence: vtkMRMLSequenceNode
    anatomyVolume: vtkMRMLScalarVolumeNode
    t1MapVolume: vtkMRMLScalarVolumeNode
    t10Constant_s: Annotated[float, WithinRange(0.05, 10.0)] = _DEFAULTS["t10_s"]
    repetitionTime_ms: Annotated[float, WithinRange(0.0, 1000.0)] = 0.0
    flipAngle_deg: Annotated[float, WithinRange(0.0, 90.0)] = 0.0
    frameInterval_s: Annotated[float, WithinRange(0.0, 600.0)] = 0.0
    contrastAgent: Annotated[str, Choice(CONTRAST_AGENTS)] = _DEFAULTS["contrast_agent"]
    fieldStrength_T: Annotated[float, Choice(list(registry.FIELD_STRENGTHS_T))] = _DEFAULTS["field_strength_t"]
    relaxivity_per_mM_s: Annotated[float, WithinRange(0.1, 50.0)] = 4.5
    bloodT10_s: Annotated[float, WithinRange(0.0, 5.0)] = 0.0
    hematocrit: Annotated[float, WithinRange(0.0, 0.99)] = _DEFAULTS["hct"]
    baselineFrames: Annotated[int, WithinRange(0, 1000)] = 0  # 0: found from the curves (bolus arrival)
    correctRicianNoise: bool = False
    noiseSigma: Annotated[float, WithinRange(0.0, 1e6)] = 0.0  # signal units; 0: estimated from the baseline
    correctMotion: bool = False
    motionCorrection: MotionCorrection = MotionCorrection("rigid")
    motionReferenceFrames: Annotated[int, WithinRange(1, 100)] = _DEFAULTS["motion_reference_frames"]
    aifSource: AIFSource = AIFSource(_DEFAULTS["aif_source"])
    segmentation: vtkMRMLSegmentationNode
    fitSegmentsOnly: bool = False
    model: KineticModel = KineticModel(_DEFAULTS["model"])
    method: FitMethod = FitMethod(_DEFAULTS["method"])
    fitDelay: bool = False
    uncertainty: bool = True
    examLabel: str = "baseline"
    overlayMap: Annotated[str, Choice(registry.overlay_choices())] = "vp"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    showFramesCorrected: bool = True
    # response: two analysed exams, by exam label
    responseBaselineExam: str = "baseline"
    responseFollowupExam: str = "follow-up"
    followupSegmentation: vtkMRMLSegmentationNode
    responseBaselineAnatomy: vtkMRMLScalarVolumeNode
    responseFollowupAnatomy: vtkMRMLScalarVolumeNode
    responseStatistic: Annotated[str, Choice(list(registry.RESPONSE_STATISTICS))] = registry.RESPONSE_STATISTICS[0]
    responseCutoff_pct: Annotated[float, WithinRange(-100.0, 100.0)] = registry.VP_CUTOFF_PCT
    sizeProgression_pct: Annotated[float, WithinRange(1.0, 200.0)] = registry.SIZE_PROGRESSION_PCT
    callOnReferenceNormalised: bool = False
    indeterminateWhenCIStraddles: bool = True
    # cohort
    cohortCsvPath: pathlib.Path
    cohortTable: vtkMRMLTableNode
    cohortSizeCutoff_pct: Annotated[float, WithinRange(1.0, 200.0)] = registry.SIZE_PROGRESSION_PCT


# Segment choices live in segment selector widgets, which the wrapper cannot bind; they are kept in the same
# parameter node under these names, with a node reference to the segmentation they were made in (a node
# reference, unlike a parameter, follows the node's ID when a scene is imported): segment IDs name different
# structures in another segmentation, so a choice is void once the segmentation is changed.
LESION_SEGMENTS_PARAMETER = "LesionSegmentIDs"
AIF_SEGMENT_PARAMETER = "AIFSegmentID"
REFERENCE_SEGMENT_PARAMETER = "ReferenceSegmentID"
SEGMENTS_OF_REFERENCE = "SegmentChoicesSegmentation"
#: parameter-node layout: 2 = segment choices with their segmentation, TR/flip 0 meaning "from DICOM"
#: (scenes saved before have neither; :meth:`DCEPerfusionLogic.upgradeParameterNode`)
PARAMETER_NODE_VERSION_PARAMETER, PARAMETER_NODE_VERSION = "ParameterNodeVersion", "2"


#
# DCEPerfusionWidget
#


class DCEPerfusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The parameter node is the one source of the inputs: widgets bound by the wrapper write it on a user's
    change and are rewritten from it on its ModifiedEvent; the segment selectors (not bound) are rewritten from
    it in :meth:`_updateGUIFromParameterNode`, with their signals blocked, and write it only from a user's
    change. No slot of a bound widget writes other parameters: the wrapper's refresh would put the old value
    back in that widget before its own slot has read the new one (issue 11)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._numbaOffered = False          # asked this session (once: also after a failed install)
        self._lastOutputs = None            # the last fit of this panel (scene.analysis.SceneOutputs): exportable
        self._lastResponse = None           # the last assessment: (lesion responses, baseline label, follow-up label)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DCEPerfusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DCEPerfusionLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartImportEvent, self.onSceneStartImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._updateMultiVolumeHint)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self._updateMultiVolumeHint)
        self.ui.lesionSegmentsSelector.connect("segmentSelectionChanged(QStringList)", self.onLesionSegmentsChanged)
        # the AIF and reference segments are stored from a user's pick only: a selector also picks a segment itself
        # when its list is rebuilt (qMRMLSegmentSelectorWidget.cxx:263-280); a QComboBox emits activated() for users
        for selector, parameter in self._singleSegmentSelectors().items():
            slicer.util.findChild(selector, "comboBox_Segment").connect(
                "activated(int)", lambda index, s=selector, n=parameter: self.onSegmentChosen(s, n))
            selector.connect("currentSegmentChanged(QString)", self._onSingleSelectorChanged)
        for selector in (self.ui.lesionSegmentsSelector, *self._singleSegmentSelectors()):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self._onSegmentSelectorNodeChanged)
        self.ui.convertMultiVolumeButton.connect("clicked(bool)", self.onConvertMultiVolumeButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showFramesCorrectedCheckBox.connect("toggled(bool)", self.onShowFramesCorrected)
        self.ui.assessButton.connect("clicked(bool)", self.onAssessButton)
        self.ui.loadCohortButton.connect("clicked(bool)", self.onLoadCohortButton)
        self.ui.computeCohortButton.connect("clicked(bool)", self.onComputeCohortButton)
        self.ui.installNumbaButton.connect("clicked(bool)", self.onInstallNumbaButton)
        self.ui.exportDICOMButton.connect("clicked(bool)", self.onExportDICOMButton)
        self.initializeParameterNode()
        self._updateMultiVolumeHint()
        self._updateNumbaButton()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRequested = self._running          # a fit in progress stops at its next step, writing nothing
        self._lastOutputs = self._lastResponse = None  # their nodes go with the scene
        self.ui.exportDICOMButton.enabled, self.ui.exportDICOMResultLabel.text = False, ""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered and not slicer.mrmlScene.IsImporting():
            self.initializeParameterNode()

    def onSceneStartImport(self, caller, event) -> None:
        """While a scene is imported the node selectors ignore the new nodes and then rebuild their lists,
        losing their choice (qMRMLSceneModel.cxx:1203-1219, :1499-1507; Slicer issues #4570, #7492): bound to
        the parameter node they would write that loss into it. Unbound until every list is rebuilt."""
        self.setParameterNode(None)

    def onSceneEndImport(self, caller, event) -> None:
        qt.QTimer.singleShot(0, self._afterImport)        # after every selector has rebuilt its list

    def _afterImport(self) -> None:
        if self.parent.isEntered and self._parameterNode is None:
            self.initializeParameterNode()
        self._updateMultiVolumeHint()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.dceSequence:
            sequences = [slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSequenceNode")
                         for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSequenceNode"))]
            shown = [n for n in sequences if not n.GetHideFromEditors()]
            if shown:
                self._parameterNode.dceSequence = shown[0]

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self.logic.upgradeParameterNode(self._parameterNode)
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUIFromParameterNode)
            self._updateGUIFromParameterNode()

    # the parameter node -> the widgets the wrapper does not bind ---------------------------------
    def _nodeParameter(self, name):
        """A node parameter read from the node itself (the wrapper stores it as a node reference of that name,
        serializers.py:402-409): the wrapper's cache of one parameter is refreshed by an observer that VTK
        may call after this widget's."""
        return self._parameterNode.parameterNode.GetNodeReference(name)

    def _updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        self._showSegmentChoices()
        self._showAcquisitionFromDICOM()
        self._updateState()

    def _singleSegmentSelectors(self) -> dict:
        """{selector: parameter} of the one-segment choices."""
        return {self.ui.aifSegmentSelector: AIF_SEGMENT_PARAMETER,
                self.ui.referenceSegmentSelector: REFERENCE_SEGMENT_PARAMETER}

    def _showSegmentChoices(self) -> None:
        if not self._parameterNode:
            return
        segmentation = self._nodeParameter("segmentation")
        lesionIDs = self.logic.segmentChoices(self._parameterNode)[0]
        for selector in (self.ui.lesionSegmentsSelector, *self._singleSegmentSelectors()):
            wasBlocked = selector.blockSignals(True)
            try:
                selector.setCurrentNode(segmentation)
                if selector is self.ui.lesionSegmentsSelector:
                    selector.setSelectedSegmentIDs(lesionIDs)
                else:
                    selector.setCurrentSegmentID(self.logic.segmentChoice(
                        self._parameterNode, self._singleSegmentSelectors()[selector]))
            finally:
                selector.blockSignals(wasBlocked)

    def _showAcquisitionFromDICOM(self) -> None:
        """TR and flip angle at 0 mean "the sequence's DICOM value": the boxes show which value that is."""
        sequence = self._nodeParameter("dceSequence")
        try:
            acquisition = self.logic.acquisitionParameters(sequence) if sequence else {}
        except ValueError:
            acquisition = {}
        tr_s, flip = acquisition.get("tr_s"), acquisition.get("flip_angle_deg")
        missing = _("not in DICOM - enter it")
        shown = ((self.ui.trSpinBox, _("from DICOM ({v:g} ms)").format(v=MS_PER_S * tr_s) if tr_s else missing),
                 (self.ui.flipAngleSpinBox, _("from DICOM ({v:g} deg)").format(v=flip) if flip else missing))
        for box, text in shown:
            if box.specialValueText != text:
                box.specialValueText = text

    def _updateMultiVolumeHint(self, caller=None, event=None) -> None:
        """Time-series MultiVolume nodes (DICOM import with "multi-volume" as the preferred format) cannot be
        selected as the DCE series: say so and offer to convert them."""
        if slicer.mrmlScene.IsImporting() or slicer.mrmlScene.IsClosing():
            return                                         # once, after the import (or close) instead
        nodes = self.logic.multiVolumeNodes(unconverted=True)
        self.ui.multiVolumeRow.visible = bool(nodes)
        if nodes:
            self.ui.multiVolumeLabel.text = _(
                "{name}: a MultiVolume, not a volume sequence. Convert it to select it as the DCE series "
                "(or set Application Settings > DICOM > preferred multi-volume import format to "
                "volume sequence).").format(name=f"'{nodes[0].GetName()}'")

    def _updateState(self) -> None:
        p = self._parameterNode
        self.ui.relaxivitySpinBox.enabled = p.contrastAgent == OTHER_AGENT
        self.ui.fieldStrengthComboBox.enabled = p.contrastAgent != OTHER_AGENT
        self.ui.t10SpinBox.enabled = p.t1MapVolume is None
        self.ui.aifSegmentSelector.enabled = p.aifSource == AIFSource.SEGMENT
        self.ui.bloodT10SpinBox.enabled = p.aifSource == AIFSource.SEGMENT
        self.ui.noiseSigmaSpinBox.enabled = p.correctRicianNoise
        self.ui.motionCorrectionComboBox.enabled = p.correctMotion
        self.ui.motionReferenceFramesSpinBox.enabled = p.correctMotion
        self.ui.computeCohortButton.enabled = p.cohortTable is not None and not self._running
        registration = p.followupSegmentation is None
        self.ui.responseBaselineAnatomySelector.enabled = registration
        self.ui.responseFollowupAnatomySelector.enabled = registration
        problem = self.logic.settingsProblem(p, self._nodeParameter("dceSequence"))
        self.ui.applyButton.enabled = problem is None and not self._running
        self.ui.applyButton.toolTip = problem or _("Compute the perfusion maps")
        self.ui.applyProblemLabel.text = problem or ""
        self.ui.applyProblemLabel.visible = problem is not None
        self.ui.assessButton.enabled = not self._running
        self.ui.exportDICOMButton.enabled = self._lastOutputs is not None and not self._running

    # a user's changes -------------------------------------------------------------------------------
    def _onSegmentSelectorNodeChanged(self, node) -> None:
        """A segment selector took a segmentation by itself (its list has no "None": the first one added, or
        the next one when its own is removed): show the chosen one again."""
        if self._parameterNode and node is not self._nodeParameter("segmentation"):
            qt.QTimer.singleShot(0, self._showSegmentChoices)

    def onLesionSegmentsChanged(self, *args) -> None:
        """The user ticked lesion segments (or one was removed from the segmentation: the selection shrinks)."""
        if not self._parameterNode:
            return
        self.logic.setSegmentChoices(self._parameterNode, self.ui.lesionSegmentsSelector.currentNode(),
                                     lesions=self.ui.lesionSegmentsSelector.selectedSegmentIDs())

    def onSegmentChosen(self, selector, parameter) -> None:
        """The user picked the AIF or reference segment (or None) in its list."""
        if not self._parameterNode:
            return
        self.logic.setSegmentChoices(self._parameterNode, selector.currentNode(),
                                     **{parameter: selector.currentSegmentID()})

    def _onSingleSelectorChanged(self, segmentID) -> None:
        """A one-segment selector may show another segment than the stored choice (it rebuilt its list): show
        the choices again."""
        if self._parameterNode:
            qt.QTimer.singleShot(0, self._showSegmentChoices)

    def onConvertMultiVolumeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not convert the MultiVolume."), waitCursor=True):
            nodes = self.logic.multiVolumeNodes(unconverted=True)
            if nodes:
                sequence = self.logic.convertMultiVolume(nodes[0])
                if self._parameterNode:
                    self._parameterNode.dceSequence = sequence
            self._updateMultiVolumeHint()

    def onApplyButton(self) -> None:
        if self._running:
            return
        with slicer.util.tryWithErrorDisplay(_("DCE Perfusion failed."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            from DCEPerfusionLib.core.fitting import FitCancelled
            installNumba = self._askToInstallNumba()       # before the progress dialog shows (minimumDuration 0)
            # application-modal: while the fit runs the scene cannot be closed nor Apply pressed again
            dialog = slicer.util.createProgressDialog(parent=slicer.util.mainWindow(), value=0, maximum=100,
                                                      windowTitle=_("DCE Perfusion"),
                                                      windowModality=qt.Qt.ApplicationModal)
            dialog.setCancelButtonText(_("Cancel"))
            notice = self._installNumbaForTheFit(dialog) if installNumba else ""

            def progress(fraction, message):
                dialog.labelText = message
                dialog.value = int(100 * fraction)
                slicer.app.processEvents()
                return not (dialog.wasCanceled or self._cancelRequested)

            parameters = self._parameterNode
            lesionIDs, aifID = self.logic.segmentChoices(parameters)
            referenceID = self.logic.segmentChoice(parameters, REFERENCE_SEGMENT_PARAMETER)
            self._running, self._cancelRequested = True, False
            self._updateState()
            try:
                outputs = self.logic.process(parameters, lesionSegmentIDs=lesionIDs, aifSegmentID=aifID or None,
                                             referenceSegmentID=referenceID or None, progress=progress)
            except FitCancelled:
                logging.info("DCE Perfusion: cancelled, nothing was changed")
                return
            finally:
                self._running = False
                dialog.close()
                if self._parameterNode:
                    self._updateState()
            if outputs.chart is not None:
                slicer.modules.plots.logic().ShowChartInLayout(outputs.chart)
            if outputs.statistics_table is not None:
                slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(outputs.statistics_table.GetID())
                slicer.app.applicationLogic().PropagateTableSelection()
            if outputs.motion_transforms is not None:
                self.logic.showCorrectedFrames(parameters, parameters.showFramesCorrected)
            self._lastOutputs = outputs
            self.ui.exportDICOMResultLabel.text = ""
            if self._parameterNode:
                self._updateState()
            summary = self.logic.resultSummary(outputs)
            self.ui.resultLabel.text = html.escape(notice) + "<br>" + summary if notice else summary

    def onExportDICOMButton(self) -> None:
        """The last fit as DICOM objects into the open DICOM database, or - without one - into a folder the user
        chooses; highdicom is offered for install first when missing. A sequence not loaded from DICOM is the
        logic's one-line error."""
        if self._lastOutputs is None or self._running:
            return
        with slicer.util.tryWithErrorDisplay(_("DICOM export failed."), waitCursor=True):
            self.logic.checkDICOMExportable(self._lastOutputs)
            if not self.logic.ensureDICOMExport(askUser=True):
                return
            database = self.logic.dicomDatabase()
            folder = None
            if database is None:
                folder = qt.QFileDialog.getExistingDirectory(
                    slicer.util.mainWindow(),
                    _("No DICOM database is open: choose a folder for the DICOM objects (one subfolder per exam)"))
                if not folder:
                    return
            files = self.logic.exportToDICOM(self._lastOutputs, folder, database)
            where = (_("into the DICOM database (DICOM module: under the patient of the DCE series)")
                     if database is not None else _("to {folder}").format(folder=pathlib.Path(files[0]).parent))
            lines = [_("{n} DICOM objects written {where}.").format(n=len(files), where=where)]
            lines += self._exportResponse(folder, database)
            self.ui.exportDICOMResultLabel.text = "<br>".join(html.escape(line) for line in lines)

    def _exportResponse(self, folder, database) -> list:
        """With a response assessed between the exported exam and another one: its SR too, once both exams are
        exported. Returns the lines for the panel."""
        if self._lastResponse is None:
            return []
        responses, baseline, followup = self._lastResponse
        from DCEPerfusionLib.scene import dicom
        if dicom.exam_label(self._lastOutputs) not in (baseline, followup):
            return []
        missing = [label for label in (baseline, followup) if dicom.exam_record(slicer.mrmlScene, label) is None]
        if missing:
            return [_("The response SR ({b} to {f}) follows when '{m}' is exported too.").format(
                b=baseline, f=followup, m=missing[0])]
        files = self.logic.exportResponseToDICOM(responses, baseline, followup, folder, database)
        return [_("The response SR ({b} to {f}) written {where}.").format(
            b=baseline, f=followup, where=_("into the DICOM database") if database is not None else files[0])]

    # the optional numba ---------------------------------------------------------------------------------
    def _askToInstallNumba(self) -> bool:
        """Whether to install numba before this fit: asked once - on the first Apply in a Slicer without numba,
        unless the user declined it before (remembered in the settings: never asked again; the Model section's
        button installs it later). Not in testing mode, where confirmOkCancelDisplay answers OK without a
        dialog (util.py:3061-3063 in Slicer 5.8.1): a self-test must not install anything."""
        if (self._numbaOffered or self.logic.compiledFitsAvailable() or slicer.app.testingEnabled()
                or not self.logic.offerNumba()):
            return False
        self._numbaOffered = True
        if slicer.util.confirmOkCancelDisplay(self._numbaQuestion(), windowTitle=_("DCE Perfusion")):
            return True
        self.logic.setOfferNumba(False)
        logging.info("DCE Perfusion: numba declined, not asked again; to install it later press 'Install numba' "
                     "in the Model section or run %s", self.logic.numbaInstallCommand())
        return False

    @staticmethod
    def _speedup() -> str:
        """ "about N times faster" with the Lib's measured factor, else "faster"."""
        try:
            from DCEPerfusionLib.core import fitting
        except ImportError:                # a required package is missing (Apply offers it first)
            return _("faster")
        factor = getattr(fitting, "COMPILED_SPEEDUP", None)
        return _("about {n:.0f} times faster").format(n=factor) if factor else _("faster")

    def _numbaQuestion(self) -> str:
        return _("Fits run {speedup} with the optional package numba (compiled kernels). Install it from PyPI now "
                 "(needs internet; the fit works without it)?").format(speedup=self._speedup())

    def _installNumbaForTheFit(self, dialog) -> str:
        """Install numba, saying so in the progress dialog; the fit runs afterwards either way. Returns the line
        for the result display: numba's kernels are used, or why the install failed and the command to run."""
        dialog.labelText = _("Installing numba from PyPI (the fit starts afterwards) ...")
        slicer.app.processEvents()
        try:
            self.logic.installNumba()
        except ValueError as e:
            logging.warning("DCE Perfusion: %s", e)
            slicer.util.showStatusMessage(str(e))
            return str(e)
        finally:
            self._updateNumbaButton()
        return _("numba installed (the result line names the engine that ran).")

    def _updateNumbaButton(self) -> None:
        """The button to install numba is shown only while numba is missing."""
        self.ui.installNumbaButton.visible = not self.logic.compiledFitsAvailable()
        self.ui.installNumbaButton.toolTip = _(
            "Fits run {speedup} with the optional package numba (compiled kernels): install it from PyPI (needs "
            "internet). The fit works without it.").format(speedup=self._speedup())

    def onInstallNumbaButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not install numba."), waitCursor=True):
            try:
                self.logic.installNumba()
            finally:
                self._updateNumbaButton()
            slicer.util.showStatusMessage(_("numba installed: the next fits use its compiled kernels."), 5000)

    def onShowFramesCorrected(self, checked) -> None:
        """Show the DCE's frames motion-corrected or as acquired (the last run of this exam label, if it had a
        motion correction; nothing to do otherwise)."""
        if self._parameterNode and not self._running:
            self.logic.showCorrectedFrames(self._parameterNode, bool(checked))

    def _lesionSegmentIDs(self):
        return self.logic.segmentChoices(self._parameterNode)[0]

    def onAssessButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Response assessment failed."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            results, table, propagation = self.logic.assessResponse(self._parameterNode, self._lesionSegmentIDs())
            p = self._parameterNode
            self._lastResponse = (results, p.responseBaselineExam.strip(), p.responseFollowupExam.strip())
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
            lines = []
            for r in results:
                colour = self.logic.callColour(r.call.call)
                size = f"; size: {html.escape(r.size.call)}" if r.size else ""
                lines.append(f'<b>{html.escape(r.lesion)}</b>: <span style="color:{colour}"><b>'
                             f"{html.escape(r.call.call)}</b></span> - {html.escape(r.call.reason)}{size}")
                lines += [html.escape(_("Warning: {w}").format(w=w)) for w in getattr(r, "warnings", [])]
            if propagation is not None:
                lines.append(html.escape(_("Lesions carried to the follow-up by registration (metric {m:.3f}); "
                                           "check with the transform '{t}'.").format(
                    m=propagation.registration.final_metric, t=propagation.transform_node.GetName())))
            self.ui.responseResultLabel.text = "<br>".join(lines)

    def onLoadCohortButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not load the cohort."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            self._parameterNode.cohortTable = self.logic.loadCohort(self._parameterNode.cohortCsvPath)

    def onComputeCohortButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cohort statistics failed."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            p = self._parameterNode
            report, (table, rocChart, waterfallChart) = self.logic.computeCohort(
                p.cohortTable, p.responseCutoff_pct, p.cohortSizeCutoff_pct)
            slicer.modules.plots.logic().ShowChartInLayout(rocChart)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
            vp = report.measures["vp"]
            self.ui.cohortResultLabel.text = _(
                "{n} lesions ({f} failures). vp: sensitivity {se:.0%}, specificity {sp:.0%}, AUC {auc:.2f}, "
                "Mann-Whitney p = {p:.2g}. Waterfall chart: '{w}'.").format(
                n=report.n_lesions, f=report.n_failure, se=vp.performance.sensitivity.estimate,
                sp=vp.performance.specificity.estimate, auc=vp.roc.auc, p=vp.mann_whitney.p_value,
                w=waterfallChart.GetName())


#
# DCEPerfusionLogic
#


class DCEPerfusionLogic(ScriptedLoadableModuleLogic):
    """Fills in the Lib's options and delegates to ``DCEPerfusionLib.scene``; usable from the Python console
    without the widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DCEPerfusionParameterNode(super().getParameterNode())

    @staticmethod
    def missingPackages(packages=None) -> list:
        """The pip names (requirements) of the packages this Python cannot import, of ``packages`` ({import name:
        pip name}; the required ones by default)."""
        packages = REQUIRED_PACKAGES if packages is None else packages
        return [pip for module, pip in packages.items() if importlib.util.find_spec(module) is None]

    @classmethod
    def ensureDependencies(cls, askUser: bool = False, packages=None, purpose=None, keep=()) -> bool:
        """True when every required package is there (always, in Slicer 5.8 and newer) - or, with ``packages``
        ({import name: pip name}), every one of those, which ``purpose`` needs (e.g. the DICOM export). Otherwise,
        with ``askUser``, ask before installing them from PyPI (False if the user declines); without it - from
        the Python console - nothing is installed and a ValueError says what to install. ``keep``: packages the
        install must not replace (pinned to the version installed). A failed install (no internet) is a
        one-line error naming the command to run."""
        missing = cls.missingPackages(packages)
        if not missing:
            return True
        packages = REQUIRED_PACKAGES if packages is None else packages
        names = ", ".join(module for module, pip in packages.items() if pip in missing)
        requirements = " ".join(missing + [f"{k}=={importlib.import_module(k).__version__}" for k in keep])
        command = f"slicer.util.pip_install('{requirements}')"
        bundled = packages is REQUIRED_PACKAGES
        purpose = purpose or _("DCE Perfusion")
        if not askUser:
            text = _("{purpose} needs the Python package(s) {names}, which this Slicer does not have: install them "
                     "with {command}").format(purpose=purpose, names=names, command=command)
            raise ValueError(text + (_(" (or use Slicer 5.8 or newer, which bundles them)") if bundled else ""))
        if not slicer.util.confirmOkCancelDisplay(_(
                "{purpose} needs the Python package(s) {names}, which this Slicer does not have. "
                "Install them from PyPI now (needs internet access)?").format(purpose=purpose, names=names)):
            return False
        cls._pipInstall(names, requirements, _("connect to the internet and try again, or run {command} in the "
                                               "Python console").format(command=command))
        if cls.missingPackages(packages):
            raise ValueError(_("{names} installed but not importable yet: restart Slicer and try again").format(
                names=names))
        return True

    @classmethod
    def ensureDICOMExport(cls, askUser: bool = False) -> bool:
        """:meth:`ensureDependencies` for the DICOM export (highdicom; Slicer's pydicom and numpy kept)."""
        return cls.ensureDependencies(askUser, DICOM_EXPORT_PACKAGES, _("DICOM export"), DICOM_EXPORT_KEEP)

    @staticmethod
    def _pipInstall(names: str, requirements: str, advice: str) -> None:
        """slicer.util.pip_install(requirements), a failure as a one-line ValueError "Could not install <names>
        (<reason>); <advice>". pip_install runs ``PythonSlicer -m pip install`` and raises
        subprocess.CalledProcessError when pip exits non-zero (util.py:3899-3942, :3865-3896, :3862 in Slicer
        5.8.1), RuntimeError when PythonSlicer is not found (:3884); pip's own messages went to the Python
        console (:3850)."""
        import subprocess
        logging.info("DCE Perfusion: installing %s (pip install %s)", names, requirements)
        try:
            slicer.util.pip_install(requirements)
        except Exception as e:  # noqa: BLE001 - pip reports failures as any exception; one line for the user
            if isinstance(e, subprocess.CalledProcessError):
                reason = _("pip exited with status {code}; its messages are in the Python console").format(
                    code=e.returncode)
            else:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(_("Could not install {names} ({reason}); {advice}").format(
                names=names, reason=reason, advice=advice)) from None
        finally:
            importlib.invalidate_caches()                 # find_spec must see what was just installed

    # the optional numba --------------------------------------------------------------------------------
    @staticmethod
    def compiledFitsAvailable() -> bool:
        """True when numba can be imported here, so that the fit runs its compiled kernels (found, not
        imported)."""
        return importlib.util.find_spec("numba") is not None

    @staticmethod
    def numbaRequirement() -> str:
        """The pip arguments that install numba without touching Slicer's numpy: numpy pinned to the version
        this Slicer has, so pip picks a numba built for it (Python 3.9 / numpy 1.26 in Slicer 5.8: numba 0.60)
        rather than replacing numpy under the other modules."""
        import numpy
        return f"{NUMBA_REQUIREMENT} numpy=={numpy.__version__}"

    @classmethod
    def numbaInstallCommand(cls) -> str:
        """What to type in the Python console to install numba."""
        return f"slicer.util.pip_install('{cls.numbaRequirement()}')"

    @classmethod
    def installNumba(cls) -> None:
        """Install numba from PyPI (needs internet); later fits of this session use its compiled kernels.
        Called by the module panel when the user agrees; from the console call it yourself - the logic's
        computations never install anything. Raises a one-line ValueError when the install fails (the fits
        still run, on the numpy kernels)."""
        cls._pipInstall("numba", cls.numbaRequirement(), _(
            "the fit runs without it (numpy kernels); to install it later run {command} in the Python console").format(
            command=cls.numbaInstallCommand()))
        if not cls.compiledFitsAvailable():
            raise ValueError(_("numba installed but not importable yet: restart Slicer for the compiled fits"))

    @classmethod
    def prepareFitKernels(cls, progress=None) -> float:
        """With numba, compile the fit kernels (or load them from numba's cache) before the fit, saying so in
        ``progress(fraction, message)``: the first fit of a session would otherwise stay at 0 % meanwhile.
        Returns the seconds spent (0.0 once done, and without numba)."""
        from DCEPerfusionLib.core import fitting
        compileKernels = getattr(fitting, "compile_kernels", None)
        if compileKernels is None or not cls.compiledFitsAvailable():
            return 0.0
        if progress is not None:
            progress(0.0, _("Compiling the fit kernels (numba, first fit of the session) ..."))
        seconds = compileKernels()
        if seconds:
            logging.info("DCE Perfusion: numba compiled (or loaded) the fit kernels in %.1f s", seconds)
        return seconds

    @staticmethod
    def offerNumba() -> bool:
        """False once the user declined numba (a Slicer setting, kept across sessions)."""
        return slicer.util.settingsValue(OFFER_NUMBA_SETTING, True, converter=slicer.util.toBool)

    @staticmethod
    def setOfferNumba(offer: bool) -> None:
        qt.QSettings().setValue(OFFER_NUMBA_SETTING, bool(offer))

    _fitEngineNoted = False

    @classmethod
    def noteFitEngine(cls) -> None:
        """Without numba, one info line per session saying how to get the compiled fits (nothing is asked)."""
        if DCEPerfusionLogic._fitEngineNoted or cls.compiledFitsAvailable():
            return
        DCEPerfusionLogic._fitEngineNoted = True
        logging.info("DCE Perfusion: the fits run on the numpy kernels; for the faster compiled ones install the "
                     "optional package numba: %s", cls.numbaInstallCommand())

    @staticmethod
    def _segmentsOfChoices(parameters):
        """The segmentation's segments when the stored choices were made in it, else None."""
        node = parameters.parameterNode
        segmentation = node.GetNodeReference("segmentation")
        if segmentation is None or node.GetNodeReferenceID(SEGMENTS_OF_REFERENCE) != segmentation.GetID():
            return None
        return segmentation.GetSegmentation()

    @classmethod
    def segmentChoice(cls, parameters, parameter) -> str:
        """The one segment stored under ``parameter`` (AIF or reference), "" when none or not in the segmentation."""
        segments = cls._segmentsOfChoices(parameters)
        value = parameters.parameterNode.GetParameter(parameter)
        return value if segments is not None and value and segments.GetSegment(value) else ""

    @classmethod
    def segmentChoices(cls, parameters):
        """(lesion segment IDs, AIF segment ID or "") chosen in the parameter node's segmentation; none when they
        were chosen in another segmentation, and IDs no longer in it left out."""
        segments = cls._segmentsOfChoices(parameters)
        if segments is None:
            return [], ""
        ids = parameters.parameterNode.GetParameter(LESION_SEGMENTS_PARAMETER).split(",")
        return [s for s in ids if s and segments.GetSegment(s)], cls.segmentChoice(parameters, AIF_SEGMENT_PARAMETER)

    @classmethod
    def setSegmentChoices(cls, parameters, segmentation, lesions=None, **single) -> None:
        """Keep segments chosen in ``segmentation``: ``lesions`` (IDs) and/or one segment per parameter name
        (``AIFSegmentID=``, ``ReferenceSegmentID=``); the other choices, if made in that segmentation, stay
        (one ModifiedEvent)."""
        node = parameters.parameterNode
        keep = cls._segmentsOfChoices(parameters) is not None and segmentation is node.GetNodeReference(
            "segmentation")
        values = {LESION_SEGMENTS_PARAMETER: ",".join(cls.segmentChoices(parameters)[0]) if keep else "",
                  **{p: cls.segmentChoice(parameters, p) if keep else ""
                     for p in (AIF_SEGMENT_PARAMETER, REFERENCE_SEGMENT_PARAMETER)}}
        if lesions is not None:
            values[LESION_SEGMENTS_PARAMETER] = ",".join(lesions)
        values.update({p: v or "" for p, v in single.items()})
        wasModifying = node.StartModify()
        try:
            for parameter, value in values.items():
                node.SetParameter(parameter, value)
            node.SetNodeReferenceID(SEGMENTS_OF_REFERENCE, segmentation.GetID() if segmentation else None)
        finally:
            node.EndModify(wasModifying)

    def upgradeParameterNode(self, parameters) -> None:
        """A parameter node saved by an earlier version: its segment choices were made in its segmentation
        (it had no reference to say so), and a TR or flip angle equal to the sequence's DICOM value was filled
        in from it, not entered (it now means "from DICOM": 0)."""
        node = parameters.parameterNode
        if node.GetParameter(PARAMETER_NODE_VERSION_PARAMETER) == PARAMETER_NODE_VERSION:
            return
        wasModifying = node.StartModify()
        try:
            segmentation = node.GetNodeReference("segmentation")
            if segmentation is not None and not node.GetNodeReferenceID(SEGMENTS_OF_REFERENCE) and (
                    node.GetParameter(LESION_SEGMENTS_PARAMETER) or node.GetParameter(AIF_SEGMENT_PARAMETER)):
                node.SetNodeReferenceID(SEGMENTS_OF_REFERENCE, segmentation.GetID())
            sequence = node.GetNodeReference("dceSequence")
            if sequence is not None:
                header = self.acquisitionParameters(sequence)
                if header["tr_s"] and abs(parameters.repetitionTime_ms - MS_PER_S * header["tr_s"]) < 1e-6:
                    parameters.repetitionTime_ms = 0.0
                if header["flip_angle_deg"] and abs(parameters.flipAngle_deg - header["flip_angle_deg"]) < 1e-6:
                    parameters.flipAngle_deg = 0.0
            node.SetParameter(PARAMETER_NODE_VERSION_PARAMETER, PARAMETER_NODE_VERSION)
        finally:
            node.EndModify(wasModifying)

    def settingsProblem(self, parameters, sequence=None):
        """Why Apply cannot run with these settings (the Lib's own check of the options, e.g. a model the
        linear method cannot fit), or None. Inputs that need the data are checked at Apply."""
        if sequence is None:
            return _("Select the DCE sequence")
        try:
            self.analysisOptions(parameters).checked()
        except ValueError as e:
            return str(e)
        except ImportError:            # a required package is missing: Apply offers to install it
            return None
        return None

    @staticmethod
    def multiVolumeNodes(scene=None, unconverted=False):
        """The scene's MultiVolume nodes that hold a time series (not a flip-angle, echo or b-value series),
        those not converted yet with ``unconverted`` (:meth:`convertMultiVolume`)."""
        scene = scene or slicer.mrmlScene
        from DCEPerfusionLib.scene.series import CONVERTED_FROM_ATTRIBUTE, is_time_multivolume
        volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                   for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
        found = [v for v in volumes if is_time_multivolume(v)]
        if unconverted:
            done = {scene.GetNthNodeByClass(i, "vtkMRMLSequenceNode").GetAttribute(CONVERTED_FROM_ATTRIBUTE)
                    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceNode"))}
            found = [v for v in found if v.GetID() not in done]
        return found

    @staticmethod
    def convertMultiVolume(node):
        """A volume sequence (with a browser) holding the frames and attributes of a MultiVolume node."""
        from DCEPerfusionLib.scene.series import sequence_from_multivolume
        return sequence_from_multivolume(slicer.mrmlScene, node)

    @staticmethod
    def showCorrectedFrames(parameters, corrected: bool) -> int:
        """Put the DCE proxy volume under (or take it from under) the per-frame transforms of the last motion
        correction of ``parameters.examLabel``; the number of proxies changed (0 without such a run)."""
        if parameters.dceSequence is None:
            return 0
        from DCEPerfusionLib.scene import motion, output
        transforms = output.find_output(slicer.mrmlScene, motion.TRANSFORMS_ROLE, (parameters.examLabel or "").strip())
        if transforms is None:
            return 0
        return motion.show_corrected_frames(slicer.mrmlScene, parameters.dceSequence, transforms, corrected)

    @staticmethod
    def fitEngine(outputs):
        """Which kernels ran the fit: FitResult.engine, "numba" or "numpy" (a Lib without FitResult.engine has
        only the numpy kernels)."""
        return getattr(outputs.result, "engine", "numpy")

    @staticmethod
    def resultSummary(outputs) -> str:
        """One paragraph for the module panel: the AIF, the baseline used, the fit's statuses, the warnings."""
        exam = outputs.exam
        baseline = exam.provenance.get("n_baseline", {})
        text = _("AIF: {aif}. Baseline: {n} frames ({source}). Fit status: {status}.").format(
            aif=outputs.aif_description, n=baseline.get("value"), source=baseline.get("source", ""),
            status=outputs.result.status_counts())
        engine = DCEPerfusionLogic.fitEngine(outputs)
        text += " " + _("Fit engine: {engine}.").format(engine=ENGINE_TITLES.get(engine, engine))
        if exam.motion is not None:
            m = exam.motion.summary()
            text += " " + _("Motion ({kind}): frames moved up to {mm:.1f} mm ({voxels:.1f} voxels, frame {frame}), "
                            "registered to the mean of frames {first}-{last}.").format(
                kind=m["correction"], mm=m["max_displacement_mm"], voxels=m["max_displacement_voxels"],
                frame=m["frame_of_max_displacement"], first=m["reference_frames"][0], last=m["reference_frames"][-1])
        warnings = "".join("<br>" + html.escape(_("Warning: {w}").format(w=w)) for w in exam.warnings)
        return html.escape(text) + warnings

    @staticmethod
    def acquisitionParameters(sequenceNode) -> dict:
        """TR (s) and flip angle (degrees) from the sequence's DICOM attributes, None where absent (numpy only)."""
        from DCEPerfusionLib.core import multivolume
        return multivolume.acquisition_parameters(sequenceNode.GetAttribute)

    @staticmethod
    def analysisOptions(parameters):
        """The Lib's options record filled in from a :class:`DCEPerfusionParameterNode` (0 means "not given";
        a frame interval entered replaces the sequence's frame times, as its tooltip says; 0 baseline frames:
        found from the curves)."""
        from DCEPerfusionLib.core.options import AnalysisOptions
        p = parameters
        given = lambda value: value if value > 0 else None  # noqa: E731
        other = p.contrastAgent == OTHER_AGENT  # then the given r1 is used, not a preset
        return AnalysisOptions(
            n_baseline=p.baselineFrames or None, tr_s=given(p.repetitionTime_ms / MS_PER_S),
            flip_angle_deg=given(p.flipAngle_deg), frame_interval_s=given(p.frameInterval_s),
            override_frame_times=given(p.frameInterval_s) is not None,
            t10_s=p.t10Constant_s, blood_t10_s=given(p.bloodT10_s),
            contrast_agent=p.contrastAgent, field_strength_t=p.fieldStrength_T,
            r1_per_mM_s=p.relaxivity_per_mM_s if other else None,
            aif_source=p.aifSource.value, hct=p.hematocrit, model=p.model.value, method=p.method.value,
            fit_delay=p.fitDelay, fit_lesions_only=p.fitSegmentsOnly,
            noise_sigma=(p.noiseSigma or "auto") if p.correctRicianNoise else None, uncertainty=p.uncertainty,
            motion_correction=p.motionCorrection.value if p.correctMotion else "none",
            motion_reference_frames=p.motionReferenceFrames)

    def process(self, parameters, lesionSegmentIDs=(), aifSegmentID=None, progress=None, referenceSegmentID=None):
        """Run the analysis for a :class:`DCEPerfusionParameterNode`; returns ``scene.analysis.SceneOutputs``.

        Raises ValueError with a message naming the input to fix (the scene is unchanged then)."""
        self.ensureDependencies(askUser=False)
        self.noteFitEngine()
        from DCEPerfusionLib.scene import analysis
        p = parameters
        inputs = analysis.SceneInputs(
            dce_sequence=p.dceSequence, anatomy=p.anatomyVolume, t1_map=p.t1MapVolume, segmentation=p.segmentation,
            lesion_segment_ids=list(lesionSegmentIDs), aif_segment_id=aifSegmentID, exam_label=p.examLabel,
            overlay_map=p.overlayMap, overlay_opacity=p.overlayOpacity, reference_segment_id=referenceSegmentID)
        options = self.analysisOptions(p)
        self.prepareFitKernels(progress)
        outputs = analysis.run_analysis(slicer.mrmlScene, inputs, options, progress=progress)
        logging.info("DCE Perfusion: '%s' fitted in %.1f s with the %s engine", p.examLabel,
                     outputs.exam.timings_s.get("fit_s", float("nan")), self.fitEngine(outputs))
        return outputs

    def assessResponse(self, parameters, lesionSegmentIDs):
        """Compare the exams labelled ``responseBaselineExam`` and ``responseFollowupExam``; returns
        (lesion responses, response table node, propagation or None)."""
        self.ensureDependencies(askUser=False)
        from DCEPerfusionLib.scene import response
        p = parameters
        return response.assess_exams(
            slicer.mrmlScene, p.responseBaselineExam.strip(), p.responseFollowupExam.strip(), p.segmentation,
            list(lesionSegmentIDs), followup_segmentation=p.followupSegmentation,
            baseline_image=p.responseBaselineAnatomy, followup_image=p.responseFollowupAnatomy,
            statistic=p.responseStatistic, cutoff_pct=p.responseCutoff_pct, progression_pct=p.sizeProgression_pct,
            reference_segment_id=self.segmentChoice(p, REFERENCE_SEGMENT_PARAMETER) or None,
            normalise_to_reference=p.callOnReferenceNormalised,
            indeterminate_when_ci_straddles=p.indeterminateWhenCIStraddles)

    @staticmethod
    def dicomDatabase():
        """Slicer's DICOM database when one is open (``slicer.dicomDatabase``, as DICOM.py:526 in Slicer 5.8.1
        tests it), else None."""
        database = getattr(slicer, "dicomDatabase", None)
        return database if database is not None and database.isOpen else None

    def exportToDICOM(self, outputs, folder=None, database=None) -> list:
        """Write a fit's results as DICOM objects - one Parametric Map per map and a SEG of its segments
        (``DCEPerfusionLib.files.dicomout``), in the study and frame of reference of the DICOM series the DCE
        sequence was loaded from - and import them into ``database`` (a ctkDICOMDatabase; the open
        ``slicer.dicomDatabase`` by default), where the DICOM browser shows them under the patient.

        folder : where the objects are written, into a subfolder named after the exam label (an earlier
                 export of the exam there is replaced). None with a database: a temporary folder, removed once the
                 database has copied the files in (as Slicer's DICOM export dialog does,
                 qSlicerDICOMExportDialog.cxx:431-453 in Slicer 5.8.1). Required without a database.
        Returns the paths of the DICOM objects: the database's copies, or the files in ``folder/<exam label>``.
        Raises ValueError (one line) for a sequence not loaded from DICOM and every other problem, before
        anything is written; needs highdicom (:meth:`ensureDICOMExport`)."""
        self.ensureDICOMExport(askUser=False)
        import os
        from DCEPerfusionLib.files import dicomout
        from DCEPerfusionLib.scene import dicom
        sequence = self.checkDICOMExportable(outputs)
        database = self._exportDatabase(folder, database)
        dicom.dicom_source(sequence, database, outputs.exam.series)

        def write(into):
            record = dicomout.write_dicom_exam(outputs.exam, into, overwrite=True)   # an earlier export of ours
            written.append(record)
            return [(os.path.join(into, o["file"]), o["sop_instance_uid"]) for o in record["objects"]]
        written = []
        files = self._writeDICOM(folder, database, dicom.folder_name(dicom.exam_label(outputs)), write)
        dicom.keep_record(outputs.map_nodes["status"], written[0])            # for the response SR
        logging.info("DCE Perfusion: %d DICOM objects of the fit of '%s' written %s", len(files), sequence.GetName(),
                     "into the DICOM database" if database is not None else f"to {folder}")
        return files

    def exportResponseToDICOM(self, responses, baselineExam, followupExam, folder=None, database=None) -> list:
        """The response SR (a TID 1500 Measurement Report, ``DCEPerfusionLib.files.dicomsr``) of an assessment
        (:meth:`assessResponse`'s lesion responses) between the exams labelled ``baselineExam`` and
        ``followupExam``, both exported with :meth:`exportToDICOM` (the SR references their SEG and vp
        Parametric Map), into ``database`` (default: the open ``slicer.dicomDatabase``) or ``folder``
        (subfolder "response <baseline> to <follow-up>"), as :meth:`exportToDICOM` does. Returns [the SR's
        path]. ValueError (one line) when an exam was not exported, or for every other problem."""
        self.ensureDICOMExport(askUser=False)
        import os
        from DCEPerfusionLib.files import dicomsr, results
        from DCEPerfusionLib.scene import dicom
        records = [dicom.exam_record(slicer.mrmlScene, label) for label in (baselineExam, followupExam)]
        for label, record in zip((baselineExam, followupExam), records):
            if record is None:
                raise ValueError(_("Response SR: the exam '{label}' has not been exported to DICOM - fit it and press "
                                   "Export to DICOM first").format(label=label))
        database = self._exportDatabase(folder, database)
        rows = results.response_rows(responses)

        def write(into):
            import pydicom
            path = dicomsr.write_response_sr(rows, records[0], records[1], os.path.join(into, "response.dcm"),
                                             overwrite=True)
            return [(path, str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))]
        name = dicom.folder_name(f"response {baselineExam} to {followupExam}")
        return self._writeDICOM(folder, database, name, write)

    def _exportDatabase(self, folder, database):
        """The database an export goes into: ``database``, else the open one, else None - then ``folder`` is
        required (ValueError)."""
        database = database if database is not None else self.dicomDatabase()
        if database is None and not folder:
            raise ValueError(_("DICOM export: no DICOM database is open - choose a folder to write the DICOM objects "
                               "into"))
        return database

    def _writeDICOM(self, folder, database, name, write) -> list:
        """``write(into)`` -> [(file, SOP Instance UID)] run on ``folder/name`` - or, without a folder, on a
        temporary one removed once ``database`` has copied the files in (as Slicer's DICOM export dialog does,
        qSlicerDICOMExportDialog.cxx:431-453 in Slicer 5.8.1) - and the files imported into ``database`` when
        given. Returns the files: the database's copies, or those written."""
        import os
        import shutil
        import tempfile
        root = str(folder) if folder else tempfile.mkdtemp(prefix="DCEPerfusion-DICOM-")
        try:
            into = os.path.join(root, name)
            written = write(into)
            files = [path for path, _ in written]
            if database is not None:
                files = self.importIntoDICOMDatabase(into, database, [uid for _, uid in written])
        finally:
            if not folder:
                shutil.rmtree(root, ignore_errors=True)
        return files

    @staticmethod
    def checkDICOMExportable(outputs):
        """The DCE sequence of a fit (:meth:`process`'s outputs) whose results can go to DICOM - one loaded from
        DICOM, still in the scene; else a one-line ValueError (before anything is asked or written)."""
        from DCEPerfusionLib.scene import dicom
        sequence = getattr(outputs, "dce_sequence", None)
        if sequence is None:
            raise ValueError(_("DICOM export: no fit to export - press Apply first"))
        if sequence.GetScene() is None:
            raise ValueError(_("DICOM export: the DCE sequence of this fit was removed from the scene - fit again"))
        if not dicom.instance_uids(sequence):
            raise ValueError(dicom.not_from_dicom(sequence.GetName()))
        return sequence

    @staticmethod
    def importIntoDICOMDatabase(folder, database, instanceUIDs) -> list:
        """Import the DICOM files of ``folder`` into ``database``, copying them into the database's folder
        (DICOMUtils.importDicom(folder, database, copyFiles=True): ctkDICOMIndexer.addDirectory, which
        inserts every readable DICOM file and waits for the import; DICOMUtils.py:486-502 in Slicer 5.8.1).
        Returns the database's files of ``instanceUIDs``; ValueError when the import failed or left one out."""
        from DICOMLib import DICOMUtils
        imported = DICOMUtils.importDicom(str(folder), database, copyFiles=True)
        files = [database.fileForInstance(uid) for uid in instanceUIDs]
        if not imported or not all(files):
            raise ValueError(_("DICOM export: the DICOM database did not take {n} of the {total} objects (its messages "
                               "are in the Python console) - check that the database folder is writable").format(
                n=sum(not f for f in files), total=len(files)))
        return files

    @staticmethod
    def callColour(call: str) -> str:
        return registry.CALL_COLOURS.get(call, "#000000")

    def loadCohort(self, path):
        """Read and check a cohort CSV into a table node."""
        self.ensureDependencies(askUser=False)
        from DCEPerfusionLib.scene import response
        if not path or not pathlib.Path(path).is_file():
            raise ValueError(_("Cohort CSV: '{path}' is not a file - choose the CSV of the cohort").format(path=path))
        return response.load_cohort_table(slicer.mrmlScene, str(path))

    def computeCohort(self, tableNode, vpCutoff_pct=registry.VP_CUTOFF_PCT,
                      sizeCutoff_pct=registry.SIZE_PROGRESSION_PCT):
        """Cohort statistics of a table node: (report, (statistics table, ROC chart, waterfall chart))."""
        self.ensureDependencies(askUser=False)
        from DCEPerfusionLib.scene import response
        if tableNode is None:
            raise ValueError(_("Cohort table: load a cohort CSV or select a table first"))
        return response.cohort_in_scene(slicer.mrmlScene, tableNode, vpCutoff_pct, sizeCutoff_pct)


#
# DCEPerfusionTest
#


class DCEPerfusionTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the synthetic phantom through the module logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DCEPerfusion_phantom()
        self.setUp()
        self.test_DCEPerfusion_response()
        self.setUp()
        self.test_DCEPerfusion_motion()
        self.setUp()
        self.test_DCEPerfusion_selectors()

    def test_DCEPerfusion_phantom(self):
        self.delayDisplay("Building the synthetic DCE phantom")
        DCEPerfusionLogic.ensureDependencies(askUser=False)
        import numpy as np
        from DCEPerfusionLib.core import phantom
        from DCEPerfusionLib.scene import phantom as scene_phantom

        ph = phantom.make_phantom(shape=(4, 28, 32), snr=60.0, seed=7)
        nodes = scene_phantom.add_phantom(slicer.mrmlScene, ph)
        logic = DCEPerfusionLogic()
        p = logic.getParameterNode()
        p.dceSequence = nodes.sequence
        p.anatomyVolume = nodes.anatomy
        p.t10Constant_s = 1.6
        p.contrastAgent = OTHER_AGENT
        p.relaxivity_per_mM_s = ph.acquisition["r1_per_mM_s"]
        p.hematocrit = ph.acquisition["hct"]
        p.baselineFrames = ph.acquisition["n_baseline"]
        p.aifSource = AIFSource.PARKER
        p.segmentation = nodes.segmentation
        p.examLabel = "self-test"

        self.delayDisplay("Fitting")
        out = logic.process(p, lesionSegmentIDs=[nodes.lesion_segment_id])
        lesion = nodes.labels == phantom.LABELS["lesion"]
        vp = slicer.util.arrayFromVolume(out.map_nodes["vp"])
        truth = nodes.truth["vp"]
        # the lesion's T10 (1.6 s) is the constant used here, so the lesion is quantified exactly
        self.assertLess(abs(np.median(vp[lesion]) - np.median(truth[lesion])), 0.025)
        self.assertEqual(out.map_nodes["vp"].GetName(), "vp (self-test)")
        table = out.statistics_table
        self.assertEqual(table.GetNumberOfRows(), 5)  # Ktrans, ve, vp, kep, R2 of the lesion
        self.assertEqual(table.GetCellText(0, 0), "lesion")
        self.assertEqual(out.chart.GetNumberOfPlotSeriesNodes(), 3)
        self.assertIn(DCEPerfusionLogic.fitEngine(out), ENGINE_TITLES)   # numba's kernels or numpy's
        self.delayDisplay("Test passed")

    def test_DCEPerfusion_response(self):
        self.delayDisplay("Two exams: the lesion's vp halves")
        DCEPerfusionLogic.ensureDependencies(askUser=False)
        from DCEPerfusionLib.core import phantom, response
        from DCEPerfusionLib.scene import phantom as scene_phantom

        logic = DCEPerfusionLogic()
        p = logic.getParameterNode()
        kt, ve, vp, t10 = phantom.TISSUES["lesion"]
        lesions = {}
        for label, lesionVp, seed in (("baseline", vp, 3), ("follow-up", vp / 2, 4)):
            ph = phantom.make_phantom(shape=(3, 24, 28), snr=60.0, seed=seed,
                                      tissues={"lesion": (kt, ve, lesionVp, t10)})
            nodes = scene_phantom.add_phantom(slicer.mrmlScene, ph, name=f"DCE {label}")
            p.dceSequence, p.anatomyVolume, p.segmentation = nodes.sequence, nodes.anatomy, nodes.segmentation
            p.t10Constant_s, p.baselineFrames, p.examLabel = 1.6, ph.acquisition["n_baseline"], label
            p.contrastAgent, p.relaxivity_per_mM_s = OTHER_AGENT, ph.acquisition["r1_per_mM_s"]
            logic.process(p, lesionSegmentIDs=[nodes.lesion_segment_id])
            lesions[label] = nodes
        p.segmentation = lesions["baseline"].segmentation
        p.followupSegmentation = lesions["follow-up"].segmentation
        p.responseBaselineExam, p.responseFollowupExam = "baseline", "follow-up"
        results, table, _ = logic.assessResponse(p, [lesions["baseline"].lesion_segment_id])
        self.assertEqual(results[0].call.call, response.SUCCESS)
        self.assertLess(abs(results[0].change_pct["vp"] + 50.0), 6.0)
        self.assertEqual(table.GetNumberOfRows(), 1)
        self.delayDisplay("Test passed")

    def test_DCEPerfusion_motion(self):
        self.delayDisplay("Motion: the first half of the frames shifted by 2 mm")
        DCEPerfusionLogic.ensureDependencies(askUser=False)
        import numpy as np
        from DCEPerfusionLib.core import motion, phantom
        from DCEPerfusionLib.scene import phantom as scene_phantom

        # a spine whose vertebrae change across the slices (a block phantom the same on every slice would leave
        # the through-plane translation undetermined)
        ph = phantom.make_spine_phantom(shape=(10, 48, 32), n_frames=30, snr=40.0, seed=5, vertebra_width_slices=6,
                                        lesions=("L2 metastasis",))
        matrix = phantom.spine_matrix(spacing_mm=(2.0, 2.0, 4.0))
        shift = np.zeros((ph.t_s.size, 6))
        shift[:15, 2] = 2.0                                        # mm along z (LPS: superior), frames 0-14
        ph.signal = phantom.move_series(ph.signal, matrix, motion.euler_matrix(shift, motion.centre_lps(
            ph.signal.shape[:-1], matrix)))
        nodes = scene_phantom.add_phantom(slicer.mrmlScene, ph, matrix=matrix, name="DCE moving",
                                          segments={"lesion": phantom.SPINE_LABELS["L2 metastasis"]})
        logic = DCEPerfusionLogic()
        p = logic.getParameterNode()
        p.dceSequence, p.anatomyVolume, p.segmentation = nodes.sequence, nodes.anatomy, nodes.segmentation
        p.t10Constant_s, p.baselineFrames, p.examLabel = 1.6, ph.acquisition["n_baseline"], "motion self-test"
        p.contrastAgent, p.relaxivity_per_mM_s = OTHER_AGENT, ph.acquisition["r1_per_mM_s"]
        p.correctMotion = True
        self.delayDisplay("Registering the frames and fitting")
        out = logic.process(p, lesionSegmentIDs=[nodes.lesion_segment_id])
        found = out.exam.motion.parameters
        self.assertLess(float(np.max(np.abs(found[:15, :3] - shift[0, :3]))), 0.5)   # mm; the frames that moved
        self.assertLess(float(np.max(np.abs(found[15:, :3]))), 0.5)                  # and those that did not
        self.delayDisplay("Test passed")

    def test_DCEPerfusion_selectors(self):
        """The module panel itself (when Slicer runs with its GUI): picking another sequence or segmentation
        keeps it - with the real Qt widgets and parameter-node wrapper - and voids the segment choice."""
        widget = getattr(slicer.modules, "DCEPerfusionWidget", None)
        if widget is None:
            self.delayDisplay("No module panel (Slicer without its main window): selector test skipped")
            return
        self.delayDisplay("Choosing sequences and segmentations in the panel")
        from DCEPerfusionLib.core import multivolume, phantom
        from DCEPerfusionLib.scene import phantom as scene_phantom

        added = []
        for name, tr_ms in (("DCE A", 4.5), ("DCE B", 3.1)):
            nodes = scene_phantom.add_phantom(slicer.mrmlScene, phantom.make_phantom(shape=(2, 12, 14), seed=1),
                                              name=name)
            nodes.sequence.SetAttribute(multivolume.TR_KEY, str(tr_ms))
            added.append(nodes)
        widget.enter()
        p = widget._parameterNode
        for nodes in (added[1], added[0]):
            widget.ui.dceSequenceSelector.setCurrentNode(nodes.sequence)   # the same signals as a user's pick
            self.assertIs(p.dceSequence, nodes.sequence)
            self.assertIs(widget.ui.dceSequenceSelector.currentNode(), nodes.sequence)
        widget.ui.segmentationSelector.setCurrentNode(added[0].segmentation)
        widget.ui.lesionSegmentsSelector.setSelectedSegmentIDs([added[0].lesion_segment_id])
        self.assertEqual(widget.logic.segmentChoices(p)[0], [added[0].lesion_segment_id])
        widget.ui.segmentationSelector.setCurrentNode(added[1].segmentation)
        self.assertIs(p.segmentation, added[1].segmentation)
        self.assertEqual(widget.logic.segmentChoices(p), ([], ""))
        self.delayDisplay("Test passed")
