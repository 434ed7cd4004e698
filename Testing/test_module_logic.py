"""DCEPerfusion.py's logic and in-Slicer self-test, run on a slicer-core scene.

slicer-core has no Qt, so the scripted-module base classes, the parameter-node wrapper and the
translation function are replaced by the stand-ins of ``slicergui`` (which behave like Slicer 5.8.1's).
What runs is the module's own code: the parameter-to-Lib mapping in ``DCEPerfusionLogic.process`` and
the body of ``DCEPerfusionTest``."""

import importlib
import sys
import types
import unittest

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (python3 run.py test)")

import slicergui  # noqa: E402

from DCEPerfusionLib import phantom  # noqa: E402
from DCEPerfusionLib.scene import headless  # noqa: E402
from DCEPerfusionLib.scene import phantom as scene_phantom  # noqa: E402


@pytest.fixture
def module(monkeypatch):
    hs = headless.headless_scene()
    mod, _ = slicergui.install(monkeypatch, hs)
    yield mod, hs
    sys.modules.pop("DCEPerfusion", None)


@pytest.mark.parametrize("panel", [False, True], ids=["no main window", "with the module panel"])
def test_the_in_slicer_self_test_passes(module, panel):
    """As run from Slicer's "Reload and Test": with the panel (slicer.modules.DCEPerfusionWidget, which Slicer
    sets for a scripted module's widget) the selector part runs on it too."""
    mod, _ = module
    widget = None
    if panel:
        widget = mod.DCEPerfusionWidget()
        widget.setup()
        slicer.modules.DCEPerfusionWidget = widget
    try:
        result = unittest.TextTestRunner(verbosity=0).run(unittest.defaultTestLoader.loadTestsFromTestCase(
            mod.DCEPerfusionTest))
        assert result.wasSuccessful(), result.failures + result.errors
        if panel:                                     # the selector test ran: it left sequence A chosen
            assert widget._parameterNode.dceSequence.GetName() == "DCE A"
    finally:
        if widget is not None:
            widget.cleanup()
            slicergui.detach(widget.ui)


def test_logic_maps_the_parameters_onto_the_lib(module):
    mod, hs = module
    ph = phantom.make_phantom(shape=(3, 20, 24), snr=80.0, seed=5)
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    logic = mod.DCEPerfusionLogic()
    p = logic.getParameterNode()
    p.dceSequence, p.anatomyVolume, p.segmentation = nodes.sequence, nodes.anatomy, nodes.segmentation
    p.baselineFrames = ph.acquisition["n_baseline"]
    p.contrastAgent, p.fieldStrength_T = "gadobutrol", 1.5   # preset: 5.2 /(mM s), not the phantom's 5.0
    p.t10Constant_s, p.hematocrit = 1.6, ph.acquisition["hct"]
    p.aifSource, p.model, p.method = mod.AIFSource.PARKER, mod.KineticModel.PATLAK, mod.FitMethod.LLS
    p.examLabel, p.overlayMap = "pre", "ktrans"
    acq = logic.acquisitionParameters(nodes.sequence)
    assert acq == {"tr_s": pytest.approx(ph.acquisition["tr_s"]), "flip_angle_deg": ph.acquisition["flip_angle_deg"]}
    out = logic.process(p, lesionSegmentIDs=[nodes.lesion_segment_id])
    assert out.result.model == "patlak" and out.result.method == "lls"
    assert set(out.map_nodes) == {"ktrans", "vp", "ktrans_se", "vp_se", "r2", "status"}
    assert out.map_nodes["ktrans"].GetName() == "Ktrans (pre)"
    # the preset was used: with a population AIF (mM) tissue concentration, and so the linear vp, scale as 1/r1
    lesion = nodes.labels == phantom.LABELS["lesion"]
    p.contrastAgent, p.relaxivity_per_mM_s = mod.CONTRAST_AGENTS[-1], 5.0
    out2 = logic.process(p, lesionSegmentIDs=[nodes.lesion_segment_id])
    ratio = np.median(out2.result.maps["vp"][lesion]) / np.median(out.result.maps["vp"][lesion])
    assert ratio == pytest.approx(5.2 / 5.0, rel=1e-6)  # concentrations are stored as float32
    assert out2.map_nodes["vp"] is out.map_nodes["vp"]  # same exam label: the outputs were updated in place


