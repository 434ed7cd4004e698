"""Files in and out with SimpleITK, in Slicer's conventions: arrays (K, J, I[, T]) with a 4x4 IJK->RAS
matrix (mm), time last, frame times in seconds from the first frame.

Read a 4D DCE series from
- a DICOM folder (one series; frames ordered by Temporal Position Identifier, Trigger Time or
  Acquisition/Content Time - the conventions of GE, Philips and Siemens - and the tag used is reported);
- a 4D NRRD with Slicer's MultiVolume keys (``MultiVolume.FrameLabels`` in ms, TR in ms, flip angle);
- a 4D NIfTI with a BIDS-style JSON sidecar (``RepetitionTimeExcitation`` or a sub-second
  ``RepetitionTime`` in s, ``FlipAngle`` in degrees, frame times in ``VolumeTiming``/``FrameTimesStart``).
Write maps as NRRD or NIfTI with the same geometry; read 3D volumes, labelmaps and Slicer ``.seg.nrrd``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
FRAME_LABELS = "MultiVolume.FrameLabels"
TR_KEY = "MultiVolume.DICOM.RepetitionTime"
FLIP_KEY = "MultiVolume.DICOM.FlipAngle"


# ============================================================================================ geometry
def to_sitk(array_kji, matrix, dtype=np.float32):
    """A SimpleITK image (LPS physical space) from a (K, J, I) array and its IJK->RAS matrix."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array_kji, dtype=dtype))
    m = _LPS @ np.asarray(matrix, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(x) for x in (m[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(x) for x in m[:3, 3]])
    return img


def matrix_of(img) -> np.ndarray:
    """The IJK->RAS matrix of a 3D SimpleITK image (the first three axes of a 4D one)."""
    d = img.GetDimension()
    direction = np.array(img.GetDirection()).reshape(d, d)[:3, :3]
    m = np.eye(4)
    m[:3, :3] = direction * np.array(img.GetSpacing()[:3])
    m[:3, 3] = img.GetOrigin()[:3]
    return _LPS @ m


def resample_mask(mask_kji, matrix, shape_kji, target_matrix) -> np.ndarray:
    """A mask moved onto another grid (nearest neighbour, physical positions kept)."""
    import SimpleITK as sitk

    src = to_sitk(np.asarray(mask_kji, dtype=np.uint8), matrix, np.uint8)
    ref = to_sitk(np.zeros(tuple(shape_kji), np.uint8), target_matrix, np.uint8)
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out) > 0


def t1_on_grid(t1, t1_matrix, shape_kji, matrix, unit: str = "auto", name: str = "T1 map",
               tol_mm: float = 1e-4) -> np.ndarray:
    """A T1 map (K, J, I) in s on the DCE grid: copied when the grids match, else resampled (trilinear;
    NaN farther than half a voxel outside the T1 map). ``unit``: "s", "ms" or "auto" (a median above 10
    means ms - no tissue T1 exceeds 10 s)."""
    from scipy import ndimage
    t1 = np.asarray(t1, dtype=np.float64)
    if t1.ndim != 3:
        raise ValueError(f"{name}: expected a 3D scalar volume, got shape {t1.shape}")
    positive = t1[np.isfinite(t1) & (t1 > 0)]
    if positive.size == 0:
        raise ValueError(f"{name}: has no positive T1 value - check the volume")
    if unit == "auto":
        unit = "ms" if np.median(positive) > 10 else "s"
    if unit not in ("s", "ms"):
        raise ValueError(f"{name} unit {unit!r}: use 's', 'ms' or 'auto'")
    if unit == "ms":
        t1 = t1 / 1000.0
    if t1.shape == tuple(shape_kji) and np.max(np.abs(np.asarray(t1_matrix) - matrix)) <= tol_mm:
        return t1
    a = np.linalg.inv(t1_matrix) @ np.asarray(matrix)        # DCE ijk -> T1 ijk
    p = np.eye(4)[[2, 1, 0, 3]]                               # (i, j, k) <-> (k, j, i)
    a = p @ a @ p
    log.info("%s is on another grid: resampled to the DCE grid (trilinear)", name)
    grid = np.indices(tuple(shape_kji), dtype=np.float64).reshape(3, -1)
    coords = a[:3, :3] @ grid + a[:3, 3:4]
    out = ndimage.map_coordinates(t1, coords, order=1, mode="nearest")
    outside = np.any((coords < -0.5) | (coords > np.array(t1.shape)[:, None] - 0.5), axis=0)
    out[outside] = np.nan
    return out.reshape(tuple(shape_kji))


