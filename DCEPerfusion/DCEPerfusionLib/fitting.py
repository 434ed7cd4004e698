"""Voxel-wise tracer-kinetic model fitting, vectorised across voxels (no per-voxel Python loop).

Methods
-------
``lls``  Linear least squares on the integral form of the model (Murase, MRM 2004;51:858):
         Tofts  Ct = Ktrans Icp - kep ICt
         ETM    Ct = (Ktrans + kep vp) Icp - kep ICt + vp cp
         Patlak Ct = Ktrans Icp + vp cp                         (I = running integral from the first frame)
         solved per voxel in closed form from its normal equations.
``nlls`` Bounded nonlinear least squares on the exact model (``models``): a start from the LLS estimate and
         from a variable-projection grid (the model is linear in its amplitudes for a fixed rate, so every
         voxel's best amplitudes for every grid rate come from a few matrix products; Golub & Pereyra,
         SIAM J Numer Anal 1973;10:413), the better of the two refined by Levenberg-Marquardt with an
         analytic Jacobian, all voxels of a chunk stepping together, bounds enforced by projection with
         bound-active parameters held fixed.

Arterial delay (``fit_delay=True``): the input is shifted (linear interpolation, zero before the first
frame). Delays live on a lattice whose step divides half a frame interval and is at most 1 s, so whole-
and half-frame shifts are exact. The start (LLS and grid) searches that lattice; the kinetic parameters
are then fitted at the start delay and at its lattice neighbours, walking downhill in each direction
while the fitted SSE keeps falling (a profile search: the SSE is not smooth in the delay, it has kinks at
the frame times, which a derivative-based refinement of the delay handles badly).

Units: t in s; Ktrans, kep, PS in 1/min; Fp in ml/100 ml/min; ve, vp fractions; delay in s; C in mM.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import models as _m
from ._checks import as_float_array, check_times

log = logging.getLogger(__name__)

# ---- per-voxel status codes ------------------------------------------------------------------
OK = 0              #: converged inside the bounds
NOT_CONVERGED = 1   #: iteration limit reached; the values are the best found
AT_BOUND = 2        #: converged (or LLS estimate clipped) with a parameter on a bound
INVALID_INPUT = 3   #: the curve has NaN or Inf samples - not fitted, maps NaN
NO_SIGNAL = 4       #: the curve is constant (e.g. all zero) - not fitted, maps NaN
MASKED_OUT = 5      #: outside the mask - not fitted, maps NaN
FIT_FAILED = 6      #: the solution is not finite (singular system) - maps NaN
STATUS_NAMES = {OK: "ok", NOT_CONVERGED: "not converged", AT_BOUND: "at bound", INVALID_INPUT: "invalid input",
                NO_SIGNAL: "no signal", MASKED_OUT: "outside mask", FIT_FAILED: "fit failed"}

MODEL_PARAMETERS = {
    "tofts": ("ktrans", "ve"),
    "extended_tofts": ("ktrans", "ve", "vp"),
    "patlak": ("ktrans", "vp"),
    "2cxm": ("fp", "ps", "ve", "vp"),
}
MODEL_ALIASES = {"etm": "extended_tofts", "extended-tofts": "extended_tofts", "two_compartment_exchange": "2cxm"}
MAP_KEYS = {
    "tofts": ("ktrans", "ve", "kep"),
    "extended_tofts": ("ktrans", "ve", "vp", "kep"),
    "patlak": ("ktrans", "vp"),
    "2cxm": ("fp", "ps", "ve", "vp"),
}
#: (lower, upper) bounds; units: ktrans, ps 1/min; fp ml/100 ml/min; ve, vp fractions; delay_s s.
DEFAULT_BOUNDS = {"ktrans": (0.0, 5.0), "ve": (0.0, 1.0), "vp": (0.0, 1.0), "fp": (0.0, 200.0),
                  "ps": (0.0, 5.0), "delay_s": (-10.0, 10.0)}
_VE_FLOOR = 1e-6   # ve below this makes kep = Ktrans/ve meaningless; used as the effective lower bound
_KEP_GRID_PER_MIN = np.concatenate([[0.0], np.geomspace(2e-3, 50.0, 27)])
_RATE_GRID_PER_S = np.geomspace(2e-4, 2.0, 18)


class FitCancelled(RuntimeError):
    """Raised when the progress callback asks to stop."""


@dataclass
class FitResult:
    """Parameter maps (voxel shape of the input) and how they were obtained.

    ``maps``: model parameters (see ``MAP_KEYS``), ``r2`` (coefficient of determination of the fit),
    ``status`` (int8 codes, see ``STATUS_NAMES``) and ``delay_s`` when the delay was fitted."""

    maps: dict
    model: str
    method: str
    fit_delay: bool
    bounds: dict = field(default_factory=dict)

    def status_counts(self) -> dict:
        codes, counts = np.unique(self.maps["status"], return_counts=True)
        return {STATUS_NAMES[int(c)]: int(n) for c, n in zip(codes, counts)}


# ==============================================================================================
# public entry point
# ==============================================================================================

def fit(ct, t_s, cp, model: str = "extended_tofts", method: str = "nlls", fit_delay: bool = False, mask=None,
        bounds: dict | None = None, progress=None, chunk_size: int | None = None, max_iter: int = 60,
        n_threads: int | None = None) -> FitResult:
    """Fit a tracer-kinetic model to every voxel of ``ct``.

    Parameters
    ----------
    ct : array (..., T)        tissue concentration, mM (any voxel shape, time last); not modified.
    t_s : array (T,)           frame times, s, strictly increasing.
    cp : array (T,)            arterial plasma concentration, mM, sampled at ``t_s``.
    model : "tofts" | "extended_tofts" | "patlak" | "2cxm"
    method : "lls" | "nlls"    linear (Murase) or bounded nonlinear least squares (see module doc).
    fit_delay : bool           also fit an arterial delay (s) within ``bounds["delay_s"]``.
    mask : bool array (...)    fit only these voxels (others get status MASKED_OUT and NaN).
    bounds : dict              overrides of ``DEFAULT_BOUNDS``, e.g. ``{"ktrans": (0, 2)}``.
    progress : callable(done_voxels, total_voxels) -> bool | None
                               called before the first and after each chunk; returning False cancels
                               (raises :class:`FitCancelled`).
    chunk_size : int           voxels per chunk, default 4096 (lls) / 8192 (nlls); working memory is about
                               40 * chunk_size * T * 8 bytes per thread. The input is never copied whole
                               (float32 input stays float32; chunks are converted one at a time).
    n_threads : int            chunks fitted in parallel (default: number of CPUs, at most 4).

    Returns a :class:`FitResult`; ``res.maps`` holds the maps listed in ``MAP_KEYS[model]`` plus
    ``r2``, ``status`` and, with ``fit_delay``, ``delay_s``. Invalid voxels never raise: they get a status.
    """
    model = _check_model(model)
    if method not in ("lls", "nlls"):
        raise ValueError(f"method={method!r}: use 'lls' (linear, Murase) or 'nlls' (nonlinear least squares)")
    if method == "lls" and model == "2cxm":
        raise ValueError("method='lls' is available for tofts, extended_tofts and patlak; use method='nlls' for 2cxm")
    t = check_times(t_s, "t_s", min_frames=3)
    ct = np.asarray(ct)  # kept in its own dtype (e.g. float32); chunks are converted to float64 one at a time
    if not (np.issubdtype(ct.dtype, np.integer) or np.issubdtype(ct.dtype, np.floating)):
        raise ValueError(f"ct: expected a real-valued array of concentrations (mM), got dtype {ct.dtype}")
    if ct.ndim < 1 or ct.shape[-1] != t.size:
        raise ValueError(f"ct: shape {ct.shape} must be (..., T) with T = len(t_s) = {t.size} (time on the last axis)")
    cp = as_float_array(cp, "cp")
    if cp.shape != t.shape:
        raise ValueError(f"cp: shape {cp.shape} must equal the shape of t_s {t.shape} (one AIF value per frame)")
    if not np.all(np.isfinite(cp)):
        raise ValueError("cp: the arterial input contains NaN or Inf - check the AIF")
    if not np.any(cp != 0):
        raise ValueError("cp: the arterial input is all zero - check the AIF source and its units (mM)")
    b = _check_bounds(bounds, model)
    if chunk_size is None:  # sizes that keep a chunk's working arrays in cache (measured, benchmarks/)
        chunk_size = 4096 if method == "lls" else 8192
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter={max_iter}: must be >= 1")

    voxel_shape = ct.shape[:-1]
    y_all = ct.reshape(-1, t.size)
    n_vox = y_all.shape[0]
    status = np.full(n_vox, MASKED_OUT, dtype=np.int8)
    if mask is None:
        sel = np.ones(n_vox, dtype=bool)
    else:
        m = np.asarray(mask)
        if m.shape != voxel_shape:
            raise ValueError(f"mask: shape {m.shape} does not match the voxel shape {voxel_shape} of ct")
        sel = m.reshape(-1).astype(bool)
    todo = np.flatnonzero(sel)
    names = MODEL_PARAMETERS[model]
    params = np.full((n_vox, len(names)), np.nan)
    delay = np.full(n_vox, np.nan) if fit_delay else None
    r2 = np.full(n_vox, np.nan)

    chunks = [todo[i:i + int(chunk_size)] for i in range(0, todo.size, int(chunk_size))]
    total = int(todo.size)
    _report(progress, 0, total)
    ctx = _Context(t=t, cp=cp, model=model, bounds=b, fit_delay=fit_delay, max_iter=int(max_iter))

    def work(idx):
        contiguous = idx[-1] - idx[0] + 1 == idx.size
        # time-major (T, n) copy of the chunk: every later pass runs over contiguous rows
        yt = (y_all[idx[0]:idx[-1] + 1] if contiguous else y_all[idx]).T.astype(np.float64, order="C")
        out = (np.full((idx.size, len(names)), np.nan), np.full(idx.size, np.nan) if fit_delay else None,
               np.full(idx.size, np.nan), np.empty(idx.size, dtype=np.int8))
        lo_v, hi_v = yt.min(axis=0), yt.max(axis=0)          # NaN or +-Inf anywhere shows up here
        finite = np.isfinite(lo_v) & np.isfinite(hi_v)
        out[3][~finite] = INVALID_INPUT
        flat = finite & (lo_v == hi_v)
        out[3][flat] = NO_SIGNAL
        go = finite & ~flat
        if go.any():
            p, d, r, s = _fit_chunk(ctx, method, yt[:, go] if not go.all() else yt)
            out[0][go], out[2][go], out[3][go] = p, r, s
            if fit_delay:
                out[1][go] = d
        return idx, out

    threads = n_threads if n_threads is not None else min(4, os.cpu_count() or 1)
    done = 0
    if threads > 1 and len(chunks) > 1:
        # the chunks already keep every core busy: BLAS threads inside them would only compete
        with _single_threaded_blas(), ThreadPoolExecutor(max_workers=int(threads)) as pool:
            futures = [pool.submit(work, c) for c in chunks]
            try:
                for fut in futures:
                    idx, out = fut.result()
                    done = _store(out, idx, params, delay, r2, status, done)
                    _report(progress, done, total)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        for c in chunks:
            idx, out = work(c)
            done = _store(out, idx, params, delay, r2, status, done)
            _report(progress, done, total)

    maps = _make_maps(model, names, params, voxel_shape)
    maps["r2"] = r2.reshape(voxel_shape)
    maps["status"] = status.reshape(voxel_shape)
    if fit_delay:
        maps["delay_s"] = delay.reshape(voxel_shape)
    res = FitResult(maps=maps, model=model, method=method, fit_delay=fit_delay, bounds=b)
    log.info("fit %s/%s: %d voxels, status %s", model, method, total, res.status_counts())
    if total and not np.any(status <= AT_BOUND):
        log.warning("fit: none of the %d selected voxels could be fitted (status %s) - check the concentration "
                    "series and the mask", total, res.status_counts())
    return res


def predict(result: FitResult, t_s, cp):
    """Model curves (..., T) in mM for the maps of ``result`` (NaN where the voxel was not fitted)."""
    mp = result.maps
    t = check_times(t_s, "t_s", min_frames=2)
    cp = as_float_array(cp, "cp")
    if cp.shape != t.shape:
        raise ValueError(f"cp: shape {cp.shape} must equal the shape of t_s {t.shape}")
    shape = mp["status"].shape
    ctx = _Context(t=t, cp=cp, model=result.model, bounds=result.bounds, fit_delay=result.fit_delay, max_iter=1)
    theta = np.stack([np.broadcast_to(mp[k], shape).reshape(-1) for k in MODEL_PARAMETERS[result.model]], axis=1)
    delay = np.asarray(mp["delay_s"], dtype=float).reshape(-1) if result.fit_delay else None
    good = np.all(np.isfinite(theta), axis=1)
    if delay is not None:
        good &= np.isfinite(delay)
    out = np.full((theta.shape[0], t.size), np.nan)
    good_idx = np.flatnonzero(good)

    def work(idx):
        out[idx] = _evaluate(ctx, theta[idx], None if delay is None else delay[idx], jacobian=False)[0].T

    chunks = [good_idx[s:s + 16384] for s in range(0, good_idx.size, 16384)]  # bounded working memory
    threads = min(4, os.cpu_count() or 1, max(len(chunks), 1))
    with _single_threaded_blas(), ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(work, chunks))
    return out.reshape(shape + (t.size,))


# ==============================================================================================
# argument checks and bookkeeping
# ==============================================================================================

def _check_model(model):
    key = str(model).strip().lower()
    key = MODEL_ALIASES.get(key, key)
    if key not in MODEL_PARAMETERS:
        raise ValueError(f"model={model!r}: choose one of {', '.join(MODEL_PARAMETERS)}")
    return key


def _check_bounds(bounds, model):
    b = dict(DEFAULT_BOUNDS)
    allowed = set(MODEL_PARAMETERS[model]) | {"delay_s"}
    for key, value in (bounds or {}).items():
        if key not in DEFAULT_BOUNDS:
            raise ValueError(f"bounds: unknown parameter {key!r}; known: {', '.join(DEFAULT_BOUNDS)}")
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"bounds[{key!r}]={value!r}: give a (lower, upper) pair of numbers") from None
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
            raise ValueError(f"bounds[{key!r}]=({lo}, {hi}): need finite lower < upper")
        if key != "delay_s" and lo < 0:
            raise ValueError(f"bounds[{key!r}]: lower bound {lo} < 0 - physical parameters are non-negative")
        if key in ("ve", "vp") and hi > 1:
            raise ValueError(f"bounds[{key!r}]: upper bound {hi} > 1 - volume fractions are at most 1")
        if key in allowed:
            b[key] = (lo, hi)
    if "ve" in MODEL_PARAMETERS[model]:
        b["ve"] = (max(b["ve"][0], _VE_FLOOR), b["ve"][1])
    return b


def _single_threaded_blas():
    """Limit BLAS to one thread for the duration (threadpoolctl); a no-op where it is not installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _report(progress, done, total):
    if progress is None:
        return
    if progress(done, total) is False:
        raise FitCancelled(f"fit cancelled after {done} of {total} voxels")