def test_the_parameter_node_defaults_are_the_options_defaults(module):
    """One set of defaults: a fresh parameter node fills in exactly the Lib's AnalysisOptions defaults
    (its field selector always names a field - a sequence node carries no MagneticFieldStrength - so it
    gives the default field the record falls back to)."""
    from DCEPerfusionLib.core.options import AnalysisOptions
    from DCEPerfusionLib.core.registry import DEFAULT_OPTIONS
    mod, _ = module
    p = mod.DCEPerfusionLogic().getParameterNode()
    assert p.baselineFrames == 0                      # 0: "detect", the options' None
    assert mod.DCEPerfusionLogic.analysisOptions(p) == AnalysisOptions(
        field_strength_t=DEFAULT_OPTIONS["field_strength_t"])
    p.contrastAgent, p.relaxivity_per_mM_s, p.repetitionTime_ms = mod.OTHER_AGENT, 6.1, 4.5
    options = mod.DCEPerfusionLogic.analysisOptions(p)
    assert options.relaxivity() == (6.1, "given") and options.tr_s == pytest.approx(0.0045)
    # the module's choices are the registry's
    from DCEPerfusionLib.core import registry
    assert [m.value for m in mod.KineticModel] == list(registry.MODELS)
    assert [m.value for m in mod.AIFSource] == [k for k in registry.AIF_SOURCES
                                                if k not in registry.PRESCRIBED_AIF_SOURCES]
    # the wrapper's combobox connector labels an enum's items with getattr(enum, "label", ...)(member)
    # (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py:419-421, Slicer 5.8.1) and stores the
    # member's name in the parameter node (serializers.py:1003-1011): the names are the old enum's
    assert mod.KineticModel.label(mod.KineticModel.TWO_COMPARTMENT_EXCHANGE) == "Two-compartment exchange"
    assert [m.name for m in mod.KineticModel] == ["EXTENDED_TOFTS", "TOFTS", "PATLAK", "TWO_COMPARTMENT_EXCHANGE",
                                                  "BEST_BY_AICC"]
    assert [m.name for m in mod.FitMethod] == ["NLLS", "LLS"] and mod.AIFSource["FRITZ_HANSEN"].value == "fritz_hansen"


