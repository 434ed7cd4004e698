"""Response and cohort in an MRML scene: compare two exams analysed by :func:`analysis.run_analysis`
(found by their exam labels) with the core's response chain (:func:`pipeline.compare_exams`), carry a
lesion from the baseline to the follow-up by registration, write the lesion response table, and turn a
cohort table into statistics tables and plot charts.

Imports slicer/vtk (never qt/ctk); receives the scene explicitly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import slicer
from slicer import util

from ..core import cohort as cohort_mod
from ..core import examchecks, fitting, pipeline, response
from ..core.geometry import voxel_volume_mm3
from ..core.registry import OUTCOME_COLOURS, SIZE_PROGRESSION_PCT, VP_CUTOFF_PCT
from ..core.regionstats import region_statistics
from ..files.registration import Registration, propagate_mask, register_rigid
from .analysis import CONDITIONS_ATTRIBUTE
from .output import (add_column, find_output, ijk_to_ras, output_name, output_node, segment_masks,
                     write_mask_segmentation)

log = logging.getLogger(__name__)


@dataclass
class ExamMaps:
    """The maps one run wrote for an exam label: arrays (NaN where not fitted), the grid, the vp node and
    the exam's :class:`examchecks.ExamConditions` (None when the run did not record them)."""

    exam: str
    maps: dict
    matrix: np.ndarray
    reference: object
    conditions: examchecks.ExamConditions | None = None


def exam_maps(scene, exam: str) -> ExamMaps:
    """Read back the maps of exam ``exam`` (ValueError naming the label when the exam was not analysed)."""
    status_node = find_output(scene, "map:status", exam)
    if status_node is None:
        raise ValueError(f"exam {exam!r}: no DCE Perfusion result with this exam label in the scene - run the fit "
                         "for this exam first (Apply with this exam label)")
    status = util.arrayFromVolume(status_node)
    maps = {}
    for name in response.RESPONSE_MAPS + ("r2",):
        node = find_output(scene, f"map:{name}", exam)
        if node is not None:
            maps[name] = np.where(status <= fitting.AT_BOUND, util.arrayFromVolume(node).astype(np.float64), np.nan)
    vp_node = find_output(scene, "map:vp", exam)
    reference = vp_node if vp_node is not None else status_node
    text = status_node.GetAttribute(CONDITIONS_ATTRIBUTE)
    conditions = examchecks.ExamConditions(**json.loads(text)) if text else None
    return ExamMaps(exam=exam, maps=maps, matrix=ijk_to_ras(status_node), reference=reference, conditions=conditions)


@dataclass
class Propagation:
    """Lesions carried from the baseline to the follow-up: the registration, the transform node made
    for the user to check it, and per lesion name the carried mask (follow-up map grid) and the
    segmentation node that shows it."""

    registration: Registration
    transform_node: object
    segmentations: dict = field(default_factory=dict)
    masks: dict = field(default_factory=dict)


def propagate_lesions(scene, segmentation, segment_ids, baseline_image, followup_image, followup: ExamMaps,
                      exam_pair: str) -> Propagation:
    """Register the follow-up image to the baseline image (rigid, mutual information) and carry the
    baseline segments onto the follow-up map grid. Creates a linear transform node "follow-up to
    baseline" (put the follow-up image under it to check the alignment) and, per lesion, a segmentation
    "<lesion> carried to follow-up". The input nodes are not changed."""
    for label, node in (("baseline anatomy", baseline_image), ("follow-up anatomy", followup_image)):
        if node is None:
            raise ValueError(f"{label}: select it to carry the lesion over by registration (or give a follow-up "
                             "segmentation with the same segment names)")
    b_arr, b_m = util.arrayFromVolume(baseline_image), ijk_to_ras(baseline_image)
    reg = register_rigid(b_arr, b_m, util.arrayFromVolume(followup_image), ijk_to_ras(followup_image))
    transform = output_node(scene, "vtkMRMLLinearTransformNode", "registration", exam_pair,
                            output_name("follow-up to baseline", exam_pair))
    transform.SetMatrixTransformToParent(util.vtkMatrixFromArray(reg.followup_to_baseline_ras))
    transform.SetAttribute("DCEPerfusion.RegistrationMetric", f"{reg.final_metric:.5f}")
    masks, seg_nodes = {}, {}
    shape = followup.maps["vp"].shape if "vp" in followup.maps else util.arrayFromVolume(followup.reference).shape
    for sid in segment_ids:
        name = segmentation.GetSegmentation().GetSegment(sid).GetName()
        base_mask = next(iter(segment_masks(segmentation, [sid], baseline_image, "lesion segments").values()))
        carried = propagate_mask(base_mask, b_m, shape, followup.matrix, reg)
        masks[name] = carried
        seg_nodes[name] = write_mask_segmentation(scene, carried, followup.matrix, exam_pair, f"propagated:{name}",
                                                  f"{name} carried to follow-up", name, colour=(0.95, 0.8, 0.1))
    log.info("lesions carried to the follow-up: %s (registration metric %.4f)", ", ".join(masks), reg.final_metric)
    return Propagation(registration=reg, transform_node=transform, segmentations=seg_nodes, masks=masks)


