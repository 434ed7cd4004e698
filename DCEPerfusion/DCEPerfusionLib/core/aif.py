"""Arterial input functions: population models, image-derived AIF and automatic AIF detection.

All functions take frame times in seconds and return the **plasma** concentration in mM,
Cp = Cb / (1 - Hct), where the published model gives whole-blood concentration Cb
(``hct=0`` returns the whole-blood curve). Models published as plasma curves (Weinmann,
Fritz-Hansen) are returned as published. Before ``delay_s`` every curve is zero.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.stats import gamma as gamma_distribution
from scipy.stats import rankdata

from ._checks import as_float_array
from .registry import AIF_SOURCES
from .units import S_PER_MIN

log = logging.getLogger(__name__)

# Parker et al., MRM 2006;56:993-1000, Table 1 (times in min, A in mM min, alpha in mM).
PARKER_PARAMETERS = dict(A1=0.809, sigma1=0.0563, T1=0.17046, A2=0.330, sigma2=0.132, T2=0.365,
                         alpha=1.050, beta=0.1685, s=38.078, tau=0.483)

# Georgiou et al., MRM 2019;81:1955-1963, eq. 1 (Horsfield et al. form, a sum of gamma variates for the
# first pass and each recirculation, scaled by a tri-exponential). Table 3 gives the parameters rounded
# (A1 0.37 mM, m1 0.11/min, A2 0.33, m2 1.17, A3 10.06, m3 16.02, alpha 5.26, beta 0.032 min, tau 0.129 min);
# with the rounded values the curve deviates from the paper's supplementary curve (Figure S2) by up to
# 0.08 mM. The values below are the same parameters to more digits, recovered by a least-squares fit of
# eq. 1 to that supplementary curve; they reproduce it within 2.2e-5 mM everywhere (tested).
GEORGIOU_PARAMETERS = dict(A1=0.37430309, m1=0.11269008, A2=0.33118589, m2=1.17451197, A3=10.06087934,
                           m3=16.0196272, alpha=5.26696775, beta=0.03207892, tau=0.12855613)
GEORGIOU_HCT = 0.35  # haematocrit of the representative patient (Georgiou et al. 2019)

# Biexponential plasma curves for a standard dose of 0.1 mmol/kg, Cp(t) = a1 exp(-m1 t) + a2 exp(-m2 t),
# a in mM, m in 1/min, scaled linearly with the dose.
# Weinmann et al., Physiol Chem Phys Med NMR 1984;16:167 as given by Tofts & Kermode, MRM 1991;17:357
# (D = 0.1 mmol/kg times 3.99 and 4.78 kg/L).
WEINMANN_PARAMETERS = dict(a1=0.399, m1=0.144, a2=0.478, m2=0.0111)
# Fritz-Hansen et al., MRM 1996;36:225-231, parameters as given by Whitcher & Schmid, J Stat Softw 2011;44(5).
FRITZ_HANSEN_PARAMETERS = dict(a1=2.4, m1=3.0, a2=0.62, m2=0.016)
STANDARD_DOSE_MMOL_PER_KG = 0.1


def _check_hct(hct: float) -> float:
    h = float(hct)
    if not np.isfinite(h) or h < 0 or h >= 1:
        raise ValueError(f"hct={hct}: haematocrit must be a fraction in [0, 1) (e.g. 0.42), not a percentage")
    return h


def _shifted_minutes(t_s, delay_s):
    t = as_float_array(t_s, "t_s")
    if np.any(~np.isfinite(t)):
        raise ValueError("t_s: times contain NaN or Inf")
    d = float(delay_s)
    if not np.isfinite(d):
        raise ValueError(f"delay_s={delay_s}: must be a finite number of seconds")
    return (t - d) / S_PER_MIN


def parker(t_s, hct: float = 0.42, delay_s: float = 0.0):
    """Parker population AIF (Parker et al., MRM 2006;56:993), plasma concentration in mM.

    Two Gaussians (first pass and recirculation) plus an exponential modulated by a sigmoid,
    for a 0.1 mmol/kg dose; zero before ``delay_s``.
    """
    h = _check_hct(hct)
    tm = _shifted_minutes(t_s, delay_s)
    p = PARKER_PARAMETERS
    cb = (p["A1"] / (p["sigma1"] * np.sqrt(2 * np.pi)) * np.exp(-((tm - p["T1"]) ** 2) / (2 * p["sigma1"] ** 2))
          + p["A2"] / (p["sigma2"] * np.sqrt(2 * np.pi)) * np.exp(-((tm - p["T2"]) ** 2) / (2 * p["sigma2"] ** 2))
          + p["alpha"] * np.exp(-p["beta"] * tm) / (1.0 + np.exp(-p["s"] * (tm - p["tau"]))))
    cb = np.where(tm >= 0, cb, 0.0)
    return cb / (1.0 - h)


def georgiou(t_s, hct: float = 0.42, delay_s: float = 0.0):
    """Georgiou population AIF (Georgiou et al., MRM 2019;81:1955), plasma concentration in mM.

    Eq. 1: Cb(t) = (A1 e^{-m1 t} + A2 e^{-m2 t} + A3 e^{-m3 t}) * sum_k g_k(t - k tau), where g_k is a
    normalised gamma variate with shape (k+1) alpha + k and scale beta, one term per circulation
    (recirculation included); zero before ``delay_s``.
    """
    h = _check_hct(hct)
    tm = _shifted_minutes(t_s, delay_s)
    p = GEORGIOU_PARAMETERS
    envelope = p["A1"] * np.exp(-p["m1"] * tm) + p["A2"] * np.exp(-p["m2"] * tm) + p["A3"] * np.exp(-p["m3"] * tm)
    passes = np.zeros_like(tm)
    n_pass = int(np.floor(max(np.max(tm, initial=0.0), 0.0) / p["tau"])) + 1
    for k in range(n_pass):
        # u^s e^{-u/beta} / (beta^{s+1} Gamma(s+1)) is the gamma density with shape s + 1 and scale beta
        passes += gamma_distribution.pdf(tm - k * p["tau"], (k + 1) * p["alpha"] + k + 1, scale=p["beta"])
    cb = np.where(tm >= 0, envelope * passes, 0.0)
    return cb / (1.0 - h)


def _biexponential(t_s, params, dose_mmol_per_kg, delay_s):
    tm = _shifted_minutes(t_s, delay_s)
    dose = float(dose_mmol_per_kg)
    if not np.isfinite(dose) or dose <= 0:
        raise ValueError(f"dose_mmol_per_kg={dose_mmol_per_kg}: must be > 0 (standard dose 0.1 mmol/kg)")
    cp = (dose / STANDARD_DOSE_MMOL_PER_KG) * (params["a1"] * np.exp(-params["m1"] * tm)
                                              + params["a2"] * np.exp(-params["m2"] * tm))
    return np.where(tm >= 0, cp, 0.0)


def weinmann(t_s, dose_mmol_per_kg: float = 0.1, delay_s: float = 0.0):
    """Weinmann biexponential AIF (as in Tofts & Kermode, MRM 1991;17:357), plasma concentration in mM.

    Published as a plasma curve (instantaneous bolus at ``delay_s``), so no haematocrit applies.
    """
    return _biexponential(t_s, WEINMANN_PARAMETERS, dose_mmol_per_kg, delay_s)


def fritz_hansen(t_s, dose_mmol_per_kg: float = 0.1, delay_s: float = 0.0):
    """Fritz-Hansen biexponential AIF (Fritz-Hansen et al., MRM 1996;36:225), plasma concentration in mM.

    Published as a plasma curve (instantaneous bolus at ``delay_s``), so no haematocrit applies.
    """
    return _biexponential(t_s, FRITZ_HANSEN_PARAMETERS, dose_mmol_per_kg, delay_s)


POPULATION_MODELS = {"parker": parker, "georgiou": georgiou, "weinmann": weinmann, "fritz_hansen": fritz_hansen}


def population(name: str, t_s, hct: float = 0.42, delay_s: float = 0.0):
    """Population AIF by name (parker, georgiou, weinmann, fritz_hansen); plasma mM."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in POPULATION_MODELS:
        raise ValueError(f"aif: unknown population AIF {name!r}; choose one of {', '.join(POPULATION_MODELS)}")
    if key in ("weinmann", "fritz_hansen"):
        return POPULATION_MODELS[key](t_s, delay_s=delay_s)
    return POPULATION_MODELS[key](t_s, hct=hct, delay_s=delay_s)