def test_the_readme_console_snippet_runs(monkeypatch):
    """The README's 'Use from the Python console' code, on a scene with nodes named as it expects."""
    import os
    import re
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("## Use from the Python console", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    hs = headless.headless_scene()
    monkeypatch.setattr(slicer, "mrmlScene", hs.scene, raising=False)
    ph = phantom.make_phantom(shape=(3, 20, 24), snr=80.0, seed=9)
    nodes = scene_phantom.add_phantom(hs.scene, ph, name="DCE series")
    nodes.anatomy.SetName("T1w post-contrast")
    nodes.segmentation.SetName("Segmentation")
    nodes.segmentation.GetSegmentation().GetSegment(nodes.artery_segment_id).SetName("aorta")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.statistics and out.statistics[0].segment == "lesion"
    assert out.map_nodes["vp"].GetName() == "vp (baseline)"


def test_logic_response_and_cohort_sections(module, tmp_path):
    from DCEPerfusionLib import cohort, response
    mod, hs = module
    logic = mod.DCEPerfusionLogic()
    p = logic.getParameterNode()
    kt, ve, vp, t10 = phantom.TISSUES["lesion"]
    segmentations = {}
    for label, lesion_vp, seed in (("baseline", vp, 1), ("follow-up", vp * 0.4, 2)):
        ph = phantom.make_phantom(shape=(3, 20, 24), snr=80.0, seed=seed, tissues={"lesion": (kt, ve, lesion_vp, t10)})
        nodes = scene_phantom.add_phantom(hs.scene, ph, name=f"DCE {label}")
        p.dceSequence, p.anatomyVolume, p.segmentation = nodes.sequence, nodes.anatomy, nodes.segmentation
        p.baselineFrames, p.t10Constant_s, p.examLabel = ph.acquisition["n_baseline"], 1.6, label
        p.contrastAgent, p.relaxivity_per_mM_s = mod.CONTRAST_AGENTS[-1], ph.acquisition["r1_per_mM_s"]
        logic.process(p, lesionSegmentIDs=[nodes.lesion_segment_id])
        segmentations[label] = nodes
    p.segmentation = segmentations["baseline"].segmentation
    p.followupSegmentation = segmentations["follow-up"].segmentation
    results, table, propagation = logic.assessResponse(p, [segmentations["baseline"].lesion_segment_id])
    assert results[0].call.call == response.SUCCESS and propagation is None
    assert results[0].change_pct["vp"] == pytest.approx(-60.0, abs=6.0)
    assert logic.callColour(results[0].call.call).startswith("#")
    p.responseCutoff_pct = -70.0                     # a stricter cut-off turns it into "suspected failure"
    assert logic.assessResponse(p, [segmentations["baseline"].lesion_segment_id])[0][0].call.call == response.FAILURE
    rows = cohort.synthetic_cohort(n_success=8, n_failure=5, seed=1)
    csv_path = tmp_path / "c.csv"
    csv_path.write_text(",".join(rows[0]) + "\n" + "\n".join(",".join(r.values()) for r in rows))
    with pytest.raises(ValueError, match="is not a file"):
        logic.loadCohort(tmp_path / "missing.csv")
    table = logic.loadCohort(csv_path)
    report, (stats, roc_chart, wf_chart) = logic.computeCohort(table, -20.0, 20.0)
    assert report.n_lesions == 13 and stats.GetNumberOfRows() > 10
    with pytest.raises(ValueError, match="Cohort table: load a cohort CSV"):
        logic.computeCohort(None)


def test_the_readme_cohort_snippet_runs(tmp_path, monkeypatch):
    """The README's 'Response and cohort statistics' code with a cohort CSV and a lesion mask in place."""
    import os
    import re

    from DCEPerfusionLib import cohort
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8") as f:
        section = f.read().split("### Response and cohort statistics", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    rows = cohort.synthetic_cohort(seed=5)
    (tmp_path / "cohort.csv").write_text(",".join(rows[0]) + "\n" + "\n".join(",".join(r.values()) for r in rows))
    monkeypatch.chdir(tmp_path)
    mask = np.zeros((5, 20, 20), bool)
    mask[1:4, 5:15, 6:12] = True
    namespace = {"lesion_mask_kji": mask, "ijk_to_ras": np.diag([1.0, 1.0, 3.0, 1.0])}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["size"].longest_diameter_mm == pytest.approx(np.hypot(10, 6), abs=1.0)
    assert (tmp_path / "waterfall.png").exists() and (tmp_path / "roc.svg").exists()


def _small_linear_exam(mod, hs):
    """(logic, parameter node, phantom nodes) set for a quick fit: a small phantom, Patlak by linear least squares."""
    ph = phantom.make_phantom(shape=(2, 16, 18), snr=80.0, seed=2)
    nodes = scene_phantom.add_phantom(hs.scene, ph)
    logic = mod.DCEPerfusionLogic()
    p = logic.getParameterNode()
    p.dceSequence, p.anatomyVolume, p.segmentation = nodes.sequence, nodes.anatomy, nodes.segmentation
    p.baselineFrames, p.t10Constant_s = ph.acquisition["n_baseline"], 1.6
    p.model, p.method = mod.KineticModel.PATLAK, mod.FitMethod.LLS
    return logic, p, nodes


def test_the_logic_never_offers_numba_and_says_once_how_to_get_it(module, monkeypatch, caplog):
    """From the Python console (the logic, no widget): without numba nothing is asked nor installed, the fit
    runs, one info line says how to install numba, and the log names the engine that ran."""
    import logging
    mod, hs = module
    monkeypatch.setitem(sys.modules, "numba", None)
    logic, p, nodes = _small_linear_exam(mod, hs)
    questions, installs = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: questions.append(a) or True)
    monkeypatch.setattr(slicer.util, "pip_install", installs.append)
    with caplog.at_level(logging.INFO):
        for label in ("a", "b"):
            p.examLabel = label
            out = logic.process(p, lesionSegmentIDs=[nodes.lesion_segment_id])
    assert questions == [] and installs == [] and out.map_nodes["vp"].GetName() == "vp (b)"
    notes = [r.getMessage() for r in caplog.records if "numba" in r.getMessage()]
    assert len(notes) == 1 and "slicer.util.pip_install('numba>=0.60 numpy==" in notes[0]
    engine = getattr(out.result, "engine", "numpy")
    assert sum(f"with the {engine} engine" in r.getMessage() for r in caplog.records) == 2


def test_the_result_line_names_the_engine_that_ran(module):
    """FitResult.engine ("numba" or "numpy") in the module's result line."""
    mod, hs = module
    logic, p, nodes = _small_linear_exam(mod, hs)
    out = logic.process(p, lesionSegmentIDs=[nodes.lesion_segment_id])
    for engine, shown in (("numba", "Fit engine: numba (compiled kernels)."), ("numpy", "Fit engine: numpy.")):
        object.__setattr__(out.result, "engine", engine)
        assert shown in logic.resultSummary(out)
