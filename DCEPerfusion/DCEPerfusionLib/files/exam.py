"""The files adapter around the chain: files -> arrays -> :func:`pipeline.analyse` -> files. What
``dceperfusion fit``, ``batch`` and the demo run; nothing here computes what the Slicer scene would need
too (that is all in the core).

An exam's output folder holds the maps (NRRD or NIfTI, the DCE geometry, NaN where not fitted - see
``status``), ``statistics.csv``, ``curves.csv`` (AIF and lesion curves), ``lesions.seg.nrrd`` (the
lesion masks on the DCE grid, for the size comparison) and ``summary.json`` (values used and where they
came from, frame times in s, the options, the statistics).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np

from ..core import pipeline
from ..core.geometry import Volume
from ..core.options import AnalysisOptions
from . import images, results, series

#: File names inside an exam's output folder.
SUMMARY, STATISTICS, CURVES, LESIONS = "summary.json", "statistics.csv", "curves.csv", "lesions.seg.nrrd"
MAP_FORMATS = {"nrrd": ".nrrd", "nii": ".nii.gz", "nii.gz": ".nii.gz"}


@dataclass
class ExamFiles:
    """The files of one exam. ``dce``: a DICOM folder, a 4D NRRD or a 4D NIfTI; ``segmentation``: a
    ``.seg.nrrd`` or labelmap with the lesions (and the artery); ``t1_map``: a T1 map (s or ms, any grid);
    ``aif_segment``: the name of the artery segment (for ``aif_source="segment"``); ``lesions``: the
    segment names to report (default: every segment but the artery)."""

    dce: str
    segmentation: str | None = None
    t1_map: str | None = None
    aif_segment: str | None = None
    lesions: list | None = None


def fit_exam(files: ExamFiles, options: AnalysisOptions, progress=None) -> pipeline.ExamResult:
    """Read the exam's files and run the chain on them (ValueError naming the input and the fix)."""
    t0 = time.perf_counter()
    options = options.checked()                                  # before reading anything large
    masks, seg_matrix = {}, None
    if files.segmentation:
        masks, seg_matrix = images.read_segmentation(files.segmentation)
    names = list(masks)
    if options.aif_source == "segment" and files.aif_segment not in masks:
        raise ValueError(f"AIF segment {files.aif_segment!r}: not in the segmentation "
                         f"({', '.join(names) or 'no segmentation given'}) - give --segmentation and --aif-segment")
    lesion_names = list(files.lesions) if files.lesions else [n for n in names if n != files.aif_segment]
    missing = [n for n in lesion_names if n not in masks]
    if missing:
        raise ValueError(f"lesions {missing}: not in the segmentation ({', '.join(names) or 'none given'}) - "
                         "give the segment names of --segmentation")
    s = series.read_dce(files.dce, options.frame_interval_s)
    on_grid = {n: images.resample_mask(masks[n], seg_matrix, s.shape_kji, s.ijk_to_ras)
               for n in dict.fromkeys([*lesion_names, *([files.aif_segment] if files.aif_segment in masks else [])])}
    t1 = None
    if files.t1_map:
        arr, matrix = images.read_volume(files.t1_map)
        t1 = Volume(arr, matrix, f"T1 map {files.t1_map}")
    t_read = time.perf_counter() - t0
    result = pipeline.analyse(s, options, lesions={n: on_grid[n] for n in lesion_names},
                              aif_mask=on_grid.get(files.aif_segment), aif_name=files.aif_segment or "",
                              t1_map=t1, progress=progress)
    result.timings_s.update(read_s=t_read, total_s=time.perf_counter() - t0)
    return result


def write_exam(result: pipeline.ExamResult, out_dir: str, fmt: str = "nrrd", overwrite: bool = False,
               files: ExamFiles | None = None) -> list:
    """Write an exam's results into ``out_dir`` (see the module doc); never overwrites unless ``overwrite``.
    Returns the paths written."""
    ext = MAP_FORMATS.get(fmt)
    if ext is None:
        raise ValueError(f"format {fmt!r}: use nrrd or nii.gz")
    targets = [os.path.join(out_dir, f"{name}{ext}") for name in result.maps]
    targets += [os.path.join(out_dir, n) for n in (STATISTICS, CURVES, SUMMARY, *([LESIONS] if result.lesions else []))]
    for path in targets:                                         # refuse before writing anything
        results.check_free(path, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    matrix = result.series.ijk_to_ras
    paths = []
    for name, values in result.maps.items():
        data = values.astype(np.int16) if name == "status" else values.astype(np.float32)
        paths.append(images.write_volume(os.path.join(out_dir, f"{name}{ext}"), data, matrix,
                                         {"DCEPerfusion.Map": name}))
    rows = results.statistics_rows(result.statistics)
    paths.append(results.write_csv(os.path.join(out_dir, STATISTICS), rows, overwrite))
    paths.append(results.write_csv(os.path.join(out_dir, CURVES), results.curves_rows(result.t_s, result.curves),
                                   overwrite))
    if result.lesions:
        paths.append(images.write_segmentation(os.path.join(out_dir, LESIONS), result.lesions, matrix))
    paths.append(results.write_json(os.path.join(out_dir, SUMMARY), summary(result, files), overwrite))
    return paths


def summary(result: pipeline.ExamResult, files: ExamFiles | None = None) -> dict:
    """summary.json: what was analysed, how, with which values from where, and the statistics."""
    s = result.series
    return {"source": s.source, "time_source": s.time_source, "frame_times_s": s.t_s,
            "aif": result.aif_description, "cp_mM": result.cp_mM, "model": result.fit.model,
            "method": result.fit.method, "status_counts": result.fit.status_counts(),
            "statistics": results.statistics_rows(result.statistics), "provenance": result.provenance,
            "warnings": result.warnings, "options": result.options.as_dict(),
            "inputs": dataclasses.asdict(files) if files else None, "timings_s": result.timings_s}


def read_exam_lesions(folder: str, segmentation: str | None = None) -> pipeline.ExamLesions:
    """An exam fitted by :func:`write_exam`, as the response chain needs it: the statistics from its
    summary.json and the lesion masks from ``segmentation`` (any grid) or else its lesions.seg.nrrd."""
    path = os.path.join(folder, SUMMARY) if os.path.isdir(folder) else folder
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no {SUMMARY} - give the output folder of 'dceperfusion fit'")
    data = results.read_json(path, "exam summary")
    try:
        stats = results.statistics_from_rows(data.get("statistics", []))
    except (AttributeError, KeyError, TypeError):
        raise ValueError(f"{path}: its statistics are not as 'dceperfusion fit' writes them - fit the exam "
                         "again") from None
    seg = segmentation or os.path.join(os.path.dirname(path), LESIONS)
    if segmentation or os.path.exists(seg):
        masks, matrix = images.read_segmentation(seg)
        return pipeline.ExamLesions(stats, masks, matrix)
    return pipeline.ExamLesions(stats)
