"""Timing and acquisition attributes of a DCE volume sequence, as Slicer's DICOM importer (and a 4D
NRRD with MultiVolume keys) leaves them on the sequence node. numpy only, so the module can read them
before scipy is installed."""

from __future__ import annotations

import numpy as np

FRAME_LABELS = "MultiVolume.FrameLabels"          # frame times, ms (Slicer's DICOM importer)
TR_ATTRIBUTE = "MultiVolume.DICOM.RepetitionTime"  # ms
FLIP_ATTRIBUTE = "MultiVolume.DICOM.FlipAngle"     # degrees
_UNIT_SCALE_TO_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
                    "ms": 1e-3, "msec": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
                    "min": 60.0, "minute": 60.0, "minutes": 60.0}


def _attribute_float(node, name):
    value = node.GetAttribute(name)
    try:
        return float(str(value).split(",")[0]) if value not in (None, "") else None
    except ValueError:
        return None


def acquisition_parameters(sequence_node) -> dict:
    """``{"tr_s", "flip_angle_deg"}`` from the sequence's MultiVolume.DICOM attributes (None when absent)."""
    tr_ms = _attribute_float(sequence_node, TR_ATTRIBUTE)
    return {"tr_s": tr_ms / 1000.0 if tr_ms is not None and tr_ms > 0 else None,
            "flip_angle_deg": _attribute_float(sequence_node, FLIP_ATTRIBUTE)}


def frame_times_s(sequence_node, frame_interval_s: float | None = None):
    """Frame times (s) of a sequence and where they came from.

    Order of preference: an explicit ``frame_interval_s``; ``MultiVolume.FrameLabels`` (ms); numeric
    index values with a time unit (s, ms or min). Returns (times in item order, source text)."""
    n = sequence_node.GetNumberOfDataNodes()
    name = sequence_node.GetName()
    if frame_interval_s is not None and frame_interval_s > 0:
        return np.arange(n) * float(frame_interval_s), f"frame interval {frame_interval_s:g} s (given)"
    labels = sequence_node.GetAttribute(FRAME_LABELS)
    if labels:
        try:
            t_ms = np.array([float(v) for v in labels.replace(";", ",").split(",") if v.strip()])
        except ValueError:
            raise ValueError(f"sequence '{name}': {FRAME_LABELS} is not a list of numbers ({labels[:60]!r}) - "
                             "give the frame interval in seconds instead") from None
        if t_ms.size != n:
            raise ValueError(f"sequence '{name}': {FRAME_LABELS} has {t_ms.size} times for {n} frames - "
                             "give the frame interval in seconds instead")
        return t_ms / 1000.0, f"{FRAME_LABELS} (ms)"
    unit = (sequence_node.GetIndexUnit() or "").strip().lower()
    if sequence_node.GetIndexType() == sequence_node.NumericIndex and unit in _UNIT_SCALE_TO_S:
        values = np.array([float(sequence_node.GetNthIndexValue(i)) for i in range(n)])
        return values * _UNIT_SCALE_TO_S[unit], f"sequence index values ({unit})"
    raise ValueError(
        f"sequence '{name}': no frame times - it has no {FRAME_LABELS} attribute and its index "
        f"('{sequence_node.GetIndexName()}', unit '{sequence_node.GetIndexUnit()}') is not a time in s or ms; "
        "give the frame interval in seconds")
