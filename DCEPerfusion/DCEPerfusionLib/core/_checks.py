"""Argument checks shared by the numeric modules: each raises ValueError naming the argument and the fix."""

from __future__ import annotations

import numpy as np


def as_float_array(value, name: str) -> np.ndarray:
    """``value`` as a float64 array (a copy is made only when needed; callers never write into it)."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected numbers, got {type(value).__name__}") from None
    return arr


def check_positive(value, name: str, unit: str = "") -> float:
    """A finite scalar > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number{' in ' + unit if unit else ''}, got {value!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name}={value}: must be a finite number > 0{' (' + unit + ')' if unit else ''}")
    return v


def check_flip_angle_deg(value, name: str) -> np.ndarray:
    """Flip angle(s) in degrees within (0, 90]."""
    fa = as_float_array(value, name)
    if np.any(~np.isfinite(fa)) or np.any(fa <= 0) or np.any(fa > 90):
        raise ValueError(f"{name} = {value}: a flip angle must be in (0, 90] degrees")
    return fa


def check_times(t_s, name: str = "t_s", min_frames: int = 3) -> np.ndarray:
    """Frame times in seconds: 1-D, finite, strictly increasing, at least ``min_frames``."""
    t = as_float_array(t_s, name)
    if t.ndim != 1:
        raise ValueError(f"{name}: frame times must be a 1-D array (T,), got shape {t.shape}")
    if t.size < min_frames:
        raise ValueError(f"{name}: need at least {min_frames} frames, got {t.size}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{name}: frame times contain NaN or Inf")
    d = np.diff(t)
    if np.any(d <= 0):
        i = int(np.flatnonzero(d <= 0)[0])
        kind = "duplicate" if d[i] == 0 else "decreasing"
        raise ValueError(
            f"{name}: frame times must be strictly increasing (seconds); {kind} time at index {i + 1} "
            f"({t[i]} then {t[i + 1]}) - sort the frames or remove duplicates"
        )
    return t
