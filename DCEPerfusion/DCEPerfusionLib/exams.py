"""One DCE exam from files to maps and lesion statistics, without Slicer: what ``dceperfusion fit``,
``batch`` and ``demo`` run. numpy/scipy/SimpleITK (through :mod:`io`)."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import aif, concentration, fitting, io
from .regionstats import STAT_NAMES, region_statistics

log = logging.getLogger(__name__)


@dataclass
class ExamOptions:
    """How to analyse an exam. Times in s, flip angle in degrees, relaxivity 1/(mM s).

    TR and flip angle default to the file's header; r1 to the agent/field preset. ``aif`` is one of
    :data:`aif.SOURCES`; "segment" uses the segment named ``aif_segment``. ``lesions`` are the segment
    names to report (default: every segment but the AIF's)."""

    n_baseline: int
    t10_s: float = 1.0
    t1_path: str | None = None
    blood_t10_s: float | None = None
    tr_s: float | None = None
    flip_angle_deg: float | None = None
    r1_per_mM_s: float | None = None
    agent: str = "gadobutrol"
    field_t: float = 3.0
    hct: float = 0.42
    aif: str = "parker"
    aif_segment: str | None = None
    model: str = "extended_tofts"
    method: str = "nlls"
    fit_delay: bool = False
    frame_interval_s: float | None = None
    lesions: list | None = None


@dataclass
class ExamResult:
    series: io.Series4D
    cp: np.ndarray
    aif_description: str
    aif_mask: np.ndarray | None
    result: fitting.FitResult
    masks: dict
    statistics: list
    options: ExamOptions
    timings_s: dict = field(default_factory=dict)


def fit_exam(dce_path: str, options: ExamOptions, segmentation_path: str | None = None, progress=None) -> ExamResult:
    """Read the series (and segmentation), convert to concentration, choose the AIF, fit every voxel
    and compute the lesion statistics. Errors name the input and the fix (ValueError)."""
    t0 = time.perf_counter()
    series = io.read_dce(dce_path, options.frame_interval_s)
    shape = series.signal.shape[:-1]
    tr = options.tr_s or series.tr_s
    fa = options.flip_angle_deg or series.flip_angle_deg
    if not tr:
        raise ValueError(f"{dce_path}: no repetition time in the file - give TR (--tr-ms)")
    if not fa:
        raise ValueError(f"{dce_path}: no flip angle in the file - give it (--flip-deg)")
    if not 1 <= options.n_baseline < series.t_s.size - 2:
        raise ValueError(f"baseline frames = {options.n_baseline}: must be between 1 and {series.t_s.size - 3}")
    r1 = options.r1_per_mM_s or concentration.relaxivity(options.agent, options.field_t)
    masks = {}
    if segmentation_path:
        seg, seg_matrix = io.read_segmentation(segmentation_path)
        masks = {name: io.resample_mask(m, seg_matrix, shape, series.ijk_to_ras) for name, m in seg.items()}
    aif_mask = None
    if options.aif == "segment":
        if options.aif_segment not in masks:
            raise ValueError(f"AIF segment {options.aif_segment!r}: not in the segmentation "
                             f"({', '.join(masks) or 'no segmentation given'}) - give --segmentation and --aif-segment")
        aif_mask = masks[options.aif_segment]
    if options.t1_path:
        t1, t1_matrix = io.read_volume(options.t1_path)
        t10 = io.t1_on_grid(t1, t1_matrix, shape, series.ijk_to_ras, name=f"T1 map {options.t1_path}",
                            tol_mm=1e-3)
        if not np.any(np.isfinite(t10) & (t10 > 0)):
            raise ValueError(f"T1 map {options.t1_path}: does not overlap the DCE series - use this study's T1 map")
    else:
        t10 = np.full(shape, float(options.t10_s))
    if options.blood_t10_s and aif_mask is not None:
        t10 = np.where(aif_mask, float(options.blood_t10_s), t10)
    conc, _, _ = concentration.series_to_concentration(series.signal, t10, tr_s=tr, flip_angle_deg=fa,
                                                       r1_per_mM_s=r1, n_baseline=options.n_baseline)
    cp, aif_mask, desc = aif.select(options.aif, conc, series.t_s, n_baseline=options.n_baseline, hct=options.hct,
                                    mask=aif_mask, mask_name=options.aif_segment or "")
    t1_ = time.perf_counter()
    result = fitting.fit(conc, series.t_s, cp, model=options.model, method=options.method,
                         fit_delay=options.fit_delay, progress=progress)
    if not np.any(result.maps["status"] <= fitting.AT_BOUND):
        raise ValueError(f"{dce_path}: no voxel could be fitted (status {result.status_counts()}) - check TR, flip "
                         "angle, T10, the baseline frames and the AIF")
    lesion_names = options.lesions or [n for n in masks if n != options.aif_segment]
    missing = [n for n in lesion_names if n not in masks]
    if missing:
        raise ValueError(f"lesions {missing}: not in the segmentation ({', '.join(masks) or 'none given'})")
    voxel_mm3 = float(abs(np.linalg.det(series.ijk_to_ras[:3, :3])))
    stats = region_statistics(result.maps, {n: masks[n] for n in lesion_names}, voxel_mm3)
    timings = {"total_s": time.perf_counter() - t0, "fit_s": time.perf_counter() - t1_}
    return ExamResult(series=series, cp=cp, aif_description=desc, aif_mask=aif_mask, result=result,
                      masks={n: masks[n] for n in lesion_names}, statistics=stats, options=options, timings_s=timings)


def _check_free(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists - choose another output folder or pass --overwrite")


def write_json(path: str, data, overwrite: bool = False) -> str:
    """JSON through a temporary name (no half-written files)."""
    _check_free(path, overwrite)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=_jsonable)
    os.replace(tmp, path)
    return path


def write_csv(path: str, rows: list[dict], overwrite: bool = False) -> str:
    _check_free(path, overwrite)
    tmp = path + ".partial"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    os.replace(tmp, path)
    return path


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def statistics_rows(stats) -> list[dict]:
    """Region statistics as flat rows (CSV/JSON): segment, map, unit, counts and the statistics."""
    return [{"segment": r.segment, "map": r.map, "unit": r.unit, "voxel_count": r.voxel_count,
             "volume_cm3": r.volume_cm3, "excluded_voxel_count": r.excluded_voxel_count,
             **{k: r.values[k] for k in STAT_NAMES}} for r in stats]


def statistics_from_rows(rows) -> list:
    """The inverse of :func:`statistics_rows` (rows read back from summary.json or a worker)."""
    from .regionstats import RegionStats
    return [RegionStats(r["segment"], r["map"], r["unit"], r["voxel_count"], r["volume_cm3"],
                        r["excluded_voxel_count"], {k: r[k] for k in STAT_NAMES}) for r in rows]


def write_exam(exam: ExamResult, out_dir: str, fmt: str = "nrrd", overwrite: bool = False) -> list[str]:
    """Maps (NRRD or NIfTI, DCE geometry; NaN where not fitted, see status), statistics CSV + JSON and
    a summary JSON into ``out_dir``. Never overwrites unless ``overwrite``."""
    ext = {"nrrd": ".nrrd", "nii": ".nii.gz", "nii.gz": ".nii.gz"}.get(fmt)
    if ext is None:
        raise ValueError(f"format {fmt!r}: use nrrd or nii.gz")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, values in exam.result.maps.items():
        path = os.path.join(out_dir, f"{name}{ext}")
        _check_free(path, overwrite)
        data = values.astype(np.int16) if name == "status" else values.astype(np.float32)
        paths.append(io.write_volume(path, data, exam.series.ijk_to_ras, {"DCEPerfusion.Map": name}))
    rows = statistics_rows(exam.statistics)
    paths.append(write_csv(os.path.join(out_dir, "statistics.csv"), rows, overwrite))
    summary = {"source": exam.series.source, "time_source": exam.series.time_source,
               "frame_times_s": exam.series.t_s, "aif": exam.aif_description, "cp_mM": exam.cp,
               "model": exam.result.model, "method": exam.result.method,
               "status_counts": exam.result.status_counts(), "statistics": rows,
               "options": {k: v for k, v in vars(exam.options).items()}, "timings_s": exam.timings_s}
    paths.append(write_json(os.path.join(out_dir, "summary.json"), summary, overwrite))
    return paths
