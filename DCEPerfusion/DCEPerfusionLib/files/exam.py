"""The files adapter around the chain: files -> arrays -> :func:`pipeline.analyse` -> files. What
``dceperfusion fit``, ``batch`` and the demo run; nothing here computes what the Slicer scene would need
too (that is all in the core).

An exam's output folder holds the maps (NRRD or NIfTI, the DCE geometry, NaN where not fitted - see
``status``; with uncertainty also ``<map>_se``, the standard errors, and with model "auto" ``model_choice``
and ``aicc``; each NRRD names its map and unit in the keys ``DCEPerfusion.Map`` and ``DCEPerfusion.Unit``),
``statistics.csv``, ``curves.csv`` (AIF and lesion curves), ``lesions.seg.nrrd`` (the lesion masks on the
DCE grid, for the size comparison), with a motion correction ``motion.csv`` (per frame: time in s, the
rigid parameters tx, ty, tz in mm and rx, ry, rz in degrees, the largest displacement in mm -
:meth:`core.motion.MotionEstimate.rows`) and ``summary.json`` (values used and where they came from, frame
times in s, the options, the maps with their titles and units, the statistics, the motion correction).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from ..core import examchecks, pipeline
from ..core.geometry import Volume
from ..core.registry import DEFAULT_OPTIONS, MAPS
from ..core.options import AnalysisOptions
from . import atomic, images, motion, results, series

#: File names inside an exam's output folder.
SUMMARY, STATISTICS, CURVES, LESIONS = "summary.json", "statistics.csv", "curves.csv", "lesions.seg.nrrd"
MOTION = "motion.csv"
MAP_FORMATS = {"nrrd": ".nrrd", "nii": ".nii.gz", "nii.gz": ".nii.gz"}


@dataclass
class ExamFiles:
    """The files of one exam. ``dce``: a DICOM folder, a 4D NRRD or a 4D NIfTI; ``segmentation``: a
    ``.seg.nrrd`` or labelmap with the lesions (and the artery); ``t1_map``: a T1 map (s or ms, any grid);
    ``aif_segment``: the artery segment of ``segmentation`` (its name; for a labelmap also its label value,
    e.g. "1"); ``lesions``: the segments to report (default: every segment but the artery); ``aif_mask``:
    the artery as a labelmap or segmentation of its own (every non-zero voxel; instead of ``aif_segment``,
    as PkModeling takes it); ``mask``: the region to fit (every non-zero voxel; default all voxels);
    ``aif_csv``: a prescribed AIF, a CSV of time (s) and plasma concentration (mM); ``reference_segment``:
    a normal-appearing vertebral body of ``segmentation`` (its name or label value), reported as the
    normal-marrow reference (:mod:`..core.examchecks`). Masks may be on any grid (resampled, nearest
    neighbour)."""

    dce: str
    segmentation: str | None = None
    t1_map: str | None = None
    aif_segment: str | None = None
    lesions: list | None = None
    aif_mask: str | None = None
    mask: str | None = None
    aif_csv: str | None = None
    reference_segment: str | None = None

    def inputs(self) -> list:
        """Every input path given."""
        return [p for p in (self.dce, self.segmentation, self.t1_map, self.aif_mask, self.mask, self.aif_csv) if p]


def fit_exam(files: ExamFiles, options: AnalysisOptions, progress=None) -> pipeline.ExamResult:
    """Read the exam's files and run the chain on them (ValueError naming the input and the fix)."""
    t0 = time.perf_counter()
    options = options.checked()                                  # before reading anything large
    for label, path in (("DCE input", files.dce), ("segmentation", files.segmentation), ("T1 map", files.t1_map),
                        ("AIF mask", files.aif_mask), ("fit mask", files.mask), ("AIF CSV", files.aif_csv)):
        if path and not os.path.exists(path):
            raise ValueError(f"{label} {path} does not exist - check the path")
    if files.aif_segment and files.aif_mask:
        raise ValueError("AIF: give either an AIF segment of the segmentation (--aif-segment) or an AIF mask file "
                         "(--aif-mask), not both")
    if options.aif_source == "segment" and not (files.aif_segment or files.aif_mask):
        raise ValueError("AIF source 'segment': no artery given - name its segment (--aif-segment NAME) or give "
                         "a mask file of it (--aif-mask FILE)")
    masks, seg_matrix = {}, None
    if files.segmentation:
        masks, seg_matrix = images.read_segmentation(files.segmentation)
    names = list(masks)
    aif_segment = _segment_name(masks, files.aif_segment) if files.aif_segment else None
    if options.aif_source == "segment" and not (aif_segment in masks or files.aif_mask):
        raise ValueError(f"AIF segment {files.aif_segment!r}: not in the segmentation "
                         f"({', '.join(names) or 'no segmentation given'}) - give --segmentation and --aif-segment "
                         "(a segment name, or a labelmap's label value), or --aif-mask")
    reference = _segment_name(masks, files.reference_segment) if files.reference_segment else None
    if files.reference_segment and reference is None:
        raise ValueError(f"reference segment {files.reference_segment!r}: not in the segmentation "
                         f"({', '.join(names) or 'no segmentation given'}) - give --segmentation and the name (or "
                         "label value) of a normal-appearing vertebral body")
    lesion_names = ([_segment_name(masks, n) or n for n in files.lesions] if files.lesions
                    else [n for n in names if n not in (aif_segment, reference)])
    missing = [n for n in lesion_names if n not in masks]
    if missing:
        raise ValueError(f"lesions {missing}: not in the segmentation ({', '.join(names) or 'none given'}) - "
                         "give the segment names of --segmentation")
    prescribed = None
    if files.aif_csv:
        from ..core.tables import read_aif_csv
        prescribed = read_aif_csv(files.aif_csv)
    s = series.read_dce(files.dce, options.frame_interval_s, options.override_frame_times)
    on_grid = {n: images.resample_mask(masks[n], seg_matrix, s.shape_kji, s.ijk_to_ras)
               for n in dict.fromkeys([*lesion_names, *(n for n in (aif_segment, reference) if n)])}
    aif_mask, aif_name = on_grid.get(aif_segment), aif_segment or ""
    if files.aif_mask:
        aif_mask, aif_name = _mask_file(files.aif_mask, s, "AIF mask", single=True), os.path.basename(files.aif_mask)
    fit_mask = _mask_file(files.mask, s, "fit mask") if files.mask else None
    t1 = None
    if files.t1_map:
        arr, matrix = images.read_volume(files.t1_map)
        t1 = Volume(arr, matrix, f"T1 map {files.t1_map}")
    t_read = time.perf_counter() - t0
    result = pipeline.analyse(s, options, lesions={n: on_grid[n] for n in lesion_names}, aif_mask=aif_mask,
                              aif_name=aif_name, t1_map=t1, fit_mask=fit_mask, prescribed_aif=prescribed,
                              progress=progress, reference_mask=on_grid.get(reference),
                              reference_name=reference or "reference", frame_registration=motion.FRAME_REGISTRATION)
    result.timings_s.update(read_s=t_read, total_s=time.perf_counter() - t0)
    return result


