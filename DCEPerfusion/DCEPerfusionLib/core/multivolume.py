"""Slicer's MultiVolume conventions, read once for the files and the scene: the keys Slicer's DICOM
importer (MultiVolumeImporter) writes onto a DCE sequence node and into a 4D NRRD, and their parsing.

``MultiVolume.FrameLabels`` holds the frame labels in the unit of ``MultiVolume.FrameIdentifyingDICOMTagUnits``
(ms for the times the importer reads; ``count`` for Temporal Position Identifier - not a time),
``MultiVolume.DICOM.RepetitionTime`` the TR (ms) and ``MultiVolume.DICOM.FlipAngle`` the flip angle (degrees). Plain Python and numpy, so the Slicer
module can read them before anything else is loaded. ``get`` arguments are callables key -> str | None
(a node's ``GetAttribute``, a header dict's ``get``).

The units are those fedorov/MultiVolumeImporter writes (``MultiVolumeImporterPlugin.py`` lines 63-78 at
144b2e4: TriggerTime, AcquisitionTime, ContentTime "ms", DeltaStartTime "sec", TemporalPositionIdentifier
"count"; line 968 sets the attribute from that table).
"""

from __future__ import annotations

import re

import numpy as np

from .units import MS_PER_S, S_PER_MIN

FRAME_LABELS = "MultiVolume.FrameLabels"           # frame times, ms
TR_KEY = "MultiVolume.DICOM.RepetitionTime"        # ms
FLIP_KEY = "MultiVolume.DICOM.FlipAngle"           # degrees
NUMBER_OF_FRAMES_KEY = "MultiVolume.NumberOfFrames"
TAG_NAME_KEY = "MultiVolume.FrameIdentifyingDICOMTagName"
TAG_UNITS_KEY = "MultiVolume.FrameIdentifyingDICOMTagUnits"
#: Seconds per unit of a time given with a unit name (sequence index units, tag units).
UNIT_SCALE_TO_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
                   "ms": 1.0 / MS_PER_S, "msec": 1.0 / MS_PER_S, "millisecond": 1.0 / MS_PER_S,
                   "milliseconds": 1.0 / MS_PER_S, "min": S_PER_MIN, "minute": S_PER_MIN, "minutes": S_PER_MIN}


def header_float(value):
    """The first number of a header value ("4.2", "15,15"), or None when absent or not a number ("inf"
    stays: the readers and the chain's plausibility checks refuse it by name)."""
    try:
        return float(str(value).split(",")[0]) if value not in (None, "") else None
    except ValueError:
        return None


#: Frame-identifying tags of MultiVolumes that are not time series (MultiVolumeImporterPlugin.py:40-79): variable
#: flip angle (T1 mapping), echo or repetition time, inversion time, cardiac phase, diffusion b-values.
NOT_TIME_TAGS = ("FlipAngle", "EchoTime", "RepetitionTime", "InversionTime", "CardiacCycle",
                 "NominalPercentageOfCardiacPhase", "B-value")


def is_time_series(get) -> bool:
    """Whether MultiVolume attributes (``get(key)``) describe frames over time (no frame-identifying tag, or a
    tag not in :data:`NOT_TIME_TAGS`)."""
    tag = str(get(TAG_NAME_KEY) or "")
    return not any(t.lower() in tag.lower() for t in NOT_TIME_TAGS)


def acquisition_parameters(get) -> dict:
    """``{"tr_s", "flip_angle_deg"}`` from the MultiVolume.DICOM keys (None when absent or not positive)."""
    tr_ms, flip = header_float(get(TR_KEY)), header_float(get(FLIP_KEY))
    return {"tr_s": tr_ms / MS_PER_S if tr_ms is not None and tr_ms > 0 else None,
            "flip_angle_deg": flip if flip is not None and flip > 0 else None}


def frame_labels_s(get, n_frames: int, where: str):
    """Frame times (s) from ``MultiVolume.FrameLabels`` in the unit ``MultiVolume.FrameIdentifyingDICOMTagUnits``
    names (ms when the key is absent, as older 4D NRRDs have it), and a description; (None, "") when there
    are no labels. ValueError naming ``where`` when the labels are not ``n_frames`` numbers or their unit is
    not a time (``count``: Temporal Position Identifiers 1, 2, 3 ...)."""
    labels = get(FRAME_LABELS)
    if not labels:
        return None, ""
    unit = str(get(TAG_UNITS_KEY) or "ms").strip()
    scale = UNIT_SCALE_TO_S.get(unit.lower())
    if scale is None:
        tag = get(TAG_NAME_KEY) or "the frame-identifying tag"
        raise ValueError(f"{where}: {FRAME_LABELS} are in '{unit}' ({tag}), not a time - give the frame interval "
                         "in seconds (--frame-interval)")
    return frame_times(labels, scale, n_frames, where, FRAME_LABELS), f"{FRAME_LABELS} ({unit})"


def frame_times(text, scale_to_s: float, n_frames: int, where: str, what: str) -> np.ndarray:
    """``n_frames`` times (s) from a header's list of numbers (comma, semicolon or space separated) in a
    unit of ``scale_to_s`` seconds; ValueError naming ``where`` and ``what`` when they are not that."""
    try:
        values = np.array([float(v) for v in re.split(r"[,;\s]+", str(text).strip()) if v])
    except ValueError:
        raise ValueError(f"{where}: {what} is not a list of numbers ({str(text)[:60]!r}) - give the frame interval in "
                         "seconds instead (--frame-interval)") from None
    if values.size != n_frames:
        raise ValueError(f"{where}: {what} has {values.size} times for {n_frames} frames - give the frame interval in "
                         "seconds instead (--frame-interval)")
    return values * scale_to_s
