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
and half-frame shifts are exact. The start's LLS searches that lattice (at most about 60 delays; the
tissue terms of its design are computed once, only the input's change with the delay) and the grid is
evaluated at the delay the LLS chose (the 2CXM, which has no LLS, searches its grid over the lattice;
searching the grid at every delay cost more than half of the fit with the delay, for the same median
errors of Ktrans, ve, vp and the delay on 3,000 simulated Extended Tofts curves at noise SD 0.005 and
0.02 mM); the kinetic parameters are then fitted at the start delay and at its lattice neighbours, walking
downhill to earlier delays and, where that did not move, to later ones, while the fitted SSE keeps
falling (a profile search: the SSE is not smooth in the delay, it has kinks at the frame times, which a
derivative-based refinement of the delay handles badly). Last, between the lattice points: one more fit
at the vertex of the parabola through the fitted SSEs at the best lattice delay and its two neighbours,
kept where its SSE is lower (on 3,000 simulated Extended Tofts curves with delays between the lattice
points, noise SD 0.005 mM, it halves the median errors of Ktrans, 0.0017 to 0.0010 /min, and vp,
0.0011 to 0.0005, and brings the delay's from 0.24 to 0.06 s). Not for the 2CXM, whose delay trades
off against Fp and PS: on the OSIPI 2CXM case of Fp 5 ml/100 ml/min, PS 0.15 /min and a 5 s delay the
off-lattice optimum (5.08 s) takes PS to 0.127 /min, outside OSIPI's tolerance, where the lattice gives
0.137.

Engines (``engine``): the same methods run as numpy kernels over all voxels of a chunk at once
(:mod:`_fit_kernels`) or, with numba installed, compiled one voxel at a time (:mod:`_compiled`, chunks
in threads without the GIL); the maps agree within 1e-9 relative on noise-free curves and the statuses
agree (``Testing/test_compiled.py``). Chunks are sized in bytes: the working memory of a fit stays
within ``WORKING_MEMORY_BYTES`` at any number of frames.

Standard errors (``uncertainty=True``, the default): maps ``<map>_se`` in the unit of the map, from the
asymptotic covariance of the least-squares estimate, s^2 (J^T J)^-1 with s^2 = SSE / (T - P) (one
degree of freedom less with the delay fitted). ``nlls`` reuses the J^T J the Levenberg-Marquardt
iteration built last (no extra model evaluation). ``lls`` takes the covariance of its linear solve,
with the noise the integrated tissue curve carries into the Murase design (a sandwich; exact for
Patlak, whose design is noise-free), and carries it to Ktrans, ve, vp by the delta method. kep =
Ktrans / ve gets the delta method, var = g^T cov g with g = (1/ve, -Ktrans/ve^2). With the delay
fitted the SEs are those at the fitted delay (the delay itself gets none).
Rule at the bounds: a parameter on a bound (the voxels of status AT_BOUND) gets NaN - a symmetric
+-1.96 SE interval about a bound that caps the estimate is no confidence interval - and so does kep
when Ktrans or ve is on one; the voxel's other parameters keep the SE of the full (unconstrained)
covariance, which stays calibrated there (Testing/test_uncertainty.py). NaN too where the voxel was
not fitted or has no residual degree of freedom, for a parameter the curve holds no information on
(a zero column of J, e.g. ve where Ktrans = 0: the others are computed without it), and for all where
the parameters cannot be told apart (J^T J scaled to unit diagonal has a determinant below 1e-12).
Calibration on simulated Extended Tofts curves (Testing/test_uncertainty.py): +-1.96 SE covers the
truth in 93-97 % of the voxels of status ok for Ktrans, ve and vp at noise SD 0.005 and 0.02 mM, with
either method.

Model choice (``model="auto"``): every voxel is fitted with Patlak, Tofts and Extended Tofts (the same
method, delay and bounds) and the fit with the least AICc = T ln(SSE/T) + 2k + 2k(k+1)/(T-k-1)
(Burnham & Anderson, Model Selection and Multimodel Inference, 2nd ed. 2002, eq. 2.14 with the
least-squares likelihood) is kept; k counts every estimated parameter: the model's, the residual
variance and the delay when fitted (Patlak and Tofts 3, Extended Tofts 4). Ties go to the simpler
model. Fits of status ok, at bound or not converged take part. The maps are ktrans, ve, vp, kep of the
chosen model with: vp = 0 where Tofts wins (the model has no plasma term); ve and kep NaN where Patlak
wins (no backflux within the acquisition: ve is not determined, so it is left out of region statistics
instead of entering them as 0); ``model_choice`` 1 Patlak, 2 Tofts, 3 Extended Tofts, 0 not fitted;
``aicc`` the chosen fit's AICc; r2, status, delay and the SEs those of the chosen fit (vp_se NaN where
Tofts wins, ve_se and kep_se where Patlak wins).

