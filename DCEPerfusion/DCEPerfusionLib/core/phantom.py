"""Synthetic DCE-MRI volume with known kinetic parameters (numpy only).

A block of tissue (muscle-like background), a spherical lesion with high plasma volume, and a
cylindrical artery carrying the arterial input. Tissue curves come from the Extended Tofts model
with the Parker AIF; signals from the SPGR equation with Rician noise, so the whole chain
signal -> concentration -> fit can be checked against the truth. Arrays are (K, J, I) like every
other volume of the library, series (K, J, I, T); ``shape`` arguments are (K, J, I) too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import aif, concentration, models

#: Kinetic parameters per tissue class: (Ktrans 1/min, ve, vp, T10 s).
TISSUES = {
    "muscle": (0.08, 0.15, 0.02, 1.4),
    "lesion": (0.25, 0.35, 0.10, 1.6),
}
LABELS = {"background": 0, "muscle": 1, "lesion": 2, "artery": 3}


@dataclass
class Phantom:
    """A synthetic study. Shapes: volumes (K, J, I), series (K, J, I, T).

    t_s: frame times (s); cp: plasma AIF (mM); signal: SPGR signal; conc: noise-free tissue
    concentration (mM); labels: LABELS codes; truth: {"ktrans", "ve", "vp", "kep"} maps (NaN outside
    tissue); t10_s: T1 map (s); acquisition: TR, flip angle, relaxivity, baseline frames, hct."""

    t_s: np.ndarray
    cp: np.ndarray
    signal: np.ndarray
    conc: np.ndarray
    labels: np.ndarray
    truth: dict
    t10_s: np.ndarray
    acquisition: dict


def make_phantom(shape=(4, 32, 32), n_frames: int = 60, frame_s: float = 5.0, bolus_s: float = 30.0,
                 snr: float = 40.0, tr_s: float = 0.004, flip_angle_deg: float = 15.0,
                 r1_per_mM_s: float = 5.0, hct: float = 0.42, seed: int = 0, tissues: dict | None = None) -> Phantom:
    """Build a :class:`Phantom` of ``shape`` (K, J, I) voxels: the lesion and the artery are cylinders along
    K. ``snr`` is baseline signal over noise standard deviation in the muscle.
    ``tissues`` overrides entries of :data:`TISSUES`, e.g. ``{"lesion": (0.25, 0.35, 0.05, 1.6)}`` for a
    follow-up exam whose lesion vp has halved."""
    unknown = set(tissues or {}) - set(TISSUES)
    if unknown:
        raise ValueError(f"tissues: unknown tissue(s) {sorted(unknown)}; the phantom has {sorted(TISSUES)}")
    tissue_params = {**TISSUES, **(tissues or {})}
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    t = np.arange(n_frames) * float(frame_s)
    cp = aif.parker(t, hct=hct, delay_s=bolus_s)
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    labels = np.full(shape, LABELS["muscle"], dtype=np.int16)
    r_lesion = 0.22 * min(ni, nj)
    lesion = (i - 0.6 * ni) ** 2 + (j - 0.5 * nj) ** 2 <= r_lesion**2
    artery = (i - 0.2 * ni) ** 2 + (j - 0.3 * nj) ** 2 <= (0.06 * min(ni, nj) + 0.5) ** 2
    labels[lesion] = LABELS["lesion"]
    labels[artery] = LABELS["artery"]

    params = {LABELS[name]: (*p, 1.0) for name, p in tissue_params.items()}
    conc, noisy, truth, t10 = _synthesize(labels, params, artery, t, cp, i, j, tr_s=tr_s, flip_angle_deg=flip_angle_deg,
                                          r1_per_mM_s=r1_per_mM_s, hct=hct, noise_t1_s=tissue_params["muscle"][3],
                                          snr=snr, rng=rng, blood_t10_s=1.9)
    acq = dict(tr_s=tr_s, flip_angle_deg=flip_angle_deg, r1_per_mM_s=r1_per_mM_s,
               n_baseline=int(np.sum(t < bolus_s)), hct=hct, bolus_s=bolus_s)
    return Phantom(t_s=t, cp=cp, signal=noisy, conc=conc, labels=labels, truth=truth, t10_s=t10, acquisition=acq)


def _synthesize(labels, params, artery, t, cp, i, j, *, tr_s, flip_angle_deg, r1_per_mM_s, hct, noise_t1_s, snr, rng,
                blood_t10_s, m0=1000.0):
    """Concentrations (Extended Tofts), SPGR signal with Rician noise, truth maps and T10 for a label
    volume. ``params`` {label code: (Ktrans 1/min, ve, vp, T10 s, relative M0)}; the artery carries
    whole blood Cp (1 - Hct). Ktrans and vp vary +-20 % along I and J so maps are not flat."""
    shape = labels.shape
    truth = {k: np.full(shape, np.nan) for k in ("ktrans", "ve", "vp")}
    t10 = np.full(shape, 1.6)
    pd = np.zeros(shape)
    for code, (kt, ve, vp, t1, rel_m0) in params.items():
        sel = labels == code
        truth["ktrans"][sel] = kt * (1 + 0.2 * np.sin(i[sel] / 3.0))
        truth["ve"][sel] = ve
        truth["vp"][sel] = vp * (1 + 0.2 * np.cos(j[sel] / 4.0))
        t10[sel] = t1
        pd[sel] = rel_m0
    with np.errstate(invalid="ignore", divide="ignore"):
        truth["kep"] = truth["ktrans"] / truth["ve"]
    tissue = np.isfinite(truth["ktrans"])
    conc = np.zeros(shape + (t.size,))
    conc[tissue] = models.extended_tofts(t, cp, truth["ktrans"][tissue], truth["ve"][tissue], truth["vp"][tissue])
    conc[artery] = cp * (1 - hct)  # whole blood in the artery
    t10[artery] = blood_t10_s
    pd[artery] = 1.0
    clean = concentration.concentration_to_signal(conc, tr_s=tr_s, flip_angle_deg=flip_angle_deg, t10_s=t10,
                                                  r1_per_mM_s=r1_per_mM_s, m0=m0) * pd[..., None]
    sigma = concentration.spgr_signal(1 / noise_t1_s, tr_s, flip_angle_deg, m0) / snr
    noisy = np.sqrt((clean + _noise(rng, sigma, clean.shape)) ** 2 + _noise(rng, sigma, clean.shape) ** 2)
    return conc, noisy, truth, t10


def _noise(rng, sigma, shape_kjit):
    """Gaussian noise for a (K, J, I, T) series, drawn in (I, J, K, T) order: the order the phantoms
    were first written in, so that a seed keeps giving the same noise in every voxel (the demo's
    published numbers depend on it)."""
    nk, nj, ni, nt = shape_kjit
    return np.transpose(rng.normal(0, sigma, (ni, nj, nk, nt)), (2, 1, 0, 3))


#: Labels of the spine phantom.
SPINE_LABELS = {"background": 0, "soft tissue": 1, "muscle": 2, "marrow": 3, "disc": 4, "csf": 5, "aorta": 6,
                "L2 metastasis": 7, "L3 metastasis": 8, "L1 metastasis": 9}
#: (Ktrans 1/min, ve, vp, T10 s, relative M0) of the spine phantom's tissues (fatty marrow: short T1).
SPINE_TISSUES = {"soft tissue": (0.06, 0.15, 0.02, 1.2, 0.8), "muscle": (0.05, 0.12, 0.02, 1.4, 0.9),
                 "marrow": (0.03, 0.10, 0.015, 0.55, 1.0), "disc": (0.005, 0.20, 0.003, 1.2, 0.9),
                 "csf": (0.0, 0.0, 0.0, 4.0, 1.0), "L2 metastasis": (0.20, 0.30, 0.12, 1.4, 0.9),
                 "L3 metastasis": (0.20, 0.30, 0.12, 1.4, 0.9), "L1 metastasis": (0.20, 0.30, 0.12, 1.4, 0.9)}
#: Where the metastases sit: (vertebral body from the bottom, radius as a fraction of the I extent).
SPINE_LESIONS = {"L2 metastasis": (2.6, 0.11), "L3 metastasis": (1.6, 0.11), "L1 metastasis": (3.6, 0.06)}


def spine_matrix(spacing_mm=(1.5, 1.5, 4.0), origin_mm=(-10.0, -40.0, -70.0)):
    """IJK->RAS of the sagittal spine phantom, as a sagittal DCE acquisition: I runs from anterior to
    posterior, J from inferior to superior, K (the slices) from right to left."""
    m = np.zeros((4, 4))
    m[:3, 0] = [0.0, -spacing_mm[0], 0.0]     # I: anterior -> posterior (A decreases)
    m[:3, 1] = [0.0, 0.0, spacing_mm[1]]      # J: inferior -> superior
    m[:3, 2] = [-spacing_mm[2], 0.0, 0.0]     # K: right -> left
    m[:3, 3] = origin_mm
    m[3, 3] = 1.0
    return m


def make_spine_phantom(lesion_vp: dict | None = None, shape=(6, 96, 64), n_frames: int = 60, frame_s: float = 5.0,
                       bolus_s: float = 30.0, snr: float = 30.0, tr_s: float = 0.004, flip_angle_deg: float = 15.0,
                       r1_per_mM_s: float = 4.5, hct: float = 0.42, seed: int = 0,
                       lesions=("L2 metastasis", "L3 metastasis"), lesion_scale: dict | None = None,
                       vertebra_width_slices: float | None = None) -> Phantom:
    """A sagittal DCE study of the lumbar spine: four vertebral bodies of fatty marrow with discs between
    them, the spinal canal (CSF), paraspinal muscle, the aorta in front of the spine (left slices) and two
    metastases, in L2 and L3. Array axes (K, J, I) = (slices, inferior-superior, anterior-posterior), on
    the grid of :func:`spine_matrix`.

    lesion_vp : {"L2 metastasis": vp, "L3 metastasis": vp} changes the lesions' plasma volume (and
        Ktrans in proportion), e.g. a follow-up where L2 responds (vp halves) and L3 fails (vp rises).
    lesions : the metastases drawn, of :data:`SPINE_LESIONS` (a small "L1 metastasis" besides L2 and L3).
    lesion_scale : {lesion: factor} scales a lesion's radius, e.g. 1.3 for one that grew.
    vertebra_width_slices : the vertebral bodies, discs and canal this many slices wide (about the middle
        slice; muscle beside them) - anatomy that changes across the slices, as the motion tests need;
        None: as wide as the volume.
    5 s frames over 5 min by default, Rician noise (``snr`` in muscle), Parker AIF from ``bolus_s``."""
    for what, given in (("lesions", lesions), ("lesion_vp", lesion_vp or {}), ("lesion_scale", lesion_scale or {})):
        unknown = set(given) - (set(SPINE_LESIONS) if what == "lesions" else set(lesions))
        if unknown:
            raise ValueError(f"{what}: unknown lesion(s) {sorted(unknown)}; use {', '.join(map(repr, lesions))}")
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    t = np.arange(n_frames) * float(frame_s)
    cp = aif.parker(t, hct=hct, delay_s=bolus_s)
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    L = SPINE_LABELS
    labels = np.full(shape, L["soft tissue"], dtype=np.int16)
    labels[i < 0.08 * ni] = L["background"]                       # air in front of the abdomen
    labels[i > 0.78 * ni] = L["muscle"]                           # paraspinal muscle behind the canal
    canal = (i > 0.67 * ni) & (i <= 0.78 * ni)
    if vertebra_width_slices is not None:
        canal &= np.abs(k - (nk - 1) / 2) <= vertebra_width_slices / 4
    labels[canal] = L["csf"]                                      # spinal canal
    body = (i > 0.30 * ni) & (i <= 0.65 * ni)
    if vertebra_width_slices is not None:
        lateral = np.abs(k - (nk - 1) / 2) > vertebra_width_slices / 2
        labels[lateral & (i > 0.30 * ni)] = L["muscle"]
        body &= ~lateral
    period = nj / 4.0
    phase = np.mod(j, period)
    labels[body & (phase >= 0.18 * period)] = L["marrow"]         # four vertebral bodies ...
    labels[body & (phase < 0.18 * period)] = L["disc"]            # ... with discs between
    for name in lesions:                                          # J runs up: L1 above L2 above L3
        body_pos, radius = SPINE_LESIONS[name]
        r = radius * ni * (lesion_scale or {}).get(name, 1.0)
        inside = ((i - 0.47 * ni) ** 2 + (j - body_pos * period) ** 2 + ((k - (nk - 1) / 2) * 2.7) ** 2) <= r * r
        labels[inside] = L[name]
    artery = ((i - 0.18 * ni) ** 2 <= (0.06 * ni) ** 2) & (k <= 1)
    labels[artery] = L["aorta"]
    tissues = dict(SPINE_TISSUES)
    for name, vp in (lesion_vp or {}).items():
        kt, ve, vp0, t1, pd = tissues[name]
        tissues[name] = (kt * vp / vp0, ve, vp, t1, pd)
    params = {L[name]: p for name, p in tissues.items()}
    conc, noisy, truth, t10 = _synthesize(labels, params, artery, t, cp, i, j, tr_s=tr_s,
                                          flip_angle_deg=flip_angle_deg, r1_per_mM_s=r1_per_mM_s, hct=hct,
                                          noise_t1_s=tissues["muscle"][3], snr=snr, rng=rng, blood_t10_s=1.6)
    t10[labels == L["background"]] = 1.0
    acq = dict(tr_s=tr_s, flip_angle_deg=flip_angle_deg, r1_per_mM_s=r1_per_mM_s,
               n_baseline=int(np.sum(t < bolus_s)), hct=hct, bolus_s=bolus_s)
    return Phantom(t_s=t, cp=cp, signal=noisy, conc=conc, labels=labels, truth=truth, t10_s=t10, acquisition=acq)


def breathing_and_step_motion(t_s, *, breathing_mm=(0.0, 2.0, 3.0), period_s: float = 23.0, step_frame=None,
                              step_mm=(1.0, 3.0, 3.5), step_deg=(3.5, 0.0, 0.0), seed: int = 0) -> np.ndarray:
    """(T, 6) per-frame rigid motion (tx, ty, tz mm, rx, ry, rz degrees; LPS, as
    :func:`motion.euler_matrix`): a periodic breathing-like part of amplitude ``breathing_mm`` per axis
    (period ``period_s``, sampled at the frame times with a random phase jitter, as 5 s frames alias a 4 s
    breath), plus a step of ``step_mm`` / ``step_deg`` from ``step_frame`` on (default: halfway).
    The motion is then shifted so that the mean pose of the last :data:`motion.REFERENCE_FRAMES` frames
    is the identity - the reference position the masks are drawn in."""
    from .motion import REFERENCE_FRAMES
    t = np.asarray(t_s, dtype=float)
    rng = np.random.default_rng(seed)
    phase = 2 * np.pi * t / float(period_s) + rng.uniform(-0.6, 0.6, t.size)
    params = np.zeros((t.size, 6))
    params[:, :3] = np.sin(phase)[:, None] * np.asarray(breathing_mm, dtype=float)
    step = t.size // 2 if step_frame is None else int(step_frame)
    params[step:, :3] += np.asarray(step_mm, dtype=float)
    params[step:, 3:] += np.asarray(step_deg, dtype=float)
    return params - params[-REFERENCE_FRAMES:].mean(axis=0)


def move_series(signal, ijk_to_ras, transforms_lps, order: int = 3) -> np.ndarray:
    """The series as a moving patient gives it: frame f shows at each point q what the still series shows
    at ``transforms_lps[f]``^-1 (q) (spline interpolation of ``order``; beyond the edge the nearest voxel), so that
    ``transforms_lps[f]`` maps the still (reference) position to frame f (LPS, mm; :mod:`motion`)."""
    from scipy import ndimage

    from .motion import LPS
    signal = np.asarray(signal)
    index_to_lps = LPS @ np.asarray(ijk_to_ras, dtype=float)
    flip = np.eye(4)[[2, 1, 0, 3]]                                  # (i, j, k) <-> (k, j, i)
    out = np.empty(signal.shape, dtype=np.float32)
    for f in range(signal.shape[-1]):
        back = flip @ np.linalg.inv(index_to_lps) @ np.linalg.inv(transforms_lps[f]) @ index_to_lps @ flip
        out[..., f] = ndimage.affine_transform(signal[..., f].astype(np.float64), back[:3, :3], back[:3, 3],
                                               order=order, mode="nearest")
    return out
