"""Synthetic DCE-MRI volume with known kinetic parameters (numpy only).

A block of tissue (muscle-like background), a spherical lesion with high plasma volume, and a
cylindrical artery carrying the arterial input. Tissue curves come from the Extended Tofts model
with the Parker AIF; signals from the SPGR equation with Rician noise, so the whole chain
signal -> concentration -> fit can be checked against the truth.
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
    """A synthetic study. Shapes: volumes (X, Y, Z), series (X, Y, Z, T).

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


def make_phantom(shape=(32, 32, 4), n_frames: int = 60, frame_s: float = 5.0, bolus_s: float = 30.0,
                 snr: float = 40.0, tr_s: float = 0.004, flip_angle_deg: float = 15.0,
                 r1_per_mM_s: float = 5.0, hct: float = 0.42, seed: int = 0, tissues: dict | None = None) -> Phantom:
    """Build a :class:`Phantom`. ``snr`` is baseline signal over noise standard deviation in the muscle.
    ``tissues`` overrides entries of :data:`TISSUES`, e.g. ``{"lesion": (0.25, 0.35, 0.05, 1.6)}`` for a
    follow-up exam whose lesion vp has halved."""
    unknown = set(tissues or {}) - set(TISSUES)
    if unknown:
        raise ValueError(f"tissues: unknown tissue(s) {sorted(unknown)}; the phantom has {sorted(TISSUES)}")
    tissue_params = {**TISSUES, **(tissues or {})}
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    t = np.arange(n_frames) * float(frame_s)
    cp = aif.parker(t, hct=hct, delay_s=bolus_s)
    x, y, z = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    labels = np.full(shape, LABELS["muscle"], dtype=np.int16)
    r_lesion = 0.22 * min(nx, ny)
    lesion = (x - 0.6 * nx) ** 2 + (y - 0.5 * ny) ** 2 <= r_lesion**2
    artery = (x - 0.2 * nx) ** 2 + (y - 0.3 * ny) ** 2 <= (0.06 * min(nx, ny) + 0.5) ** 2
    labels[lesion] = LABELS["lesion"]
    labels[artery] = LABELS["artery"]

    truth = {k: np.full(shape, np.nan) for k in ("ktrans", "ve", "vp")}
    t10 = np.full(shape, 1.6)
    for name, (kt, ve, vp, t1) in tissue_params.items():
        sel = labels == LABELS[name]
        # a little spatial variation so maps are not flat
        truth["ktrans"][sel] = kt * (1 + 0.2 * np.sin(x[sel] / 3.0))
        truth["ve"][sel] = ve
        truth["vp"][sel] = vp * (1 + 0.2 * np.cos(y[sel] / 4.0))
        t10[sel] = t1
    truth["kep"] = truth["ktrans"] / truth["ve"]
    tissue = np.isfinite(truth["ktrans"])
    conc = np.zeros(shape + (n_frames,))
    conc[tissue] = models.extended_tofts(t, cp, truth["ktrans"][tissue], truth["ve"][tissue], truth["vp"][tissue])
    conc[artery] = cp * (1 - hct)  # whole blood in the artery
    t10[artery] = 1.9
    m0 = 1000.0
    clean = concentration.concentration_to_signal(conc, tr_s=tr_s, flip_angle_deg=flip_angle_deg, t10_s=t10,
                                                  r1_per_mM_s=r1_per_mM_s, m0=m0)
    base = concentration.spgr_signal(1 / tissue_params["muscle"][3], tr_s, flip_angle_deg, m0)
    sigma = base / snr
    noisy = np.sqrt((clean + rng.normal(0, sigma, clean.shape)) ** 2 + rng.normal(0, sigma, clean.shape) ** 2)
    acq = dict(tr_s=tr_s, flip_angle_deg=flip_angle_deg, r1_per_mM_s=r1_per_mM_s,
               n_baseline=int(np.sum(t < bolus_s)), hct=hct, bolus_s=bolus_s)
    return Phantom(t_s=t, cp=cp, signal=noisy, conc=conc, labels=labels, truth=truth, t10_s=t10, acquisition=acq)