def assess_exams(scene, baseline_exam: str, followup_exam: str, segmentation, segment_ids, *,
                 followup_segmentation=None, baseline_image=None, followup_image=None, statistic: str = "mean",
                 cutoff_pct: float = VP_CUTOFF_PCT, progression_pct: float = SIZE_PROGRESSION_PCT,
                 reference_segment_id: str | None = None, normalise_to_reference: bool = False, **call_options):
    """Compare two analysed exams lesion by lesion and write the response table.

    segmentation / segment_ids : the lesions, drawn on the baseline (exported on each exam's map grid).
    followup_segmentation : the same lesions (same segment names) drawn on the follow-up; when absent,
        they are carried over by rigid registration of ``followup_image`` to ``baseline_image``.
    reference_segment_id : a normal-appearing vertebral body of ``segmentation`` (found by name in
        ``followup_segmentation``, else carried over like the lesions): the lesion/reference vp ratios, and
        with ``normalise_to_reference`` the call on their change (:func:`pipeline.compare_exams`).
    Each response has the warnings between the exams (from what each run recorded on its status map).
    Returns (list of :class:`response.LesionResponse`, table node, :class:`Propagation` or None).
    """
    if segmentation is None or not segment_ids:
        raise ValueError("lesion segments: select the segmentation and the lesion segment(s) to assess")
    base = exam_maps(scene, baseline_exam)
    follow = exam_maps(scene, followup_exam)
    if baseline_exam == followup_exam:
        raise ValueError(f"exam labels: baseline and follow-up are both {baseline_exam!r} - pick two analysed exams")
    reference = (segmentation.GetSegmentation().GetSegment(reference_segment_id).GetName()
                 if reference_segment_id else None)
    segment_ids = list(dict.fromkeys([*segment_ids, *([reference_segment_id] if reference_segment_id else [])]))
    base_masks = segment_masks(segmentation, list(segment_ids), base.reference, "lesion segments")
    propagation = None
    if followup_segmentation is not None:
        follow_masks = {}
        for name in base_masks:
            sid = followup_segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
            if not sid:
                log.warning("follow-up segmentation has no segment %r - its call is indeterminate", name)
                continue
            follow_masks.update(segment_masks(followup_segmentation, [sid], follow.reference, "follow-up segments"))
    else:
        propagation = propagate_lesions(scene, segmentation, segment_ids, baseline_image, followup_image, follow,
                                        f"{baseline_exam} to {followup_exam}")
        follow_masks = propagation.masks
    b_rows = region_statistics(base.maps, base_masks, voxel_volume_mm3(base.matrix))
    f_rows = region_statistics(follow.maps, follow_masks, voxel_volume_mm3(follow.matrix)) if follow_masks else []
    results = pipeline.compare_exams(
        pipeline.ExamLesions(b_rows, base_masks, base.matrix, reference, base.conditions),
        pipeline.ExamLesions(f_rows, follow_masks, follow.matrix, reference, follow.conditions),
        [n for n in base_masks if n != reference], statistic=statistic, cutoff_pct=cutoff_pct,
        progression_pct=progression_pct, normalise_to_reference=normalise_to_reference, **call_options)
    table = write_response_table(scene, results, baseline_exam, followup_exam)
    return results, table, propagation