# ----------------------------------------------------------------------------------------------
# Image-derived AIF
# ----------------------------------------------------------------------------------------------

def _real_array(conc):
    """``conc`` without a copy (float32 stays float32: only the curves that are used get converted)."""
    c = np.asarray(conc)
    if not (np.issubdtype(c.dtype, np.integer) or np.issubdtype(c.dtype, np.floating)):
        raise ValueError(f"conc: expected real concentrations (mM), got dtype {c.dtype}")
    return c


def _masked_curves(conc, mask):
    c = _real_array(conc)
    if c.ndim < 2:
        raise ValueError(f"conc: expected (..., T) with at least one voxel axis, got shape {c.shape}")
    m = np.asarray(mask)
    if m.shape != c.shape[:-1]:
        raise ValueError(f"mask: shape {m.shape} does not match the voxel shape {c.shape[:-1]} of conc")
    return c[m.astype(bool)].astype(float)


def image_derived(conc, mask, hct: float = 0.42, method: str = "mean", top_fraction: float = 0.25,
                  min_voxels: int = 3):
    """AIF from the concentration curves ``conc`` (..., T) (mM, whole blood) of the voxels in ``mask``.

    ``method="mean"`` averages all valid voxels; ``method="top"`` averages the ``top_fraction`` of voxels
    with the highest peak (robust against partial volume at the vessel wall). Returns plasma
    concentration Cb / (1 - Hct) in mM. Voxels with NaN/Inf are left out (and logged).
    """
    h = _check_hct(hct)
    curves = _masked_curves(conc, mask)
    n_total = curves.shape[0]
    finite = np.all(np.isfinite(curves), axis=1)
    curves = curves[finite]
    if n_total - curves.shape[0]:
        log.warning("aif.image_derived: %d of %d AIF voxels have NaN/Inf values and were left out",
                    n_total - curves.shape[0], n_total)
    if curves.shape[0] < min_voxels:
        raise ValueError(
            f"mask: the AIF region has {curves.shape[0]} valid voxels, need at least {min_voxels} - "
            "draw the AIF segment inside a large artery (e.g. the aorta) over several slices"
        )
    if method == "mean":
        cb = curves.mean(axis=0)
    elif method == "top":
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction={top_fraction}: must be in (0, 1]")
        n = max(min_voxels, int(np.ceil(top_fraction * curves.shape[0])))
        order = np.argsort(-curves.max(axis=1), kind="stable")[:n]
        cb = curves[order].mean(axis=0)
    else:
        raise ValueError(f"method={method!r}: use 'mean' or 'top'")
    return cb / (1.0 - h)