def _segment_name(masks: dict, name: str):
    """The segment ``name`` refers to: the name itself, or for a labelmap its label value ("1" ->
    "label 1"); None when there is none."""
    if name in masks:
        return name
    label = f"label {str(name).strip()}"
    return label if label in masks else None


def _mask_file(path: str, s, what: str, single: bool = False) -> np.ndarray:
    """Every non-zero voxel of a labelmap or segmentation file, on the grid of the series ``s``; with
    ``single`` the file must hold one segment (an artery, not the artery and the lesions)."""
    found, matrix = images.read_segmentation(path, allow_empty=True)
    if single and len(found) > 1:
        names = ", ".join(list(found)[:4]) + (" ..." if len(found) > 4 else "")
        raise ValueError(f"{what} {path}: holds {len(found)} segments ({names}) - give a mask of the artery alone, "
                         "or name its segment (--segmentation FILE --aif-segment NAME)")
    union = np.logical_or.reduce(list(found.values())) if found else None
    on_grid = images.resample_mask(union, matrix, s.shape_kji, s.ijk_to_ras) if found else None
    if on_grid is None or not on_grid.any():
        where = "has no non-zero voxel" if not found else "has no voxel inside the DCE volume"
        marked = "the artery (e.g. the aorta)" if what == "AIF mask" else "the region to fit"
        raise ValueError(f"{what} {path}: {where} - mark {marked} in a mask of this study")
    return on_grid


