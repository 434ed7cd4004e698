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

#: Fraction of the enhancement at which the bolus counts as arrived.
RISE_FRACTION = 0.1
#: Fraction of voxels (the strongest-enhancing) whose mean signal is used when no artery is given.
TOP_FRACTION = 0.01


@dataclass
class BolusArrival:
    """frame: index of the first frame the bolus has visibly reached; n_baseline: the frames before the
    frame before it (>= 1); time_s: the time of frame ``n_baseline`` (the onset at frame resolution); curve: the mean signal it was found in (T,); where: which voxels that was."""

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
    for the messages. ValueError when no
    enhancement can be found (then the baseline frames must be given)."""
    t = np.asarray(t_s, dtype=float)
    flat = np.asarray(signal).reshape(-1, t.size)
    if artery is not None and np.any(artery):
        curves, where = flat[np.asarray(artery, dtype=bool).reshape(-1)].astype(np.float64), "the AIF voxels"
    else:
        step = max(1, flat.shape[0] // 200_000)                 # a regular subsample keeps this fast
        sample = flat[::step].astype(np.float64)
        sample = sample[np.all(np.isfinite(sample), axis=1)]
        if sample.size == 0:
            raise ValueError(f"bolus arrival in {series}: the signal has no finite voxel - give the number of baseline frames")
        smooth = _moving_mean(sample[:, 1:], 3)        # frame 0 stays out of the choice: an unbiased baseline
        rise = smooth.max(axis=1) - smooth[:, 0]
        n_top = max(1, int(np.ceil(TOP_FRACTION * sample.shape[0])))
        curves = sample[np.argsort(-rise, kind="stable")[:n_top]]
        where = f"the {n_top} strongest-enhancing voxels"
    curve = curves.mean(axis=0)
    smooth = _moving_mean(curve[None], 3)[0]
    base = float(np.mean(curve[:2]))
    peak = float(smooth.max())
    steps = np.diff(curve)
    noise = 1.4826 * float(np.median(np.abs(steps - np.median(steps)))) / np.sqrt(2)   # robust to the bolus jump
    if not peak - base > max(3 * noise, 1e-6 * max(abs(base), 1e-30)):
        raise ValueError(f"bolus arrival in {series}: the signal shows no enhancement to find it from - give the number of "
                         "baseline frames (--baseline-frames)")
    frame = max(1, int(np.flatnonzero(curve >= base + RISE_FRACTION * (peak - base))[0]))
    after = curve[frame:]                 # frame 0 and the mean after: unbiased by the choice of the voxels
    if not after.mean() - curve[0] > 4 * noise * np.sqrt(1.0 + 1.0 / after.size):
        raise ValueError(f"bolus arrival in {series}: the signal shows no lasting enhancement to find it from - give the number "
                         "of baseline frames (--baseline-frames)")
    n_baseline = max(1, frame - 1)
    return BolusArrival(frame=frame, n_baseline=n_baseline, time_s=float(t[n_baseline]), curve=curve, where=where)


def _moving_mean(curves, width):
    """Centred moving mean along the last axis (edges use the frames there are)."""
    kernel = np.ones(width) / width
    pad = width // 2
    padded = np.pad(curves, ((0, 0), (pad, pad)), mode="edge")
    out = np.empty_like(curves)
    for i in range(curves.shape[1]):
        out[:, i] = padded[:, i:i + width] @ kernel
    return out
