"""4D DCE series from files (SimpleITK, pydicom), as the core's :class:`~DCEPerfusionLib.core.series.Series4D`:
signal (K, J, I, T), frame times in seconds from the first frame, IJK->RAS (mm), TR and flip angle.

- a DICOM folder (:mod:`.dicom`: classic or enhanced multi-frame MR, read with pydicom; frames that lack
  the timing tag filled from their neighbours, and said so; files that are not images ignored;
  ``MagneticFieldStrength`` kept for the relaxivity preset);
- a 4D NRRD with Slicer's MultiVolume keys (``MultiVolume.FrameLabels`` in the unit of
  ``MultiVolume.FrameIdentifyingDICOMTagUnits``, TR in ms, flip angle);
- a 4D NIfTI with a BIDS-style JSON sidecar (``RepetitionTimeExcitation`` or a sub-second
  ``RepetitionTime`` in s, ``FlipAngle`` in degrees, ``MagneticFieldStrength`` in T, frame times in
  ``VolumeTiming``/``FrameTimesStart``).
Files are checked before their data is used (complete, as large as their headers say, header text
readable); bad input is a ValueError naming the file and the fix.
:func:`write_dce_nrrd` writes a series as a 4D NRRD that Slicer loads as a volume sequence.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re

import numpy as np

from . import atomic
from ..core import multivolume as mv
from ..core.series import Series4D, resolve_frame_times
from ..core.units import MS_PER_S
from .images import NRRD_UNITS, matrix_of, read_image, read_image_with_keys, to_sitk
from .results import read_json

log = logging.getLogger(__name__)


def read_dce(path: str, frame_interval_s: float | None = None, override_frame_times: bool = False) -> Series4D:
    """Read a 4D DCE series from a DICOM folder, a 4D NRRD or a 4D NIfTI (see the module doc).

    ``frame_interval_s`` (s) is used when the file has no frame times; one that contradicts the file's
    times is refused unless ``override_frame_times`` (:func:`core.series.resolve_frame_times`)."""
    if not os.path.exists(path):
        raise ValueError(f"DCE input {path!r} does not exist")
    low = path.lower()
    if os.path.isdir(path):
        from .dicom import read_dicom_series
        return read_dicom_series(path, frame_interval_s, override_frame_times)
    if low.endswith((".nrrd", ".nhdr")):
        return read_nrrd_4d(path, frame_interval_s, override_frame_times)
    if low.endswith((".nii", ".nii.gz")):
        return read_nifti_4d(path, frame_interval_s, override_frame_times)
    raise ValueError(f"DCE input {path!r}: give a DICOM folder, a .nrrd or a .nii/.nii.gz file")


def read_nrrd_4d(path: str, frame_interval_s: float | None = None, override: bool = False) -> Series4D:
    """A 4D NRRD with the time axis first (Slicer's MultiVolume/sequence layout) and MultiVolume keys:
    frame times (s) from ``MultiVolume.FrameLabels``, TR (ms in the file, s in the series) and flip angle
    (degrees). The file is checked as :func:`images.read_image_with_keys` checks it."""
    img, keys = read_image_with_keys(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() < 3:
        raise ValueError(f"{path}: expected a 4D NRRD with the frames on its first (list) axis, got a "
                         f"{img.GetDimension()}D image with {img.GetNumberOfComponentsPerPixel()} component(s) - "
                         "give the DCE series as Slicer saves a sequence")
    import SimpleITK as sitk
    signal = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)         # (K, J, I, T)
    try:
        t, source = mv.frame_labels_s(keys.get, signal.shape[-1], path)
        if t is None:
            t, source = _index_times(keys, signal.shape[-1], path)
    except ValueError:
        if not frame_interval_s:
            raise
        t, source = None, ""                                 # unusable labels: the given interval replaces them
    t_s, source = resolve_frame_times(t, source, signal.shape[-1], path, frame_interval_s, override)
    acq = mv.acquisition_parameters(keys.get)
    for key, name in ((mv.TR_KEY, "tr_s"), (mv.FLIP_KEY, "flip_angle_deg")):
        if acq[name] is not None and not math.isfinite(acq[name]):
            raise ValueError(f"{path}: {key} = {keys.get(key)[:40]!r} is not a finite number - correct it or leave "
                             "it out (then give it as an option)")
    return Series4D(signal, t_s, matrix_of(img), acq["tr_s"], acq["flip_angle_deg"], source, path)


#: Sidecar fields read: name -> (what it is, unit, the largest plausible value).
SIDECAR_NUMBERS = {"RepetitionTime": ("the repetition time", "s", None),
                   "RepetitionTimeExcitation": ("the excitation repetition time", "s", 1.0),
                   "FlipAngle": ("the flip angle", "degrees", 180.0),
                   "MagneticFieldStrength": ("the field strength", "T", 20.0)}
#: Sidecar fields holding the frame times (s), in the order they are looked for.
SIDECAR_TIMES = ("VolumeTiming", "FrameTimesStart", "FrameTimes")


def _json_kind(value) -> str:
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    if isinstance(value, bool):
        return json.dumps(value)
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else repr(value)


def _sidecar_number(meta: dict, key: str, sidecar: str):
    """``meta[key]`` as a positive finite float (None when absent or null); ValueError naming the field."""
    value = meta.get(key)
    if value is None:
        return None
    what, unit, top = SIDECAR_NUMBERS[key]
    fix = f"give {what} in {unit} as a number"
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = None
    if number is None or not math.isfinite(number) or number <= 0:
        shown = _json_kind(value) if number is None else f"{value!r}" if math.isfinite(number) else "not finite"
        raise ValueError(f"{sidecar}: {key} is {shown} - {fix}")
    if top is not None and number > top:
        hint = "values in ms? give seconds" if unit == "s" else fix
        raise ValueError(f"{sidecar}: {key} is {number:g}, more than {top:g} {unit} - {hint}")
    return number


def _sidecar_times(meta: dict, sidecar: str):
    """The frame times (s) of the sidecar's first time field present (None when none), checked to be a
    list of finite numbers; ValueError naming the field otherwise."""
    key = next((k for k in SIDECAR_TIMES if meta.get(k) is not None), None)
    if key is None:
        return None
    values = meta[key]
    fix = f"give {key} as a list of frame times in s"
    if not isinstance(values, list):
        raise ValueError(f"{sidecar}: {key} is {_json_kind(values)}, not a list - {fix}")
    out = []
    for i, v in enumerate(values):
        try:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        except OverflowError:
            ok = False
        if not ok:
            raise ValueError(f"{sidecar}: {key}[{i}] is {_json_kind(v)}, not a finite number - {fix}")
        out.append(float(v))
    return out


def _index_times(keys, n_frames: int, where: str):
    """Frame times (s) from a Slicer sequence NRRD's ``axis N index values`` in the unit its ``units``
    field gives that axis (vtkMRMLVolumeSequenceStorageNode.cxx lines 102-159 at v5.8.1 read them so);
    (None, "") when there are none. ValueError when the index is not a time."""
    for axis in (0, 3):
        values = keys.get(f"axis {axis} index values")
        if not values:
            continue
        units = re.findall(r'"([^"]*)"', keys.get(NRRD_UNITS) or "")
        unit = units[axis].strip() if axis < len(units) else ""
        scale = mv.UNIT_SCALE_TO_S.get(unit.lower())
        if (keys.get(f"axis {axis} index type") or "numeric") != "numeric" or scale is None:
            raise ValueError(f"{where}: its sequence index (axis {axis}, unit {unit!r}) is not a time in s, ms or min - "
                             "give the frame interval in seconds (--frame-interval)")
        return (mv.frame_times(values, scale, n_frames, where, f"axis {axis} index values"),
                f"sequence index values ({unit})")
    return None, ""


def read_nifti_4d(path: str, frame_interval_s: float | None = None, override: bool = False) -> Series4D:
    """A 4D NIfTI (x, y, z, time) and its BIDS-style JSON sidecar (same name, ``.json``): TR from
    ``RepetitionTimeExcitation`` or a sub-second ``RepetitionTime`` (s), ``FlipAngle`` (degrees),
    ``MagneticFieldStrength`` (T) and the frame times (s) from ``VolumeTiming``/``FrameTimesStart``.
    ValueError naming the file (or the sidecar and its field) and the fix."""
    import SimpleITK as sitk
    img = read_image(path)
    if img.GetDimension() != 4 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a 4D NIfTI (x, y, z, time), got a {img.GetDimension()}D image with "
                         f"{img.GetNumberOfComponentsPerPixel()} component(s) - give the DCE series as one 4D file")
    arr = sitk.GetArrayFromImage(img)                                          # (T, K, J, I)
    signal = np.ascontiguousarray(np.moveaxis(arr, 0, -1), dtype=np.float32)
    stem = re.sub(r"\.nii(\.gz)?$", "", path, flags=re.I)
    sidecar = stem + ".json"
    meta = {}
    if os.path.exists(sidecar):
        meta = read_json(sidecar, "JSON sidecar", "give the BIDS sidecar as dcm2niix writes it, or remove it "
                         "and give the frame interval (--frame-interval)")
    numbers = {k: _sidecar_number(meta, k, sidecar) for k in SIDECAR_NUMBERS}
    tr = numbers["RepetitionTimeExcitation"]
    if tr is None and numbers["RepetitionTime"] is not None and numbers["RepetitionTime"] < 1.0:
        tr = numbers["RepetitionTime"]                                         # an excitation TR, not a volume TR
    t = _sidecar_times(meta, sidecar)
    t_s, source = resolve_frame_times(t, "JSON sidecar (s)", signal.shape[-1], f"{path} (JSON sidecar)",
                                      frame_interval_s, override)
    return Series4D(signal, t_s, matrix_of(img), tr, numbers["FlipAngle"], source, path,
                    field_strength_t=numbers["MagneticFieldStrength"])


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
    atomic.write_image(img, path)
    return path
