"""Treatment response of a lesion between a baseline and a follow-up DCE exam.

- :func:`assess_lesion`: percent change of vp, Ktrans, ve and kep (a chosen lesion statistic) and the
  plasma-volume call. A drop of vp after radiation means success; a smaller drop or a rise suggests
  failure: "suspected failure" when ΔVp > cut-off (default -20 %, Kumar et al., Technol Cancer Res
  Treat 2017; AJNR 2023;44:1451 found mean ΔVp -57.3 % in successes vs +88.2 % in failures).
  "indeterminate" (with the reason) when the call cannot be trusted.
- :func:`size_measures` / :func:`size_change`: the size comparator - longest axial diameter on the
  acquired slices, the longest perpendicular diameter, their product (WHO bidimensional) and the
  volume; "progression" when the longest diameter grows by >= 20 % (RECIST 1.1's threshold).
- :func:`register_rigid` / :func:`propagate_mask`: carry a lesion drawn on the baseline over to the
  follow-up by rigid registration (SimpleITK, Mattes mutual information, three resolutions).

numpy/scipy (SimpleITK for the registration). Geometry is given as Slicer's (K, J, I) arrays with
their 4x4 IJK->RAS matrix (mm).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .io import to_sitk

log = logging.getLogger(__name__)

RESPONSE_MAPS = ("vp", "ktrans", "ve", "kep")
STATISTICS = ("mean", "median", "percentile_90")
SUCCESS, FAILURE, INDETERMINATE = "success", "suspected failure", "indeterminate"
PROGRESSION, NO_PROGRESSION = "progression", "no progression"


# ============================================================================================ vp call
@dataclass
class ExamValues:
    """One lesion in one exam: ``values`` {map: statistic}, the voxels the statistics used and the
    segment voxels left out because the fit failed there."""

    values: dict
    voxel_count: int
    excluded_voxel_count: int

    @property
    def fitted_fraction(self) -> float:
        total = self.voxel_count + self.excluded_voxel_count
        return self.voxel_count / total if total else 0.0


def exam_values(rows, lesion: str, statistic: str = "mean") -> ExamValues | None:
    """Pick ``lesion``'s ``statistic`` of every map from region statistics rows (:mod:`regionstats`);
    None when the exam has no row for the lesion."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r}: use one of {', '.join(STATISTICS)}")
    mine = [r for r in rows if r.segment == lesion]
    if not mine:
        return None
    vp_row = next((r for r in mine if r.map == "vp"), mine[0])
    return ExamValues(values={r.map: float(r.values[statistic]) for r in mine},
                      voxel_count=int(vp_row.voxel_count), excluded_voxel_count=int(vp_row.excluded_voxel_count))


def percent_change(before: float, after: float) -> float:
    """100 (after - before) / before; NaN when before is 0 or either value is not finite."""
    if not (np.isfinite(before) and np.isfinite(after)) or before == 0:
        return float("nan")
    return 100.0 * (after - before) / before


@dataclass
class ResponseCall:
    """The vp-based call and what it rests on. call: SUCCESS, FAILURE or INDETERMINATE."""

    call: str
    reason: str
    delta_vp_pct: float
    cutoff_pct: float


@dataclass
class LesionResponse:
    """A lesion's response: the chosen statistic of each map at both exams, their percent changes,
    the voxel counts behind them, the vp call and (optionally) the size comparison."""

    lesion: str
    statistic: str
    baseline: dict
    followup: dict
    change_pct: dict
    voxel_counts: tuple
    call: ResponseCall
    size: "SizeChange | None" = None


def assess_lesion(baseline: ExamValues | None, followup: ExamValues | None, lesion: str = "lesion", *,
                  statistic: str = "mean", cutoff_pct: float = -20.0, min_baseline_vp: float = 0.005,
                  min_voxels: int = 10, min_fitted_fraction: float = 0.5, size=None) -> LesionResponse:
    """Percent changes and the vp call for one lesion.

    cutoff_pct : ΔVp (%) above which the call is "suspected failure" (default -20 %).
    min_baseline_vp : baseline vp (fraction) below which a percent change is not meaningful.
    min_voxels, min_fitted_fraction : each exam needs this many voxels with a good fit, and this
        fraction of the lesion's voxels fitted, for the call to be trusted.
    """
    if not np.isfinite(cutoff_pct):
        raise ValueError(f"cutoff_pct={cutoff_pct}: give the ΔVp cut-off in percent, e.g. -20")
    base = baseline.values if baseline else {}
    follow = followup.values if followup else {}
    change = {m: percent_change(base.get(m, np.nan), follow.get(m, np.nan)) for m in RESPONSE_MAPS
              if m in base or m in follow}
    dvp = change.get("vp", float("nan"))
    reasons = []
    for label, exam in (("baseline", baseline), ("follow-up", followup)):
        if exam is None:
            reasons.append(f"the {label} exam has no statistics for lesion {lesion!r}")
        elif "vp" not in exam.values:
            reasons.append(f"the {label} exam has no vp map (use a model with vp: Extended Tofts, Patlak, 2CXM)")
        elif exam.voxel_count < min_voxels or exam.fitted_fraction < min_fitted_fraction:
            reasons.append(f"{label}: {exam.voxel_count} voxels with a good fit ({100 * exam.fitted_fraction:.0f} % "
                           f"of the lesion); need >= {min_voxels} and >= {100 * min_fitted_fraction:.0f} %")
    if not reasons and not base["vp"] >= min_baseline_vp:
        reasons.append(f"baseline vp {base['vp']:.4f} is below {min_baseline_vp:g}: a percent change of so small a "
                       "plasma volume is not meaningful")
    if reasons:
        call = ResponseCall(INDETERMINATE, "; ".join(reasons), dvp, float(cutoff_pct))
    elif dvp > cutoff_pct:
        call = ResponseCall(FAILURE, f"ΔVp {dvp:+.1f} % is above the cut-off {cutoff_pct:+.0f} %", dvp,
                            float(cutoff_pct))
    else:
        call = ResponseCall(SUCCESS, f"ΔVp {dvp:+.1f} % is at or below the cut-off {cutoff_pct:+.0f} %", dvp,
                            float(cutoff_pct))
    counts = (baseline.voxel_count if baseline else 0, followup.voxel_count if followup else 0)
    return LesionResponse(lesion=lesion, statistic=statistic, baseline=dict(base), followup=dict(follow),
                          change_pct=change, voxel_counts=counts, call=call, size=size)