Units: t in s; Ktrans, kep, PS in 1/min; Fp in ml/100 ml/min; ve, vp fractions; delay in s; C in mM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import registry
from ._checks import as_float_array, check_times
from ._fit_kernels import (AT_BOUND, FIT_FAILED, INVALID_INPUT, MASKED_OUT, NO_SIGNAL, NOT_CONVERGED, OK,  # noqa: F401
                           STATUS_NAMES, _aicc, _Context, _evaluate, _levenberg_marquardt, _lls_search,
                           _nlls_covariance, _sse, _standard_errors, _start)

log = logging.getLogger(__name__)

#: Default (lower, upper) fit bounds, from the registry; units: ktrans, ps 1/min; fp ml/100 ml/min; ve, vp
#: fractions; delay_s s.
DEFAULT_BOUNDS = registry.default_bounds()
_VE_FLOOR = 1e-6   # ve below this makes kep = Ktrans/ve meaningless; used as the effective lower bound
#: ``model_choice`` codes of ``model="auto"``: 0 not fitted, then ``registry.AUTO_CANDIDATES`` from 1.
MODEL_CHOICE_CODES = {0: "not fitted", **{i + 1: m for i, m in enumerate(registry.AUTO_CANDIDATES)}}


#: ``engine`` choices of :func:`fit`: "numba" the compiled kernels (:mod:`_compiled`), "numpy" the
#: vectorised numpy kernels (:mod:`_fit_kernels`), "auto" numba when it can be imported, else numpy.
ENGINES = ("auto", "numba", "numpy")
#: How many times faster the compiled kernels fit than the numpy ones, rounded down, for messages (the
#: Slicer module's offer to install numba): benchmarks/bench_fit.py on 2 cores, 2026-12-01, measured 3.6x
#: for Extended Tofts NLLS, 2.5x for its LLS, 6.3x for the 2CXM and 10.6x with the delay fitted.
COMPILED_SPEEDUP = 3
#: Working memory of one fit, all its threads together (bytes): chunks are sized from it and the number
#: of frames, so that a fit of any frame count stays within it (``benchmarks/bench_fit.py`` measures it).
WORKING_MEMORY_BYTES = 256 * 2**20
#: Bytes a chunk's working arrays take per voxel and frame, with a margin: tracemalloc's peak over fits of
#: 1,024 voxels at 60, 400 and 1,321 frames, every model, with and without the delay, was at most 83 (LLS)
#: and 141 (NLLS, 2CXM with delay) for the numpy kernels, which keep several (T, n) float64 arrays alive,
#: and 53 for the compiled ones (the chunk's float64 rows and the curves the fit shares).
_BYTES_PER_VOXEL_FRAME = {("numpy", "lls"): 100, ("numpy", "nlls"): 160, ("numba", "lls"): 64, ("numba", "nlls"): 64}
#: Bytes per voxel and frame of :func:`predict`'s working arrays (the input at the delays, the curves).
_PREDICT_BYTES_PER_VOXEL_FRAME = 48
#: Largest chunk (voxels): enough to amortise a chunk's overhead, few enough for progress and cancel.
_MAX_CHUNK = {("numpy", "lls"): 4096, ("numpy", "nlls"): 8192, ("numba", "lls"): 32768, ("numba", "nlls"): 8192}
_compile_seconds = None     # compile_kernels() done (seconds it took), once per process
_compile_failed: list = []  # why compiling failed, once warned: "auto" then fits with numpy


def compiled_available() -> bool:
    """Whether numba can be imported here (the compiled kernels of ``engine="numba"``); nothing is compiled."""
    return importlib.util.find_spec("numba") is not None