def _store(out, idx, params, delay, r2, status, done):
    p, d, r, s = out
    params[idx] = p
    if delay is not None:
        delay[idx] = d
    r2[idx] = r
    status[idx] = s
    return done + idx.size


def _make_maps(model, names, params, voxel_shape):
    maps = {name: params[:, i].reshape(voxel_shape) for i, name in enumerate(names)}
    if model in ("tofts", "extended_tofts"):
        with np.errstate(divide="ignore", invalid="ignore"):
            maps["kep"] = maps["ktrans"] / maps["ve"]
    return {k: maps[k] for k in MAP_KEYS[model]}


@dataclass
class _Context:
    t: np.ndarray
    cp: np.ndarray
    model: str
    bounds: dict
    fit_delay: bool
    max_iter: int

    @property
    def names(self):
        return MODEL_PARAMETERS[self.model]

    def limits(self):
        lo = np.array([self.bounds[k][0] for k in self.names])
        hi = np.array([self.bounds[k][1] for k in self.names])
        return lo, hi

    def delay_steps(self):
        """(fine step, coarse step) in s. Delays live on a lattice of multiples of the fine step: half the
        median frame interval divided into equal parts of at most 1 s, so that whole- and half-frame
        shifts are exactly representable."""
        lo, hi = self.bounds["delay_s"]
        half = 0.5 * float(np.median(np.diff(self.t)))
        fine = half / max(1, int(np.ceil(half / 1.0 - 1e-9)))
        coarse = fine * max(1, int(np.ceil((hi - lo) / 60.0 / fine)))   # start search: at most ~60 delays
        return fine, coarse

    def delay_grid(self, step):
        lo, hi = self.bounds["delay_s"]
        k = np.arange(np.ceil(lo / step - 1e-9), np.floor(hi / step + 1e-9) + 1)
        grid = k * step
        return grid if grid.size else np.array([min(max(0.0, lo), hi)])


