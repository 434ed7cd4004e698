"""The scene adapter around the chain: nodes -> arrays -> :func:`pipeline.analyse` -> nodes.

:func:`run_analysis` reads the DCE sequence, the segments (exported on the DCE grid by Slicer's own
segmentation logic) and the T1 map from a scene, runs the chain and writes the result back with
:func:`write_exam`: map volumes with colour, window and legend over the anatomy, the statistics table,
the curves and their chart, the AIF voxels as a segmentation, the motion correction's per-frame
transforms (browsed with the DCE) and their table. A re-run with the same exam label updates
its own nodes and never touches the inputs. :func:`write_exam` also takes a result computed elsewhere
(the demo builds its scenes from the files' results).

Imports slicer/vtk (never qt/ctk) and receives the scene and nodes explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

from slicer import util

from ..core import examchecks, fitting, pipeline
from ..core.geometry import Volume
from ..core.options import AnalysisOptions
from ..core.registry import MODELS
from ..files.motion import FRAME_REGISTRATION
from .dicom import RECORD_ATTRIBUTE
from .motion import write_motion
from .output import (check_inputs_not_outputs, ijk_to_ras, reference_volume, remove_stale_outputs, segment_masks,
                     show_overlay, write_curves, write_map, write_mask_segmentation, write_statistics_table)
from .series import read_sequence

log = logging.getLogger(__name__)

#: The status map node's attribute with the exam's :class:`examchecks.ExamConditions` (JSON).
CONDITIONS_ATTRIBUTE = "DCEPerfusion.ExamConditions"


@dataclass
class SceneInputs:
    """The nodes of one run (in the scene passed to :func:`run_analysis`) and how its outputs are shown.

    ``lesion_segment_ids``: the lesion segments of ``segmentation`` (statistics, curves, and the fit region
    with ``fit_lesions_only``); ``aif_segment_id``: the artery segment for ``aif_source="segment"``;
    ``exam_label`` names the outputs ("vp (baseline)"); ``overlay_map`` is shown over ``anatomy``;
    ``reference_segment_id``: a normal-appearing vertebral body of ``segmentation``, reported as the
    normal-marrow reference (:mod:`..core.examchecks`)."""

    dce_sequence: object
    anatomy: object = None
    t1_map: object = None
    segmentation: object = None
    lesion_segment_ids: list = field(default_factory=list)
    aif_segment_id: str | None = None
    exam_label: str = ""
    overlay_map: str = "vp"
    overlay_opacity: float = 0.6
    reference_segment_id: str | None = None


@dataclass
class SceneOutputs:
    """A run's result (:class:`pipeline.ExamResult`) and the nodes written for it; ``dce_sequence``: the sequence
    node the exam was read from (the DICOM export finds the source images through it), None for a result
    computed elsewhere."""

    exam: pipeline.ExamResult
    map_nodes: dict
    statistics_table: object
    curves_table: object
    chart: object
    aif_segmentation: object
    timings_s: dict
    motion_transforms: object = None
    motion_table: object = None
    dce_sequence: object = None

    @property
    def result(self) -> fitting.FitResult:
        return self.exam.fit

    @property
    def statistics(self) -> list:
        return self.exam.statistics

    @property
    def cp(self):
        return self.exam.cp_mM

    @property
    def t_s(self):
        return self.exam.t_s

    @property
    def aif_description(self) -> str:
        return self.exam.aif_description


def _check(inputs: SceneInputs, options: AnalysisOptions):
    if options.aif_source == "segment" and (inputs.segmentation is None or not inputs.aif_segment_id):
        raise ValueError("AIF source 'segment': select the segmentation and the artery segment (e.g. the aorta)")
    if (inputs.lesion_segment_ids or options.fit_lesions_only) and inputs.segmentation is None:
        raise ValueError("segments: select the segmentation that holds the lesion segments")
    if not 0 <= inputs.overlay_opacity <= 1:
        raise ValueError(f"overlay opacity = {inputs.overlay_opacity}: must be in [0, 1]")


def run_analysis(scene, inputs: SceneInputs, options: AnalysisOptions, progress=None) -> SceneOutputs:
    """Run the chain on the nodes of ``inputs`` and write the outputs into ``scene``.

    progress : callable(fraction 0..1, message) -> bool | None; returning False cancels the fit
               (raises :class:`fitting.FitCancelled`; the scene is not modified then).
    Raises ValueError naming the input and the fix for every bad input, before anything is written.
    """
    def report(frac, msg):
        if progress is not None and progress(frac, msg) is False:
            raise fitting.FitCancelled("cancelled by the user")

    t0 = time.perf_counter()
    exam_label = (inputs.exam_label or "").strip()
    options = options.checked()
    check_inputs_not_outputs(scene, {"DCE sequence": inputs.dce_sequence, "anatomy volume": inputs.anatomy,
                                     "T1 map": inputs.t1_map, "segmentation": inputs.segmentation}, exam_label)
    _check(inputs, options)
    report(0.0, "reading the DCE sequence")
    series = read_sequence(inputs.dce_sequence, options.frame_interval_s, options.override_frame_times)
    ref = reference_volume(series.shape_kji, series.ijk_to_ras)
    lesions, aif_mask, aif_name = {}, None, ""
    if inputs.segmentation is not None and inputs.lesion_segment_ids:
        lesions = segment_masks(inputs.segmentation, list(inputs.lesion_segment_ids), ref, "lesion segments")
    if options.aif_source == "segment":
        aif_name, aif_mask = next(iter(segment_masks(inputs.segmentation, [inputs.aif_segment_id], ref,
                                                     "AIF segment").items()))
    reference_name, reference_mask = "reference", None
    if inputs.reference_segment_id:
        if inputs.segmentation is None:
            raise ValueError("reference segment: select the segmentation that holds it")
        reference_name, reference_mask = next(iter(segment_masks(inputs.segmentation, [inputs.reference_segment_id],
                                                                 ref, "reference segment").items()))
    t1 = None
    if inputs.t1_map is not None:
        t1 = Volume(util.arrayFromVolume(inputs.t1_map), ijk_to_ras(inputs.t1_map),
                    f"T1 map '{inputs.t1_map.GetName()}'")
    read_s = time.perf_counter() - t0

    within = None if progress is None else (lambda frac, msg: progress(0.05 + 0.85 * frac, msg))
    exam = pipeline.analyse(series, options, lesions=lesions, aif_mask=aif_mask, aif_name=aif_name, t1_map=t1,
                            progress=within, reference_mask=reference_mask, reference_name=reference_name,
                            frame_registration=FRAME_REGISTRATION)
    report(0.9, "writing maps, statistics and curves")
    out = write_exam(scene, exam, exam_label, inputs.anatomy, inputs.overlay_map, inputs.overlay_opacity,
                     dce_sequence=inputs.dce_sequence)
    out.timings_s.update(read_s=read_s, **exam.timings_s)
    if progress is not None:
        progress(1.0, "done")  # the scene has changed: too late to cancel
    return out


def write_exam(scene, exam: pipeline.ExamResult, exam_label: str = "", anatomy=None, overlay_map: str = "vp",
               overlay_opacity: float = 0.6, dce_sequence=None) -> SceneOutputs:
    """Write an exam's result into ``scene``: maps on the DCE grid, the overlay over ``anatomy``, the
    statistics table (when there are lesions), the curves and chart, the AIF voxels and, with a motion
    correction, the per-frame transforms (a sequence browsed with ``dce_sequence``, the sequence the
    exam was read from; :mod:`.motion`) and their table; outputs an earlier run with the same label made
    and this one did not are removed."""
    t0 = time.perf_counter()
    matrix = exam.series.ijk_to_ras
    map_nodes = {name: write_map(scene, name, values, matrix, exam_label) for name, values in exam.maps.items()}
    map_nodes["status"].SetAttribute(CONDITIONS_ATTRIBUTE, json.dumps(dataclasses.asdict(
        examchecks.conditions(exam.provenance, exam.t_s, exam.cp_mM)), allow_nan=True))   # for the response
    map_nodes["status"].RemoveAttribute(RECORD_ATTRIBUTE)       # an earlier fit's DICOM export is not this one's
    overlay = overlay_map if overlay_map in map_nodes else MODELS[exam.fit.model].maps[0]
    show_overlay(scene, map_nodes[overlay], anatomy, overlay_opacity)
    table = write_statistics_table(scene, exam.statistics, exam_label) if exam.lesions else None
    curves_table, chart = write_curves(scene, exam.t_s, exam.curves, exam_label)
    aif_seg = None
    if exam.aif_mask is not None:
        aif_seg = write_mask_segmentation(scene, exam.aif_mask, matrix, exam_label, "aif-segmentation", "AIF voxels",
                                          f"AIF ({exam.options.aif_source})")
    transforms = motion_table = None
    if exam.motion is not None:
        transforms, motion_table = write_motion(scene, exam.motion, exam.t_s, exam_label, dce_sequence,
                                                exam.options.frame_interval_s, exam.options.override_frame_times)
    remove_stale_outputs(scene, exam_label, keep=[*map_nodes.values(), table, aif_seg, transforms, motion_table])
    return SceneOutputs(exam=exam, map_nodes=map_nodes, statistics_table=table, curves_table=curves_table,
                        chart=chart, aif_segmentation=aif_seg, timings_s={"write_s": time.perf_counter() - t0},
                        motion_transforms=transforms, motion_table=motion_table, dce_sequence=dce_sequence)
