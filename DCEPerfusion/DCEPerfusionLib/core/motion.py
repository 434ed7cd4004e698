"""Motion of a DCE series between frames: the record of a correction, the rigid parameters reported for
each frame and the model-driven targets (numpy only; the registration itself is SimpleITK's, in
:mod:`..files.motion`, handed to :func:`pipeline.analyse` as ``frame_registration``).

Conventions. Every frame is registered to a reference image: by default the mean of the last frames,
when the enhancement has plateaued (so that early frames, whose contrast differs, are matched with
mutual information and the late ones almost by identity). A frame's transform maps a point of the
reference position (LPS, mm) to where that tissue is in the frame - the transform ITK's registration of
the frame (moving) to the reference (fixed) returns, and the one that resamples the frame into the
reference position. The masks (lesions, reference, AIF) and the T1 map are taken to be in the reference
position. Rigid parameters are those of SimpleITK's ``Euler3DTransform`` about the reference volume's
centre (rotation R = Rz Rx Ry, angles about x, y, z in degrees); for an affine transform, those of its
nearest rotation (polar decomposition) with the same translation.

The model-driven correction (the idea of model-driven registration as the mdreg package implements it:
fit, register each frame to the frame the fitted model predicts for it, refit) keeps the contrast uptake
itself from being taken for motion: a frame and its target differ only by the motion.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from . import concentration, registry

log = logging.getLogger(__name__)

#: The motion corrections a user can choose: key -> title (kept in the plain-Python registry, which the
#: command line and the Slicer module read before numpy loads).
MOTION_CORRECTIONS = registry.MOTION_CORRECTIONS
#: Default number of last frames whose mean is the reference image.
REFERENCE_FRAMES = registry.DEFAULT_OPTIONS["motion_reference_frames"]
#: Rounds of fit-and-register of the model-driven correction (after the first rigid pass).
MODEL_ROUNDS = 2
#: A largest displacement above this many voxels (of the smallest spacing) is warned about.
WARN_VOXELS = 1.0
#: RAS <-> LPS.
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def check_choice(kind, what: str = "motion correction") -> str:
    """The motion-correction key ``kind`` (lower case); ValueError naming the choices otherwise."""
    key = str(kind if kind is not None else "none").strip().lower()
    if key not in MOTION_CORRECTIONS:
        raise ValueError(f"{what} {kind!r}: use one of {', '.join(MOTION_CORRECTIONS)}")
    return key


def check_reference_frames(n, n_frames: int | None = None) -> int:
    """The number of last frames averaged into the reference (a whole number >= 1, and below the
    number of frames when that is known); ValueError naming the fix otherwise."""
    try:
        value = int(n)
    except (TypeError, ValueError):
        raise ValueError(f"motion reference frames = {n!r}: give a whole number of last frames (e.g. 5)") from None
    if value < 1 or value != float(n):
        raise ValueError(f"motion reference frames = {n}: must be a whole number of at least 1 (the last frames, "
                         "when the enhancement has plateaued; default 5)")
    if n_frames is not None and value >= n_frames:
        raise ValueError(f"motion reference frames = {value}: the series has only {n_frames} frames - use fewer "
                         "last frames (default 5)")
    return value


def reference_frames(n_frames: int, n_last: int = REFERENCE_FRAMES) -> list:
    """Indices of the frames whose mean is the reference: the last ``n_last``."""
    n_last = check_reference_frames(n_last, n_frames)
    return list(range(n_frames - n_last, n_frames))


# ---------------------------------------------------------------------------------------- transforms
def euler_matrix(params, center_lps) -> np.ndarray:
    """The 4x4 (LPS, mm) of SimpleITK's ``Euler3DTransform`` with ``params`` (tx, ty, tz mm, rx, ry, rz
    degrees) about ``center_lps``: x -> R (x - c) + c + t, R = Rz Rx Ry. ``params`` may be (..., 6)."""
    p = np.asarray(params, dtype=float)
    ax, ay, az = (np.radians(p[..., k]) for k in (3, 4, 5))
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    r = np.empty(p.shape[:-1] + (3, 3))
    r[..., 0, 0] = cz * cy - sz * sx * sy
    r[..., 0, 1] = -sz * cx
    r[..., 0, 2] = cz * sy + sz * sx * cy
    r[..., 1, 0] = sz * cy + cz * sx * sy
    r[..., 1, 1] = cz * cx
    r[..., 1, 2] = sz * sy - cz * sx * cy
    r[..., 2, 0] = -cx * sy
    r[..., 2, 1] = sx
    r[..., 2, 2] = cx * cy
    c = np.asarray(center_lps, dtype=float)
    m = np.zeros(p.shape[:-1] + (4, 4))
    m[..., :3, :3] = r
    m[..., :3, 3] = p[..., :3] + c - np.einsum("...ij,j->...i", r, c)
    m[..., 3, 3] = 1.0
    return m


def euler_parameters(matrix, center_lps) -> np.ndarray:
    """(tx, ty, tz mm, rx, ry, rz degrees) of a 4x4 (LPS) as SimpleITK's ``Euler3DTransform`` about
    ``center_lps`` (the inverse of :func:`euler_matrix`). An affine matrix gives the parameters of its
    nearest rotation (polar decomposition) and its translation at the centre."""
    m = np.asarray(matrix, dtype=float)
    a = m[:3, :3]
    u, _, vt = np.linalg.svd(a)
    r = u @ vt
    if np.linalg.det(r) < 0:                      # a reflection is no motion; keep the nearest rotation
        u[:, -1] *= -1
        r = u @ vt
    ax = math.asin(max(-1.0, min(1.0, r[2, 1])))
    if abs(math.cos(ax)) > 1e-12:
        ay = math.atan2(-r[2, 0], r[2, 2])
        az = math.atan2(-r[0, 1], r[1, 1])
    else:                                          # gimbal lock: rz carries the rotation
        ay, az = 0.0, math.atan2(r[1, 0], r[0, 0])
    c = np.asarray(center_lps, dtype=float)
    t = m[:3, 3] - c + a @ c                       # x -> A (x - c) + c + t
    return np.array([t[0], t[1], t[2], math.degrees(ax), math.degrees(ay), math.degrees(az)])


def box_corners_lps(shape_kji, ijk_to_ras, mask=None) -> np.ndarray:
    """The 8 corners (LPS, mm) of the bounding box of ``mask`` (K, J, I) - the fit region - or of the
    whole volume, at voxel centres."""
    shape = tuple(shape_kji)
    if mask is not None and np.any(mask):
        idx = np.nonzero(mask)
        lo = [int(v.min()) for v in idx][::-1]             # (i, j, k)
        hi = [int(v.max()) for v in idx][::-1]
    else:
        lo, hi = [0, 0, 0], [shape[2] - 1, shape[1] - 1, shape[0] - 1]
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return (LPS @ np.asarray(ijk_to_ras, dtype=float) @ corners.T).T[:, :3]


def centre_lps(shape_kji, ijk_to_ras) -> np.ndarray:
    """The centre (LPS, mm) of a volume: the middle of its voxel centres."""
    k, j, i = (np.asarray(shape_kji, dtype=float) - 1) / 2
    return (LPS @ np.asarray(ijk_to_ras, dtype=float) @ np.array([i, j, k, 1.0]))[:3]


def displacements_mm(transforms_lps, points_lps) -> np.ndarray:
    """(T,) the largest displacement (mm) of ``points_lps`` (N, 3) under each of ``transforms_lps`` (T, 4, 4)."""
    p = np.c_[np.asarray(points_lps, dtype=float), np.ones(len(points_lps))]
    moved = np.einsum("tij,nj->tni", np.asarray(transforms_lps, dtype=float), p)[..., :3]
    return np.linalg.norm(moved - p[None, :, :3], axis=-1).max(axis=1)


def smallest_spacing_mm(ijk_to_ras) -> float:
    """The smallest voxel spacing (mm) of a grid: the "voxel" of the motion figures and warnings."""
    return float(np.linalg.norm(np.asarray(ijk_to_ras, dtype=float)[:3, :3], axis=0).min())


# -------------------------------------------------------------------------------------------- record
@dataclass
class MotionEstimate:
    """A motion correction of a series of T frames.

    kind : "rigid", "affine" or "model"; transforms_lps : (T, 4, 4) each frame's transform (reference
    position -> frame, LPS mm; module doc); center_lps : the reference volume's centre (mm) the rigid
    parameters are about; parameters : (T, 6) tx, ty, tz (mm), rx, ry, rz (degrees) (:func:`euler_parameters`);
    displacement_mm : (T,) largest displacement of the fit region's corners; reference_frames : the
    frames averaged into the reference; voxel_mm : the smallest spacing; rounds : registration passes
    (1, or 1 + the model-driven rounds); metric : (T,) the final Mattes mutual information of each
    frame (more negative = better); timings_s : seconds spent registering and resampling."""

    kind: str
    transforms_lps: np.ndarray
    center_lps: np.ndarray
    parameters: np.ndarray
    displacement_mm: np.ndarray
    reference_frames: list
    voxel_mm: float
    rounds: int = 1
    metric: np.ndarray | None = None
    timings_s: dict = field(default_factory=dict)

    @property
    def max_displacement_mm(self) -> float:
        return float(np.max(self.displacement_mm)) if self.displacement_mm.size else 0.0

    @property
    def max_displacement_voxels(self) -> float:
        return self.max_displacement_mm / self.voxel_mm

    @property
    def unregistered_frames(self) -> list:
        """The frames the registration left in place (metric NaN: a constant frame, e.g. a dropped one)."""
        return [] if self.metric is None else [int(f) for f in np.flatnonzero(np.isnan(self.metric))]

    def summary(self) -> dict:
        """summary.json's ``motion`` entry."""
        worst = int(np.argmax(self.displacement_mm)) if self.displacement_mm.size else 0
        return {"correction": self.kind, "reference_frames": [int(f) for f in self.reference_frames],
                "max_displacement_mm": self.max_displacement_mm,
                "max_displacement_voxels": self.max_displacement_voxels, "frame_of_max_displacement": worst,
                "voxel_mm": self.voxel_mm, "rounds": int(self.rounds),
                "center_lps_mm": [float(x) for x in self.center_lps],
                "unregistered_frames": self.unregistered_frames, "timings_s": dict(self.timings_s)}

    def rows(self, t_s) -> list:
        """motion.csv's rows: frame, time_s, tx_mm, ty_mm, tz_mm, rx_deg, ry_deg, rz_deg, displacement_mm."""
        keys = ("tx_mm", "ty_mm", "tz_mm", "rx_deg", "ry_deg", "rz_deg")
        return [{"frame": f, "time_s": float(t_s[f]), **{k: float(v) for k, v in zip(keys, self.parameters[f])},
                 "displacement_mm": float(self.displacement_mm[f])} for f in range(len(self.displacement_mm))]

    def warning(self) -> str | None:
        """The warning for a motion above :data:`WARN_VOXELS` voxels and for frames left unregistered
        (one line), else None."""
        parts = []
        if self.max_displacement_voxels > WARN_VOXELS:
            worst = int(np.argmax(self.displacement_mm))
            parts.append(f"frames moved up to {self.max_displacement_mm:.1f} mm ({self.max_displacement_voxels:.1f} "
                         f"voxels, frame {worst}) and were registered to the mean of frames "
                         f"{self.reference_frames[0]}-{self.reference_frames[-1]} ({self.kind})")
        blank = self.unregistered_frames
        if blank:
            parts.append(f"frame(s) {', '.join(map(str, blank))} are constant (a dropped frame?) and were left "
                         "unregistered")
        if not parts:
            return None
        return "motion: " + "; ".join(parts) + "; check motion.csv and the corrected curves"


