"""DCE Perfusion - 3D Slicer scripted module (thin glue; the work is done in DCEPerfusionLib)."""

import enum
import html
import logging
import pathlib
from typing import Annotated

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

#: Python packages the Lib needs that Slicer does not bundle (installed on first use).
REQUIRED_PACKAGES = {"scipy": "scipy", "threadpoolctl": "threadpoolctl"}
# (SimpleITK, used to register exams, is bundled with Slicer; matplotlib is only needed for figure files)


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
    baselineFrames: Annotated[int, WithinRange(1, 1000)] = 5
    aifSource: AIFSource = AIFSource(_DEFAULTS["aif_source"])
    segmentation: vtkMRMLSegmentationNode
    fitSegmentsOnly: bool = False
    model: KineticModel = KineticModel(_DEFAULTS["model"])
    method: FitMethod = FitMethod(_DEFAULTS["method"])
    fitDelay: bool = False
    examLabel: str = "baseline"
    overlayMap: Annotated[str, Choice(registry.overlay_choices())] = "vp"
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    # response: two analysed exams, by exam label
    responseBaselineExam: str = "baseline"
    responseFollowupExam: str = "follow-up"
    followupSegmentation: vtkMRMLSegmentationNode
    responseBaselineAnatomy: vtkMRMLScalarVolumeNode
    responseFollowupAnatomy: vtkMRMLScalarVolumeNode
    responseStatistic: Annotated[str, Choice(list(registry.RESPONSE_STATISTICS))] = registry.RESPONSE_STATISTICS[0]
    responseCutoff_pct: Annotated[float, WithinRange(-100.0, 100.0)] = registry.VP_CUTOFF_PCT
    sizeProgression_pct: Annotated[float, WithinRange(1.0, 200.0)] = registry.SIZE_PROGRESSION_PCT
    # cohort
    cohortCsvPath: pathlib.Path
    cohortTable: vtkMRMLTableNode
    cohortSizeCutoff_pct: Annotated[float, WithinRange(1.0, 200.0)] = registry.SIZE_PROGRESSION_PCT


# segment choices live in segment selector widgets, which the wrapper cannot bind; they are kept in the
# same parameter node under these names
LESION_SEGMENTS_PARAMETER = "LesionSegmentIDs"
AIF_SEGMENT_PARAMETER = "AIFSegmentID"


#
# DCEPerfusionWidget
#


class DCEPerfusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DCEPerfusion.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DCEPerfusionLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.dceSequenceSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSequenceChanged)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.lesionSegmentsSelector.connect("segmentSelectionChanged(QStringList)", self.onSegmentsChanged)
        self.ui.aifSegmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentsChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.assessButton.connect("clicked(bool)", self.onAssessButton)
        self.ui.loadCohortButton.connect("clicked(bool)", self.onLoadCohortButton)
        self.ui.computeCohortButton.connect("clicked(bool)", self.onComputeCohortButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.dceSequence:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceNode")
            if first:
                self._parameterNode.dceSequence = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
            self._restoreSegmentSelection()
            self._updateState()

    # segment selectors (not bound by the wrapper) -------------------------------------------------
    def _restoreSegmentSelection(self) -> None:
        node = self._parameterNode.parameterNode
        segmentation = self._parameterNode.segmentation
        for selector in (self.ui.lesionSegmentsSelector, self.ui.aifSegmentSelector):
            selector.setCurrentNode(segmentation)
        ids = [s for s in node.GetParameter(LESION_SEGMENTS_PARAMETER).split(",") if s]
        self.ui.lesionSegmentsSelector.setSelectedSegmentIDs(ids)
        if node.GetParameter(AIF_SEGMENT_PARAMETER):
            self.ui.aifSegmentSelector.setCurrentSegmentID(node.GetParameter(AIF_SEGMENT_PARAMETER))

    def onSegmentationChanged(self, node) -> None:
        for selector in (self.ui.lesionSegmentsSelector, self.ui.aifSegmentSelector):
            selector.setCurrentNode(node)

    def onSegmentsChanged(self, *args) -> None:
        if not self._parameterNode:
            return
        node = self._parameterNode.parameterNode
        node.SetParameter(LESION_SEGMENTS_PARAMETER, ",".join(self.ui.lesionSegmentsSelector.selectedSegmentIDs()))
        node.SetParameter(AIF_SEGMENT_PARAMETER, self.ui.aifSegmentSelector.currentSegmentID() or "")

    def onSequenceChanged(self, node) -> None:
        """Fill TR and flip angle from the sequence's DICOM attributes (still editable)."""
        if not self._parameterNode or node is None:
            return
        acquisition = self.logic.acquisitionParameters(node)
        if acquisition["tr_s"]:
            self._parameterNode.repetitionTime_ms = MS_PER_S * acquisition["tr_s"]
        if acquisition["flip_angle_deg"]:
            self._parameterNode.flipAngle_deg = acquisition["flip_angle_deg"]

    def _updateState(self, caller=None, event=None) -> None:
        p = self._parameterNode
        self.ui.relaxivitySpinBox.enabled = p.contrastAgent == OTHER_AGENT
        self.ui.fieldStrengthComboBox.enabled = p.contrastAgent != OTHER_AGENT
        self.ui.t10SpinBox.enabled = p.t1MapVolume is None
        self.ui.aifSegmentSelector.enabled = p.aifSource == AIFSource.SEGMENT
        self.ui.bloodT10SpinBox.enabled = p.aifSource == AIFSource.SEGMENT
        self.ui.computeCohortButton.enabled = p.cohortTable is not None
        registration = p.followupSegmentation is None
        self.ui.responseBaselineAnatomySelector.enabled = registration
        self.ui.responseFollowupAnatomySelector.enabled = registration
        if p.dceSequence:
            self.ui.applyButton.toolTip = _("Compute the perfusion maps")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select the DCE sequence")
            self.ui.applyButton.enabled = False

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("DCE Perfusion failed."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            from DCEPerfusionLib.core.fitting import FitCancelled
            dialog = slicer.util.createProgressDialog(parent=slicer.util.mainWindow(), value=0, maximum=100,
                                                      windowTitle=_("DCE Perfusion"))
            dialog.setCancelButtonText(_("Cancel"))

            def progress(fraction, message):
                dialog.labelText = message
                dialog.value = int(100 * fraction)
                slicer.app.processEvents()
                return not dialog.wasCanceled

            try:
                node = self._parameterNode.parameterNode
                outputs = self.logic.process(
                    self._parameterNode,
                    lesionSegmentIDs=[s for s in node.GetParameter(LESION_SEGMENTS_PARAMETER).split(",") if s],
                    aifSegmentID=node.GetParameter(AIF_SEGMENT_PARAMETER) or None,
                    progress=progress)
            except FitCancelled:
                logging.info("DCE Perfusion: cancelled, nothing was changed")
                return
            finally:
                dialog.close()
            if outputs.chart is not None:
                slicer.modules.plots.logic().ShowChartInLayout(outputs.chart)
            if outputs.statistics_table is not None:
                slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(outputs.statistics_table.GetID())
                slicer.app.applicationLogic().PropagateTableSelection()
            self.ui.resultLabel.text = _("AIF: {aif}. Fit status: {status}.").format(
                aif=outputs.aif_description, status=outputs.result.status_counts())


    def _lesionSegmentIDs(self):
        node = self._parameterNode.parameterNode
        return [s for s in node.GetParameter(LESION_SEGMENTS_PARAMETER).split(",") if s]

    def onAssessButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Response assessment failed."), waitCursor=True):
            if not self.logic.ensureDependencies(askUser=True):
                return
            results, table, propagation = self.logic.assessResponse(self._parameterNode, self._lesionSegmentIDs())
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
            lines = []
            for r in results:
                colour = self.logic.callColour(r.call.call)
                size = f"; size: {html.escape(r.size.call)}" if r.size else ""
                lines.append(f'<b>{html.escape(r.lesion)}</b>: <span style="color:{colour}"><b>'
                             f"{html.escape(r.call.call)}</b></span> - {html.escape(r.call.reason)}{size}")
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
    def ensureDependencies(askUser: bool = False) -> bool:
        """Install scipy and threadpoolctl (not bundled with Slicer) on first use."""
        import importlib.util
        missing = [pip for module, pip in REQUIRED_PACKAGES.items() if importlib.util.find_spec(module) is None]
        if not missing:
            return True
        message = _("DCE Perfusion needs the Python packages {names}, which Slicer does not bundle. "
                    "Install them now (internet access required, about a minute)?").format(names=", ".join(missing))
        if askUser and not slicer.util.confirmOkCancelDisplay(message):
            return False
        logging.info("DCE Perfusion: installing %s", ", ".join(missing))
        slicer.util.pip_install(" ".join(missing))
        return True

    @staticmethod
    def acquisitionParameters(sequenceNode) -> dict:
        """TR (s) and flip angle (degrees) from the sequence's DICOM attributes (numpy only)."""
        from DCEPerfusionLib.core import multivolume
        return multivolume.acquisition_parameters(sequenceNode.GetAttribute)

    @staticmethod
    def analysisOptions(parameters):
        """The Lib's options record filled in from a :class:`DCEPerfusionParameterNode` (0 means "not given";
        a frame interval entered replaces the sequence's frame times, as its tooltip says)."""
        from DCEPerfusionLib.core.options import AnalysisOptions
        p = parameters
        given = lambda value: value if value > 0 else None  # noqa: E731
        other = p.contrastAgent == OTHER_AGENT  # then the given r1 is used, not a preset
        return AnalysisOptions(
            n_baseline=p.baselineFrames, tr_s=given(p.repetitionTime_ms / MS_PER_S),
            flip_angle_deg=given(p.flipAngle_deg), frame_interval_s=given(p.frameInterval_s),
            override_frame_times=given(p.frameInterval_s) is not None,
            t10_s=p.t10Constant_s, blood_t10_s=given(p.bloodT10_s),
            contrast_agent=p.contrastAgent, field_strength_t=p.fieldStrength_T,
            r1_per_mM_s=p.relaxivity_per_mM_s if other else None,
            aif_source=p.aifSource.value, hct=p.hematocrit, model=p.model.value, method=p.method.value,
            fit_delay=p.fitDelay, fit_lesions_only=p.fitSegmentsOnly)

    def process(self, parameters, lesionSegmentIDs=(), aifSegmentID=None, progress=None):
        """Run the analysis for a :class:`DCEPerfusionParameterNode`; returns ``scene.analysis.SceneOutputs``.

        Raises ValueError with a message naming the input to fix (the scene is unchanged then)."""
        self.ensureDependencies(askUser=False)
        from DCEPerfusionLib.scene import analysis
        p = parameters
        inputs = analysis.SceneInputs(
            dce_sequence=p.dceSequence, anatomy=p.anatomyVolume, t1_map=p.t1MapVolume, segmentation=p.segmentation,
            lesion_segment_ids=list(lesionSegmentIDs), aif_segment_id=aifSegmentID, exam_label=p.examLabel,
            overlay_map=p.overlayMap, overlay_opacity=p.overlayOpacity)
        return analysis.run_analysis(slicer.mrmlScene, inputs, self.analysisOptions(p), progress=progress)

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
            statistic=p.responseStatistic, cutoff_pct=p.responseCutoff_pct, progression_pct=p.sizeProgression_pct)

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