# ==============================================================================================
# one chunk
# ==============================================================================================

def _fit_chunk(ctx: _Context, method: str, yt):
    """Fit the voxels of yt (T, n); returns (params (n, P), delay (n,) or None, r2 (n,), status (n,))."""
    lo, hi = ctx.limits()
    if method == "lls":
        fine, _ = ctx.delay_steps()
        theta, delay, _ = _lls_search(ctx, yt, ctx.delay_grid(fine) if ctx.fit_delay else None)
        finite = np.all(np.isfinite(theta), axis=1)
        clipped = np.clip(theta, lo, hi)
        status = np.where(np.any(clipped != theta, axis=1), AT_BOUND, OK).astype(np.int8)
        theta = np.where(finite[:, None], clipped, np.nan)
        sse = np.full(yt.shape[1], np.nan)
        if finite.any():
            sse[finite] = _sse(ctx, yt[:, finite] if not finite.all() else yt, theta[finite],
                               None if delay is None else delay[finite])
    else:
        theta, delay = _start(ctx, yt)
        if ctx.fit_delay:
            theta, delay, sse, status = _profile_delay(ctx, yt, theta, delay, lo, hi)
        else:
            theta, sse, status = _levenberg_marquardt(ctx, yt, theta, None, lo, hi)
    n_t = yt.shape[0]
    sst = np.einsum("tn,tn->n", yt, yt) - yt.sum(axis=0) ** 2 / n_t
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - sse / sst
    bad = ~np.all(np.isfinite(theta), axis=1) | ~np.isfinite(r2)
    status = np.where(bad, FIT_FAILED, status).astype(np.int8)
    theta[bad] = np.nan
    r2[bad] = np.nan
    if delay is not None:
        delay = np.where(bad, np.nan, delay)
    return theta, delay, r2, status


