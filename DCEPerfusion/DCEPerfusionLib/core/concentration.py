"""Signal <-> longitudinal relaxation rate <-> contrast-agent concentration, and VFA T1 mapping.

Everything here is for a spoiled gradient-echo (SPGR / FLASH) acquisition in steady state,
the sequence of nearly every clinical DCE-MRI protocol:

    S = M0 * sin(a) * (1 - E1) / (1 - cos(a) * E1),   E1 = exp(-TR * R1)

(Ernst & Anderson 1966; as used by the QIBA DCE profile and the OSIPI code collection).
With fast water exchange R1 rises linearly with concentration, R1 = R10 + r1 * C
(Donahue et al. 1994).

Units: TR in s, flip angles in degrees, T1/T10 in s, R1 in 1/s, relaxivity r1 in 1/(mM s),
concentration in mM. Arrays are voxel-first, time-last ``(..., T)``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import rician
from ._checks import as_float_array, check_flip_angle_deg, check_positive
from .registry import AGENT_ALIASES, RELAXIVITY_PER_MM_S  # noqa: F401  (public here too)

log = logging.getLogger(__name__)

def relaxivity(agent: str, field_strength_t: float) -> float:
    """Longitudinal relaxivity r1 in 1/(mM s) of a contrast agent at 1.5 T or 3 T.

    Values from Rohrer et al., Invest Radiol 2005;40:715 (plasma, 37 C). ``agent`` accepts the
    generic name (gadobutrol, gadoterate, gadopentetate) or a common trade name.
    """
    key = str(agent).strip().lower()
    key = AGENT_ALIASES.get(key, key)
    field = float(field_strength_t)
    for (name, tesla), r1 in RELAXIVITY_PER_MM_S.items():
        if name == key and abs(tesla - field) < 0.05:
            return r1
    agents = sorted({name for name, _ in RELAXIVITY_PER_MM_S})
    raise ValueError(
        f"relaxivity: no preset for agent={agent!r} at field_strength_t={field_strength_t}; "
        f"presets exist for {', '.join(agents)} at 1.5 and 3.0 T - give the relaxivity r1 in 1/(mM s) (--r1; "
        "r1_per_mM_s in the API)"
    )


def spgr_signal(r1_per_s, tr_s: float, flip_angle_deg, m0=1.0):
    """Steady-state SPGR signal for longitudinal relaxation rate ``r1_per_s`` (1/s)."""
    alpha = np.deg2rad(flip_angle_deg)
    e1 = np.exp(-tr_s * np.asarray(r1_per_s, dtype=float))
    return m0 * np.sin(alpha) * (1.0 - e1) / (1.0 - np.cos(alpha) * e1)


def _baseline_selection(n_frames: int, n_baseline, baseline_frames):
    """Boolean mask over frames used for the pre-contrast baseline."""
    if baseline_frames is not None:
        sel = np.asarray(baseline_frames)
        if sel.dtype == bool:
            if sel.shape != (n_frames,):
                raise ValueError(
                    f"baseline_frames: boolean mask has shape {sel.shape}, expected ({n_frames},) - one entry per frame"
                )
            mask = sel.copy()
        else:
            idx = sel.astype(int).ravel()
            if idx.size and (idx.min() < -n_frames or idx.max() >= n_frames):
                raise ValueError(f"baseline_frames: frame index out of range 0..{n_frames - 1}")
            mask = np.zeros(n_frames, dtype=bool)
            mask[idx] = True
        if not mask.any():
            raise ValueError("baseline_frames selects no frame - select at least one pre-contrast frame")
        return mask
    if n_baseline is None:
        raise ValueError("n_baseline: give the number of pre-contrast frames (or baseline_frames)")
    n_baseline = int(n_baseline)
    if n_baseline < 1:
        raise ValueError(f"n_baseline={n_baseline}: need at least 1 pre-contrast frame")
    if n_baseline >= n_frames:
        raise ValueError(
            f"n_baseline={n_baseline} must be smaller than the number of frames ({n_frames}); "
            "leave frames after contrast arrival for the fit"
        )
    mask = np.zeros(n_frames, dtype=bool)
    mask[:n_baseline] = True
    return mask


@dataclass
class ConversionFlags:
    """What :func:`signal_to_concentration` could not convert.

    ``saturated`` marks samples at or above the SPGR ceiling M0*sin(a) (no finite R1 exists),
    ``bad_baseline`` marks voxels whose baseline signal is not positive and finite.
    Both are set to NaN in the returned concentration.
    """

    saturated: np.ndarray
    bad_baseline: np.ndarray

    @property
    def n_saturated(self) -> int:
        return int(self.saturated.sum())

    @property
    def n_bad_baseline(self) -> int:
        return int(self.bad_baseline.sum())


def signal_to_concentration(
    signal,
    *,
    tr_s: float,
    flip_angle_deg,
    t10_s,
    r1_per_mM_s: float,
    n_baseline: int | None = None,
    baseline_frames=None,
    return_flags: bool = False,
    warn: bool = True,
    noise_sigma=None,
):
    """Convert SPGR signal ``(..., T)`` to contrast-agent concentration in mM.

    M0 is estimated per voxel from the mean baseline signal and the pre-contrast T10; each sample
    is then inverted exactly for R1 (no small-angle or linear approximation):

        E1 = (M0 sin a - S) / (M0 sin a - S cos a),  R1 = -ln(E1) / TR,  C = (R1 - 1/T10) / r1

    Parameters
    ----------
    signal : array (..., T)          signal intensities (arbitrary units); not modified.
    tr_s : float                     repetition time, s.
    flip_angle_deg : float or array  flip angle, degrees, in (0, 90]; an array broadcasting to the
                                     voxel shape is an actual (B1-corrected) flip-angle map.
    t10_s : float or array           pre-contrast T1, s (scalar or a map of the voxel shape).
    r1_per_mM_s : float              relaxivity, 1/(mM s) (see :func:`relaxivity`).
    n_baseline : int                 the first ``n_baseline`` frames are pre-contrast.
    baseline_frames : bool mask or indices, optional
                                     explicit pre-contrast frames (instead of ``n_baseline``).
    return_flags : bool              also return a :class:`ConversionFlags`.
    warn : bool                      log the counts below as a warning (callers that convert a series
                                     block by block log one summary instead).
    noise_sigma : None, float, array or "auto"
                                     Rician noise of magnitude images (:mod:`rician`): sigma of one sample in
                                     signal units (a scalar or a map of the voxel shape), or "auto" (estimated
                                     from the baseline frames, :func:`rician.estimate_sigma`). Each sample is
                                     then corrected as sqrt(max(S^2 - sigma^2, 0)) (Gudbjartsson & Patz,
                                     MRM 1995;34:910; mean-unbiased within 1 % down to SNR 1.5), the baseline
                                     is the mean of the corrected baseline frames, raised by sigma^2 / (N s0)
                                     (N baseline frames) so that 1/s0, which scales the concentrations, is
                                     unbiased to second order (delta method). The exact inversion of the Rician
                                     mean (:func:`rician.invert_mean`) is for means of many voxels (the AIF in
                                     :func:`pipeline.analyse`): from 10 frames at SNR 1.5 it gave fewer DRO
                                     patches within tolerance (``Testing/test_rician.py``). None: no correction.

    Samples at or above the SPGR ceiling (S >= M0 sin a), and voxels with a non-positive baseline,
    become NaN; their count is logged as a warning and returned in the flags.
    """
    # (long: the checks and one in-place pass over the whole 4D series, whose temporaries it reuses)
    s = as_float_array(signal, "signal")
    if s.ndim < 1 or s.shape[-1] < 3:
        raise ValueError(f"signal: expected shape (..., T) with T >= 3 frames, got {s.shape}")
    tr_s = check_positive(tr_s, "tr_s", unit="s")
    r1 = check_positive(r1_per_mM_s, "r1_per_mM_s", unit="1/(mM s)")
    fa = check_flip_angle_deg(flip_angle_deg, "flip_angle_deg")
    t10 = as_float_array(t10_s, "t10_s")
    if np.any(~np.isfinite(t10)) or np.any(t10 <= 0):
        raise ValueError("t10_s: pre-contrast T1 must be finite and > 0 s everywhere (mask or fill invalid T1 voxels)")
    voxel_shape = s.shape[:-1]
    for name, arr in (("t10_s", t10), ("flip_angle_deg", fa)):
        try:
            np.broadcast_to(arr, voxel_shape)
        except ValueError:
            raise ValueError(
                f"{name}: shape {arr.shape} does not match the voxel shape {voxel_shape} of signal"
            ) from None
    base_mask = _baseline_selection(s.shape[-1], n_baseline, baseline_frames)
    sigma = rician.check_sigma(noise_sigma)
    if isinstance(sigma, str):
        sigma = rician.estimate_sigma(s[..., base_mask])[0]
    if sigma is not None:
        try:
            sigma = np.broadcast_to(np.asarray(sigma, dtype=float), voxel_shape)[..., None]
        except ValueError:
            raise ValueError(f"noise_sigma: shape {np.shape(sigma)} does not match the voxel shape {voxel_shape} "
                             "of signal - give one sigma or a map of the voxel shape") from None

    cos_a = np.cos(np.deg2rad(fa))[..., None]
    r10 = (1.0 / t10)[..., None]
    e10 = np.exp(-tr_s * r10)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if sigma is not None:  # each sample: Gudbjartsson-Patz; the baseline: their mean
            s = rician.correct_sample(s, sigma)
        s0 = s[..., base_mask].mean(axis=-1, keepdims=True)
        if sigma is not None:
            s0 += np.square(sigma) / (base_mask.sum() * s0)   # E[1/s0]: second order (delta method)
        missing = ~np.isfinite(s0)                  # no data (NaN samples: e.g. outside the field of view)
        bad_base = ~missing & ~(s0 > 0)
        m0_sin = s0 * (1.0 - cos_a * e10) / (1.0 - e10)  # = M0 * sin(a)
        # in place, few passes: num -> E1 -> R1 -> C (this runs over whole 4D series)
        num = m0_sin - s
        den = s * cos_a
        np.subtract(m0_sin, den, out=den)
        # a finite R1 exists only below the ceiling: S < M0 sin(a) (then 0 < E1 < 1)
        ok = num > 0
        ok &= den > 0
        conc = np.divide(num, den, out=num)
        del den
        np.log(conc, out=conc)
        conc *= -1.0 / (tr_s * r1)
        conc -= r10 / r1
        conc[~ok] = np.nan
        saturated = ~ok & ~bad_base & ~missing & np.isfinite(s)
        if bad_base.any() or missing.any():
            conc[np.broadcast_to(bad_base | missing, conc.shape)] = np.nan
    flags = ConversionFlags(saturated=saturated, bad_baseline=bad_base[..., 0])
    if warn and flags.n_saturated:
        log.warning(
            "signal_to_concentration: %d samples in %d voxels are at or above the SPGR ceiling "
            "M0*sin(a) and were set to NaN (check TR, flip angle, T10 and the baseline frames)",
            flags.n_saturated, int(saturated.any(axis=-1).sum()),
        )
    if warn and flags.n_bad_baseline:
        log.warning("signal_to_concentration: %d voxels have a non-positive baseline signal and were set to NaN",
                    flags.n_bad_baseline)
    return (conc, flags) if return_flags else conc


def series_to_concentration(signal, t10_s, *, tr_s, flip_angle_deg, r1_per_mM_s, n_baseline,
                            block_voxels: int = 65536, n_threads: int | None = None, noise_sigma=None):
    """Concentration (mM, float32 ``(..., T)``) from a signal series, in blocks of voxels on a thread
    pool (numpy releases the GIL) so memory stays small; voxels without a valid T10 (NaN, <= 0) are NaN.
    ``noise_sigma`` as in :func:`signal_to_concentration` ("auto" is estimated once, from the whole series).
    Returns (conc, n_invalid_t10, {"saturated_voxels", "bad_baseline_voxels", "noise_sigma",
    "noise_sigma_source"})."""
    shape = signal.shape
    s = signal.reshape(-1, shape[-1])
    sigma, sigma_source = rician.check_sigma(noise_sigma), "none (no Rician correction)"
    if isinstance(sigma, str):
        sigma, sigma_source = rician.estimate_sigma(s[:, _baseline_selection(shape[-1], n_baseline, None)])
    elif sigma is not None:
        sigma_source = "given"
        if np.ndim(sigma):
            sigma = np.broadcast_to(sigma, shape[:-1]).reshape(-1)
    t10 = np.broadcast_to(np.asarray(t10_s, dtype=np.float64), shape[:-1]).reshape(-1)
    valid = np.isfinite(t10) & (t10 > 0)
    conc = np.full(s.shape, np.nan, dtype=np.float32)
    if valid.all():  # slices: no gathered copies
        blocks = [slice(b, min(s.shape[0], b + block_voxels)) for b in range(0, s.shape[0], block_voxels)]
    else:
        idx = np.flatnonzero(valid)
        blocks = [idx[b:b + block_voxels] for b in range(0, idx.size, block_voxels)]

    def work(sel):
        c, flags = signal_to_concentration(
            s[sel], tr_s=tr_s, flip_angle_deg=flip_angle_deg, t10_s=t10[sel], r1_per_mM_s=r1_per_mM_s,
            n_baseline=n_baseline, return_flags=True, warn=False,
            noise_sigma=sigma[sel] if np.ndim(sigma) else sigma)
        conc[sel] = c
        return int(flags.saturated.any(axis=-1).sum()), flags.n_bad_baseline

    with ThreadPoolExecutor(max_workers=n_threads or min(4, os.cpu_count() or 1)) as pool:
        counts = list(pool.map(work, blocks))  # one summary below instead of a warning per block
    n_sat = sum(c[0] for c in counts)
    n_bad = sum(c[1] for c in counts)
    if n_sat or n_bad:
        log.warning("concentration: %d voxels have samples above the SPGR ceiling and %d a non-positive baseline; "
                    "they are not fitted (status 'invalid input'). In air this is noise; in tissue or an artery "
                    "check T10 (a T1 map helps), TR and the flip angle", n_sat, n_bad)
    return conc.reshape(shape), int((~valid).sum()), {"saturated_voxels": n_sat, "bad_baseline_voxels": n_bad,
                                                      "noise_sigma": sigma, "noise_sigma_source": sigma_source}


def concentration_to_signal(
    concentration,
    *,
    tr_s: float,
    flip_angle_deg,
    t10_s,
    r1_per_mM_s: float,
    m0=1.0,
):
    """SPGR signal ``(..., T)`` for concentration ``(..., T)`` in mM (inverse of
    :func:`signal_to_concentration`). ``t10_s``, ``m0`` and ``flip_angle_deg`` may be maps of the
    voxel shape."""
    c = as_float_array(concentration, "concentration")
    tr_s = check_positive(tr_s, "tr_s", unit="s")
    r1 = check_positive(r1_per_mM_s, "r1_per_mM_s", unit="1/(mM s)")
    fa = check_flip_angle_deg(flip_angle_deg, "flip_angle_deg")
    t10 = as_float_array(t10_s, "t10_s")
    if np.any(t10 <= 0):
        raise ValueError("t10_s: pre-contrast T1 must be > 0 s")
    r1_t = (1.0 / t10)[..., None] + r1 * c
    return spgr_signal(r1_t, tr_s, fa[..., None], np.asarray(m0, dtype=float)[..., None])


# ----------------------------------------------------------------------------------------------
# Variable flip angle T1 mapping
# ----------------------------------------------------------------------------------------------

@dataclass
class T1Fit:
    """Result of :func:`vfa_t1`: T1 in s, M0 (signal units), and a status per voxel
    (0 ok, 1 not converged, 3 invalid input: non-finite or non-positive signals / no solution)."""

    t1_s: np.ndarray
    m0: np.ndarray
    status: np.ndarray

    def __iter__(self):  # allows ``t1_s, m0 = vfa_t1(...)``
        return iter((self.t1_s, self.m0))


def vfa_t1(signals, flip_angles_deg, tr_s, method: str = "linear", b1=None, max_iter: int = 50):
    """Variable-flip-angle T1 mapping (SPGR), vectorised over voxels.

    Parameters
    ----------
    signals : array (..., N)     signal at each flip angle (last axis), not modified.
    flip_angles_deg : (N,)       nominal flip angles in degrees.
    tr_s : float                 repetition time, s.
    method : "linear" | "nonlinear"
        "linear": DESPOT1 (Deoni et al., MRM 2003;49:515): S/sin a = E1 * S/tan a + M0 (1 - E1),
        a straight-line fit per voxel in closed form.
        "nonlinear": least squares on the SPGR equation in (M0, T1), Gauss-Newton with
        Levenberg damping started from the linear estimate.
    b1 : array (...) or float, optional
        flip-angle scale factor (actual / nominal) per voxel.

    Returns a :class:`T1Fit` (unpacks as ``t1_s, m0``).
    """
    s = as_float_array(signals, "signals")
    fa = as_float_array(flip_angles_deg, "flip_angles_deg").ravel()
    if s.ndim < 1 or s.shape[-1] != fa.size:
        raise ValueError(
            f"signals: last axis has {s.shape[-1] if s.ndim else 0} entries but flip_angles_deg has {fa.size}; "
            "put one signal per flip angle on the last axis"
        )
    if fa.size < 2:
        raise ValueError("flip_angles_deg: need at least 2 flip angles for T1 mapping")
    check_flip_angle_deg(fa, "flip_angles_deg")
    tr_s = check_positive(tr_s, "tr_s", unit="s")
    if method not in ("linear", "nonlinear"):
        raise ValueError(f"method={method!r}: use 'linear' or 'nonlinear'")
    voxel_shape = s.shape[:-1]
    if b1 is None:
        b1 = np.ones(voxel_shape)
    b1 = np.broadcast_to(as_float_array(b1, "b1"), voxel_shape)
    if np.any(~np.isfinite(b1)) or np.any(b1 <= 0):
        raise ValueError("b1: flip-angle scale must be finite and > 0 (1 = nominal flip angle)")

    flat = s.reshape(-1, fa.size)
    alpha = np.deg2rad(fa)[None, :] * b1.reshape(-1, 1)
    valid = np.all(np.isfinite(flat), axis=1) & np.all(flat > 0, axis=1)
    y = np.where(valid[:, None], flat / np.sin(alpha), 0.0)
    x = np.where(valid[:, None], flat / np.tan(alpha), 0.0)
    xm, ym = x.mean(axis=1), y.mean(axis=1)
    sxx = ((x - xm[:, None]) ** 2).sum(axis=1)
    sxy = ((x - xm[:, None]) * (y - ym[:, None])).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        e1 = sxy / sxx
        m0 = (ym - e1 * xm) / (1.0 - e1)
        t1 = -tr_s / np.log(e1)
    ok = valid & np.isfinite(t1) & (e1 > 0) & (e1 < 1) & (m0 > 0)
    status = np.where(ok, 0, 3).astype(np.int8)

    if method == "nonlinear":
        t1, m0, status = _vfa_nonlinear(flat, alpha, tr_s, t1, valid, max_iter)

    t1 = np.where(status == 3, np.nan, t1)
    m0 = np.where(status == 3, np.nan, m0)
    if np.any(status == 3):
        log.warning("vfa_t1: %d voxels have no valid T1 (non-positive signals or no solution)",
                    int((status == 3).sum()))
    return T1Fit(t1.reshape(voxel_shape), m0.reshape(voxel_shape), status.reshape(voxel_shape))


def _vfa_nonlinear(s, alpha, tr_s, t1_init, valid, max_iter):
    """Damped Gauss-Newton on S = M0 sin a (1-E1)/(1-cos a E1) in (M0, R1), all voxels at once."""
    sin_a, cos_a = np.sin(alpha), np.cos(alpha)
    # start: linear estimate where usable, else a generic tissue value
    r1 = np.where(np.isfinite(t1_init) & (t1_init > 0), 1.0 / np.where(t1_init > 0, t1_init, 1.0), 1.0)
    r1 = np.clip(r1, 1e-3, 1e3)

    def model(m0_, r1_, sel=slice(None)):
        sa, ca = sin_a[sel], cos_a[sel]
        e1 = np.exp(-tr_s * r1_)[:, None]
        d = 1.0 - ca * e1
        f = sa * (1.0 - e1) / d
        # derivative of f with respect to R1
        df_de1 = sa * (ca - 1.0) / d**2
        df_dr1 = df_de1 * (-tr_s * e1)
        return m0_[:, None] * f, f, m0_[:, None] * df_dr1

    # M0 enters linearly: start from its least-squares value for the starting R1
    _, f0, _ = model(np.ones(len(r1)), r1)
    m0 = np.where(valid, (f0 * s).sum(1) / (f0 * f0).sum(1), 1.0)
    lam = np.full(len(r1), 1e-3)
    pred, f, dr = model(m0, r1)
    sse = ((s - pred) ** 2).sum(1)
    active = valid.copy()
    converged = ~valid
    for _ in range(max_iter):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        res = s[idx] - pred[idx]
        j0, j1 = f[idx], dr[idx]
        a00, a01, a11 = (j0 * j0).sum(1), (j0 * j1).sum(1), (j1 * j1).sum(1)
        g0, g1 = (j0 * res).sum(1), (j1 * res).sum(1)
        l = lam[idx]
        b00, b11 = a00 * (1 + l), a11 * (1 + l)
        det = b00 * b11 - a01 * a01
        with np.errstate(invalid="ignore", divide="ignore"):
            d0 = (b11 * g0 - a01 * g1) / det
            d1 = (b00 * g1 - a01 * g0) / det
        m_new = m0[idx] + d0
        r_new = np.clip(r1[idx] + d1, 1e-6, 1e4)
        p_new, f_new, dr_new = model(m_new, r_new, idx)
        sse_new = ((s[idx] - p_new) ** 2).sum(1)
        better = np.isfinite(sse_new) & (sse_new <= sse[idx])
        bi = idx[better]
        small = np.abs(d1[better]) <= 1e-10 * np.abs(r_new[better]) + 1e-14
        small |= (sse[bi] - sse_new[better]) <= 1e-14 * sse[bi]
        m0[bi], r1[bi], sse[bi] = m_new[better], r_new[better], sse_new[better]
        pred[bi], f[bi], dr[bi] = p_new[better], f_new[better], dr_new[better]
        lam[bi] = np.maximum(lam[bi] * 0.3, 1e-12)
        lam[idx[~better]] *= 10.0
        done = np.zeros(len(idx), dtype=bool)
        done[np.flatnonzero(better)[small]] = True
        done |= lam[idx] > 1e12
        converged[idx[done]] = True
        active[idx[done]] = False
    ok = valid & np.isfinite(r1) & (r1 > 0) & (m0 > 0)
    status = np.where(~ok, 3, np.where(converged, 0, 1)).astype(np.int8)
    return 1.0 / r1, m0, status
