"""Size of a lesion: the comparator of the vp call.

:func:`size_measures` gives the longest axial diameter on the acquired slices, the longest perpendicular
diameter, their product (WHO bidimensional) and the volume of a (K, J, I) mask with its IJK->RAS matrix
(mm); :func:`size_change` calls "progression" when the longest diameter grows by >= 20 % (RECIST 1.1's
threshold; the AJNR 2023 paper does not define its size criterion). numpy/scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .registry import SIZE_PROGRESSION_PCT
from .response import INDETERMINATE, percent_change
from .units import MM3_PER_CM3

PROGRESSION, NO_PROGRESSION = "progression", "no progression"


@dataclass
class SizeMeasures:
    """Size of a lesion mask. Diameters in mm on the acquired (K) slices, product in mm^2, volume cm^3;
    ``slice_index`` is the K slice of the longest diameter (-1 for an empty mask)."""

    longest_diameter_mm: float
    perpendicular_diameter_mm: float
    bidimensional_mm2: float
    volume_cm3: float
    slice_index: int
    voxel_count: int


def _plane_axes(matrix):
    """Unit vectors of the I and J voxel edges (RAS) and the in-plane spacings (mm)."""
    m = np.asarray(matrix, dtype=float)[:3, :3]
    si, sj = np.linalg.norm(m[:, 0]), np.linalg.norm(m[:, 1])
    return m[:, 0] / si, m[:, 1] / sj, si, sj


def _extent(points, direction):
    proj = points @ direction
    return float(proj.max() - proj.min())


def _pixel_width(direction, ei, ej, si, sj):
    """The voxel size along ``direction`` (si along I, sj along J, in between elliptically): a caliper on
    the drawn voxels reaches about half a voxel beyond the outermost centres at each end."""
    return float(np.hypot((direction @ ei) * si, (direction @ ej) * sj))


def size_measures(mask, matrix) -> SizeMeasures:
    """Longest axial diameter (the maximum caliper distance on any acquired slice), the longest extent
    perpendicular to it on that slice, their product and the volume of a (K, J, I) mask.

    Distances are between voxel centres plus one voxel width along the measured direction, so a
    caliper on the drawn voxels is reproduced (within one voxel of the true size of a smooth shape).
    """
    from scipy.spatial import ConvexHull, QhullError

    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"mask: expected a (K, J, I) volume, got shape {m.shape}")
    matrix = np.asarray(matrix, dtype=float)
    voxel_mm3 = float(abs(np.linalg.det(matrix[:3, :3])))
    n = int(m.sum())
    if n == 0:
        return SizeMeasures(0.0, 0.0, 0.0, 0.0, -1, 0)
    ei, ej, si, sj = _plane_axes(matrix)
    # in-plane coordinates (mm) along an orthonormal basis of the slice plane
    u = ei
    v = ej - (ej @ u) * u
    v /= np.linalg.norm(v)
    best = (-1.0, 0.0, -1)
    for k in np.flatnonzero(m.any(axis=(1, 2))):
        jj, ii = np.nonzero(m[k])
        ras = np.outer(ii, matrix[:3, 0]) + np.outer(jj, matrix[:3, 1])  # the slice offset does not matter
        pts = np.column_stack([ras @ u, ras @ v])
        try:
            hull = pts[ConvexHull(pts).vertices] if len(pts) >= 3 else pts
        except QhullError:  # collinear voxels: the line's end points are on it anyway
            hull = pts
        d = hull[:, None, :] - hull[None, :, :]
        dist = np.sqrt((d ** 2).sum(axis=-1))
        a, b = np.unravel_index(np.argmax(dist), dist.shape)
        direction = d[a, b] / dist[a, b] if dist[a, b] > 0 else np.array([1.0, 0.0])
        perp = np.array([-direction[1], direction[0]])
        dir3, perp3 = direction[0] * u + direction[1] * v, perp[0] * u + perp[1] * v
        longest = dist[a, b] + _pixel_width(dir3, ei, ej, si, sj)
        width = _extent(pts, perp) + _pixel_width(perp3, ei, ej, si, sj)
        if longest > best[0]:
            best = (float(longest), float(width), int(k))
    longest, width, k = best
    return SizeMeasures(longest_diameter_mm=longest, perpendicular_diameter_mm=width,
                        bidimensional_mm2=longest * width, volume_cm3=n * voxel_mm3 / MM3_PER_CM3, slice_index=k,
                        voxel_count=n)


@dataclass
class SizeChange:
    """Baseline and follow-up size, percent changes (longest, bidimensional, volume) and the size call."""

    baseline: SizeMeasures
    followup: SizeMeasures
    change_pct: dict
    call: str
    reason: str
    progression_pct: float


def size_change(baseline: SizeMeasures, followup: SizeMeasures,
                progression_pct: float = SIZE_PROGRESSION_PCT) -> SizeChange:
    """"progression" when the longest diameter grows by at least ``progression_pct`` percent."""
    if not np.isfinite(progression_pct) or progression_pct <= 0:
        raise ValueError(f"progression_pct={progression_pct}: give the growth threshold in percent, e.g. 20")
    change = {"longest_diameter": percent_change(baseline.longest_diameter_mm, followup.longest_diameter_mm),
              "bidimensional": percent_change(baseline.bidimensional_mm2, followup.bidimensional_mm2),
              "volume": percent_change(baseline.volume_cm3, followup.volume_cm3)}
    growth = change["longest_diameter"]
    if baseline.voxel_count == 0 or followup.voxel_count == 0:
        which = "baseline" if baseline.voxel_count == 0 else "follow-up"
        call, reason = INDETERMINATE, f"the {which} lesion mask is empty"
    elif growth >= progression_pct:
        call, reason = PROGRESSION, f"longest diameter {growth:+.1f} % (>= +{progression_pct:g} %)"
    else:
        call, reason = NO_PROGRESSION, f"longest diameter {growth:+.1f} % (< +{progression_pct:g} %)"
    return SizeChange(baseline, followup, change, call, reason, float(progression_pct))
