"""Rigid registration of a follow-up exam to its baseline and the lesion carried over (SimpleITK).

:func:`register_rigid` aligns two images (Mattes mutual information, three resolutions);
:func:`propagate_mask` carries a baseline lesion mask onto the follow-up grid through it. Geometry as
Slicer's (K, J, I) arrays with their 4x4 IJK->RAS matrix (mm).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .images import LPS, affine_of, matrix_of_transform, to_sitk

log = logging.getLogger(__name__)


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
    a = matrix_of_transform(euler)
    baseline_to_followup_ras = LPS @ a @ LPS
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
    m = LPS @ registration.followup_to_baseline_ras @ LPS   # follow-up LPS -> baseline LPS
    out = sitk.Resample(src, ref, affine_of(m), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out) > 0.5
