"""Voxel grids in Slicer's conventions: arrays (K, J, I) with a 4x4 IJK->RAS matrix in mm.

:class:`Volume` is a 3D array with its grid and a name for messages; :func:`on_grid` moves one onto
another grid (trilinear, numpy/scipy), :func:`t1_on_grid` does so for a T1 map in s or ms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .plausibility import T1_MAX_S
from .units import MS_PER_S

log = logging.getLogger(__name__)

#: Largest difference (mm) between two IJK->RAS matrices that still counts as the same grid.
SAME_GRID_TOL_MM = 1e-4


@dataclass
class Volume:
    """A 3D volume: ``array`` (K, J, I), its IJK->RAS matrix (mm) and a name for messages."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    name: str = "volume"


def voxel_volume_mm3(matrix) -> float:
    """Volume of one voxel (mm^3) for an IJK->RAS matrix (handles oblique and flipped axes)."""
    return float(abs(np.linalg.det(np.asarray(matrix, dtype=float)[:3, :3])))


def same_grid(shape_a, matrix_a, shape_b, matrix_b, tol_mm: float = SAME_GRID_TOL_MM) -> bool:
    """True when both grids have the same dimensions and IJK->RAS within ``tol_mm``."""
    return (tuple(shape_a) == tuple(shape_b)
            and float(np.max(np.abs(np.asarray(matrix_a, float) - np.asarray(matrix_b, float)))) <= tol_mm)


def on_grid(volume: Volume, shape_kji, matrix) -> np.ndarray:
    """``volume`` on the grid (``shape_kji``, ``matrix``) as float64: the array itself when the grids match,
    else resampled trilinearly, NaN farther than half a voxel outside the volume."""
    from scipy import ndimage

    arr = np.asarray(volume.array, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{volume.name}: expected a 3D scalar volume, got shape {arr.shape}")
    if same_grid(arr.shape, volume.ijk_to_ras, shape_kji, matrix):
        return arr
    a = np.linalg.inv(np.asarray(volume.ijk_to_ras, float)) @ np.asarray(matrix, float)   # target ijk -> source ijk
    p = np.eye(4)[[2, 1, 0, 3]]                                                            # (i, j, k) <-> (k, j, i)
    a = p @ a @ p
    log.info("%s is on another grid: resampled to the DCE grid (trilinear)", volume.name)
    grid = np.indices(tuple(shape_kji), dtype=np.float64).reshape(3, -1)
    coords = a[:3, :3] @ grid + a[:3, 3:4]
    out = ndimage.map_coordinates(arr, coords, order=1, mode="nearest")
    outside = np.any((coords < -0.5) | (coords > np.array(arr.shape)[:, None] - 0.5), axis=0)
    out[outside] = np.nan
    return out.reshape(tuple(shape_kji))


def t1_on_grid(t1: Volume, shape_kji, matrix, unit: str = "auto") -> tuple:
    """A T1 map on the DCE grid in s, and the unit it was read in.

    ``unit``: "s", "ms" or "auto" (a median above 10 means ms - no tissue T1 exceeds 10 s). Returns
    (T1 (K, J, I) in s, NaN outside the map; "s" or "ms")."""
    arr = np.asarray(t1.array, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{t1.name}: expected a 3D scalar volume, got shape {arr.shape}")
    positive = arr[np.isfinite(arr) & (arr > 0)]
    if positive.size == 0:
        raise ValueError(f"{t1.name}: has no positive T1 value - check the volume")
    if unit == "auto":
        unit = "ms" if np.median(positive) > 10 else "s"
    if unit not in ("s", "ms"):
        raise ValueError(f"{t1.name} unit {unit!r}: use 's', 'ms' or 'auto'")
    median_s = float(np.median(positive)) / (MS_PER_S if unit == "ms" else 1.0)
    if not 0.01 <= median_s <= T1_MAX_S:
        other = "s" if unit == "ms" else "ms"
        raise ValueError(f"{t1.name}: median T1 {median_s:g} s when read in {unit} - no tissue has that; the map is "
                         f"in {other}: set the T1 map unit to '{other}' or 'auto'")
    if unit == "ms":
        arr = arr / MS_PER_S
    return on_grid(Volume(arr, t1.ijk_to_ras, t1.name), shape_kji, matrix), unit