@dataclass
class AIFDetection:
    """Result of :func:`detect`: the chosen voxels and their mean curve.

    ``mask``: boolean, the voxel shape of the input; ``cp``: plasma concentration (T,) in mM;
    ``cb``: whole-blood curve (T,) in mM; ``score``: the detection score of the chosen voxels."""

    mask: np.ndarray
    cp: np.ndarray
    cb: np.ndarray
    score: np.ndarray


def detect(conc, t_s, mask=None, n_voxels: int = 20, hct: float = 0.42, candidate_fraction: float = 0.05):
    """Automatic AIF detection from 4D concentration ``conc`` (..., T) in mM (whole blood scale).

    Arterial voxels arrive early, peak high and wash out fast (a narrow first pass). Following the
    criteria of Mouridsen et al. (MRM 2006;55:524) and Peruzzo et al. (Comput Methods Programs Biomed
    2011;104:e148): keep the ``candidate_fraction`` of voxels with the largest peak, then rank them by
    the sum of ranks of (time to peak, ascending) and (width of the curve above half its peak,
    ascending), and average the ``n_voxels`` best (the peak height only pre-selects, so noise maxima do
    not bias the curve upward). Returns an :class:`AIFDetection`.
    """
    h = _check_hct(hct)
    c = _real_array(conc)
    t = as_float_array(t_s, "t_s")
    if c.ndim < 2 or c.shape[-1] != t.size:
        raise ValueError(f"conc: shape {c.shape} must be (..., T) with T = len(t_s) = {t.size}")
    if int(n_voxels) < 1:
        raise ValueError(f"n_voxels={n_voxels}: need at least 1 voxel")
    voxel_shape = c.shape[:-1]
    flat = c.reshape(-1, t.size)
    eligible = np.all(np.isfinite(flat), axis=1)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != voxel_shape:
            raise ValueError(f"mask: shape {m.shape} does not match the voxel shape {voxel_shape} of conc")
        eligible &= m.reshape(-1).astype(bool)
    idx = np.flatnonzero(eligible)
    if idx.size == 0:
        raise ValueError("conc: no voxel with finite values in the search region - check the mask and the conversion")
    curves = flat[idx].astype(float)
    peak = curves.max(axis=1)
    n_cand = max(int(n_voxels), int(np.ceil(candidate_fraction * idx.size)))
    n_cand = min(n_cand, idx.size)
    # candidates in voxel order, so that ties in the ranking below are not broken by the noisy peak
    cand = np.sort(np.argsort(-peak, kind="stable")[:n_cand])
    curves, peak, idx = curves[cand], peak[cand], idx[cand]
    if not np.any(peak > 0):
        raise ValueError("conc: no voxel enhances (all peaks <= 0) - is this a concentration series after contrast?")
    ttp = t[np.argmax(curves, axis=1)]
    dt = np.gradient(t)
    width = ((curves >= 0.5 * peak[:, None]) * dt[None, :]).sum(axis=1)
    # ranking on timing and shape only: ranking on the noisy peak height would bias the curve upward
    rank = rankdata(ttp, method="ordinal") + rankdata(width, method="ordinal")
    best = np.argsort(rank, kind="stable")[: min(int(n_voxels), idx.size)]
    chosen = idx[best]
    sel = np.zeros(flat.shape[0], dtype=bool)
    sel[chosen] = True
    cb = flat[chosen].mean(axis=0, dtype=float)
    log.info("aif.detect: chose %d voxels, peak %.3g mM at %.1f s", chosen.size, cb.max(), t[np.argmax(cb)])
    return AIFDetection(mask=sel.reshape(voxel_shape), cp=cb / (1.0 - h), cb=cb, score=rank[best])