# ============================================================================================ 4D series
@dataclass
class Series4D:
    """A DCE series from a file or a Slicer sequence node: signal float32 (K, J, I, T), frame times (s)
    from the first frame, IJK->RAS matrix, TR (s) and flip angle (degrees) when known, where the times
    came from, and the source (a path or the sequence node's name)."""

    signal: np.ndarray
    t_s: np.ndarray
    ijk_to_ras: np.ndarray
    tr_s: float | None
    flip_angle_deg: float | None
    time_source: str
    source: str


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


def _read_image(path):
    import SimpleITK as sitk
    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise ValueError(f"{path}: cannot be read ({first[:160]}) - is the file complete?") from None


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
    img = _read_image(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() < 3:
        raise ValueError(f"{path}: expected a 4D NRRD with the frames on its first (list) axis, got a "
                         f"{img.GetDimension()}D image with {img.GetNumberOfComponentsPerPixel()} component(s)")
    import SimpleITK as sitk
    signal = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)         # (K, J, I, T)
    keys = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
    labels = keys.get(FRAME_LABELS)
    t = [float(v) / 1000.0 for v in labels.split(",")] if labels else None
    tr = _float(keys.get(TR_KEY))
    t_s, source = _times(t, frame_interval_s, signal.shape[-1], path, f"{FRAME_LABELS} (ms)")
    return Series4D(signal, t_s, matrix_of(img), tr / 1000.0 if tr else None, _float(keys.get(FLIP_KEY)),
                    source, path)


def _float(value):
    try:
        return float(str(value).split(",")[0]) if value not in (None, "") else None
    except ValueError:
        return None


def read_nifti_4d(path: str, frame_interval_s: float | None = None) -> Series4D:
    """A 4D NIfTI; TR, flip angle and frame times from a BIDS-style JSON sidecar next to it."""
    import SimpleITK as sitk
    img = _read_image(path)
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
    return Series4D(signal, t_s, matrix_of(img), float(tr) if tr else None, _float(meta.get("FlipAngle")), source,
                    path)


# ---------------------------------------------------------------------------------------------- DICOM
_TAGS = {"series": "0020|000e", "position": "0020|0032", "orientation": "0020|0037", "instance": "0020|0013",
         "temporal_position": "0020|0100", "trigger_time": "0018|1060", "acquisition_time": "0008|0032",
         "content_time": "0008|0033", "tr": "0018|0080", "flip": "0018|1314"}
_TIME_TAGS = (("trigger_time", "Trigger Time (0018,1060)", 1e-3), ("acquisition_time", "Acquisition Time (0008,0032)",
                                                                    None),
              ("content_time", "Content Time (0008,0033)", None))


def _dicom_time_s(value: str) -> float:
    """DICOM TM (HHMMSS.ffffff) as seconds after midnight."""
    v = value.strip()
    if not v:
        return float("nan")
    h, m, s = int(v[0:2]), int(v[2:4] or 0), float(v[4:] or 0)
    return 3600 * h + 60 * m + s


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

    def values(key, scale):
        raw = [headers[i][key] for i in range(len(headers))]
        if not all(raw):
            return None
        try:
            v = np.array([float(x) * scale if scale else _dicom_time_s(x) for x in raw])
        except ValueError:
            return None
        return v if np.unique(v).size > 1 else None

    order_key = None
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
    h0 = headers[0]
    return Series4D(signal, t_s, matrix, _float(h0["tr"]) / 1000.0 if _float(h0["tr"]) else None, _float(h0["flip"]),
                    source, folder)


def _slice_normal(orientation: str):
    try:
        v = np.array([float(x) for x in orientation.split("\\")])
        return np.cross(v[:3], v[3:6])
    except (ValueError, IndexError):
        return np.array([0.0, 0.0, 1.0])