def write_response_table(scene, results, baseline_exam: str, followup_exam: str):
    """One row per lesion: the statistic of each map at both exams, the percent changes, the call with
    its reason (with ΔVp's 95 % CI), the voxel counts, and the size measures with the size call."""
    pair = f"{baseline_exam} to {followup_exam}"
    node = output_node(scene, "vtkMRMLTableNode", "response", pair, output_name("DCE response", pair))
    node.RemoveAllColumns()
    columns = {"Lesion": [r.lesion for r in results], "Statistic": [r.statistic for r in results]}
    for m in response.RESPONSE_MAPS:
        columns[f"{m} baseline"] = [r.baseline.get(m, np.nan) for r in results]
        columns[f"{m} follow-up"] = [r.followup.get(m, np.nan) for r in results]
        columns[f"delta {m} %"] = [r.change_pct.get(m, np.nan) for r in results]
    columns["delta vp % CI lower"] = [r.call.delta_vp_ci_lower_pct for r in results]
    columns["delta vp % CI upper"] = [r.call.delta_vp_ci_upper_pct for r in results]
    columns["Call"] = [r.call.call for r in results]
    columns["Reason"] = [r.call.reason for r in results]
    columns["voxels baseline"] = [r.voxel_counts[0] for r in results]
    columns["voxels follow-up"] = [r.voxel_counts[1] for r in results]
    for key, label in (("longest_diameter_mm", "longest diameter"), ("volume_cm3", "volume")):
        columns[f"{label} baseline"] = [getattr(r.size.baseline, key) if r.size else np.nan for r in results]
        columns[f"{label} follow-up"] = [getattr(r.size.followup, key) if r.size else np.nan for r in results]
    columns["delta longest diameter %"] = [r.size.change_pct["longest_diameter"] if r.size else np.nan
                                           for r in results]
    columns["Size call"] = [r.size.call if r.size else response.INDETERMINATE for r in results]
    if any(r.reference for r in results):
        columns["Reference"] = [(r.reference or {}).get("segment", "") for r in results]
        for key, label in (("vp_ratio_baseline", "vp ratio baseline"), ("vp_ratio_followup", "vp ratio follow-up"),
                           ("delta_vp_ratio_pct", "delta vp ratio %")):
            columns[label] = [(r.reference or {}).get(key, np.nan) for r in results]
    columns["Warnings"] = [" | ".join(r.warnings) for r in results]
    units = {"longest diameter baseline": "mm", "longest diameter follow-up": "mm", "volume baseline": "cm3",
             "volume follow-up": "cm3", "voxels baseline": "voxels", "voxels follow-up": "voxels"}
    for name, values in columns.items():
        add_column(node, name, values, units.get(name, "%" if name.startswith("delta") else ""))
    node.Modified()
    return node


# ============================================================================================ cohort
def load_cohort_table(scene, path: str, name: str = "DCE cohort"):
    """Read and validate a cohort CSV (:func:`cohort.read_cohort_csv`) into a table node."""
    c = cohort_mod.read_cohort_csv(path)
    node = output_node(scene, "vtkMRMLTableNode", "cohort", "", name)
    node.RemoveAllColumns()
    add_column(node, "lesion_id", c.lesion_ids)
    add_column(node, "patient_id", c.patient_ids)
    add_column(node, "outcome", ["failure" if f else "success" for f in c.failure])
    for m, v in c.measures.items():
        add_column(node, m, list(v), "%")
    node.Modified()
    return node


def cohort_rows_from_table(table_node) -> list[dict]:
    """The rows of a cohort table node as dicts of strings (validated by :func:`cohort.cohort_from_rows`)."""
    t = table_node.GetTable()
    names = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
    return [{n: t.GetValue(r, c).ToString() for c, n in enumerate(names)} for r in range(t.GetNumberOfRows())]


