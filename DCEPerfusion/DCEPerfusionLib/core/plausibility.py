"""Plausibility of the units and values a DCE analysis is given - the checks that catch a unit slip
before it becomes a 1000x-wrong map. Each check raises ValueError naming the quantity, what it looks
like and the fix, or returns a warning text.

The ranges are those of clinical DCE-MRI (QIBA DCE-MRI profile 2020; Yankeelov & Gore, Curr Med Imaging
Rev 2009): SPGR repetition times of 2-10 ms, frames 1-30 s apart (0.1-120 s accepted), tissue and blood
T1 of 0.2-4 s. numpy only.
"""

from __future__ import annotations

import numpy as np

from .units import MS_PER_S

#: TR outside this range (s) is a unit slip: below 0.1 ms no scanner excites, above 1 s it is no DCE.
TR_RANGE_S = (1e-4, 1.0)
#: Frame spacing outside this range (s): ms read as s above, s read as ms below.
FRAME_SPACING_RANGE_S = (0.1, 120.0)
#: A T1 above this (s) is a value in ms.
T1_MAX_S = 20.0
#: A signal whose negative samples reach below this fraction of its maximum is an unsigned image read as
#: signed (int16 wrap: values near -32768); shallower ones are the noise of an image whose background was
#: made zero-mean (some reconstructions and filters), kept with a warning.
NEGATIVE_DEPTH = 0.05


def check_tr_s(tr_s: float, source: str) -> float:
    """A repetition time (s) within :data:`TR_RANGE_S`."""
    lo, hi = TR_RANGE_S
    if not lo <= tr_s <= hi:
        ms = tr_s * MS_PER_S
        hint = (f"was it given in s? give it in ms (--tr-ms {ms * MS_PER_S:g} for {ms:g} s)"
                if tr_s < lo else "is this the volume repetition time? give the excitation TR (2-10 ms)")
        raise ValueError(f"TR = {ms:g} ms ({source}): outside {lo * MS_PER_S:g}-{hi * MS_PER_S:g} ms - {hint}")
    return tr_s


def check_flip_angle_deg(flip_deg: float, source: str) -> float:
    """A flip angle (degrees) of at least 1 degree: below that it is an angle in radians."""
    if flip_deg < 1.0:
        raise ValueError(f"flip angle = {flip_deg:g} degrees ({source}): no DCE sequence excites that little - it "
                         f"looks like radians; give degrees ({float(np.degrees(flip_deg)):.3g})")
    return flip_deg


def check_t1_s(t1_s: float, name: str) -> float:
    """A constant T1 (s) below :data:`T1_MAX_S` (a larger one is a value in ms)."""
    if t1_s > T1_MAX_S:
        raise ValueError(f"{name} = {t1_s:g} s: longer than any tissue's T1 (> {T1_MAX_S:g} s) - it looks like ms; "
                         f"give seconds ({t1_s / MS_PER_S:g})")
    return t1_s


def check_frame_spacing(t_s, source: str, series: str) -> float:
    """The median frame spacing (s) of frame times ``t_s`` within :data:`FRAME_SPACING_RANGE_S`."""
    spacing = float(np.median(np.diff(np.asarray(t_s, dtype=float))))
    lo, hi = FRAME_SPACING_RANGE_S
    if spacing > hi:
        raise ValueError(f"frame times of '{series}' ({source}): frames {spacing:g} s apart - they look like ms read "
                         "as s; give the frame interval in seconds (--frame-interval with --override-frame-times)")
    if spacing < lo:
        raise ValueError(f"frame times of '{series}' ({source}): frames {spacing:g} s apart - they look like s read "
                         "as ms; give the frame interval in seconds (--frame-interval with --override-frame-times)")
    return spacing


def check_signal(signal, series: str) -> str:
    """Refuse a signal with deep negative samples (a magnitude image wrapped through int16); return a
    warning text for shallow ones (noise of a filtered image) or for NaN samples, else ""."""
    n_nan = int(np.count_nonzero(np.isnan(signal))) if np.issubdtype(np.asarray(signal).dtype, np.floating) else 0
    nan_note = (f"signal of '{series}': {n_nan} samples are NaN; those voxels are not fitted" if n_nan else "")
    if n_nan == np.size(signal):
        raise ValueError(f"signal of '{series}': every sample is NaN - check the file")
    low = float(np.nanmin(signal))
    if low >= 0:
        return nan_note
    high = float(np.nanmax(signal))
    n_neg = int(np.count_nonzero(signal < 0))
    if low < -NEGATIVE_DEPTH * max(high, 0.0):
        raise ValueError(f"signal of '{series}': {n_neg} samples are negative (down to {low:g}, maximum {high:g}) - "
                         "MR magnitude is never negative; the file was probably written as signed 16-bit while "
                         "the scanner's values are unsigned (int16 wrap) - convert it to unsigned or float")
    return "; ".join(filter(None, [nan_note, f"signal of '{series}': {n_neg} samples are slightly negative (down to "
                                   f"{low:g}, noise of a filtered image?); they are used as they are"]))
