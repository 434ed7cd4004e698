"""The MRML adapter: a DCE volume sequence in a Slicer scene -> concentration -> AIF -> fit -> maps,
statistics and curves back in the scene.

Imports slicer/vtk (never qt/ctk) and receives the scene and nodes explicitly; the module's logic in
``DCEPerfusion.py`` and the command line both call :func:`run_analysis`. Arrays read from the scene
are in Slicer's (K, J, I) voxel order with time last: ``(K, J, I, T)``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from slicer import util

from . import aif as aif_mod
from . import concentration, fitting, io
from ._checks import check_positive, check_times
from .multivolume import FLIP_ATTRIBUTE, TR_ATTRIBUTE, acquisition_parameters, frame_times_s
from .regionstats import region_statistics
from .scene_output import (check_inputs_not_outputs, ijk_to_ras, reference_volume, remove_stale_outputs,
                           segment_masks, show_overlay, voxel_volume_mm3, write_curves, write_map,
                           write_mask_segmentation, write_statistics_table)

log = logging.getLogger(__name__)

AIF_SOURCES = aif_mod.SOURCES
_GEOMETRY_TOL_MM = 1e-4


#: A series read from a sequence node is the same record as one read from a file (``source`` = node name).
DCESeries = io.Series4D


def read_sequence(sequence_node, frame_interval_s: float | None = None) -> DCESeries:
    """Read a ``vtkMRMLSequenceNode`` of 3D scalar volumes into a float32 ``(K, J, I, T)`` array.

    Frames are put in time order. Every frame must have the geometry of the first (dimensions and
    IJK->RAS within 1e-4 mm); 2D frames, vector volumes and missing times are refused with a message."""
    if sequence_node is None or not sequence_node.IsA("vtkMRMLSequenceNode"):
        raise ValueError("DCE sequence: select a volume sequence (vtkMRMLSequenceNode) - load the DCE series "
                         "from DICOM or a 4D NRRD first")
    name = sequence_node.GetName()
    n = sequence_node.GetNumberOfDataNodes()
    if n < 3:
        raise ValueError(f"DCE sequence '{name}': has {n} frames; a DCE series needs at least 3")
    t, source = frame_times_s(sequence_node, frame_interval_s)
    order = np.argsort(t, kind="stable")
    t = check_times(t[order] - t[order][0], f"frame times of '{name}'", min_frames=3)
    frames = [sequence_node.GetNthDataNode(int(i)) for i in order]
    first = frames[0]
    if not first.IsA("vtkMRMLScalarVolumeNode") or first.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"DCE sequence '{name}': frames are {first.GetClassName()}, expected scalar volumes")
    matrix = ijk_to_ras(first)
    dims = first.GetImageData().GetDimensions() if first.GetImageData() is not None else (0, 0, 0)
    if min(dims) < 1:
        raise ValueError(f"DCE sequence '{name}': the first frame has no image data")
    if dims[2] == 1:
        raise ValueError(f"DCE sequence '{name}': frames are 2D images ({dims[0]}x{dims[1]}x1); DCE Perfusion "
                         "needs 3D frames - load the series so that each time point is one 3D volume")
    shape = (dims[2], dims[1], dims[0])
    for k, frame in enumerate(frames):
        img = frame.GetImageData()
        if img is not None and img.GetNumberOfScalarComponents() != 1:
            raise ValueError(f"DCE sequence '{name}': frame {int(order[k])} has {img.GetNumberOfScalarComponents()} "
                             "components per voxel; DCE Perfusion needs scalar (single-component) frames")
        if img is None or img.GetDimensions() != dims:
            got = img.GetDimensions() if img is not None else "no image"
            raise ValueError(f"DCE sequence '{name}': frame {int(order[k])} has dimensions {got}, the first frame "
                             f"{dims} - every frame must have the same grid (resample the series)")
        if np.max(np.abs(ijk_to_ras(frame) - matrix)) > _GEOMETRY_TOL_MM:
            raise ValueError(f"DCE sequence '{name}': frame {int(order[k])} has a different position or "
                             "orientation from the first frame - every frame must have the same geometry")
    signal = np.empty(shape + (len(frames),), dtype=np.float32)
    views = [util.arrayFromVolume(f) for f in frames]

    def copy_slices(zs):  # slice by slice: the (T, J, I) -> (J, I, T) transpose stays in cache
        buf = np.empty((len(frames), shape[1], shape[2]), dtype=np.float32)
        for z in zs:
            for k, v in enumerate(views):
                buf[k] = v[z]
            signal[z] = buf.transpose(1, 2, 0)

    n_threads = min(4, os.cpu_count() or 1, shape[0])
    with ThreadPoolExecutor(max_workers=n_threads) as pool:  # numpy copies release the GIL
        list(pool.map(copy_slices, [range(i, shape[0], n_threads) for i in range(n_threads)]))
    acq = acquisition_parameters(sequence_node)
    return DCESeries(signal=signal, t_s=t, ijk_to_ras=matrix, tr_s=acq["tr_s"], flip_angle_deg=acq["flip_angle_deg"],
                     time_source=source, source=name)


def t10_on_grid(t1_node, shape_kji, matrix, unit: str = "auto") -> np.ndarray:
    """T1 map node (s or ms) on the DCE grid, in s (see :func:`io.t1_on_grid`)."""
    t1 = util.arrayFromVolume(t1_node)
    return io.t1_on_grid(t1, ijk_to_ras(t1_node), shape_kji, matrix, unit, name=f"T1 map '{t1_node.GetName()}'")


@dataclass
class AnalysisInputs:
    """Everything a run needs. Nodes belong to the scene passed to :func:`run_analysis`.

    Times in s, flip angle in degrees, relaxivity in 1/(mM s), hct a fraction. ``tr_s`` and
    ``flip_angle_deg`` default to the sequence's DICOM attributes. ``segment_ids`` are the lesion
    (statistics, curves) segments; ``fit_segments_only`` fits only inside them. ``aif_source`` is one of
    ``AIF_SOURCES``; population AIFs start at the first frame after the baseline. ``blood_t10_s``, when
    given, is the pre-contrast T1 used inside the AIF segment (blood: about 1.5 s at 1.5 T, 1.6-1.9 s at
    3 T); a tissue T10 there underestimates M0 and can push the arterial peak above the SPGR ceiling."""

    dce_sequence: object
    n_baseline: int
    anatomy: object = None
    t1_map: object = None
    t10_s: float = 1.0
    t1_map_unit: str = "auto"
    blood_t10_s: float | None = None
    segmentation: object = None
    segment_ids: list = field(default_factory=list)
    fit_segments_only: bool = False
    aif_source: str = "parker"
    aif_segment_id: str | None = None
    tr_s: float | None = None
    flip_angle_deg: float | None = None
    r1_per_mM_s: float = 4.5
    hct: float = 0.42
    frame_interval_s: float | None = None
    model: str = "extended_tofts"
    method: str = "nlls"
    fit_delay: bool = False
    exam_label: str = ""
    overlay_map: str = "vp"
    overlay_opacity: float = 0.6


@dataclass
class AnalysisOutputs:
    """What a run produced: the fit, the AIF used and the nodes written."""

    result: fitting.FitResult
    t_s: np.ndarray
    cp: np.ndarray
    aif_description: str
    map_nodes: dict
    statistics: list
    statistics_table: object
    curves_table: object
    chart: object
    aif_segmentation: object
    series: DCESeries
    timings_s: dict


def _check(inp: AnalysisInputs, series_frames: int):
    if inp.aif_source not in AIF_SOURCES:
        raise ValueError(f"AIF source {inp.aif_source!r}: use one of {', '.join(AIF_SOURCES)}")
    if inp.aif_source == "segment" and (inp.segmentation is None or not inp.aif_segment_id):
        raise ValueError("AIF source 'segment': select the segmentation and the artery segment (e.g. the aorta)")
    if (inp.segment_ids or inp.fit_segments_only) and inp.segmentation is None:
        raise ValueError("segments: select the segmentation that holds the lesion segments")
    if inp.fit_segments_only and not inp.segment_ids:
        raise ValueError("fit inside segments only: select at least one lesion segment")
    if not 1 <= int(inp.n_baseline) < series_frames - 2:
        raise ValueError(f"number of baseline frames = {inp.n_baseline}: must be between 1 and {series_frames - 3} "
                         "(pre-contrast frames before the bolus arrives)")
    if inp.t1_map is None:
        check_positive(inp.t10_s, "T10 (constant pre-contrast T1)", unit="s")
    if inp.blood_t10_s is not None:
        check_positive(inp.blood_t10_s, "blood T10 (pre-contrast T1 in the AIF segment)", unit="s")
    check_positive(inp.r1_per_mM_s, "relaxivity r1", unit="1/(mM s)")
    if not 0 <= inp.hct < 1:
        raise ValueError(f"hematocrit = {inp.hct}: must be a fraction in [0, 1), typically 0.42")
    if not 0 <= inp.overlay_opacity <= 1:
        raise ValueError(f"overlay opacity = {inp.overlay_opacity}: must be in [0, 1]")


def run_analysis(scene, inp: AnalysisInputs, progress=None) -> AnalysisOutputs:
    """Run the whole chain on a scene and write the outputs into it.

    progress : callable(fraction 0..1, message) -> bool | None; returning False cancels the fit
               (raises :class:`fitting.FitCancelled`; the scene is not modified then).
    Raises ValueError naming the input and the fix for every bad input, before anything is written.
    """
    def report(frac, msg, cancellable=True):
        log.info("%3.0f %% %s", 100 * frac, msg)
        if progress is not None and progress(frac, msg) is False and cancellable:
            raise fitting.FitCancelled("cancelled by the user")

    timings = {}
    t0 = time.perf_counter()
    exam = (inp.exam_label or "").strip()
    check_inputs_not_outputs(scene, {"DCE sequence": inp.dce_sequence, "anatomy volume": inp.anatomy,
                                     "T1 map": inp.t1_map, "segmentation": inp.segmentation}, exam)
    report(0.0, "reading the DCE sequence")
    series = read_sequence(inp.dce_sequence, inp.frame_interval_s)
    _check(inp, series.t_s.size)
    tr_s = inp.tr_s if inp.tr_s else series.tr_s
    fa = inp.flip_angle_deg if inp.flip_angle_deg else series.flip_angle_deg
    if not tr_s:
        raise ValueError(f"TR: the sequence '{series.source}' has no {TR_ATTRIBUTE} attribute - enter TR (ms)")
    if not fa:
        raise ValueError(f"flip angle: the sequence '{series.source}' has no {FLIP_ATTRIBUTE} attribute - "
                         "enter the flip angle (degrees)")
    shape = series.signal.shape[:-1]
    matrix = series.ijk_to_ras
    ref = reference_volume(shape, matrix)
    lesion_masks = {}
    if inp.segmentation is not None and inp.segment_ids:
        lesion_masks = segment_masks(inp.segmentation, list(inp.segment_ids), ref, "lesion segments")
    aif_mask = None
    if inp.aif_source == "segment":
        aif_mask = next(iter(segment_masks(inp.segmentation, [inp.aif_segment_id], ref, "AIF segment").values()))
        if aif_mask.sum() < 3:
            raise ValueError(f"AIF segment: has {int(aif_mask.sum())} voxels on the DCE grid; draw at least 3 voxels "
                             "inside the artery (e.g. the aorta on several slices)")
    if inp.t1_map is not None:
        t10 = t10_on_grid(inp.t1_map, shape, matrix, inp.t1_map_unit)
        if not np.any(np.isfinite(t10) & (t10 > 0)):
            raise ValueError(f"T1 map '{inp.t1_map.GetName()}': has no positive T1 inside the DCE volume (it does not "
                             "overlap it, or is empty there) - select the T1 map of this study or use a constant T10")
    else:
        t10 = float(inp.t10_s)
    if inp.blood_t10_s is not None and aif_mask is not None:
        t10 = np.where(aif_mask, float(inp.blood_t10_s), t10)
    timings["read_s"] = time.perf_counter() - t0

    report(0.05, "signal to concentration")
    t1 = time.perf_counter()
    conc, n_bad_t10, _ = concentration.series_to_concentration(series.signal, t10, tr_s=tr_s, flip_angle_deg=fa,
                                                 r1_per_mM_s=inp.r1_per_mM_s, n_baseline=int(inp.n_baseline))
    if n_bad_t10:
        log.warning("T1 map: %d voxels have no valid T1 (<= 0, NaN or outside the map) and are not fitted", n_bad_t10)

    report(0.15, "arterial input function")
    t_s = series.t_s
    seg_name = (inp.segmentation.GetSegmentation().GetSegment(inp.aif_segment_id).GetName()
                if inp.aif_source == "segment" else "")
    cp, aif_mask, desc = aif_mod.select(inp.aif_source, conc, t_s, n_baseline=int(inp.n_baseline), hct=inp.hct,
                                        mask=aif_mask, mask_name=seg_name)
    timings["concentration_aif_s"] = time.perf_counter() - t1

    mask = None
    if inp.fit_segments_only:
        mask = np.zeros(shape, dtype=bool)
        for m in lesion_masks.values():
            mask |= m
    t2 = time.perf_counter()
    result = fitting.fit(conc, t_s, cp, model=inp.model, method=inp.method, fit_delay=inp.fit_delay, mask=mask,
                         progress=lambda done, total: report(0.2 + 0.7 * done / max(total, 1),
                                                             f"fitting {done}/{total} voxels"))
    timings["fit_s"] = time.perf_counter() - t2
    if not np.any(result.maps["status"] <= fitting.AT_BOUND):
        raise ValueError(
            f"no voxel could be fitted (fit status {result.status_counts()}) - check TR, flip angle, T10 or the T1 "
            "map, the number of baseline frames and the AIF; nothing was written to the scene")

    report(0.9, "writing maps, statistics and curves")
    t3 = time.perf_counter()
    map_nodes = {name: write_map(scene, name, values, matrix, exam) for name, values in result.maps.items()}
    overlay = inp.overlay_map if inp.overlay_map in map_nodes else fitting.MAP_KEYS[result.model][0]
    show_overlay(scene, map_nodes[overlay], inp.anatomy, inp.overlay_opacity)
    stats = region_statistics(result.maps, lesion_masks, voxel_volume_mm3(matrix)) if lesion_masks else []
    table = write_statistics_table(scene, stats, exam) if lesion_masks else None
    curves = {"AIF plasma": (cp, "line")}
    conc_2d = conc.reshape(-1, t_s.size)
    for seg_name, m in lesion_masks.items():
        fitted = m & np.isfinite(result.maps["r2"])  # fitted voxels have finite concentrations
        n_fitted = int(fitted.sum())
        if n_fitted:
            sub = fitting.FitResult(maps={k: v[fitted] for k, v in result.maps.items()}, model=result.model,
                                    method=result.method, fit_delay=result.fit_delay, bounds=result.bounds)
            weights = fitted.reshape(-1).astype(np.float32)
            mean_c = (weights @ conc_2d).astype(np.float64) / n_fitted  # one pass, no gathered copy
            curves[f"{seg_name} mean C"] = (mean_c, "points")
            curves[f"{seg_name} fit"] = (fitting.predict(sub, t_s, cp).mean(axis=0), "line")
    curves_table, chart = write_curves(scene, t_s, curves, exam)
    aif_seg = None
    if aif_mask is not None:
        aif_seg = write_mask_segmentation(scene, aif_mask, matrix, exam, "aif-segmentation", "AIF voxels",
                                          f"AIF ({inp.aif_source})")
    remove_stale_outputs(scene, exam, keep=[*map_nodes.values(), table, aif_seg])
    timings["write_s"] = time.perf_counter() - t3
    report(1.0, "done", cancellable=False)  # the scene has changed: too late to cancel
    return AnalysisOutputs(result=result, t_s=t_s, cp=cp, aif_description=desc, map_nodes=map_nodes, statistics=stats,
                           statistics_table=table, curves_table=curves_table, chart=chart, aif_segmentation=aif_seg,
                           series=series, timings_s=timings)