def write_cohort_report(scene, c: cohort_mod.Cohort, report: cohort_mod.CohortReport, name: str = "DCE cohort"):
    """The cohort statistics as a table (one row per measure and quantity, with 95 % CIs) and two plot
    charts: ROC curves of vp and size, and the ΔVp waterfall. Returns (table, roc chart, waterfall chart)."""
    rows = []
    for measure, rep in report.measures.items():
        p = rep.performance
        rows.append((measure, "cut-off (%)", rep.cutoff_pct, np.nan, np.nan, np.nan, np.nan, ""))
        for group, s in (("success", rep.success), ("failure", rep.failure)):
            rows.append((measure, f"{group}: mean (%)", s.mean, np.nan, np.nan, np.nan, np.nan, f"n = {s.n}"))
            rows.append((measure, f"{group}: median (%)", s.median, s.q1, s.q3, np.nan, np.nan, "IQR"))
        rows.append((measure, "Mann-Whitney p", rep.mann_whitney.p_value, np.nan, np.nan, np.nan, np.nan,
                     f"{rep.mann_whitney.method}, U = {rep.mann_whitney.u_failure:g}"))
        for label, prop in (("sensitivity", p.sensitivity), ("specificity", p.specificity), ("PPV", p.ppv),
                            ("NPV", p.npv), ("accuracy", p.accuracy)):
            rows.append((measure, label, prop.estimate, *prop.ci["wilson"], *prop.ci["clopper-pearson"],
                         f"{prop.k}/{prop.n}"))
        r = rep.roc
        rows.append((measure, "AUC", r.auc, *r.auc_ci, np.nan, np.nan, f"DeLong SE {r.auc_se:.3f}"))
        rows.append((measure, "Youden cut-off (%)", r.youden_cutoff, np.nan, np.nan, np.nan, np.nan,
                     f"sensitivity {r.youden_sensitivity:.2f}, specificity {r.youden_specificity:.2f}"))
    if report.mcnemar is not None:
        rows.append(("vp vs size", "McNemar exact p", report.mcnemar.p_value, np.nan, np.nan, np.nan, np.nan,
                     f"only vp correct {report.mcnemar.b}, only size correct {report.mcnemar.c}"))
    table = output_node(scene, "vtkMRMLTableNode", "cohort-statistics", "", f"{name} statistics")
    table.RemoveAllColumns()
    for i, (col, unit) in enumerate((("Measure", ""), ("Quantity", ""), ("Value", ""), ("Wilson low", ""),
                                     ("Wilson high", ""), ("Clopper-Pearson low", ""),
                                     ("Clopper-Pearson high", ""), ("Note", ""))):
        add_column(table, col, [row[i] for row in rows], unit)
    table.SetColumnDescription("Wilson low", "95 % CI (Wilson; for the AUC: DeLong)")
    table.Modified()

    roc_chart = output_node(scene, "vtkMRMLPlotChartNode", "cohort-roc", "", f"{name} ROC")
    _clear_chart(scene, roc_chart)
    for measure, rep in report.measures.items():
        t = output_node(scene, "vtkMRMLTableNode", f"cohort-roc-{measure}", "", f"{name} ROC {measure}")
        t.RemoveAllColumns()
        add_column(t, "false positive rate", list(rep.roc.fpr))
        add_column(t, "true positive rate", list(rep.roc.tpr))
        colour = _rgb(OUTCOME_COLOURS["vp" if measure == "vp" else "size"])
        _series(scene, roc_chart, t, "false positive rate", "true positive rate", f"{measure} (AUC {rep.roc.auc:.2f})",
                colour=colour)
    roc_chart.SetXAxisTitle("1 - specificity")
    roc_chart.SetYAxisTitle("sensitivity")
    roc_chart.SetTitle("ROC: treatment failure")

    v = c.measures[next(iter(report.measures.values())).measure]
    order = [i for i in np.argsort(-np.nan_to_num(v, nan=-np.inf)) if np.isfinite(v[i])]
    wf = output_node(scene, "vtkMRMLTableNode", "cohort-waterfall", "", f"{name} waterfall")
    wf.RemoveAllColumns()
    add_column(wf, "rank", [float(k + 1) for k in range(len(order))])
    add_column(wf, "failure", [float(v[i]) if c.failure[i] else 0.0 for i in order], "%")
    add_column(wf, "success", [0.0 if c.failure[i] else float(v[i]) for i in order], "%")
    add_column(wf, "cut-off", [report.measures["vp"].cutoff_pct] * len(order), "%")
    wf_chart = output_node(scene, "vtkMRMLPlotChartNode", "cohort-waterfall-chart", "", f"{name} waterfall")
    _clear_chart(scene, wf_chart)
    _series(scene, wf_chart, wf, "rank", "failure", "failure", colour=_rgb(OUTCOME_COLOURS["failure"]), bar=True)
    _series(scene, wf_chart, wf, "rank", "success", "success", colour=_rgb(OUTCOME_COLOURS["success"]), bar=True)
    _series(scene, wf_chart, wf, "rank", "cut-off", "cut-off", colour=(0.2, 0.2, 0.2))
    wf_chart.SetXAxisTitle("lesions, sorted by ΔVp")
    wf_chart.SetYAxisTitle("ΔVp (%)")
    wf_chart.SetTitle("Change in plasma volume")
    return table, roc_chart, wf_chart


def _rgb(hex_colour: str) -> tuple:
    """"#rrggbb" as (r, g, b) in 0..1, as plot series nodes take colours."""
    return tuple(int(hex_colour[i:i + 2], 16) / 255.0 for i in (1, 3, 5))


def _clear_chart(scene, chart):
    for i in reversed(range(chart.GetNumberOfPlotSeriesNodes())):
        old = chart.GetNthPlotSeriesNode(i)
        chart.RemoveNthPlotSeriesNodeID(i)
        if old is not None and old.GetAttribute("DCEPerfusion.Role"):
            scene.RemoveNode(old)


def _series(scene, chart, table, x, y, name, colour, bar=False):
    s = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
    s.SetAttribute("DCEPerfusion.Role", "cohort-series")
    s.SetAndObserveTableNodeID(table.GetID())
    s.SetXColumnName(x)
    s.SetYColumnName(y)
    if bar:
        s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
    else:
        s.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        s.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    s.SetColor(*colour)
    chart.AddAndObservePlotSeriesNodeID(s.GetID())
    return s


def cohort_in_scene(scene, table_node, vp_cutoff_pct: float = VP_CUTOFF_PCT,
                    size_cutoff_pct: float = SIZE_PROGRESSION_PCT):
    """Validate a cohort table node, compute the report and write its tables and charts."""
    c = cohort_mod.cohort_from_rows(cohort_rows_from_table(table_node), source=f"table '{table_node.GetName()}'")
    report = cohort_mod.cohort_report(c, vp_cutoff_pct=vp_cutoff_pct, size_cutoff_pct=size_cutoff_pct)
    return report, write_cohort_report(scene, c, report)