SOURCES = tuple(AIF_SOURCES)


def select(source: str, conc, t_s, *, n_baseline: int, hct: float = 0.42, mask=None, mask_name: str = "segment",
           prescribed=None):
    """The AIF for a study: (cp (T,) plasma mM, the voxel mask used or None, a description).

    source : a population model (its curve starts at the first frame after the ``n_baseline``
             pre-contrast frames), "segment" (mean of ``mask``, an artery; the voxels whose concentration
             is not finite are left out; refused when that is most of them), "automatic" (:func:`detect`) or "prescribed": ``prescribed`` =
             (times s from the first frame, plasma concentration mM, description), interpolated linearly
             onto ``t_s`` (PkModeling's prescribed AIF); it must cover the frames' times.
    """
    t = np.asarray(t_s, dtype=float)
    if source not in SOURCES:
        raise ValueError(f"AIF source {source!r}: use one of {', '.join(SOURCES)}")
    if source == "segment":
        m = np.asarray(mask, dtype=bool)
        n_valid = int(np.all(np.isfinite(np.asarray(conc)[m]), axis=-1).sum())
        if 2 * n_valid < int(m.sum()):       # the voxels left would be the least enhancing: a biased AIF
            raise ValueError(
                f"AIF segment: only {n_valid} of its {int(m.sum())} voxels have a valid concentration (the arterial "
                "peak is above the SPGR ceiling with this T10) - set the blood T10 (about 1.5 s at 1.5 T, 1.6-1.9 s "
                "at 3 T) or a T1 map, and check TR and the flip angle")
        return (image_derived(conc, m, hct=hct, min_voxels=1), m,
                f"image-derived from segment '{mask_name}' ({n_valid} of {int(m.sum())} voxels)")
    if source == "automatic":
        det = detect(conc, t, hct=hct)
        return det.cp, det.mask, f"automatic ({int(det.mask.sum())} voxels)"
    if source == "prescribed":
        return _prescribed(prescribed, t), None, prescribed[2] if prescribed else ""
    delay = float(t[int(n_baseline)])
    return (population(source, t, hct=hct, delay_s=delay), None,
            f"population {source} (hct {hct:g}), starting at {delay:g} s")


def _prescribed(prescribed, t):
    """A prescribed plasma curve on the frame times ``t`` (s)."""
    if prescribed is None:
        raise ValueError("AIF source 'prescribed': no AIF curve given - give a CSV of time (s) and plasma "
                         "concentration (mM) (--aif-csv)")
    t_aif, cp, what = prescribed
    t_aif, cp = np.asarray(t_aif, dtype=float), np.asarray(cp, dtype=float)
    if t_aif.ndim != 1 or t_aif.shape != cp.shape or t_aif.size < 3 or np.any(np.diff(t_aif) <= 0) \
            or not np.all(np.isfinite(cp)):
        raise ValueError(f"{what}: needs at least 3 increasing times (s) with finite concentrations")
    step = float(np.median(np.diff(t))) if t.size > 1 else 0.0
    if t_aif[0] > t[0] + 0.5 * step or t_aif[-1] < t[-1] - 0.5 * step:
        raise ValueError(f"{what}: covers {t_aif[0]:g}-{t_aif[-1]:g} s, the frames {t[0]:g}-{t[-1]:g} s "
                         "(times from the first frame) - give the curve over the whole series")
    return np.interp(t, t_aif, cp)