def _profile_delay(ctx, yt, theta, delay, lo, hi):
    """Delay refinement: fit the kinetic parameters at the start delay (snapped to the fine lattice), then
    walk the lattice one step at a time in each direction while the fitted SSE keeps falling."""
    fine, _ = ctx.delay_steps()
    d_lo, d_hi = ctx.bounds["delay_s"]
    grid = ctx.delay_grid(fine)
    delay = grid[np.abs(grid[None, :] - delay[:, None]).argmin(axis=1)]
    theta, sse, status = _levenberg_marquardt(ctx, yt, theta, delay, lo, hi)
    for direction in (-1.0, 1.0):
        # each walk starts next to the best delay so far, from the best parameters so far
        d_try = delay + direction * fine
        walking = (d_try >= d_lo - 1e-9) & (d_try <= d_hi + 1e-9) & np.isfinite(sse)
        for _ in range(grid.size):
            idx = np.flatnonzero(walking)
            if idx.size == 0:
                break
            th, s, st = _levenberg_marquardt(ctx, yt[:, idx], theta[idx], d_try[idx], lo, hi)
            better = s < sse[idx]
            win = idx[better]
            theta[win], sse[win], status[win], delay[win] = th[better], s[better], st[better], d_try[win]
            walking[idx[~better]] = False
            d_try[win] += direction * fine
            walking &= (d_try >= d_lo - 1e-9) & (d_try <= d_hi + 1e-9)
    return theta, delay, sse, status