# ============================================================================================ 3D volumes
def read_volume(path: str):
    """A 3D scalar volume (anatomy, T1 map, labelmap): (array (K, J, I), IJK->RAS matrix)."""
    import SimpleITK as sitk
    img = _read_image(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a 3D scalar volume")
    return sitk.GetArrayFromImage(img), matrix_of(img)


def write_volume(path: str, array_kji, matrix, attributes: dict | None = None) -> str:
    """Write a 3D volume as NRRD (.nrrd, keys kept) or NIfTI (.nii/.nii.gz) with the given geometry,
    first to a temporary name then renamed (no half-written files). Returns the path."""
    import SimpleITK as sitk
    low = path.lower()
    if not low.endswith((".nrrd", ".nii", ".nii.gz")):
        raise ValueError(f"{path}: write maps as .nrrd, .nii or .nii.gz")
    arr = np.asarray(array_kji)
    img = to_sitk(arr, matrix, arr.dtype if arr.dtype in (np.int8, np.int16, np.uint8) else np.float32)
    for k, v in (attributes or {}).items():
        img.SetMetaData(str(k), str(v))
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    ext = ".nii.gz" if low.endswith(".nii.gz") else os.path.splitext(path)[1]
    tmp = f"{path[: len(path) - len(ext)]}.partial{ext}"
    sitk.WriteImage(img, tmp, useCompression=True)
    os.replace(tmp, path)
    return path


def read_segmentation(path: str) -> tuple[dict, np.ndarray]:
    """Segments of a Slicer ``.seg.nrrd`` (shared or separate layers) or of a labelmap volume:
    ({name: bool mask (K, J, I)}, IJK->RAS matrix). Labelmap labels are named "label <value>"."""
    import SimpleITK as sitk
    img = _read_image(path)
    keys = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
    arr = sitk.GetArrayFromImage(img)
    matrix = matrix_of(img)
    if img.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    masks = {}
    names = sorted({int(m.group(1)) for k in keys if (m := re.match(r"Segment(\d+)_Name$", k))})
    if names:
        for i in names:
            name = keys[f"Segment{i}_Name"]
            layer = int(keys.get(f"Segment{i}_Layer", 0) or 0)
            value = int(keys.get(f"Segment{i}_LabelValue", 1) or 1)
            masks[name] = arr[..., layer] == value
    else:
        for value in np.unique(arr[..., 0]):
            if value != 0:
                masks[f"label {int(value)}"] = arr[..., 0] == value
    if not masks:
        raise ValueError(f"{path}: contains no segment (all voxels are 0)")
    return masks, matrix


def write_dce_nrrd(path: str, signal_kjit, t_s, matrix, tr_s: float | None = None,
                   flip_angle_deg: float | None = None) -> str:
    """A 4D DCE series as NRRD with Slicer's MultiVolume keys (loads in Slicer as a volume sequence)."""
    import SimpleITK as sitk
    sig = np.ascontiguousarray(signal_kjit, dtype=np.float32)
    img = sitk.GetImageFromArray(sig, isVector=True)
    ref = to_sitk(sig[..., 0], matrix)
    img.CopyInformation(ref)
    img.SetMetaData(FRAME_LABELS, ",".join(f"{1000 * t:g}" for t in t_s))
    img.SetMetaData("MultiVolume.NumberOfFrames", str(len(t_s)))
    img.SetMetaData("MultiVolume.FrameIdentifyingDICOMTagName", "AcquisitionTime")
    img.SetMetaData("MultiVolume.FrameIdentifyingDICOMTagUnits", "ms")
    if tr_s:
        img.SetMetaData(TR_KEY, f"{1000 * tr_s:g}")
    if flip_angle_deg:
        img.SetMetaData(FLIP_KEY, f"{flip_angle_deg:g}")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path[:-5] + ".partial.nrrd"
    sitk.WriteImage(img, tmp, useCompression=True)
    os.replace(tmp, path)
    return path


def write_segmentation(path: str, masks: dict, matrix, colours: dict | None = None) -> str:
    """Named non-overlapping masks as a Slicer ``.seg.nrrd`` (one shared labelmap layer)."""
    import SimpleITK as sitk
    names = list(masks)
    labels = np.zeros(np.shape(masks[names[0]]), dtype=np.uint8)
    for value, name in enumerate(names, start=1):
        labels[np.asarray(masks[name], dtype=bool)] = value
    img = to_sitk(labels, matrix, np.uint8)
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    extent = " ".join(f"0 {n - 1}" for n in labels.shape[::-1])
    palette = [(0.95, 0.8, 0.1), (0.9, 0.2, 0.2), (0.2, 0.6, 0.9), (0.4, 0.8, 0.3), (0.8, 0.4, 0.9)]
    for i, name in enumerate(names):
        colour = (colours or {}).get(name, palette[i % len(palette)])
        for key, value in (("ID", f"Segment_{i + 1}"), ("Name", name), ("LabelValue", i + 1), ("Layer", 0),
                           ("Color", " ".join(f"{c:g}" for c in colour)), ("Extent", extent),
                           ("Tags", "|")):
            img.SetMetaData(f"Segment{i}_{key}", str(value))
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".partial.nrrd"
    sitk.WriteImage(img, tmp, useCompression=True)
    os.replace(tmp, path)
    return path