def write_exam(result: pipeline.ExamResult, out_dir: str, fmt: str = "nrrd", overwrite: bool = False,
               files: ExamFiles | None = None, dicom: dict | None = None) -> list:
    """Write an exam's results into ``out_dir`` (see the module doc): complete or not at all - built in a
    temporary folder beside it and swapped in as a whole (:func:`atomic.result_folder`); a previous result
    is replaced only with ``overwrite``, a folder with other files or holding an input never. ``dicom``: the
    record of the exam's DICOM objects (:func:`dicomout.write_dicom_exam`), kept in summary.json's
    ``dicom`` (null without). Returns the paths written."""
    ext = MAP_FORMATS.get(fmt)
    if ext is None:
        raise ValueError(f"format {fmt!r}: use nrrd or nii.gz")
    if files is not None:
        atomic.check_not_inputs([out_dir], files.inputs())
    names = [f"{name}{ext}" for name in result.maps]
    names += [STATISTICS, CURVES, *([LESIONS] if result.lesions else []),
              *([MOTION] if result.motion is not None else []), SUMMARY]
    matrix = result.series.ijk_to_ras
    with atomic.result_folder(out_dir, overwrite, is_ours, SUMMARY) as tmp:
        for name, values in result.maps.items():
            data = values.astype(np.int16) if is_code_map(name) else values.astype(np.float32)
            images.write_volume(os.path.join(tmp, f"{name}{ext}"), data, matrix,
                                {"DCEPerfusion.Map": name, "DCEPerfusion.Unit": MAPS[name].unit})
        results.write_csv(os.path.join(tmp, STATISTICS), _statistics_rows(result))
        results.write_csv(os.path.join(tmp, CURVES), results.curves_rows(result.t_s, result.curves))
        if result.lesions:
            images.write_segmentation(os.path.join(tmp, LESIONS), result.lesions, matrix)
        if result.motion is not None:
            results.write_csv(os.path.join(tmp, MOTION), result.motion.rows(result.t_s))
        results.write_json(os.path.join(tmp, SUMMARY), {**summary(result, files), "dicom": dicom})   # last: complete
    return [os.path.join(out_dir, n) for n in names]


#: Every name :func:`write_exam` may write: a result folder holding anything else is not replaced (so
#: ``--overwrite`` never deletes a file the user put there).
OUR_NAMES = frozenset({SUMMARY, STATISTICS, CURVES, LESIONS, MOTION} |
                      {f"{key}{ext}" for key in MAPS for ext in set(MAP_FORMATS.values())})


def is_code_map(name: str) -> bool:
    """Whether the map ``name`` holds integer codes (status, model_choice), written as int16."""
    return MAPS[name].unit == "code"


def maps_summary(result: pipeline.ExamResult) -> dict:
    """{map: {"title", "unit", "description"}} of the maps written (``registry.MAPS``)."""
    return {name: {"title": MAPS[name].title, "unit": MAPS[name].unit, "description": MAPS[name].description}
            for name in result.maps}


def is_ours(name: str) -> bool:
    """Whether ``name`` is a file :func:`write_exam` writes."""
    return name in OUR_NAMES


def summary(result: pipeline.ExamResult, files: ExamFiles | None = None) -> dict:
    """summary.json: what was analysed, how, every value used and where it came from (``values_used``:
    TR, flip angle, r1 and its source - the agent and field only when r1 came from their preset -, frame
    times and their source, baseline frames, T10, AIF), the options as given (null: taken from the
    series or detected), the maps written with their units, the statistics, and ``motion``: the motion
    correction (:meth:`core.motion.MotionEstimate.summary`: the correction, the reference frames, the
    largest displacement in mm and voxels and its frame, ... and ``file``, motion.csv), or
    ``{"correction": "none"}`` when the frames were not registered - always there, so a reader need not
    tell an older summary from an uncorrected exam by a missing key."""
    s = result.series
    given = given_options(result.options)
    if result.provenance["n_baseline"]["source"] != "given":
        given["n_baseline"] = None
    return {"source": s.source, "time_source": s.time_source, "frame_times_s": s.t_s,
            "aif": result.aif_description, "cp_mM": result.cp_mM, "model": result.fit.model,
            "method": result.fit.method, "status_counts": result.fit.status_counts(),
            **({"model_counts": result.fit.model_counts()} if result.fit.model == "auto" else {}),
            "maps": maps_summary(result),
            "statistics": _statistics_rows(result), "reference_segment": result.reference,
            "values_used": result.provenance, "bootstrap": results.bootstrap_rows(result.statistics),
            "warnings": result.warnings, "motion": motion_summary(result), "options_given": given,
            "inputs": dataclasses.asdict(files) if files else None, "timings_s": result.timings_s}