# ---- linear least squares (Murase) -----------------------------------------------------------

def _lls(ctx: _Context, yt, cp):
    """Murase LLS of yt (T, n) for input ``cp`` (T,); returns model parameters (n, P) and the
    linear-system SSE (n,)."""
    t = ctx.t
    icp = _m.cumulative_integral(t, cp)
    yy = np.einsum("tn,tn->n", yt, yt)
    ycp, yicp = cp @ yt, icp @ yt
    if ctx.model == "patlak":
        beta = _solve2(icp @ icp, icp @ cp, cp @ cp, yicp, ycp)
        sse = yy - beta[0] * yicp - beta[1] * ycp
        return np.stack([beta[0] * 60.0, beta[1]], axis=1), sse
    q = _m.cumulative_integral(t, yt, axis=0)
    q *= -1.0                                                # the column multiplying kep
    qq = np.einsum("tn,tn->n", q, q)
    qy = np.einsum("tn,tn->n", q, yt)
    qicp = icp @ q
    if ctx.model == "tofts":
        beta = _solve2(icp @ icp, qicp, qq, yicp, qy)
        sse = yy - beta[0] * yicp - beta[1] * qy
        ktrans, kep = beta[0] * 60.0, beta[1] * 60.0
        with np.errstate(divide="ignore", invalid="ignore"):
            ve = ktrans / kep
        return np.stack([ktrans, ve], axis=1), sse
    # extended Tofts: unknowns (Ktrans + kep vp, kep, vp)
    beta = _solve3(icp @ icp, qicp, icp @ cp, qq, cp @ q, cp @ cp, yicp, qy, ycp)
    sse = yy - beta[0] * yicp - beta[1] * qy - beta[2] * ycp
    kep_s, vp = beta[1], beta[2]
    ktrans = (beta[0] - kep_s * vp) * 60.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ve = ktrans / (kep_s * 60.0)
    return np.stack([ktrans, ve, vp], axis=1), sse


def _lls_search(ctx: _Context, yt, delays):
    """LLS at one delay (``delays`` None) or the best of several by linear-system SSE.
    Returns (theta, delay or None, sse)."""
    if delays is None:
        theta, sse = _lls(ctx, yt, ctx.cp)
        return theta, None, sse
    best_theta, best_delay, best_sse = None, None, None
    for d in delays:
        theta, sse = _lls(ctx, yt, _m.shift_input(ctx.t, ctx.cp, d))
        sse = np.where(np.isfinite(sse) & np.all(np.isfinite(theta), axis=1), sse, np.inf)
        if best_theta is None:
            best_theta, best_delay, best_sse = theta, np.full(yt.shape[1], d), sse
        else:
            better = sse < best_sse
            best_theta[better], best_delay[better], best_sse[better] = theta[better], d, sse[better]
    return best_theta, best_delay, best_sse


def _solve2(a00, a01, a11, b0, b1):
    with np.errstate(divide="ignore", invalid="ignore"):
        det = a00 * a11 - a01 * a01
        return np.stack([(a11 * b0 - a01 * b1) / det, (a00 * b1 - a01 * b0) / det])


def _solve3(a00, a01, a02, a11, a12, a22, b0, b1, b2):
    """Symmetric 3x3 systems by cofactors, vectorised."""
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    with np.errstate(divide="ignore", invalid="ignore"):
        det = a00 * c00 + a01 * c01 + a02 * c02
        return np.stack([(c00 * b0 + c01 * b1 + c02 * b2) / det,
                         (c01 * b0 + c11 * b1 + c12 * b2) / det,
                         (c02 * b0 + c12 * b1 + c22 * b2) / det])


# ---- starting values -------------------------------------------------------------------------

def _start(ctx: _Context, yt):
    """Starting values (theta, delay): the lower-SSE of the LLS estimate and the variable-projection grid,
    both searched over the coarse delay grid when the delay is fitted."""
    lo, hi = ctx.limits()
    delays = ctx.delay_grid(ctx.delay_steps()[1]) if ctx.fit_delay else None
    candidates = []
    if ctx.model != "2cxm":
        theta, delay, _ = _lls_search(ctx, yt, delays)
        theta = np.where(np.isfinite(theta), theta, 0.5 * (lo + hi))
        candidates.append((np.clip(theta, lo, hi), delay, None))
    if ctx.model in ("tofts", "extended_tofts", "2cxm"):
        theta, delay, sse = _grid_start(ctx, yt, delays)
        clipped = np.clip(theta, lo, hi)
        moved = np.any(clipped != theta, axis=1)
        if moved.any():  # the grid's own SSE holds only for unclipped parameters
            sse[moved] = _sse(ctx, yt[:, moved], clipped[moved], None if delay is None else delay[moved])
        candidates.append((clipped, delay, sse))
    best_theta, best_delay = candidates[0][:2]
    if len(candidates) > 1:
        best_sse = _sse(ctx, yt, best_theta, best_delay)
        for theta, delay, sse in candidates[1:]:
            better = sse < best_sse
            best_theta[better] = theta[better]
            if delay is not None:
                best_delay[better] = delay[better]
            best_sse[better] = sse[better]
    return best_theta, best_delay


