"""When the contrast arrives: the number of pre-contrast (baseline) frames of a DCE series, found from
its signal so that the user need not count them.

The arrival is where the mean signal of the strongest-enhancing voxels (or of the artery, when its
voxels are known) first rises by 10 % of its enhancement - the threshold method of bolus-arrival
detection (Cheong et al., Phys Med Biol 2003;48:N59, who compare it with fitted models; the threshold
form is the robust one at clinical temporal resolution). The onset lies between that frame and the one
before, which may already hold the foot of the bolus: the baseline is the frames before that one, and
a population AIF starts at it (the convention of :func:`aif.select`).
numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter1d

#: Fraction of the enhancement at which the bolus counts as arrived.
RISE_FRACTION = 0.1
#: Fraction of voxels (the strongest-enhancing) whose mean signal is used when no artery is given.
TOP_FRACTION = 0.01


@dataclass
class BolusArrival:
    """frame: index of the first frame the bolus has visibly reached (>= 3); n_baseline: the frames before
    the frame before it (>= 2); time_s: the time of frame ``n_baseline`` (the onset at frame resolution); curve: the mean signal it was found in (T,); where: which voxels that was."""

    frame: int
    n_baseline: int
    time_s: float
    curve: np.ndarray
    where: str

    def describe(self) -> str:
        return (f"detected: the signal of {self.where} rises at frame {self.frame}; {self.n_baseline} baseline "
                f"frame(s), bolus onset {self.time_s:g} s")


def arrival(signal, t_s, artery=None, series: str = "the series") -> BolusArrival:
    """The bolus arrival in ``signal`` (K, J, I, T) with frame times ``t_s`` (s); ``artery``: a mask
    (K, J, I) whose mean signal is used instead of the strongest-enhancing voxels; ``series``: its name
    for the messages. ValueError when no baseline followed by a lasting rise can be found, or when the
    rise leaves fewer than 2 clean baseline frames (then the baseline frames must be given).

    Without an artery the voxels are those whose mean signal over the second half of the series rises
    most above frames 1-3 (a sum over many frames: noise does not pick them, as it would a maximum);
    frame 0 stays out of that choice so that it judges the rise without bias. The arrival is the first
    frame that, with the next two, lies above the baseline (median of the frames before) by 10 % of the
    enhancement and by at least 3 noise standard deviations (robust estimate from the frame-to-frame
    steps)."""
    t = np.asarray(t_s, dtype=float)
    flat = np.asarray(signal).reshape(-1, t.size)
    if artery is not None and np.any(artery):
        curves, where = flat[np.asarray(artery, dtype=bool).reshape(-1)].astype(np.float64), "the AIF voxels"
    else:
        step = max(1, flat.shape[0] // 200_000)                 # a regular subsample keeps this fast
        sample = flat[::step].astype(np.float64)
        sample = sample[np.all(np.isfinite(sample), axis=1)]
        if sample.size == 0 or t.size < 6:
            raise ValueError(f"bolus arrival in {series}: too few frames or no finite voxel to find it - give the "
                             "number of baseline frames (--baseline-frames)")
        score = sample[:, t.size // 2:].mean(axis=1) - sample[:, 1:4].mean(axis=1)
        n_top = max(1, int(np.ceil(TOP_FRACTION * sample.shape[0])))
        curves = sample[np.argsort(-score, kind="stable")[:n_top]]
        where = f"the {n_top} strongest-enhancing voxels"
    curve = curves.mean(axis=0)
    steps = np.diff(curve)
    noise = 1.4826 * float(np.median(np.abs(steps - np.median(steps)))) / np.sqrt(2)   # robust to the bolus jump
    peak = float(uniform_filter1d(curve, 3, mode="nearest").max())       # a 3-frame mean: not one noisy frame
    frame = None
    for i in range(1, t.size - 2):
        base = float(np.median(curve[:i]))
        level = base + max(RISE_FRACTION * (peak - base), 3.0 * noise)
        if np.all(curve[i:i + 3] >= level):
            frame = i
            break
    after = curve[frame:] if frame is not None else curve
    if frame is None or not after.mean() - curve[0] > 4 * noise * np.sqrt(1.0 + 1.0 / after.size):
        raise ValueError(f"bolus arrival in {series}: found no baseline followed by a lasting rise of the signal - "
                         "give the number of baseline frames (--baseline-frames)")
    if frame < 3:
        raise ValueError(f"bolus arrival in {series}: the signal of {where} rises at frame {frame}, leaving fewer "
                         "than 2 baseline frames (the series starts with the bolus?) - give the number of baseline "
                         "frames (--baseline-frames)")
    n_baseline = frame - 1
    return BolusArrival(frame=frame, n_baseline=n_baseline, time_s=float(t[n_baseline]), curve=curve, where=where)