def compile_kernels() -> float:
    """Compile the kernels of ``engine="numba"`` (or load them from numba's on-disk cache) now instead of at
    the first fit: seconds it took on the first call, 0.0 afterwards. ValueError when numba is missing."""
    global _compile_seconds
    if _compile_seconds is not None:
        return 0.0
    _check_engine("numba")
    log.info("fit: preparing the compiled kernels (numba compiles them once, in under a minute, and caches them)")
    t0 = time.perf_counter()
    from . import _compiled
    t = np.arange(8) * 5.0
    cp = np.array([0.0, 0.0, 4.0, 2.0, 1.5, 1.2, 1.0, 0.9])
    ctx = _Context(t=t, cp=cp, model="extended_tofts", bounds=_check_bounds(None, "extended_tofts"), fit_delay=False,
                   max_iter=5)
    _compiled.fit_rows(ctx, "nlls", np.stack([0.1 * cp, np.zeros(8)]))   # one signature serves every model
    _compile_seconds = time.perf_counter() - t0
    log.info("fit: compiled kernels ready in %.1f s", _compile_seconds)
    return _compile_seconds


def _check_engine(engine: str) -> str:
    """The engine that runs ("numba" or "numpy") for the ``engine`` argument; ValueError naming the fix."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "numpy" or (engine == "auto" and not compiled_available()):
        return "numpy"
    if not compiled_available():
        raise ValueError("engine='numba': the package numba is not installed - install it (pip install numba; in "
                         "Slicer: slicer.util.pip_install('numba')) or use engine='numpy'")
    return "numba"


def _ready_engine(engine: str) -> str:
    """The engine a fit runs on, its kernels compiled: with ``engine="auto"`` a numba that fails to compile
    (a broken llvmlite, say) falls back to numpy with one warning; asked for by name, that is a ValueError."""
    chosen = _check_engine(engine)
    if chosen != "numba" or _compile_seconds is not None:
        return chosen
    if _compile_failed and engine == "auto":   # failed before in this process: not another try per fit
        return "numpy"
    try:
        compile_kernels()
    except Exception as e:  # noqa: BLE001 - whatever numba raises, the numpy kernels fit the same
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if engine == "numba":
            raise ValueError(f"engine='numba': numba could not compile the fit kernels ({reason}) - reinstall numba "
                             f"or use engine='numpy'") from None
        if not _compile_failed:
            log.warning("fit: numba could not compile the fit kernels (%s); fitting with numpy", reason)
        _compile_failed.append(reason)
        return "numpy"
    return chosen


def chunk_voxels(engine: str, method: str, n_t: int, threads: int, total: int, voxel_bytes: int = 0,
                 shared_bytes: int = 0) -> int:
    """Voxels per chunk: the working memory of all threads within ``WORKING_MEMORY_BYTES`` at ``n_t``
    frames - ``_BYTES_PER_VOXEL_FRAME`` per voxel and frame, ``voxel_bytes`` more per voxel (the compiled
    kernels' products with the shared curves) and ``shared_bytes`` of curves every thread copies once
    more - at most ``_MAX_CHUNK``, and (compiled kernels) at least 4 chunks per thread when the voxels
    allow, so that threads share the work evenly."""
    key = (engine, method)
    threads = max(threads, 1)
    budget = max(WORKING_MEMORY_BYTES - (threads + 1) * shared_bytes, WORKING_MEMORY_BYTES // 8)
    by_memory = budget // (threads * (_BYTES_PER_VOXEL_FRAME[key] * max(n_t, 1) + voxel_bytes))
    size = min(_MAX_CHUNK[key], max(16, int(by_memory)))
    if engine == "numba":
        size = min(size, max(256, -(-total // (4 * max(threads, 1)))))
    return max(1, size)


class FitCancelled(RuntimeError):
    """Raised when the progress callback asks to stop."""


@dataclass
class FitResult:
    """Parameter maps (voxel shape of the input) and how they were obtained.

    ``maps``: the model's maps (``registry.MODELS[model].maps``), with uncertainty their standard errors
    (``registry.uncertainty_maps(model)``), ``r2`` (coefficient of determination of the fit), ``status``
    (int8 codes, see ``STATUS_NAMES``) and ``delay_s`` when the delay was fitted; ``engine`` the kernels
    that ran ("numba" or "numpy")."""

    maps: dict
    model: str
    method: str
    fit_delay: bool
    bounds: dict = field(default_factory=dict)
    engine: str = "numpy"

    def status_counts(self) -> dict:
        codes, counts = np.unique(self.maps["status"], return_counts=True)
        return {STATUS_NAMES[int(c)]: int(n) for c, n in zip(codes, counts)}

    def model_counts(self) -> dict:
        """{model: voxels} of ``model="auto"`` (``MODEL_CHOICE_CODES``); empty for the other models."""
        if "model_choice" not in self.maps:
            return {}
        codes, counts = np.unique(self.maps["model_choice"], return_counts=True)
        return {MODEL_CHOICE_CODES[int(c)]: int(n) for c, n in zip(codes, counts)}


def fit(ct, t_s, cp, model: str = "extended_tofts", method: str = "nlls", fit_delay: bool = False, mask=None,
        bounds: dict | None = None, progress=None, chunk_size: int | None = None, max_iter: int = 60,
        n_threads: int | None = None, uncertainty: bool = True, engine: str = "auto") -> FitResult:
    """Fit a tracer-kinetic model to every voxel of ``ct``.

    Parameters
    ----------
    ct : array (..., T)        tissue concentration, mM (any voxel shape, time last); not modified.
    t_s : array (T,)           frame times, s, strictly increasing.
    cp : array (T,)            arterial plasma concentration, mM, sampled at ``t_s``.
    model : "tofts" | "extended_tofts" | "patlak" | "2cxm" | "auto"
                               "auto": per voxel the best of Patlak, Tofts and Extended Tofts by AICc
                               (module doc: the rule, the maps and the ``model_choice`` codes).
    method : "lls" | "nlls"    linear (Murase) or bounded nonlinear least squares (see module doc).
    fit_delay : bool           also fit an arterial delay (s) within ``bounds["delay_s"]``.
    mask : bool array (...)    fit only these voxels (others get status MASKED_OUT and NaN).
    bounds : dict              overrides of ``DEFAULT_BOUNDS``, e.g. ``{"ktrans": (0, 2)}``.
    progress : callable(done_voxels, total_voxels) -> bool | None
                               called before the first and after each chunk; returning False cancels
                               (raises :class:`FitCancelled`).
    chunk_size : int           voxels per chunk; default from the frame count so that the working memory
                               of all threads stays within ``WORKING_MEMORY_BYTES`` (:func:`chunk_voxels`).
                               The input is never copied whole (float32 input stays float32; chunks are
                               converted one at a time).
    n_threads : int            chunks fitted in parallel (default: number of CPUs, at most 4).
    engine : "auto" | "numba" | "numpy"
                               the compiled kernels (numba; same methods, statuses and maps: within 1e-9
                               relative on noise-free curves) or the numpy ones; "auto" compiled when numba
                               is installed. The first compiled fit of a process compiles the kernels or
                               loads them from numba's cache (:func:`compile_kernels`).
    uncertainty : bool         also the standard-error maps ``<map>_se`` (same unit as the map; module doc:
                               how they are computed, and NaN for a parameter on a bound).

    Returns a :class:`FitResult`; ``res.maps`` holds the maps listed in ``registry.MODELS[model].maps``,
    with ``uncertainty`` those of ``registry.uncertainty_maps(model)``, then ``r2``, ``status`` and, with
    ``fit_delay``, ``delay_s``. Invalid voxels never raise: they get a status.
    """
    model, t, ct, cp, b, chunk_size = _checked_arguments(ct, t_s, cp, model, method, bounds, chunk_size, max_iter,
                                                         fit_delay)
    engine = _ready_engine(engine)

    voxel_shape = ct.shape[:-1]
    y_all = ct.reshape(-1, t.size)
    n_vox = y_all.shape[0]
    if mask is None:
        sel = np.ones(n_vox, dtype=bool)
    else:
        m = np.asarray(mask)
        if m.shape != voxel_shape:
            raise ValueError(f"mask: shape {m.shape} does not match the voxel shape {voxel_shape} of ct")
        sel = m.reshape(-1).astype(bool)
    todo = np.flatnonzero(sel)
    ctx = _Context(t=t, cp=cp, model=model, bounds=b, fit_delay=fit_delay, max_iter=int(max_iter),
                   uncertainty=bool(uncertainty))
    acc = _outputs(ctx, n_vox)
    acc["status"][:] = MASKED_OUT

    threads = n_threads if n_threads is not None else min(4, os.cpu_count() or 1)
    total = int(todo.size)
    if chunk_size is None:
        voxel_bytes = shared_bytes = 0
        if engine == "numba":      # the shared curves made once here, before the threads (and measured)
            from . import _compiled
            voxel_bytes, shared_bytes = _compiled.chunk_memory(ctx, method)
        chunk_size = chunk_voxels(engine, method, t.size, threads, total, voxel_bytes, shared_bytes)
    chunks = [todo[i:i + int(chunk_size)] for i in range(0, todo.size, int(chunk_size))]
    _report(progress, 0, total)
    if engine == "numba" and chunks:
        from . import _compiled  # noqa: F401 - imported (and its kernels compiled or loaded) before the threads

    def work(idx):
        return idx, _fit_voxels(ctx, method, y_all, idx, engine)

    done = 0
    if threads > 1 and len(chunks) > 1:
        # the chunks already keep every core busy: BLAS threads inside them would only compete
        with _single_threaded_blas(), ThreadPoolExecutor(max_workers=int(threads)) as pool:
            futures = [pool.submit(work, c) for c in chunks]
            try:
                for fut in futures:
                    idx, out = fut.result()
                    done = _store(out, idx, acc, done)
                    _report(progress, done, total)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        for c in chunks:
            idx, out = work(c)
            done = _store(out, idx, acc, done)
            _report(progress, done, total)

    maps = _make_maps(ctx, acc, voxel_shape)
    res = FitResult(maps=maps, model=model, method=method, fit_delay=fit_delay, bounds=b, engine=engine)
    status = acc["status"]
    if log.isEnabledFor(logging.INFO):     # the counts sort every voxel's status: only when they are shown
        log.info("fit %s/%s (%s): %d voxels, status %s%s", model, method, engine, total, res.status_counts(),
                 f", models {res.model_counts()}" if model == "auto" else "")
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
    n = int(np.prod(shape))
    if result.model == "auto":   # per voxel its chosen model: Tofts is Extended Tofts with vp = 0
        choice = np.asarray(mp["model_choice"]).reshape(-1)
        groups = [("patlak", choice == 1), ("extended_tofts", (choice == 2) | (choice == 3))]
    else:
        groups = [(result.model, np.ones(n, dtype=bool))]
    delay = np.asarray(mp["delay_s"], dtype=float).reshape(-1) if result.fit_delay else None
    out = np.full((n, t.size), np.nan)
    for model, member in groups:
        ctx = _Context(t=t, cp=cp, model=model, bounds=result.bounds, fit_delay=result.fit_delay, max_iter=1)
        theta = np.stack([np.broadcast_to(mp[k], shape).reshape(-1) for k in registry.MODELS[model].parameters],
                         axis=1)
        good = member & np.all(np.isfinite(theta), axis=1)
        if delay is not None:
            good &= np.isfinite(delay)
        good_idx = np.flatnonzero(good)

        def work(idx, ctx=ctx, theta=theta):
            out[idx] = _evaluate(ctx, theta[idx], None if delay is None else delay[idx], jacobian=False)[0].T

        threads = min(4, os.cpu_count() or 1)
        size = max(1, min(16384, WORKING_MEMORY_BYTES // (threads * _PREDICT_BYTES_PER_VOXEL_FRAME * t.size)))
        chunks = [good_idx[s:s + size] for s in range(0, good_idx.size, size)]      # bounded working memory
        threads = min(threads, max(len(chunks), 1))
        with _single_threaded_blas(), ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, chunks))
    return out.reshape(shape + (t.size,))


def _checked_arguments(ct, t_s, cp, model, method, bounds, chunk_size, max_iter, fit_delay=False):
    """The arguments of :func:`fit` checked (ValueError naming the argument and the fix) and normalised."""
    model = check_model_method(model, method)
    t = check_times(t_s, "t_s", min_frames=3)
    if model == "auto":
        need = len(registry.MODELS["extended_tofts"].parameters) + 1 + bool(fit_delay) + 2   # T - k - 1 > 0
        if t.size < need:
            raise ValueError(f"model='auto': the AICc of Extended Tofts needs at least {need} frames, t_s has "
                             f"{t.size} - choose one model")
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
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter={max_iter}: must be >= 1")
    return model, t, ct, cp, b, None if chunk_size is None else int(chunk_size)


def check_model_method(model: str, method: str) -> str:
    """The registry key of ``model`` after checking that ``method`` can fit it (ValueError otherwise)."""
    info = registry.model(model)
    if method not in registry.METHODS:
        raise ValueError(f"method={method!r}: use 'lls' (linear, Murase) or 'nlls' (nonlinear least squares)")
    if method == "lls" and not info.linear:
        linear = ", ".join(f"{k} ({m.title})" for k, m in registry.MODELS.items() if m.linear)
        raise ValueError(f"method='lls' ({registry.METHODS['lls']}) is available for {linear}; use method='nlls' "
                         f"({registry.METHODS['nlls']}) for {info.key} ({info.title})")
    return info.key


def _check_bounds(bounds, model):
    b = dict(DEFAULT_BOUNDS)
    allowed = set(registry.MODELS[model].parameters) | {"delay_s"}
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
    if "ve" in registry.MODELS[model].parameters:
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


def _outputs(ctx: _Context, n):
    """The per-voxel outputs of a fit, unset: parameters (n, P), r2, status and as the context asks
    delay, standard errors (n, S), model choice and AICc."""
    out = {"theta": np.full((n, len(ctx.names)), np.nan), "r2": np.full(n, np.nan),
           "status": np.full(n, FIT_FAILED, dtype=np.int8)}
    if ctx.fit_delay:
        out["delay"] = np.full(n, np.nan)
    if ctx.uncertainty:
        out["se"] = np.full((n, len(registry.uncertainty_maps(ctx.model))), np.nan)
    if ctx.model == "auto":
        out["model_choice"] = np.zeros(n, dtype=np.int8)
        out["aicc"] = np.full(n, np.nan)
    return out


def _store(out, idx, acc, done):
    for key, values in acc.items():
        values[idx] = out[key]
    return done + idx.size


def _make_maps(ctx: _Context, acc, voxel_shape):
    info = registry.MODELS[ctx.model]
    maps = {name: acc["theta"][:, i].reshape(voxel_shape) for i, name in enumerate(info.parameters)}
    if "kep" in info.maps:   # derived: kep = Ktrans / ve
        with np.errstate(divide="ignore", invalid="ignore"):
            maps["kep"] = maps["ktrans"] / maps["ve"]
    for key in ("model_choice", "aicc"):
        if key in acc:
            maps[key] = acc[key].reshape(voxel_shape)
    maps = {k: maps[k] for k in info.maps}
    if ctx.uncertainty:
        for j, name in enumerate(registry.uncertainty_maps(ctx.model)):
            maps[name] = acc["se"][:, j].reshape(voxel_shape)
    maps["r2"] = acc["r2"].reshape(voxel_shape)
    maps["status"] = acc["status"].reshape(voxel_shape)
    if ctx.fit_delay:
        maps["delay_s"] = acc["delay"].reshape(voxel_shape)
    return maps


def _fit_voxels(ctx: _Context, method: str, y_all, idx, engine="numpy"):
    """Fit the voxels ``idx`` of ``y_all`` (n_vox, T): invalid and flat curves get their status, the others
    are fitted by the engine's kernels. Returns the outputs of :func:`_outputs` for these voxels."""
    contiguous = idx[-1] - idx[0] + 1 == idx.size
    rows = y_all[idx[0]:idx[-1] + 1] if contiguous else y_all[idx]
    if engine == "numba":
        from . import _compiled

        def one_model(sub):
            f = _compiled.fit_rows(sub, method, rows)
            return _chunk_outputs(sub, f["theta"], f["sse"], f["sst"], f["status"], f["delay"], f["cov"])

        return _fit_auto(ctx, one_model, rows.shape[1], rows.shape[0]) if ctx.model == "auto" else one_model(ctx)
    # time-major (T, n) copy of the chunk: every later pass runs over contiguous rows
    yt = rows.T.astype(np.float64, order="C")
    out = _outputs(ctx, idx.size)
    lo_v, hi_v = yt.min(axis=0), yt.max(axis=0)          # NaN or +-Inf anywhere shows up here
    finite = np.isfinite(lo_v) & np.isfinite(hi_v)
    out["status"][~finite] = INVALID_INPUT
    flat = finite & (lo_v == hi_v)
    out["status"][flat] = NO_SIGNAL
    go = finite & ~flat
    if go.any():
        sub = yt[:, go] if not go.all() else yt
        if ctx.model == "auto":
            fitted = _fit_auto(ctx, lambda c: _fit_chunk(c, method, sub), sub.shape[0], sub.shape[1])
        else:
            fitted = _fit_chunk(ctx, method, sub)
        for key, values in out.items():
            values[go] = fitted[key]
    return out


def _fit_chunk(ctx: _Context, method: str, yt):
    """Fit the voxels of yt (T, n) with the numpy kernels; returns the outputs of :func:`_chunk_outputs`."""
    lo, hi = ctx.limits()
    cov = None
    if method == "lls":
        fine, _ = ctx.delay_steps()
        theta, delay, _, cov = _lls_search(ctx, yt, ctx.delay_grid(fine) if ctx.fit_delay else None,
                                           covariance=ctx.uncertainty)
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
            theta, delay, sse, status, normal = _profile_delay(ctx, yt, theta, delay, lo, hi)
        else:
            theta, sse, status, normal = _levenberg_marquardt(ctx, yt, theta, None, lo, hi)
        if ctx.uncertainty:
            cov = _nlls_covariance(ctx, normal, sse)
    n_t = yt.shape[0]
    sst = np.einsum("tn,tn->n", yt, yt) - yt.sum(axis=0) ** 2 / n_t
    return _chunk_outputs(ctx, theta, sse, sst, status, delay, cov)


def _chunk_outputs(ctx: _Context, theta, sse, sst, status, delay, cov):
    """What both engines' fits of a chunk become: {"theta": (n, P), "r2", "status", "sse": (n,), and as the
    context asks "delay" (n,), "se" (n, S)}. r2 = 1 - SSE / SST; a fitted voxel (status ok, not converged
    or at bound) whose parameters or r2 are not finite becomes FIT_FAILED with NaN; the voxels the
    kernels did not fit (invalid input, no signal) keep their status."""
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - sse / sst
    fitted = status <= AT_BOUND
    bad = ~fitted | ~np.all(np.isfinite(theta), axis=1) | ~np.isfinite(r2)
    status = np.where(bad & (fitted | (status == FIT_FAILED)), FIT_FAILED, status).astype(np.int8)
    theta = np.where(bad[:, None], np.nan, theta)
    r2 = np.where(bad, np.nan, r2)
    out = {"theta": theta, "r2": r2, "status": status, "sse": np.where(bad, np.nan, sse)}
    if ctx.fit_delay:
        out["delay"] = np.where(bad, np.nan, delay)
    if ctx.uncertainty:
        out["se"] = _standard_errors(ctx, theta, cov)
    return out


def _fit_auto(ctx: _Context, fit_model, n_t: int, n: int):
    """``model="auto"``: the voxels of a chunk (``n_t`` frames, ``n`` voxels) fitted by ``fit_model(ctx of
    one model)`` with every model of ``registry.AUTO_CANDIDATES``, each voxel keeping the fit of least
    AICc (module doc). Returns the outputs of :func:`_outputs`; a voxel no model fitted keeps the status
    the kernels gave it (invalid input, no signal) or is FIT_FAILED."""
    fits, aicc = [], []
    for model in registry.AUTO_CANDIDATES:
        sub = dataclasses.replace(ctx, model=model)
        f = fit_model(sub)
        k = len(sub.names) + 1 + (1 if ctx.fit_delay else 0)        # + the residual variance (+ the delay)
        aicc.append(np.where(f["status"] <= AT_BOUND, _aicc(f["sse"], n_t, k), np.inf))
        fits.append((sub, f))
    aicc = np.stack(aicc)
    choice = np.argmin(aicc, axis=0)                                # ties: the first, the simpler model
    best = aicc[choice, np.arange(n)]
    chosen = np.isfinite(best)
    out = _outputs(ctx, n)
    first = fits[0][1]["status"]
    out["status"] = np.where((first == INVALID_INPUT) | (first == NO_SIGNAL), first, FIT_FAILED).astype(np.int8)
    out["aicc"] = np.where(chosen, best, np.nan)
    out["model_choice"] = np.where(chosen, choice + 1, 0).astype(np.int8)
    names = list(ctx.names)
    se_names = list(registry.uncertainty_maps("auto"))
    for c, (sub, f) in enumerate(fits):
        win = chosen & (choice == c)
        for j, name in enumerate(sub.names):
            out["theta"][win, names.index(name)] = f["theta"][win, j]
        if sub.model == "tofts":
            out["theta"][win, names.index("vp")] = 0.0                # no plasma term
        for key in ("r2", "status", "delay"):
            if key in out:
                out[key][win] = f[key][win]
        if ctx.uncertainty:
            for j, name in enumerate(registry.uncertainty_maps(sub.model)):
                out["se"][win, se_names.index(name)] = f["se"][win, j]
    return out


def _profile_delay(ctx, yt, theta, delay, lo, hi):
    """Delay refinement: fit the kinetic parameters at the start delay (snapped to the fine lattice), then
    walk the lattice one step at a time, to earlier delays and (where that did not move) to later ones,
    while the fitted SSE keeps falling; last (not for the 2CXM), between the lattice points: a fit at the
    vertex of the parabola through the fitted SSEs at the best lattice delay and its two neighbours (kept
    where its SSE is lower). Returns (theta, delay, sse, status, J^T J)."""
    fine, _ = ctx.delay_steps()
    d_lo, d_hi = ctx.bounds["delay_s"]
    grid = ctx.delay_grid(fine)
    delay = grid[np.abs(grid[None, :] - delay[:, None]).argmin(axis=1)]
    theta, sse, status, normal = _levenberg_marquardt(ctx, yt, theta, delay, lo, hi)
    moved = np.zeros(delay.size, dtype=bool)
    s_side = {-1.0: np.full(delay.size, np.nan), 1.0: np.full(delay.size, np.nan)}   # SSE at the neighbours
    for direction in (-1.0, 1.0):
        # each walk starts next to the best delay so far, from the best parameters so far; where the walk to
        # earlier delays moved, the SSE rises to the right of the start: no walk to later delays there
        d_try = delay + direction * fine
        walking = (d_try >= d_lo - 1e-9) & (d_try <= d_hi + 1e-9) & np.isfinite(sse) & ~moved
        for _ in range(grid.size):
            idx = np.flatnonzero(walking)
            if idx.size == 0:
                break
            th, s, st, nm = _levenberg_marquardt(ctx, yt[:, idx], theta[idx], d_try[idx], lo, hi)
            better = s < sse[idx]
            win, lose = idx[better], idx[~better]
            s_side[direction][lose] = s[~better]
            s_side[-direction][win] = sse[win]                     # the old best: the new best's neighbour
            theta[win], sse[win], status[win], delay[win] = th[better], s[better], st[better], d_try[win]
            normal[win] = nm[better]
            moved[win] = True
            walking[lose] = False
            d_try[win] += direction * fine
            walking &= (d_try >= d_lo - 1e-9) & (d_try <= d_hi + 1e-9)
    if ctx.model == "2cxm":     # its delay trades off against Fp and PS: kept on the lattice (module doc)
        return theta, delay, sse, status, normal
    off = _delay_vertex(s_side[-1.0], sse, s_side[1.0])
    idx = np.flatnonzero(off != 0.0)
    if idx.size:
        d_star = delay[idx] + off[idx] * fine
        th, s, st, nm = _levenberg_marquardt(ctx, yt[:, idx], theta[idx], d_star, lo, hi)
        better = s < sse[idx]
        win = idx[better]
        theta[win], sse[win], status[win], delay[win], normal[win] = th[better], s[better], st[better], \
            d_star[better], nm[better]
    return theta, delay, sse, status, normal


def _delay_vertex(s_left, s_mid, s_right):
    """Offsets (in lattice steps, |offset| <= 1/2) of the vertices of the parabolas through the SSEs at a
    lattice delay and its two neighbours (the middle the least); 0 without both neighbours, for a parabola
    that is not convex and for offsets below 1e-3 step (as _compiled._vertex)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = s_left - 2.0 * s_mid + s_right
        off = np.clip(0.5 * (s_left - s_right) / denom, -0.5, 0.5)
    ok = np.isfinite(s_left) & np.isfinite(s_right) & (denom > 0) & (np.abs(off) >= 1e-3)
    return np.where(ok, off, 0.0)