def _sse(ctx, yt, theta, delay):
    res = yt - _evaluate(ctx, theta, delay, jacobian=False)[0]
    sse = np.einsum("tn,tn->n", res, res)
    return np.where(np.isfinite(sse), sse, np.inf)


def _nnls1(yy, b, g):
    """min ||y - a f||^2 with a >= 0, for many (voxel, f): returns (a, sse)."""
    a = np.maximum(b / g, 0.0)
    return a, yy - a * b


def _nnls2(yy, b0, b1, g00, g01, g11):
    """min ||y - a0 f0 - a1 f1||^2 with a0, a1 >= 0, vectorised; returns (a0, a1, sse)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        det = g00 * g11 - g01 * g01
        a0 = (g11 * b0 - g01 * b1) / det
        a1 = (g00 * b1 - g01 * b0) / det
    sse = yy - a0 * b0 - a1 * b1
    inside = (a0 >= 0) & (a1 >= 0) & np.isfinite(sse)
    o0, s0 = _nnls1(yy, b0, g00)
    o1, s1 = _nnls1(yy, b1, g11)
    use0 = s0 <= s1
    return (np.where(inside, a0, np.where(use0, o0, 0.0)),
            np.where(inside, a1, np.where(use0, 0.0, o1)),
            np.where(inside, sse, np.where(use0, s0, s1)))


def _grid_start(ctx: _Context, yt, delays):
    """Variable projection over a grid of rates (and delays): best amplitudes per grid point in closed form.
    Works on (grid, n) arrays; yt is (T, n). Returns (theta, delay or None, SSE of theta)."""
    t = ctx.t
    n = yt.shape[1]
    yy = np.einsum("tn,tn->n", yt, yt)
    best = np.zeros((n, len(ctx.names)))
    best_delay = np.zeros(n)
    best_sse = np.full(n, np.inf)
    cols_n = np.arange(n)
    for d in ([0.0] if delays is None else delays):
        cpd = _m.shift_input(t, ctx.cp, d)
        if ctx.model in ("tofts", "extended_tofts"):
            f = _m.exp_convolution(t, cpd, _KEP_GRID_PER_MIN / 60.0)   # (T, K)
            fy = f.T @ yt                                              # (K, n)
            gff = np.einsum("tk,tk->k", f, f)[:, None]
            if ctx.model == "tofts":
                a, sse = _nnls1(yy, fy, gff)
            else:
                a, vp, sse = _nnls2(yy, fy, cpd @ yt, gff, (f.T @ cpd)[:, None], cpd @ cpd)
            k = np.argmin(sse, axis=0)
            s = sse[k, cols_n]
            ktrans = a[k, cols_n] * 60.0
            kep = _KEP_GRID_PER_MIN[k]
            with np.errstate(divide="ignore", invalid="ignore"):
                ve = np.where(kep > 0, ktrans / np.where(kep > 0, kep, 1.0), ctx.bounds["ve"][1])
            cols = [ktrans, ve] + ([vp[k, cols_n]] if ctx.model == "extended_tofts" else [])
            theta = np.stack(cols, axis=1)
        else:
            theta, s = _grid_2cxm(yt, yy, t, cpd)
        better = s < best_sse
        best[better], best_delay[better], best_sse[better] = theta[better], d, s[better]
    return best, (best_delay if delays is not None else None), np.maximum(best_sse, 0.0)


def _grid_2cxm(yt, yy, t, cpd):
    """2CXM start: bi-exponential impulse response on a grid of rate pairs, converted to (Fp, PS, ve, vp)."""
    rates = _RATE_GRID_PER_S
    f = _m.exp_convolution(t, cpd, rates)                    # (T, R)
    fy = f.T @ yt                                            # (R, n)
    gff = f.T @ f
    i, j = np.triu_indices(rates.size, k=1)                  # k_minus = rates[i] < k_plus = rates[j]
    n = yt.shape[1]
    cols_n = np.arange(n)
    best_sse = np.full(n, np.inf)
    best = np.tile([20.0, 0.1, 0.2, 0.02], (n, 1))           # used where no grid pair gives valid parameters
    step = max(1, int(2_000_000 // max(n, 1)))
    for s0 in range(0, i.size, step):
        ii, jj = i[s0:s0 + step], j[s0:s0 + step]
        a_minus, a_plus, sse = _nnls2(yy, fy[ii], fy[jj], gff[ii, ii][:, None], gff[ii, jj][:, None],
                                      gff[jj, jj][:, None])
        params = _biexp_to_2cxm(rates[jj][:, None], rates[ii][:, None], a_plus, a_minus)   # (4, pairs, n)
        valid = np.all(np.isfinite(params), axis=0) & np.all(params > 0, axis=0)
        sse = np.where(valid, sse, np.inf)
        k = np.argmin(sse, axis=0)
        s = sse[k, cols_n]
        better = s < best_sse
        best[better] = params[:, k, cols_n].T[better]
        best_sse[better] = s[better]
    return best, best_sse


def _biexp_to_2cxm(k_plus, k_minus, a_plus, a_minus):
    """Invert models.two_compartment_rates: (rates 1/s, amplitudes 1/s) -> (fp ml/100ml/min, ps 1/min, ve, vp)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        fp = a_plus + a_minus
        e_minus = a_minus / fp
        kb = k_plus - e_minus * (k_plus - k_minus)
        ke = k_plus * k_minus / kb
        kp = k_plus + k_minus - ke
        vp = fp / kb
        ps = kp * vp - fp
        ve = ps / ke
        return np.stack(np.broadcast_arrays(fp * 6000.0, ps * 60.0, ve, vp))