# ============================================================================================ size
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
                        bidimensional_mm2=longest * width, volume_cm3=n * voxel_mm3 / 1000.0, slice_index=k,
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


def size_change(baseline: SizeMeasures, followup: SizeMeasures, progression_pct: float = 20.0) -> SizeChange:
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


# ============================================================================================ registration
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Registration:
    """A rigid registration of the follow-up (moving) to the baseline (fixed).

    followup_to_baseline_ras : 4x4 matrix mapping follow-up RAS points (mm) onto the baseline - the
        transform to put the follow-up under in Slicer to see it aligned;
    final_metric : Mattes mutual information at the end (more negative = better);
    rotation_deg, translation_mm : size of the motion found; stop : the optimizer's stop condition."""

    followup_to_baseline_ras: np.ndarray
    final_metric: float
    rotation_deg: float
    translation_mm: float
    stop: str
    iterations: int = 0
    metric_per_level: list = field(default_factory=list)


def register_rigid(fixed_kji, fixed_matrix, moving_kji, moving_matrix, *, fixed_mask=None, seed: int = 1,
                   sampling_fraction: float = 0.25, iterations: int = 200) -> Registration:
    """Rigid (6 degrees of freedom) registration of the follow-up image to the baseline image.

    Mattes mutual information (50 bins, random sampling), regular-step gradient descent with scales
    from physical shifts, three resolutions (shrink 4, 2, 1; smoothing 2, 1, 0 mm), started from the
    images' geometric centres. Use the anatomy or a late (enhanced) DCE frame of each exam.
    ``fixed_mask`` (K, J, I) limits the metric to a region (e.g. around the spine).
    """
    import SimpleITK as sitk

    fixed, moving = to_sitk(fixed_kji, fixed_matrix), to_sitk(moving_kji, moving_matrix)
    for name, img in (("baseline image", fixed), ("follow-up image", moving)):
        arr = sitk.GetArrayViewFromImage(img)
        if not np.all(np.isfinite(arr)) or arr.max() == arr.min():
            raise ValueError(f"{name}: must be finite and not constant to be registered")
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling_fraction), seed)
    if fixed_mask is not None:
        mask = sitk.Cast(to_sitk(np.asarray(fixed_mask, dtype=np.float32), fixed_matrix) > 0.5, sitk.sitkUInt8)
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=int(iterations),
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(initial, inPlace=False)
    levels = []
    reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: levels.append(reg.GetMetricValue()))
    transform = reg.Execute(fixed, moving)
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(transform).GetNthTransform(0))
    # ITK maps fixed (baseline) points to moving (follow-up) points, in LPS; Slicer wants the inverse in RAS
    a = np.eye(4)
    a[:3, :3] = np.array(euler.GetMatrix()).reshape(3, 3)
    a[:3, 3] = np.array(euler.GetTranslation()) + np.array(euler.GetCenter()) - a[:3, :3] @ np.array(euler.GetCenter())
    baseline_to_followup_ras = _LPS @ a @ _LPS
    followup_to_baseline = np.linalg.inv(baseline_to_followup_ras)
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(a[:3, :3]) - 1) / 2))))
    result = Registration(followup_to_baseline_ras=followup_to_baseline, final_metric=float(reg.GetMetricValue()),
                          rotation_deg=angle, translation_mm=float(np.linalg.norm(euler.GetTranslation())),
                          stop=reg.GetOptimizerStopConditionDescription(),
                          iterations=int(reg.GetOptimizerIteration()), metric_per_level=levels)
    log.info("rigid registration: metric %.4f, rotation %.2f deg, translation %.2f mm (%s)", result.final_metric,
             result.rotation_deg, result.translation_mm, result.stop)
    return result


def propagate_mask(mask_kji, baseline_matrix, followup_shape, followup_matrix, registration: Registration):
    """The baseline lesion mask carried onto the follow-up grid (nearest neighbour) through the
    registration: a follow-up voxel is in the lesion when its aligned baseline position is."""
    import SimpleITK as sitk

    src = to_sitk(np.asarray(mask_kji, dtype=np.float32), baseline_matrix)
    ref = to_sitk(np.zeros(tuple(followup_shape), dtype=np.float32), followup_matrix)
    m = _LPS @ registration.followup_to_baseline_ras @ _LPS   # follow-up LPS -> baseline LPS
    tf = sitk.AffineTransform(3)
    tf.SetMatrix([float(x) for x in m[:3, :3].ravel()])
    tf.SetTranslation([float(x) for x in m[:3, 3]])
    out = sitk.Resample(src, ref, tf, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out) > 0.5