def motion_summary(result: pipeline.ExamResult) -> dict:
    """summary.json's ``motion`` entry (:func:`summary`)."""
    if result.motion is None:
        return {"correction": "none"}
    return {**result.motion.summary(), "file": MOTION}


def _statistics_rows(result: pipeline.ExamResult) -> list:
    """The statistics rows, each with its role: "reference" for the normal-marrow reference, else "lesion"."""
    return [{**row, "role": "reference" if row["segment"] == result.reference else "lesion"}
            for row in results.statistics_rows(result.statistics)]


def given_options(options: AnalysisOptions) -> dict:
    """The options as summary.json's ``options_given`` holds them: the agent and field left out when r1
    was given (the preset was not used)."""
    given = options.as_dict()
    if given["r1_per_mM_s"] is not None:
        given.pop("contrast_agent")
        given.pop("field_strength_t")
    return given


def settings_differ(folder: str, files: ExamFiles, options: AnalysisOptions) -> list:
    """The inputs and options in which the result in ``folder`` differs from ``files`` and ``options``
    (empty when it was made with the same); ValueError when its summary cannot be read."""
    data = results.read_json(os.path.join(folder, SUMMARY), "exam summary")
    given_then = data.get("options_given") or {}
    then = {**(data.get("inputs") or {}), **(_ADDED_OPTIONS if given_then else {}), **given_then}
    now = {**dataclasses.asdict(files), **given_options(options.checked())}
    if then.get("motion_correction") == now.get("motion_correction") == "none":   # no reference was used
        then.pop("motion_reference_frames", None)
        now.pop("motion_reference_frames", None)
    return sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))


def dicom_record(folder: str, dicom_dir: str | None = None):
    """The record of the DICOM objects of the result in ``folder`` (an output folder of 'dceperfusion fit' or
    its summary.json): summary.json's ``dicom`` (None when absent); with ``dicom_dir``, only when they were
    written there and are all still there (else None)."""
    path = os.path.join(folder, SUMMARY) if os.path.isdir(folder) else folder
    record = results.read_json(path, "exam summary").get("dicom")
    if dicom_dir is None:
        return record
    if not isinstance(record, dict) or os.path.abspath(str(record.get("folder"))) != os.path.abspath(dicom_dir):
        return None
    objects = record.get("objects") or []
    if not all(isinstance(o, dict) and os.path.isfile(os.path.join(dicom_dir, str(o.get("file")))) for o in objects):
        return None
    return record


#: Options added after results were first written, with the value a result written before them was made
#: with (its summary does not name them): such a result is not fitted again for them.
_ADDED_OPTIONS = {key: DEFAULT_OPTIONS[key] for key in ("motion_correction", "motion_reference_frames")}


def read_exam_lesions(folder: str, segmentation: str | None = None) -> pipeline.ExamLesions:
    """An exam fitted by :func:`write_exam`, as the response chain needs it: the statistics from its
    summary.json and the lesion masks from ``segmentation`` (any grid) or else its lesions.seg.nrrd."""
    path = os.path.join(folder, SUMMARY) if os.path.isdir(folder) else folder
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no {SUMMARY} - give the output folder of 'dceperfusion fit'")
    data = results.read_json(path, "exam summary")
    try:
        stats = results.attach_draws(results.statistics_from_rows(data.get("statistics", [])), data.get("bootstrap"))
    except (AttributeError, KeyError, TypeError):
        raise ValueError(f"{path}: its statistics are not as 'dceperfusion fit' writes them - fit the exam "
                         "again") from None
    reference = data.get("reference_segment")
    reference = reference if isinstance(reference, str) else None
    conditions = None
    try:
        conditions = examchecks.conditions(data["values_used"], data["frame_times_s"], data["cp_mM"])
    except (KeyError, TypeError, ValueError):       # an older or hand-made summary: no warnings between exams
        pass
    seg = segmentation or os.path.join(os.path.dirname(path), LESIONS)
    if segmentation or os.path.exists(seg):
        masks, matrix = images.read_segmentation(seg)
        return pipeline.ExamLesions(stats, masks, matrix, reference, conditions)
    return pipeline.ExamLesions(stats, reference=reference, conditions=conditions)