# ---- model evaluation with Jacobian ----------------------------------------------------------

def _evaluate(ctx: _Context, theta, delay, jacobian=True):
    """Model (T, n) for parameters theta (n, P) at arterial delays ``delay`` (n,) s (None: no delay).

    With ``jacobian`` also returns the Jacobian in factored form (basis, coef): a list of curves, each
    (T, n) or shared (T,), and coefficients (n, B, P) such that dC/dtheta_p = sum_b coef[:, b, p] basis_b.
    For the Tofts family the basis is (F, dF/dk, cp), which keeps the normal equations to a few passes."""
    t = ctx.t
    cpd = ctx.cp if delay is None else _m.shift_input(t, ctx.cp, delay)
    cpd_tn = cpd if cpd.ndim == 2 else cpd[:, None]
    n = theta.shape[0]
    if ctx.model in ("tofts", "extended_tofts"):
        kt_s = theta[:, 0] / 60.0
        ve = theta[:, 1]
        k = kt_s / ve
        if jacobian:
            f, df = _m.exp_convolution(t, cpd, k, derivative=True)
        else:
            f = _m.exp_convolution(t, cpd, k)
        # without the Jacobian F is not needed afterwards: scale it in place
        pred = np.multiply(f, kt_s, out=None if jacobian else f)
        if ctx.model == "extended_tofts":
            pred += cpd_tn * theta[:, 2]
        if not jacobian:
            return pred, None
        n_par = theta.shape[1]
        coef = np.zeros((n, 3, n_par))
        coef[:, 0, 0] = 1.0 / 60.0          # d/dKtrans (1/min) at fixed ve: F/60 + Ktrans/60 dF/dk k/Ktrans
        coef[:, 1, 0] = k / 60.0
        coef[:, 1, 1] = -kt_s * k / ve       # d/dve
        if n_par == 3:
            coef[:, 2, 2] = 1.0              # d/dvp
        return pred, ([f, df, cpd], coef)
    if ctx.model == "patlak":
        icp = _m.cumulative_integral(t, cpd, axis=0)
        icp_tn = icp if icp.ndim == 2 else icp[:, None]
        pred = icp_tn * (theta[:, 0] / 60.0) + cpd_tn * theta[:, 1]
        if not jacobian:
            return pred, None
        coef = np.zeros((n, 2, 2))
        coef[:, 0, 0] = 1.0 / 60.0
        coef[:, 1, 1] = 1.0
        return pred, ([icp, cpd], coef)
    # 2CXM: forward differences (not on the speed-critical path)
    pred = _m._two_compartment_tn(t, cpd, theta[:, 0] / 6000.0, theta[:, 1] / 60.0, theta[:, 2], theta[:, 3])
    if not jacobian:
        return pred, None
    basis = []
    for p in range(theta.shape[1]):
        h = 1e-7 * np.maximum(np.abs(theta[:, p]), 1e-3)
        th = theta.copy()
        th[:, p] += h
        basis.append((_evaluate(ctx, th, delay, jacobian=False)[0] - pred) / h)
    coef = np.broadcast_to(np.eye(theta.shape[1]), (n, theta.shape[1], theta.shape[1]))
    return pred, (basis, coef)


def _dot(a, b):
    """Per-voxel inner products over time of curves that are (T, n) or shared (T,)."""
    if a.ndim == 1 and b.ndim == 1:
        return np.asarray(a @ b)
    if a.ndim == 1:
        return a @ b
    if b.ndim == 1:
        return b @ a
    return np.einsum("tn,tn->n", a, b)


