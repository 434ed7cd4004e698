"""4D DCE series from files (SimpleITK), as the core's :class:`~DCEPerfusionLib.core.series.Series4D`:
signal (K, J, I, T), frame times in seconds from the first frame, IJK->RAS (mm), TR and flip angle.

- a DICOM folder (:mod:`.dicom`);
- a 4D NRRD with Slicer's MultiVolume keys (``MultiVolume.FrameLabels`` in the unit of
  ``MultiVolume.FrameIdentifyingDICOMTagUnits``, TR in ms, flip angle);
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
from ..core.series import Series4D, resolve_frame_times
from ..core.units import MS_PER_S
from .images import read_image, matrix_of, to_sitk

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
    """A 4D NRRD with the time axis first (Slicer's MultiVolume/sequence layout) and MultiVolume keys."""
    img = read_image(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() < 3:
        raise ValueError(f"{path}: expected a 4D NRRD with the frames on its first (list) axis, got a "
                         f"{img.GetDimension()}D image with {img.GetNumberOfComponentsPerPixel()} component(s)")
    import SimpleITK as sitk
    signal = sitk.GetArrayFromImage(img).astype(np.float32, copy=False)         # (K, J, I, T)
    keys = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
    try:
        t, source = mv.frame_labels_s(keys.get, signal.shape[-1], path)
    except ValueError:
        if not frame_interval_s:
            raise
        t, source = None, ""                                 # unusable labels: the given interval replaces them
    t_s, source = resolve_frame_times(t, source, signal.shape[-1], path, frame_interval_s, override)
    acq = mv.acquisition_parameters(keys.get)
    return Series4D(signal, t_s, matrix_of(img), acq["tr_s"], acq["flip_angle_deg"], source, path)


def read_nifti_4d(path: str, frame_interval_s: float | None = None, override: bool = False) -> Series4D:
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
    t_s, source = resolve_frame_times(t, "JSON sidecar (s)", signal.shape[-1], f"{path} (JSON sidecar)",
                                      frame_interval_s, override)
    return Series4D(signal, t_s, matrix_of(img), float(tr) if tr else None, mv.header_float(meta.get("FlipAngle")),
                    source, path)


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
