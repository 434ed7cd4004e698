"""4D DCE series from files (SimpleITK), as the core's :class:`~DCEPerfusionLib.core.series.Series4D`:
signal (K, J, I, T), frame times in seconds from the first frame, IJK->RAS (mm), TR and flip angle.

- a DICOM folder (one series; frames ordered by Temporal Position Identifier, Trigger Time or
  Acquisition/Content Time - the conventions of GE, Philips and Siemens - and the tag used is reported);
- a 4D NRRD with Slicer's MultiVolume keys (``MultiVolume.FrameLabels`` in ms, TR in ms, flip angle);
- a 4D NIfTI with a BIDS-style JSON sidecar (``RepetitionTimeExcitation`` or a sub-second
  ``RepetitionTime`` in s, ``FlipAngle`` in degrees, frame times in ``VolumeTiming``/``FrameTimesStart``).
:func:`write_dce_nrrd` writes a series as a 4D NRRD that Slicer loads as a volume sequence.
"""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np

from ..core import multivolume as mv
from ..core.series import Series4D
from ..core.units import MS_PER_S
from .images import read_image, matrix_of, to_sitk

log = logging.getLogger(__name__)


def read_dce(path: str, frame_interval_s: float | None = None) -> Series4D:
    """Read a 4D DCE series from a DICOM folder, a 4D NRRD or a 4D NIfTI (see the module doc)."""
    if not os.path.exists(path):
        raise ValueError(f"DCE input {path!r} does not exist")
    low = path.lower()
    if os.path.isdir(path):
        return read_dicom_series(path, frame_interval_s)
    if low.endswith((".nrrd", ".nhdr")):
        return read_nrrd_4d(path, frame_interval_s)
    if low.endswith((".nii", ".nii.gz")):
        return read_nifti_4d(path, frame_interval_s)
    raise ValueError(f"DCE input {path!r}: give a DICOM folder, a .nrrd or a .nii/.nii.gz file")


def _times(t, frame_interval_s, n, where, source):
    if frame_interval_s is not None and frame_interval_s > 0:
        return np.arange(n) * float(frame_interval_s), f"frame interval {frame_interval_s:g} s (given)"
    if t is None:
        raise ValueError(f"{where}: has no frame times - give the frame interval in seconds (--frame-interval)")
    t = np.asarray(t, dtype=float)
    if t.size != n:
        raise ValueError(f"{where}: {t.size} frame times for {n} frames - give the frame interval instead")
    if not np.all(np.diff(t) > 0):
        raise ValueError(f"{where}: frame times are not increasing ({source}) - give the frame interval instead")
    return t - t[0], source


def read_nrrd_4d(path: str, frame_interval_s: float | None = None) -> Series4D:
    """A 4D NRRD with the time axis first (Slicer's MultiVolume/sequence layout) and MultiVolume keys."""
    img = read_image(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() < 3:
        raise ValueError(f"{path}: expected a 4D NRRD with the frames on its first (list) axis, got a "
                         f"{img.GetDimension()}D image with {img.GetNumberOfComponentsPerPixel()} component(s)")
    import SimpleITK as sitk
    signal = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)         # (K, J, I, T)
    keys = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
    t = None
    if frame_interval_s is None:
        t, _ = mv.frame_labels_s(keys.get, signal.shape[-1], path)
    t_s, source = _times(t, frame_interval_s, signal.shape[-1], path, f"{mv.FRAME_LABELS} (ms)")
    acq = mv.acquisition_parameters(keys.get)
    return Series4D(signal, t_s, matrix_of(img), acq["tr_s"], acq["flip_angle_deg"], source, path)


def read_nifti_4d(path: str, frame_interval_s: float | None = None) -> Series4D:
    """A 4D NIfTI; TR, flip angle and frame times from a BIDS-style JSON sidecar next to it."""
    import SimpleITK as sitk
    img = read_image(path)
    if img.GetDimension() != 4:
        raise ValueError(f"{path}: expected a 4D NIfTI (x, y, z, time), got {img.GetDimension()}D")
    arr = sitk.GetArrayFromImage(img)                                          # (T, K, J, I)
    signal = np.ascontiguousarray(np.moveaxis(arr, 0, -1), dtype=np.float32)
    stem = re.sub(r"\.nii(\.gz)?$", "", path, flags=re.I)
    meta = {}
    if os.path.exists(stem + ".json"):
        with open(stem + ".json", encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{stem}.json: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    tr = meta.get("RepetitionTimeExcitation")
    if tr is None and isinstance(meta.get("RepetitionTime"), (int, float)) and meta["RepetitionTime"] < 1.0:
        tr = meta["RepetitionTime"]                                            # an excitation TR, not a volume TR
    t = next((meta[k] for k in ("VolumeTiming", "FrameTimesStart", "FrameTimes") if k in meta), None)
    t_s, source = _times(t, frame_interval_s, signal.shape[-1], f"{path} (JSON sidecar)", "JSON sidecar (s)")
    return Series4D(signal, t_s, matrix_of(img), float(tr) if tr else None, mv.header_float(meta.get("FlipAngle")),
                    source, path)


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


def read_dicom_series(folder: str, frame_interval_s: float | None = None) -> Series4D:
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
    t_s, source = _times(t, frame_interval_s, n_frames, f"DICOM folder {folder!r}",
                         f"DICOM {source}" + (" (order by Temporal Position Identifier)" if tpi is not None else ""))
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


def write_dce_nrrd(path: str, signal_kjit, t_s, matrix, tr_s: float | None = None,
                   flip_angle_deg: float | None = None) -> str:
    """A 4D DCE series as NRRD with Slicer's MultiVolume keys (loads in Slicer as a volume sequence)."""
    import SimpleITK as sitk
    sig = np.ascontiguousarray(signal_kjit, dtype=np.float32)
    img = sitk.GetImageFromArray(sig, isVector=True)
    ref = to_sitk(sig[..., 0], matrix)
    img.CopyInformation(ref)
    img.SetMetaData(mv.FRAME_LABELS, ",".join(f"{MS_PER_S * t:g}" for t in t_s))
    img.SetMetaData(mv.NUMBER_OF_FRAMES_KEY, str(len(t_s)))
    img.SetMetaData(mv.TAG_NAME_KEY, "AcquisitionTime")
    img.SetMetaData(mv.TAG_UNITS_KEY, "ms")
    if tr_s:
        img.SetMetaData(mv.TR_KEY, f"{MS_PER_S * tr_s:g}")
    if flip_angle_deg:
        img.SetMetaData(mv.FLIP_KEY, f"{flip_angle_deg:g}")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path[:-5] + ".partial.nrrd"
    sitk.WriteImage(img, tmp, useCompression=True)
    os.replace(tmp, path)
    return path
