"""Rician noise of magnitude images: the noise level sigma and the bias correction of magnitude signals.

A magnitude pixel M = |A + n_re + i n_im| with Gaussian noise of standard deviation ``sigma`` in each
channel follows the Rice distribution (Gudbjartsson & Patz, MRM 1995;34:910):

    E[M]   = sigma sqrt(pi/2) L_1/2(-A^2 / (2 sigma^2))
    E[M^2] = A^2 + 2 sigma^2,      L_1/2(x) = exp(x/2) [(1 - x) I0(-x/2) - x I1(-x/2)]

At SNR = A/sigma = 1.5 the mean magnitude is 1.25 A: a pre-contrast baseline that low (fat-suppressed
marrow at 3 T, small voxels) is biased upward by a quarter, and the concentrations with it.

Two corrections, each for what it is given:

* a **single** sample: :func:`correct_sample`, sqrt(max(M^2 - sigma^2, 0)) (Gudbjartsson & Patz 1995: the
  magnitude is close to Gaussian about sqrt(A^2 + sigma^2)), mean-unbiased within 1 % down to SNR 1.5 in
  simulation (their sqrt(|M^2 - sigma^2|) is 8 % high there, and the exact inversion of the mean, applied
  to one sample, 7 % low). Means of corrected samples (a voxel's baseline frames) are then unbiased too.
* a **mean** of many magnitude samples of one true signal (the voxels of an artery at one time) estimates
  E[M] closely: :func:`invert_mean` solves the Rician mean for A (exact, with the ``sigma`` of one sample -
  not of the mean). Squares do not average that way: sqrt(mean(M^2) - 2 sigma^2) is right for one voxel's
  frames of one signal, wrong for voxels of different signals.

:func:`estimate_sigma` finds sigma from the baseline frames when it is not given. numpy/scipy only.
"""

from __future__ import annotations

import numpy as np
from scipy.special import i0e, i1e
from scipy.stats import chi2

#: Rician mean / sigma at A = 0 (the Rayleigh mean): sqrt(pi/2).
RAYLEIGH_MEAN = float(np.sqrt(np.pi / 2))
#: Rician variance / sigma^2 at A = 0 (the Rayleigh variance): 2 - pi/2.
RAYLEIGH_VARIANCE = 2.0 - np.pi / 2
#: Fewest baseline frames :func:`estimate_sigma` needs (a temporal variance from 2 frames is too noisy).
MIN_FRAMES_FOR_SIGMA = 3

_SNR_GRID = np.linspace(0.0, 60.0, 60001)          # A / sigma; beyond 60 the asymptotic form is exact to 1e-7


def rician_mean(snr):
    """E[M] / sigma for true SNR A / sigma (Gudbjartsson & Patz 1995, eq. 6), overflow-free via the
    exponentially scaled Bessel functions."""
    x = np.square(np.asarray(snr, dtype=float)) / 4.0
    return RAYLEIGH_MEAN * ((1.0 + 2.0 * x) * i0e(x) + 2.0 * x * i1e(x))


def rician_variance(snr):
    """Var[M] / sigma^2 for true SNR A / sigma: 2 + SNR^2 - (E[M]/sigma)^2 (Koay & Basser, JMR 2006;179:317,
    their correction factor xi)."""
    snr = np.asarray(snr, dtype=float)
    return np.maximum(2.0 + snr ** 2 - rician_mean(snr) ** 2, 0.0)


_MEAN_GRID = rician_mean(_SNR_GRID)
_RATIO_GRID = _MEAN_GRID / np.sqrt(np.maximum(rician_variance(_SNR_GRID), 1e-300))


