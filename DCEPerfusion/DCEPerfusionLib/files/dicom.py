"""A dynamic (DCE) series from a DICOM folder, as the core's :class:`~DCEPerfusionLib.core.series.Series4D`.

Classic single-frame files (one file per slice and time point) are read with SimpleITK/GDCM; frames are
ordered and timed by Temporal Position Identifier, Trigger Time or Acquisition/Content Time - the
conventions of GE, Philips and Siemens - and the tag used is reported.
"""

from __future__ import annotations

import logging

import numpy as np

from ..core import multivolume as mv
from ..core.series import Series4D, resolve_frame_times
from ..core.units import MS_PER_S
from .images import matrix_of

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- DICOM
_TAGS = {"series": "0020|000e", "position": "0020|0032", "orientation": "0020|0037", "instance": "0020|0013",
         "temporal_position": "0020|0100", "trigger_time": "0018|1060", "acquisition_time": "0008|0032",
         "content_time": "0008|0033", "tr": "0018|0080", "flip": "0018|1314"}
#: (header key, tag, scale to s): Trigger Time is in ms; the TM times are converted by _dicom_time_s.
_TIME_TAGS = (("trigger_time", "Trigger Time (0018,1060)", 1.0 / MS_PER_S),
              ("acquisition_time", "Acquisition Time (0008,0032)", None),
              ("content_time", "Content Time (0008,0033)", None))


def _dicom_time_s(value: str) -> float:
    """DICOM TM (HHMMSS.ffffff) as seconds after midnight."""
    v = value.strip()
    if not v:
        return float("nan")
    h, m, s = int(v[0:2]), int(v[2:4] or 0), float(v[4:] or 0)
    return 3600 * h + 60 * m + s


def _frame_order(headers, folder, frame_interval_s):
    """(sort key per file, frame time per file in s or None, the tag it came from, Temporal Position
    Identifiers or None): from the first tag that varies between files (see :func:`read_dicom_series`)."""
    def values(key, scale):
        raw = [h[key] for h in headers]
        if not all(raw):
            return None
        try:
            v = np.array([float(x) * scale if scale else _dicom_time_s(x) for x in raw])
        except ValueError:
            return None
        return v if np.unique(v).size > 1 else None

    tpi = values("temporal_position", 1.0)
    times, source = None, None
    for key, label, scale in _TIME_TAGS:
        v = values(key, scale)
        if v is not None:
            times, source = v, label
            break
    order_key = tpi if tpi is not None else times
    if order_key is None:
        if not (frame_interval_s and frame_interval_s > 0):
            raise ValueError(f"DICOM folder {folder!r}: no timing tag varies between frames (Temporal Position, "
                             "Trigger, Acquisition or Content Time) - give the frame interval (--frame-interval)")
        order_key = np.array([int(h["instance"] or 0) for h in headers], dtype=float)
    return order_key, times, source, tpi


def read_dicom_series(folder: str, frame_interval_s: float | None = None, override: bool = False) -> Series4D:
    """A dynamic series from a DICOM folder (files may be in any order).

    Slices are grouped by position; at every position the files are put in time order, and frame k is
    the k-th file at every position. The order and times come from the first tag that varies: Temporal
    Position Identifier (order only; Philips), Trigger Time (GE, Philips), Acquisition Time (Siemens) or
    Content Time. Every position must have the same number of frames."""
    import SimpleITK as sitk
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
        raise ValueError(f"DICOM folder {folder!r}: no DICOM series found")
    if len(series) > 1:
        raise ValueError(f"DICOM folder {folder!r}: has {len(series)} series ({', '.join(series)}); put the DCE "
                         "series in a folder of its own")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0], False, True, True)
    headers = []
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise ValueError(f"{f}: cannot be read as DICOM - is the file complete?") from None
        headers.append({k: (reader.GetMetaData(t).strip() if reader.HasMetaDataKey(t) else "")
                        for k, t in _TAGS.items()})
    positions = [tuple(np.round([float(x) for x in h["position"].split("\\")], 3)) if h["position"] else None
                 for h in headers]
    if any(p is None for p in positions):
        raise ValueError(f"DICOM folder {folder!r}: files without Image Position (Patient) - not a volume series")
    by_pos = {}
    for i, p in enumerate(positions):
        by_pos.setdefault(p, []).append(i)
    counts = {len(v) for v in by_pos.values()}
    if len(counts) != 1:
        raise ValueError(f"DICOM folder {folder!r}: positions have different numbers of frames ({sorted(counts)}) - "
                         "the series is incomplete or mixes acquisitions")
    n_frames = counts.pop()
    if n_frames < 3:
        raise ValueError(f"DICOM folder {folder!r}: {n_frames} frame(s) per slice position - not a dynamic series")

    order_key, times, source, tpi = _frame_order(headers, folder, frame_interval_s)
    frames = []                                       # frames[k] = file indices of frame k, sorted by position
    normal = _slice_normal(headers[0]["orientation"])
    pos_order = sorted(by_pos, key=lambda p: float(np.dot(p, normal)))
    ranked = {p: sorted(by_pos[p], key=lambda i: order_key[i]) for p in pos_order}
    for k in range(n_frames):
        frames.append([ranked[p][k] for p in pos_order])
    t = None
    if times is not None:
        t = np.array([np.mean([times[i] for i in idx]) for idx in frames])
        t = np.where(t < t[0] - 43200, t + 86400, t)  # acquisitions running past midnight
    t_s, source = resolve_frame_times(
        t, f"DICOM {source}" + (" (order by Temporal Position Identifier)" if tpi is not None else ""), n_frames,
        f"DICOM folder {folder!r}", frame_interval_s, override)
    volumes, matrix = [], None
    for k, idx in enumerate(frames):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([files[i] for i in idx])
        try:
            img = reader.Execute()
        except RuntimeError:
            raise ValueError(f"DICOM folder {folder!r}: frame {k} cannot be read - a file may be truncated") from None
        m = matrix_of(img)
        if matrix is None:
            matrix = m
        elif np.max(np.abs(m - matrix)) > 1e-3:
            raise ValueError(f"DICOM folder {folder!r}: frame {k} has a different geometry from frame 0")
        volumes.append(sitk.GetArrayFromImage(img).astype(np.float32))
    signal = np.stack(volumes, axis=-1)
    tr_ms, flip = mv.header_float(headers[0]["tr"]), mv.header_float(headers[0]["flip"])
    return Series4D(signal, t_s, matrix, tr_ms / MS_PER_S if tr_ms else None, flip, source, folder)


def _slice_normal(orientation: str):
    try:
        v = np.array([float(x) for x in orientation.split("\\")])
        return np.cross(v[:3], v[3:6])
    except (ValueError, IndexError):
        return np.array([0.0, 0.0, 1.0])
