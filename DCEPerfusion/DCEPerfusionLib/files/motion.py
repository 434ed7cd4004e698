"""Frame-to-reference registration of a DCE series with SimpleITK (bundled with Slicer): what
:func:`pipeline.analyse` calls for ``motion_correction`` through :data:`FRAME_REGISTRATION`.

Each frame is registered to its target (the reference image, or its model-predicted frame) with Mattes
mutual information - the contrast changes intensities between frames - and a regular-step gradient
descent, over a pyramid of three resolutions built once per image by block averaging (``BinShrink``;
in-plane factors 4, 2, 1 and through-plane factors that keep the voxels about as thick as wide, so that
20 thick slices are not averaged away) and smoothed by one voxel of its level's smallest spacing. A frame
starts from the previous frame's transform. The metric is evaluated in one thread (reproducible transforms;
ITK's threads gained about 5 %), the resampling uses ITK's threads on every core (SimpleITK keeps Python's
GIL, so frames are not run in parallel Python threads). Frames are
resampled with a cubic B-spline; samples that came from outside the field of view are NaN. Conventions
of the transforms: :mod:`..core.motion`.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from ..core import motion as core_motion
from ..core.fitting import FitCancelled
from .images import LPS, affine_of, matrix_of_transform, to_sitk

log = logging.getLogger(__name__)

#: In-plane shrink factors of the pyramid, coarse to fine.
PYRAMID = (4, 2, 1)
#: Metric samples per level (random, fixed seed); fewer when the region has fewer voxels.
SAMPLES = (3000, 5000, 6000)
#: Largest optimizer step per level (mm of the fit region's motion) and iterations per level.
STEP_MM = (2.0, 1.0, 0.5)
ITERATIONS = (60, 30, 20)
MIN_STEP_MM = 0.01
#: The fewest voxels along an axis that a registration takes (ITK's smoothing needs 4).
MIN_VOXELS = 4
#: A resampled point this many voxels beyond the outermost voxel centres still takes the edge voxel's value
#: (:func:`resample_frames`); farther out it is NaN.
EDGE_VOXELS = 1.0
HISTOGRAM_BINS = 32
SEED = 7
#: Gaussian smoothing of every level, in voxels of its smallest spacing.
SMOOTH_VOXELS = 1.0


def INTERPOLATOR():
    """How frames are resampled into the reference position: cubic B-spline (as SPM's realignment; linear
    interpolation blurs every moved frame by up to half a voxel, which mixes a lesion's baseline with the
    bright fatty marrow around it)."""
    import SimpleITK as sitk
    return sitk.sitkBSpline


def _levels(spacing_xyz, size_xyz):
    """[(shrink x, y, z)] per pyramid level: the in-plane factors of :data:`PYRAMID` for the smallest
    spacing, each axis shrunk so its voxels are about as large (never to fewer than 8 voxels)."""
    smallest = min(spacing_xyz)
    levels = []
    for f in PYRAMID:
        shrink = []
        for sp, n in zip(spacing_xyz, size_xyz):
            s = max(1, int(round(f * smallest / sp)))
            while s > 1 and n // s < 8:
                s -= 1
            shrink.append(s)
        if not levels or shrink != levels[-1]:
            levels.append(shrink)
    return levels


def _pyramid(img, levels):
    """The image at every level: block-averaged, then smoothed by a Gaussian of :data:`SMOOTH_VOXELS` of the
    level's smallest spacing - without it the mutual information of noisy images peaks between voxels
    (interpolation averages the noise), and a still frame would be moved by half a voxel."""
    import SimpleITK as sitk
    out = []
    for shrink in levels:
        small = img if all(s == 1 for s in shrink) else sitk.BinShrink(img, shrink)
        out.append(sitk.SmoothingRecursiveGaussian(small, SMOOTH_VOXELS * min(small.GetSpacing())))
    return out


def _transform(kind, center_lps, matrix_lps=None):
    """A SimpleITK transform of ``kind`` about the centre, set to the 4x4 ``matrix_lps`` (identity when None)."""
    import SimpleITK as sitk
    m = np.eye(4) if matrix_lps is None else np.asarray(matrix_lps, dtype=float)
    c = [float(x) for x in center_lps]
    if kind == "affine":
        tf = sitk.AffineTransform(3)
        tf.SetCenter(c)
        tf.SetMatrix([float(x) for x in m[:3, :3].ravel()])
    else:
        tf = sitk.Euler3DTransform()
        tf.SetCenter(c)
        p = core_motion.euler_parameters(m, center_lps)
        tf.SetRotation(*[float(np.radians(a)) for a in p[3:]])
        m = core_motion.euler_matrix(p, center_lps)            # the rotation part as set
    a = m[:3, :3]
    tf.SetTranslation([float(x) for x in m[:3, 3] - np.asarray(c) + a @ np.asarray(c)])
    return tf


def _scales(kind, radius_mm):
    """Optimizer scales so that a unit step of every parameter moves the region about equally: rotations
    and matrix elements move points up to ``radius_mm`` per unit (scale radius^2), translations 1."""
    r2 = float(radius_mm) ** 2
    if kind == "affine":
        return [r2] * 9 + [1.0] * 3
    return [r2] * 3 + [1.0] * 3


@contextlib.contextmanager
def _one_thread():
    """ITK's default thread count at 1 for the block, restored after: the metric's sums then run in a fixed
    order, so that a series gives the same transforms every time (with ITK's threads they differ by 1e-13 and
    the optimizer's path drifts apart over the model-driven rounds); the threads gained about 5 % here, and
    the resampling keeps every core. (``ImageRegistrationMethod.SetNumberOfThreads`` does not reach the
    metric's threads.)"""
    import SimpleITK as sitk
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _register_one(fixed_levels, moving_levels, kind, center, start, mask_img, scales, n_region):
    import SimpleITK as sitk
    tf = _transform(kind, center, start)
    metric = float("nan")
    for level, (fixed, moving) in enumerate(zip(fixed_levels, moving_levels)):
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
        n_voxels = n_region * np.prod(fixed.GetSize()) / np.prod(fixed_levels[-1].GetSize())
        fraction = min(1.0, SAMPLES[min(level, len(SAMPLES) - 1)] / max(n_voxels, 1.0))
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(float(fraction), SEED)
        if mask_img is not None:
            reg.SetMetricFixedMask(mask_img)
        reg.SetMetricUseMovingImageGradientFilter(False)   # gradients at the samples only: faster
        reg.SetInterpolator(sitk.sitkLinear)
        step = STEP_MM[min(level, len(STEP_MM) - 1)]
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=step, minStep=MIN_STEP_MM,
                                                     numberOfIterations=ITERATIONS[min(level, len(ITERATIONS) - 1)],
                                                     relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
        reg.SetOptimizerScales(scales)
        reg.SetInitialTransform(tf, inPlace=True)
        with _one_thread():
            reg.Execute(fixed, moving)
        metric = float(reg.GetMetricValue())
    return matrix_of_transform(tf), metric


def _constant(frame, mask=None) -> bool:
    """True when the finite samples of ``frame`` (K, J, I) - inside ``mask`` when given - have no range
    (or there are none): an image registration cannot align."""
    a = np.asarray(frame)
    if mask is not None and np.any(mask):
        a = a[np.asarray(mask, dtype=bool)]
    a = a[np.isfinite(a)]
    return a.size == 0 or float(a.max()) <= float(a.min())


def register_frames(signal, ijk_to_ras, target, kind: str = "rigid", *, mask=None, initial=None, progress=None):
    """Register every frame of ``signal`` (K, J, I, T) to its target.

    target : (K, J, I) the one reference image, or (K, J, I, T) a target per frame (model-driven).
    kind : "rigid" (Euler 3D) or "affine". mask : the fit region (K, J, I), where the metric is sampled.
    initial : (T, 4, 4) starting transforms (e.g. the previous round's); else each frame starts from the
        previous frame's result. progress : callable(done, total) -> bool | None; False cancels
        (:class:`FitCancelled`). Returns (transforms (T, 4, 4) reference -> frame in LPS mm, the final
        mutual information per frame (T,)). A constant frame (no finite sample differs, e.g. a dropped frame
        of zeros; or a constant target) is not registered: identity transform, metric NaN, a logged warning.
        NaN and infinite samples count as 0 in the metric."""
    import SimpleITK as sitk

    signal = np.asarray(signal)
    n_frames = signal.shape[-1]
    kind = "affine" if kind == "affine" else "rigid"
    shape = signal.shape[:-1]
    if min(shape) < MIN_VOXELS:
        raise ValueError(f"motion correction: the series is {shape[0]} x {shape[1]} x {shape[2]} voxels (K, J, I) - "
                         f"registering frames needs at least {MIN_VOXELS} voxels along every axis; turn motion "
                         "correction off for this series")
    center = core_motion.centre_lps(shape, ijk_to_ras)
    corners = core_motion.box_corners_lps(shape, ijk_to_ras, mask)
    radius = float(np.max(np.linalg.norm(corners - center, axis=1))) or 1.0
    scales = _scales(kind, radius)

    def image(a):
        return to_sitk(np.nan_to_num(np.asarray(a, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0), ijk_to_ras)

    first = image(signal[..., 0])
    levels = _levels(first.GetSpacing(), first.GetSize())
    mask_img, n_region = None, float(np.prod(shape))
    if mask is not None and np.any(mask):
        mask_img = sitk.Cast(to_sitk(np.asarray(mask, dtype=np.float32), ijk_to_ras) > 0.5, sitk.sitkUInt8)
        n_region = float(np.count_nonzero(mask))
    target = np.asarray(target)
    per_frame = target.ndim == signal.ndim
    fixed_levels = None if per_frame else _pyramid(image(target), levels)
    transforms = np.empty((n_frames, 4, 4))
    metric = np.empty(n_frames)
    start = None
    blank = []
    for f in range(n_frames):
        if progress is not None and progress(f, n_frames) is False:
            raise FitCancelled("cancelled by the user")
        if _constant(signal[..., f], mask) or (per_frame and _constant(target[..., f], mask)):
            # nothing to align (a dropped frame of zeros, say): Mattes MI has no histogram to build
            transforms[f], metric[f] = np.eye(4), np.nan
            blank.append(f)
            continue
        fixed_f = _pyramid(image(target[..., f]), levels) if per_frame else fixed_levels
        moving_f = _pyramid(image(signal[..., f]), levels)
        begin = initial[f] if initial is not None else start
        try:
            transforms[f], metric[f] = _register_one(fixed_f, moving_f, kind, center, begin, mask_img, scales,
                                                     n_region)
        except RuntimeError as e:           # ITK's exception text: many lines; its last is the reason
            reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1:] or ["unknown"]
            raise ValueError(f"motion correction: the registration of frame {f} failed ({reason[0][:200]}) - check "
                             "that the frames overlap the reference (a fit mask inside the volume, not at its "
                             "edge), or turn motion correction off") from None
        start = transforms[f]
    if blank:
        log.warning("motion: frame(s) %s are constant (no image to align) and were left in place", blank)
    if progress is not None:
        progress(n_frames, n_frames)
    return transforms, metric


def sharp_reference(signal, ijk_to_ras, frames, kind: str = "rigid", mask=None, progress=None) -> np.ndarray:
    """The reference image: the mean of ``frames`` after registering them to their plain mean (a patient
    who breathes blurs the plain mean, and a blurred reference pulls every frame off by a fraction of the
    blur). (K, J, I) float32, in the mean position of those frames. ``progress`` as in
    :func:`register_frames` (False cancels)."""
    signal = np.asarray(signal)
    frames = list(frames)
    plain = signal[..., frames].mean(axis=-1)
    if len(frames) == 1:
        return plain.astype(np.float32)
    halves = (None, None) if progress is None else (lambda done, total: progress(done, 2 * total),
                                                    lambda done, total: progress(total + done, 2 * total))
    transforms, _ = register_frames(signal[..., frames], ijk_to_ras, plain, kind, mask=mask, progress=halves[0])
    aligned = resample_frames(signal[..., frames], ijk_to_ras, transforms, progress=halves[1])
    seen = np.isfinite(aligned)
    total = np.where(seen, aligned, 0.0).sum(axis=-1)
    count = seen.sum(axis=-1)                     # at the edges, the frames that saw the point
    return np.where(count > 0, total / np.maximum(count, 1), plain).astype(np.float32)


def resample_frames(signal, ijk_to_ras, transforms_lps, progress=None) -> np.ndarray:
    """Every frame resampled into the reference position (:func:`INTERPOLATOR`, cubic B-spline):
    corrected[f](x) = frame f at transforms_lps[f](x), float32, a new array. Where that point lies more than
    :data:`EDGE_VOXELS` beyond frame f's outermost voxel centres (tissue that came from outside the field of
    view) the sample is NaN: its curve would mix tissues, so the voxel is not fitted; closer to the edge the
    nearest voxel is used. Non-finite samples stay NaN where they land (and in the voxels next to them),
    without spreading. ``progress`` : callable(done, total) -> bool | None; False cancels
    (:class:`FitCancelled`)."""
    import SimpleITK as sitk

    signal = np.asarray(signal)
    shape = signal.shape[:-1]
    # frame by frame into a (T, K, J, I) buffer, transposed once at the end: writing each frame into the
    # interleaved (K, J, I, T) layout touches a cache line per voxel and costs ~0.1 s a 256x256x20 frame
    out = np.empty((signal.shape[-1],) + signal.shape[:-1], dtype=np.float32)
    for f in range(signal.shape[-1]):
        if progress is not None and progress(f, signal.shape[-1]) is False:
            raise FitCancelled("cancelled by the user")
        m = np.asarray(transforms_lps[f], dtype=float)
        if np.allclose(m, np.eye(4), atol=1e-9):
            out[f] = signal[..., f]
            continue
        frame = signal[..., f]
        bad = ~np.isfinite(frame)
        tf = affine_of(m)
        img = to_sitk(np.where(bad, 0.0, frame).astype(np.float32) if bad.any() else frame, ijk_to_ras)
        moved = sitk.Resample(img, img, tf, INTERPOLATOR(), 0.0, sitk.sitkFloat32, True)
        out[f] = sitk.GetArrayViewFromImage(moved)
        if bad.any():
            # the B-spline prefilter runs along whole lines: one NaN would empty the frame, so the samples
            # are resampled as 0 and NaN again wherever a non-finite sample contributes (trilinearly)
            spread = sitk.Resample(to_sitk(bad.astype(np.float32), ijk_to_ras), img, tf, sitk.sitkLinear, 0.0,
                                   sitk.sitkFloat32, True)
            out[f][sitk.GetArrayViewFromImage(spread) > 0] = np.nan
        out[f][~_inside(shape, ijk_to_ras, m)] = np.nan
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def _inside(shape, ijk_to_ras, transform_lps) -> np.ndarray:
    """(K, J, I) bool: the voxels whose point ``transform_lps`` maps within :data:`EDGE_VOXELS` of the
    volume's outermost voxel centres."""
    index_to_lps = LPS @ np.asarray(ijk_to_ras, dtype=float)
    back = np.linalg.inv(index_to_lps) @ np.asarray(transform_lps, dtype=float) @ index_to_lps   # index -> index
    inside = np.ones(tuple(shape), dtype=bool)
    axes = [np.arange(n, dtype=float) for n in shape[::-1]]                     # i, j, k
    for row, n in zip(range(3), shape[::-1]):
        # the row'th index of the mapped point, summed over the three axes without a full grid per term
        value = (back[row, 0] * axes[0][None, None, :] + back[row, 1] * axes[1][None, :, None]
                 + back[row, 2] * axes[2][:, None, None] + back[row, 3])
        inside &= (value >= -EDGE_VOXELS) & (value <= n - 1 + EDGE_VOXELS)
    return inside


class _SimpleITKFrameRegistration:
    """The frame registration :func:`pipeline.analyse` uses (``reference``, ``register``, ``resample``)."""

    reference = staticmethod(sharp_reference)
    register = staticmethod(register_frames)
    resample = staticmethod(resample_frames)


#: Hand this to :func:`pipeline.analyse` as ``frame_registration``.
FRAME_REGISTRATION = _SimpleITKFrameRegistration()