def _normal_equations(ctx, yt, theta, delay):
    """J^T J (n, P, P), J^T r (n, P) and SSE (n,) at theta, from the factored Jacobian."""
    pred, (basis, coef) = _evaluate(ctx, theta, delay)
    res = yt - pred
    sse = np.einsum("tn,tn->n", res, res)
    nb, n = len(basis), theta.shape[0]
    gram = np.empty((n, nb, nb))
    for i in range(nb):
        for j in range(i, nb):
            gram[:, i, j] = gram[:, j, i] = _dot(basis[i], basis[j])
    br = np.stack([_dot(b, res) for b in basis], axis=1)           # (n, B)
    coef_t = np.swapaxes(coef, 1, 2)
    a = coef_t @ gram @ coef
    g = (coef_t @ br[:, :, None])[:, :, 0]
    return a, g, sse


# ---- Levenberg-Marquardt, all voxels together -------------------------------------------------

def _levenberg_marquardt(ctx: _Context, yt, theta0, delay, lo, hi, xtol=1e-7, ftol=1e-12):
    """Projected Levenberg-Marquardt for all voxels at once (Marquardt's diagonal scaling, per-voxel damping).

    Parameters on a bound whose gradient points outward are held fixed for the step, the step is then
    projected onto the bounds. The working set shrinks as voxels converge. Returns (theta, sse, status)."""
    n, n_par = theta0.shape
    diag_idx = np.arange(n_par)
    scale = np.maximum(hi - lo, 1e-12)
    theta_out = theta0.copy()
    status_out = np.full(n, NOT_CONVERGED, dtype=np.int8)

    idx = np.arange(n)
    theta = theta0.copy()
    d = delay
    a, g, sse = _normal_equations(ctx, yt, theta, d)
    sse_out = sse.copy()
    bad = ~np.isfinite(sse)
    status_out[bad] = FIT_FAILED
    lam = np.full(n, 1e-3)
    keep = ~bad
    for _ in range(ctx.max_iter):
        if not keep.all():
            idx, yt, theta, a, g, sse, lam = (idx[keep], yt[:, keep], theta[keep], a[keep], g[keep],
                                               sse[keep], lam[keep])
            d = None if d is None else d[keep]
        if idx.size == 0:
            break
        diag = a[:, diag_idx, diag_idx]
        at_lo = (theta <= lo + 1e-12 * scale) & (g <= 0)
        at_hi = (theta >= hi - 1e-12 * scale) & (g >= 0)
        # a parameter on a bound that the step would push outward, or without influence, is held fixed
        fixed = at_lo | at_hi | (diag <= 1e-14 * np.max(diag, axis=1, keepdims=True))
        m = a.copy()
        m[:, diag_idx, diag_idx] += lam[:, None] * diag
        m = np.where(fixed[:, :, None] | fixed[:, None, :], 0.0, m)
        m[:, diag_idx, diag_idx] = np.where(fixed, 1.0, m[:, diag_idx, diag_idx])
        step = _solve_batched(m, np.where(fixed, 0.0, g))
        trial = np.clip(theta + step, lo, hi)
        trial = np.where(np.isfinite(trial), trial, theta)
        p_new = _evaluate(ctx, trial, d, jacobian=False)[0]
        r_new = yt - p_new
        s_new = np.einsum("tn,tn->n", r_new, r_new)
        better = np.isfinite(s_new) & (s_new <= sse)
        small_step = np.all(np.abs(trial - theta) <= xtol * (np.abs(theta) + xtol * scale), axis=1)
        small_change = np.abs(sse - s_new) <= ftol * sse
        # at a stationary point the proposed step is negligible, accepted or not (rounding may make the
        # trial's SSE a hair larger): stop there instead of raising the damping until it overflows
        converged = small_step | (better & small_change) | (lam > 1e10)
        theta[better] = trial[better]
        sse[better] = s_new[better]
        lam = np.where(better, np.maximum(lam * 0.2, 1e-12), lam * 8.0)
        theta_out[idx] = theta
        sse_out[idx] = sse
        status_out[idx[converged]] = OK
        keep = ~converged
        upd = np.flatnonzero(better & keep)
        if upd.size:
            a_u, g_u, _ = _normal_equations(ctx, yt[:, upd], theta[upd], None if d is None else d[upd])
            a[upd], g[upd] = a_u, g_u
    at_bound = np.any((theta_out <= lo + 1e-9 * scale) | (theta_out >= hi - 1e-9 * scale), axis=1)
    status_out = np.where((status_out == OK) & at_bound, AT_BOUND, status_out).astype(np.int8)
    return theta_out, sse_out, status_out


def _solve_batched(m, g):
    """Solve m x = g for stacks of small systems (n, P, P)."""
    n_par = m.shape[1]
    if n_par == 2:
        return _solve2(m[:, 0, 0], m[:, 0, 1], m[:, 1, 1], g[:, 0], g[:, 1]).T
    if n_par == 3:
        return _solve3(m[:, 0, 0], m[:, 0, 1], m[:, 0, 2], m[:, 1, 1], m[:, 1, 2], m[:, 2, 2],
                       g[:, 0], g[:, 1], g[:, 2]).T
    try:
        return np.linalg.solve(m, g[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return (np.linalg.pinv(m) @ g[..., None])[..., 0]
