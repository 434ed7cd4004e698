"""The 4D DCE series record every reader produces (files or a Slicer sequence) and the chain consumes,
and the one rule for choosing a series' frame times (the times in the file or a given frame interval)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: A given frame interval "agrees" with the file's frame times when it is within this fraction of their
#: median spacing.
INTERVAL_AGREEMENT = 0.05


@dataclass
class Series4D:
    """A DCE series: ``signal`` float32 (K, J, I, T); frame times ``t_s`` (s) from the first frame; the
    IJK->RAS matrix (mm); TR (s), flip angle (degrees) and field strength (T) from the header when known
    (else None); where the frame times came from; the source (a path or a sequence node's name); and
    ``dicom``, the series' DICOM identity when it was read from DICOM (a ``files.dicomref.DicomSource``:
    study, series, frame of reference and the first frame's headers, which DICOM results reference; None
    otherwise - the core never looks inside it)."""

    signal: np.ndarray
    t_s: np.ndarray
    ijk_to_ras: np.ndarray
    tr_s: float | None
    flip_angle_deg: float | None
    time_source: str
    source: str
    field_strength_t: float | None = None
    dicom: object | None = None

    @property
    def shape_kji(self) -> tuple:
        return tuple(self.signal.shape[:-1])


def resolve_frame_times(t_s, source: str, n_frames: int, where: str, frame_interval_s: float | None = None,
                        override: bool = False):
    """(frame times in s from the first frame, where they came from) for a series of ``n_frames``.

    ``t_s``: the times the file or node holds (s, any origin; None when it has none), ``source`` their
    description. A given ``frame_interval_s`` is used when the file has no times, or when ``override``;
    when it contradicts the file's times (median spacing off by more than 5 %) it is refused, naming
    both - a wrong interval scales every rate constant. ValueError naming ``where`` and the fix."""
    given = frame_interval_s is not None and frame_interval_s > 0
    if given and (t_s is None or override):
        note = " (given, replacing the file's frame times)" if t_s is not None else " (given)"
        return np.arange(n_frames) * float(frame_interval_s), f"frame interval {frame_interval_s:g} s{note}"
    if t_s is None:
        raise ValueError(f"{where}: has no frame times - give the frame interval in seconds (--frame-interval)")
    t = np.asarray(t_s, dtype=float)
    if t.size != n_frames:
        raise ValueError(f"{where}: {t.size} frame times for {n_frames} frames - give the frame interval instead "
                         "(--frame-interval)")
    if not np.all(np.isfinite(t)) or not np.all(np.diff(t) > 0):
        raise ValueError(f"{where}: frame times are not increasing ({source}) - give the frame interval instead "
                         "(--frame-interval)")
    t = t - t[0]
    if given:
        spacing = float(np.median(np.diff(t)))
        if abs(spacing - frame_interval_s) > INTERVAL_AGREEMENT * spacing:
            raise ValueError(f"{where}: the given frame interval {frame_interval_s:g} s contradicts the frame times "
                             f"in the file ({source}: {spacing:.4g} s apart) - leave the interval out, or say to "
                             "use it instead (--override-frame-times)")
        source = f"{source}; the given interval {frame_interval_s:g} s agrees"
    return t, source