def invert_mean(mean_magnitude, sigma):
    """The true signal A whose Rician mean is ``mean_magnitude`` (same units as ``sigma``, which broadcasts):
    A = 0 at and below the Rayleigh mean sigma sqrt(pi/2). Use it on means of many samples of one true
    signal, with the sigma of a single sample. Non-finite inputs stay non-finite."""
    m = np.asarray(mean_magnitude, dtype=float)
    s = np.asarray(sigma, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = m / s
        snr = np.interp(r, _MEAN_GRID, _SNR_GRID, left=0.0, right=np.nan)
        high = r > _MEAN_GRID[-1]                      # E[M] = A + sigma^2 / (2 A) + O(sigma^4 / A^3)
        if np.any(high):
            snr = np.where(high, 0.5 * (r + np.sqrt(np.abs(r * r - 2.0))), snr)
        out = snr * s
    return np.where(np.isfinite(m), out, m)


def correct_sample(magnitude, sigma, out=None):
    """Bias-corrected single magnitude samples: sqrt(max(M^2 - sigma^2, 0)) (Gudbjartsson & Patz 1995);
    ``sigma`` broadcasts. ``out`` may be ``magnitude`` itself (in place, for whole series)."""
    m = np.asarray(magnitude)
    out = np.multiply(m, m, out=out)
    out -= np.square(sigma)
    np.maximum(out, 0.0, out=out)
    return np.sqrt(out, out=out)


def estimate_sigma(baseline) -> tuple:
    """(sigma, description) from pre-contrast frames ``baseline`` (..., N), N >= 3, magnitude signal units.

    Per voxel the temporal mean m and variance v of the baseline frames give the SNR by the fixed point of
    Koay & Basser (JMR 2006;179:317): m / sqrt(v) = E[M] / sqrt(Var[M]) is a known increasing function of
    A / sigma (1.91 for air, the Rayleigh case, rising to A / sigma). Then sigma^2 = v / xi(SNR): the
    temporal variance corrected for the Rician (or, in background air, Rayleigh: xi = 2 - pi/2) variance.
    Air and tissue voxels alike estimate sigma^2; the median over voxels (divided by the median of
    chi^2_(N-1) / (N-1), the spread of a variance from N frames) is robust to voxels whose baseline is not
    constant (motion, early enhancement, vessels).
    """
    b = np.asarray(baseline, dtype=float)
    if b.ndim < 1 or b.shape[-1] < MIN_FRAMES_FOR_SIGMA:
        n_given = b.shape[-1] if b.ndim else 0
        raise ValueError(f"noise_sigma='auto': needs at least {MIN_FRAMES_FOR_SIGMA} baseline frames to estimate the "
                         f"noise, got {n_given} - give the noise sigma in signal units")
    flat = b.reshape(-1, b.shape[-1])
    flat = flat[np.all(np.isfinite(flat), axis=1) & np.all(flat >= 0, axis=1)]
    n = b.shape[-1]
    mean = flat.mean(axis=1)
    var = flat.var(axis=1, ddof=1)
    ok = var > 0
    if ok.sum() < 10:
        raise ValueError("noise_sigma='auto': fewer than 10 voxels vary over the baseline frames - give the noise "
                         "sigma in signal units")
    ratio = mean[ok] / np.sqrt(var[ok])
    snr = np.interp(ratio, _RATIO_GRID, _SNR_GRID, left=0.0, right=_SNR_GRID[-1])
    sigma2 = var[ok] / np.maximum(rician_variance(snr), 1e-12)
    sigma = float(np.sqrt(np.median(sigma2) / (chi2.median(n - 1) / (n - 1))))
    n_air = int((snr == 0).sum())
    return sigma, (f"estimated from the temporal variance of {n} baseline frames in {int(ok.sum())} voxels, "
                   f"corrected for Rician noise (Koay & Basser 2006; {n_air} of them at the Rayleigh limit, "
                   "background-like)")


def check_sigma(noise_sigma, what: str = "noise_sigma"):
    """None, "auto", or a positive finite float / array (signal units); ValueError naming the fix otherwise."""
    if noise_sigma is None or (isinstance(noise_sigma, str) and noise_sigma == "auto"):
        return noise_sigma
    if isinstance(noise_sigma, str):
        try:
            noise_sigma = float(noise_sigma)
        except ValueError:
            raise ValueError(f"{what}={noise_sigma!r}: give the noise sigma in signal units (a number > 0), "
                             "'auto' or nothing") from None
    try:
        s = np.asarray(noise_sigma, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={noise_sigma!r}: give the noise sigma in signal units (a number > 0), 'auto' "
                         "or nothing") from None
    if s.size == 0 or np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"{what}={noise_sigma!r}: the noise sigma must be finite and > 0 (signal units), or 'auto'")
    return float(s) if s.ndim == 0 else s