def estimate(kind, transforms_lps, shape_kji, ijk_to_ras, reference, *, fit_mask=None, rounds=1, metric=None,
             timings_s=None) -> MotionEstimate:
    """The :class:`MotionEstimate` of registered frames: parameters about the volume's centre and the
    displacement of the fit region's corners."""
    transforms = np.asarray(transforms_lps, dtype=float)
    c = centre_lps(shape_kji, ijk_to_ras)
    params = np.array([euler_parameters(m, c) for m in transforms]).reshape(-1, 6)
    disp = displacements_mm(transforms, box_corners_lps(shape_kji, ijk_to_ras, fit_mask))
    return MotionEstimate(kind=kind, transforms_lps=transforms, center_lps=c, parameters=params,
                          displacement_mm=disp, reference_frames=list(reference),
                          voxel_mm=smallest_spacing_mm(ijk_to_ras), rounds=int(rounds),
                          metric=None if metric is None else np.asarray(metric, dtype=float),
                          timings_s=dict(timings_s or {}))


# ------------------------------------------------------------------------------- model-driven targets
def predicted_signal(conc_model_mM, t10_s, *, tr_s, flip_angle_deg, r1_per_mM_s, fitted, reference,
                     reference_frames) -> np.ndarray:
    """The frames the fitted model predicts (K, J, I, T) for the model-driven registration.

    Inside the ``fitted`` voxels: the SPGR signal of the model's concentration (fitted voxels, T), scaled so
    that its mean over ``reference_frames`` is the ``reference`` image (K, J, I) there - the targets are
    tied to the reference position, not to the corrected baseline frames, which carry any error the first
    pass made on them (a contrast bias would otherwise be kept by every round). Elsewhere the reference
    image itself, so that unfitted anatomy still guides the registration."""
    ref = np.asarray(reference, dtype=np.float32)
    n_frames = np.shape(conc_model_mM)[-1]
    out = np.repeat(ref[..., None], n_frames, axis=-1)
    if not np.any(fitted):
        return out
    r10 = 1.0 / np.broadcast_to(np.asarray(t10_s, dtype=float), fitted.shape)[fitted]
    c = np.nan_to_num(np.asarray(conc_model_mM, dtype=np.float64))
    e = concentration.spgr_signal(r10[:, None] + r1_per_mM_s * c, tr_s, flip_angle_deg)
    scale = ref[fitted].astype(np.float64) / e[:, list(reference_frames)].mean(axis=1)
    out[fitted] = scale[:, None] * e
    return out
