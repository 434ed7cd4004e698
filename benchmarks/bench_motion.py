"""Speed and accuracy of DCEPerfusion's motion correction, side by side with plain SimpleITK, in one run.

Data: the spine phantom at (K, J, I) = (20, 256, 256) voxels of 1 x 1 x 4 mm (1,310,720 voxels), anatomy
varying across the slices, 60 frames of 5 s, moved by a known per-frame rigid motion (breathing up to 3 mm
and a 4.7 mm / 3.5 degree step halfway; ``phantom.breathing_and_step_motion``; trilinear ``move_series``
to save time). Both rows correct it rigidly:

  * ours: ``files.motion`` as ``pipeline.analyse(motion_correction="rigid")`` runs it - the reference (the
    last 5 frames registered among themselves and averaged), every frame registered to it, every frame
    resampled (cubic B-spline);
  * peer: a competent per-frame registration as SimpleITK's notebooks write it - reference the plain mean
    of the last 5 frames, ImageRegistrationMethod, Mattes MI (50 bins, 1 % random samples), centred
    Euler3D initialised on the geometry, shrink factors [4, 2, 1] with smoothing sigmas [2, 1, 0] voxels,
    scales from physical shift, RegularStepGradientDescent, trilinear resampling.

Reported per row: seconds for the reference, the registration, the resampling and the total (best of
``--repeats`` alternating runs), seconds per frame, and the accuracy: RMS over the frames of the error of
the L2 lesion centre's estimated displacement after removing the mean error of the 5 reference frames (the
reference's own position; reported as the offset). The machine's limits measured in the same run: a
pass over the series in memory, one metric evaluation at full resolution, the threads ITK uses.

    python3 run.py bench motion      (or: python benchmarks/bench_motion.py [--repeats 2] [--frames 60])
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import SimpleITK as sitk

from DCEPerfusionLib.core import motion, phantom
from DCEPerfusionLib.files import motion as files_motion
from DCEPerfusionLib.files.images import to_sitk

SHAPE = (20, 256, 256)
SPACING_MM = (1.0, 1.0, 4.0)
N_REFERENCE = motion.REFERENCE_FRAMES


def study(n_frames):
    """(moved signal float32 (K, J, I, T), IJK->RAS, true transforms (T, 4, 4), lesion centre LPS)."""
    ph = phantom.make_spine_phantom(shape=SHAPE, n_frames=n_frames, vertebra_width_slices=12)
    matrix = phantom.spine_matrix(spacing_mm=SPACING_MM)
    transforms = motion.euler_matrix(phantom.breathing_and_step_motion(ph.t_s), motion.centre_lps(SHAPE, matrix))
    moved = phantom.move_series(ph.signal, matrix, transforms, order=1)
    kji = np.argwhere(ph.labels == phantom.SPINE_LABELS["L2 metastasis"]).mean(axis=0)
    return moved, matrix, transforms, (motion.LPS @ matrix @ np.r_[kji[::-1], 1.0])[:3]


def accuracy_mm(estimated, truth, point_lps):
    """(RMS error mm of the point's displacement after the reference frames' mean error, that offset mm)."""
    p = np.r_[point_lps, 1.0]
    error = (np.einsum("tij,j->ti", estimated, p) - np.einsum("tij,j->ti", truth, p))[:, :3]
    offset = error[-N_REFERENCE:].mean(axis=0)
    return float(np.sqrt(np.mean(np.sum((error - offset) ** 2, axis=1)))), float(np.linalg.norm(offset))


def ours(signal, matrix):
    frames = list(range(signal.shape[-1] - N_REFERENCE, signal.shape[-1]))
    t0 = time.perf_counter()
    reference = files_motion.sharp_reference(signal, matrix, frames, "rigid")
    t1 = time.perf_counter()
    transforms, _ = files_motion.register_frames(signal, matrix, reference, "rigid")
    t2 = time.perf_counter()
    files_motion.resample_frames(signal, matrix, transforms)
    t3 = time.perf_counter()
    return {"reference": t1 - t0, "registration": t2 - t1, "resampling": t3 - t2}, transforms


def _affine_of(tf) -> np.ndarray:
    """The 4x4 of any 3-D SimpleITK transform, from where it sends the origin and the unit vectors."""
    o = np.array(tf.TransformPoint((0.0, 0.0, 0.0)))
    a = np.stack([np.array(tf.TransformPoint(tuple(float(x) for x in e))) - o for e in np.eye(3)], axis=1)
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = a, o
    return m


def peer(signal, matrix):
    """Per-frame registration and resampling as SimpleITK's notebooks show them."""
    t0 = time.perf_counter()
    fixed = to_sitk(signal[..., -N_REFERENCE:].mean(axis=-1).astype(np.float32), matrix)
    t1 = time.perf_counter()
    moving_images, transforms = [], []
    for f in range(signal.shape[-1]):
        moving = to_sitk(np.ascontiguousarray(signal[..., f]), matrix)
        initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                    sitk.CenteredTransformInitializerFilter.GEOMETRY)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.01, 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=100,
                                                     gradientMagnitudeTolerance=1e-8)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetInitialTransform(initial, inPlace=False)
        transforms.append(reg.Execute(fixed, moving))
        moving_images.append(moving)
    t2 = time.perf_counter()
    for moving, tf in zip(moving_images, transforms):
        sitk.GetArrayViewFromImage(sitk.Resample(moving, fixed, tf, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    t3 = time.perf_counter()
    return ({"reference": t1 - t0, "registration": t2 - t1, "resampling": t3 - t2},
            np.array([_affine_of(tf) for tf in transforms]))


def limits(signal, matrix):
    """(seconds for one pass over the series in memory, seconds per frame of a trilinear and of a cubic
    B-spline resampling - the least a correction that rewrites every voxel of every frame costs)."""
    t0 = time.perf_counter()
    float(np.sum(signal, dtype=np.float64))
    t_read = time.perf_counter() - t0
    img = to_sitk(np.ascontiguousarray(signal[..., 0]), matrix)
    tf = sitk.Euler3DTransform(tuple(float(x) for x in motion.centre_lps(signal.shape[:-1], matrix)), 0.02, 0.0, 0.0,
                               (0.5, 0.5, 0.5))
    out = []
    for interpolator in (sitk.sitkLinear, sitk.sitkBSpline):
        t0 = time.perf_counter()
        for _ in range(3):
            sitk.Resample(img, img, tf, interpolator, 0.0, sitk.sitkFloat32, True)
        out.append((time.perf_counter() - t0) / 3)
    return t_read, out[0], out[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of both rows (best reported)")
    ap.add_argument("--frames", type=int, default=60, help="frames of the series (default 60)")
    ap.add_argument("--no-peer", action="store_true", help="time our correction only")
    args = ap.parse_args()
    t0 = time.perf_counter()
    signal, matrix, truth, lesion_lps = study(args.frames)
    n_frames = signal.shape[-1]
    print(f"study: {SHAPE[::-1]} voxels (I, J, K) of {SPACING_MM} mm x {n_frames} frames, moved by a known rigid "
          f"motion (largest {motion.displacements_mm(truth, [lesion_lps]).max():.1f} mm at the L2 lesion), built "
          f"in {time.perf_counter() - t0:.1f} s; ITK threads: {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}")
    rows = (("ours", ours),) if args.no_peer else (("ours", ours), ("peer", peer))
    best = {name: None for name, _ in rows}
    found = {}
    for _ in range(args.repeats):
        for name, fn in rows:
            times, transforms = fn(signal, matrix)
            total = sum(times.values())
            if best[name] is None or total < sum(best[name].values()):
                best[name] = times
            found[name] = transforms
    print(f"\n{'rigid correction':<44} {'reference':>9} {'register':>9} {'resample':>9} {'total s':>9} "
          f"{'s/frame':>8} {'RMS mm':>7} {'voxels':>7} {'offset mm':>9}")
    voxel = motion.smallest_spacing_mm(matrix)
    titles = {"ours": "DCEPerfusion (files.motion, B-spline)", "peer": "plain SimpleITK (notebook style, linear)"}
    for name in best:
        t = best[name]
        total = sum(t.values())
        rms, offset = accuracy_mm(found[name], truth, lesion_lps)
        print(f"{titles[name]:<44} {t['reference']:9.1f} {t['registration']:9.1f} {t['resampling']:9.1f} "
              f"{total:9.1f} {total / n_frames:8.2f} {rms:7.2f} {rms / voxel:7.2f} {offset:9.2f}")
    if "peer" in best:
        ratio = sum(best["peer"].values()) / sum(best["ours"].values())
        print(f"peer / ours total time: {ratio:.2f}; registration per frame: ours "
              f"{best['ours']['registration'] / n_frames:.2f} s, peer {best['peer']['registration'] / n_frames:.2f} s")
    t_read, t_linear, t_cubic = limits(signal, matrix)
    print(f"machine: one pass over the series in memory {t_read:.2f} s; resampling one frame {t_linear:.3f} s "
          f"trilinear, {t_cubic:.3f} s cubic B-spline ({n_frames} frames: {n_frames * t_linear:.1f} s / "
          f"{n_frames * t_cubic:.1f} s)")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB")


if __name__ == "__main__":
    main()
