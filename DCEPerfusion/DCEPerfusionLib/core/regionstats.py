"""Statistics of parameter maps inside regions (segments), numpy only.

The statistic names are those of Slicer's Segment Statistics module (voxel_count, volume_cm3, mean,
stdev, median, percentile_10, percentile_90, min, max) so users recognise them. Voxels whose fit
failed (a NaN map value, i.e. fit status 3-6; with the model chosen per voxel also ve and kep where
Patlak was chosen) are left out and counted in ``excluded_voxel_count``.
``stdev`` is the sample standard deviation (ddof=1), ``percentile_*`` use numpy's linear interpolation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .registry import MAPS, statistics_maps
from .units import MM3_PER_CM3

log = logging.getLogger(__name__)

#: The value statistics, in table order.
STAT_NAMES = ("mean", "stdev", "median", "percentile_10", "percentile_90", "min", "max")


@dataclass
class RegionStats:
    """Statistics of one map inside one region.

    segment: region name; map: map key (``registry.MAPS``); unit: the map's unit;
    voxel_count: voxels used; volume_cm3: their volume; excluded_voxel_count: region voxels left out
    because the fit failed there; values: ``STAT_NAMES`` -> value (NaN when no voxel is usable)."""

    segment: str
    map: str
    unit: str
    voxel_count: int
    volume_cm3: float
    excluded_voxel_count: int
    values: dict = field(default_factory=dict)


def region_statistics(maps: dict, masks: dict, voxel_volume_mm3: float, map_names=None) -> list[RegionStats]:
    """Statistics of each map in each region.

    maps : {name: array (...)}        parameter maps (NaN where not fitted), all of one shape.
    masks : {segment name: bool array (...)}  regions on the same grid as the maps.
    voxel_volume_mm3 : float          volume of one voxel, mm^3.
    map_names : iterable, optional    maps to report (default: every map ``registry.MapInfo.statistics``
                                      marks - not the status, model codes, AICc and standard errors).

    Returns one :class:`RegionStats` per (segment, map), segments in the order given. An empty region
    gives voxel_count 0 and NaN statistics (with a logged warning), never an error.
    """
    if not np.isfinite(voxel_volume_mm3) or voxel_volume_mm3 <= 0:
        raise ValueError(f"voxel_volume_mm3={voxel_volume_mm3}: must be a positive volume in mm^3")
    names = statistics_maps(maps) if map_names is None else list(map_names)
    for name in names:
        if name not in maps:
            raise ValueError(f"map_names: no map {name!r}; available: {', '.join(maps)}")
    shape = None
    for name in names:
        if shape is None:
            shape = np.shape(maps[name])
        elif np.shape(maps[name]) != shape:
            raise ValueError(f"maps: {name!r} has shape {np.shape(maps[name])}, expected {shape} like the others")
    rows = []
    for seg_name, mask in masks.items():
        m = np.asarray(mask, dtype=bool)
        if shape is not None and m.shape != shape:
            raise ValueError(f"masks: region {seg_name!r} has shape {m.shape}; the maps have shape {shape} "
                             "(export the segment on the map grid)")
        n_region = int(m.sum())
        if n_region == 0:
            log.warning("region statistics: segment %r is empty on the map grid - its statistics are NaN", seg_name)
        for name in names:
            values = np.asarray(maps[name])[m].astype(np.float64)
            good = values[np.isfinite(values)]
            rows.append(RegionStats(
                segment=str(seg_name), map=name, unit=MAPS[name].unit if name in MAPS else "",
                voxel_count=int(good.size),
                volume_cm3=good.size * float(voxel_volume_mm3) / MM3_PER_CM3,
                excluded_voxel_count=n_region - int(good.size), values=_describe(good)))
        n_bad = rows[-1].excluded_voxel_count if names else 0
        if n_region and n_bad:
            log.info("region statistics: %d of %d voxels of %r left out (fit failed)", n_bad, n_region, seg_name)
    return rows


def _describe(v: np.ndarray) -> dict:
    if v.size == 0:
        return {k: float("nan") for k in STAT_NAMES}
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {"mean": float(v.mean()), "stdev": float(v.std(ddof=1)) if v.size > 1 else 0.0, "median": float(p50),
            "percentile_10": float(p10), "percentile_90": float(p90), "min": float(v.min()), "max": float(v.max())}
