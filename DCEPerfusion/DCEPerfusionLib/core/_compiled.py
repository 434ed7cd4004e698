"""Compiled (numba) kernels behind :func:`fitting.fit` ``engine="numba"``: the same methods as the numpy
kernels of :mod:`_fit_kernels` - the Murase LLS with its covariance terms, the LLS and variable-projection
starts, the projected Levenberg-Marquardt iteration, the delay profile walk and the 2CXM with its
analytic Jacobian - written one voxel at a time instead of all voxels of a chunk at once. A chunk is
one call with the GIL released (``nogil``), so :func:`fitting.fit`'s threads run chunks in parallel;
the per-voxel loop keeps a curve and its Jacobian in cache (60 frames: a few kB), where the numpy
kernels stream (T, n) arrays through memory at every step.

Same rules as the numpy path (statuses, bounds, convergence tests, tie-breaking: the first of equal
SSEs), so the two give the same maps: within 1e-9 relative on noise-free curves
(``Testing/test_compiled.py``). The standard errors, r2 and statuses are finished by the numpy code
shared with the numpy path (:func:`fitting._chunk_outputs`), from the J^T J (NLLS) or the linear
system's normal matrix and sandwich (LLS) these kernels return.

This module imports numba; :mod:`fitting` imports it only when numba is there. Compiled functions are
cached on disk (numba ``cache=True``: ``__pycache__`` beside this file, or numba's user cache directory
when that is not writable). numba keys that cache on this file's time stamp only: the functions of
other modules compiled into these kernels (``models.two_compartment_rate_derivatives``,
``_fit_kernels.biexp_parameters`` and ``_fit_kernels.solve3``, and the constants taken from them: the
series coefficients, the 2CXM fallback start) are not watched, so after editing them in place (or a
checkout that changes them but not this file), touch this file (an install writes all anew).
"""

from __future__ import annotations

import dataclasses
import math
from collections import namedtuple

import numba
import numpy as np

from . import _fit_kernels as _fk
from . import models as _m
from . import registry

# reassociation and contraction let LLVM vectorise the sums over frames (the results move by rounding only:
# Testing/test_compiled.py holds them to the numpy kernels); no flag that assumes finite values - NaN and
# Inf are how a bad voxel shows up
_jit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")

# model and method codes of the kernels
TOFTS, EXTENDED_TOFTS, PATLAK, TWO_CXM = 0, 1, 2, 3
MODEL_CODES = {"tofts": TOFTS, "extended_tofts": EXTENDED_TOFTS, "patlak": PATLAK, "2cxm": TWO_CXM}
LLS, NLLS = 0, 1

# status codes (equal to _fit_kernels')
_OK, _NOT_CONVERGED, _AT_BOUND, _INVALID, _NO_SIGNAL, _FAILED = 0, 1, 2, 3, 4, 6

_S_PER_MIN = 60.0
_FP_UNIT = 6000.0          # units.FP_ML_PER_100ML_PER_MIN_PER_S
_G0 = _m._G0_COEF.copy()
_G1 = _m._G1_COEF.copy()
_DG0 = _G0[1:] * np.arange(1, _G0.size)
_DG1 = _G1[1:] * np.arange(1, _G1.size)
_SERIES_X = _m._SERIES_X
_FALLBACK_2CXM = _fk._2CXM_FALLBACK_START

# the 2CXM's maths written once, for numpy arrays and (compiled here) for scalars
_rates = numba.njit(cache=True, nogil=True)(_m.two_compartment_rate_derivatives)
_biexp = numba.njit(cache=True, nogil=True)(_fk.biexp_parameters)
_solve3 = numba.njit(cache=True, nogil=True)(_fk.solve3)

#: A thread's working arrays for one voxel at a time: the model curve and Jacobian rows, convolution
#: curves and weights, the normal equations and the LM step, the 2CXM grid's projections.
Scratch = namedtuple("Scratch", "pred jac f df f2 df2 wk a g a2 g2 m b step trial fixed fy cps icps")


@_jit
def scratch(n_t, n_par, n_steps, n_rates):
    return Scratch(np.empty(n_t), np.empty((n_par, n_t)), np.empty(n_t), np.empty(n_t), np.empty(n_t), np.empty(n_t),
                   np.empty((n_steps, 6)), np.empty((n_par, n_par)), np.empty(n_par), np.empty((n_par, n_par)),
                   np.empty(n_par), np.empty((n_par, n_par)), np.empty(n_par), np.empty(n_par), np.empty(n_par),
                   np.zeros(n_par, dtype=np.bool_),
                   np.empty(max(n_rates, 1)), np.empty(n_t), np.empty(n_t))


@_jit
def _horner(coef, x):
    out = 0.0
    for i in range(coef.size - 1, -1, -1):
        out = out * x + coef[i]
    return out


@_jit
def _weights(h, k, w):
    """Recursion weights of one frame interval h (s) for the rate k (1/s), as models._weights: w[0] = e^{-x},
    w[1] = h g0, w[2] = h g1, w[3] = h^2 dg0/dx, w[4] = h^2 dg1/dx, w[5] = -h e^{-x} (x = k h)."""
    x = h * k
    if abs(x) < _SERIES_X:
        e = math.exp(-x)
        g0, g1 = _horner(_G0, x), _horner(_G1, x)
        dg0, dg1 = _horner(_DG0, x), _horner(_DG1, x)
    else:
        em = math.expm1(-x)
        e = em + 1.0
        ix = 1.0 / x
        g0 = (-em - x * e) * ix * ix
        g1 = (x + em) * ix * ix
        dg0 = (e - 2.0 * g0) * ix
        dg1 = (-em * ix - 2.0 * g1) * ix
    w[0], w[1], w[2], w[3], w[4], w[5] = e, h * g0, h * g1, h * h * dg0, h * h * dg1, -h * e


@_jit
def _convolve(steps, group, cp, k, f, df, wk, derivative):
    """F = cp * exp(-k t) (and dF/dk) by the exact recursion of models.exp_convolution; steps (G,) the
    distinct frame intervals, group (T-1,) the interval's index into them; wk (G, 6) scratch."""
    for g in range(steps.size):
        _weights(steps[g], k, wk[g])
    f[0] = df[0] = fi = dfi = 0.0                # the recursion's state stays in registers (no reload)
    for i in range(1, cp.size):
        w = wk[group[i - 1]]
        if derivative:
            dfi = w[3] * cp[i - 1] + w[4] * cp[i] + w[0] * dfi + w[5] * fi
            df[i] = dfi
        fi = w[1] * cp[i - 1] + w[2] * cp[i] + w[0] * fi
        f[i] = fi


@_jit
def _model(code, theta, cpd, icpd, steps, group, w, derivative):
    """Model curve w.pred (T,) at ``theta`` (registry units) for the delayed input cpd (and its running
    integral icpd, Patlak); with ``derivative`` also the Jacobian rows w.jac (P, T), as _fit_kernels._evaluate."""
    n_t = cpd.size
    pred, jac = w.pred, w.jac
    if code == PATLAK:
        kt = theta[0] / _S_PER_MIN
        for i in range(n_t):
            pred[i] = icpd[i] * kt + cpd[i] * theta[1]
            if derivative:
                jac[0, i] = icpd[i] / _S_PER_MIN
                jac[1, i] = cpd[i]
        return
    f, df = w.f, w.df
    if code == TWO_CXM:
        r = _rates(theta[0] / _FP_UNIT, theta[1] / _S_PER_MIN, theta[2], theta[3])
        k_plus, k_minus, a_plus, a_minus = r[0], r[1], r[2], r[3]
        f2, df2 = w.f2, w.df2
        _convolve(steps, group, cpd, k_plus, f, df, w.wk, derivative)
        _convolve(steps, group, cpd, k_minus, f2, df2, w.wk, derivative)
        for i in range(n_t):
            pred[i] = a_plus * f[i] + a_minus * f2[i]
        if derivative:
            for p in range(4):
                u = 1.0 / _FP_UNIT if p == 0 else (1.0 / _S_PER_MIN if p == 1 else 1.0)
                dkp, dkm, dap, dam = r[4 + p] * u, r[8 + p] * u, r[12 + p] * u, r[16 + p] * u
                for i in range(n_t):
                    jac[p, i] = dap * f[i] + a_plus * dkp * df[i] + dam * f2[i] + a_minus * dkm * df2[i]
        return
    kt = theta[0] / _S_PER_MIN
    ve = theta[1]
    k = kt / ve
    _convolve(steps, group, cpd, k, f, df, w.wk, derivative)
    vp = theta[2] if code == EXTENDED_TOFTS else 0.0
    for i in range(n_t):
        pred[i] = f[i] * kt + cpd[i] * vp
    if derivative:
        c_ve = -kt * k / ve
        for i in range(n_t):
            jac[0, i] = f[i] / _S_PER_MIN + k / _S_PER_MIN * df[i]
            jac[1, i] = c_ve * df[i]
            if code == EXTENDED_TOFTS:
                jac[2, i] = cpd[i]


@_jit
def _tofts_sse(code, y, theta, cpd, steps, group, wk):
    """SSE of Tofts / Extended Tofts at theta: the convolution and the residual in one pass."""
    kt = theta[0] / _S_PER_MIN
    k = kt / theta[1]
    vp = theta[2] if code == EXTENDED_TOFTS else 0.0
    for g in range(steps.size):
        _weights(steps[g], k, wk[g])
    e, w1, w2 = wk[0, 0], wk[0, 1], wk[0, 2]
    uniform = steps.size == 1
    f = 0.0
    r = y[0] - cpd[0] * vp
    sse = r * r
    for i in range(1, y.size):
        if not uniform:
            q = group[i - 1]
            e, w1, w2 = wk[q, 0], wk[q, 1], wk[q, 2]
        f = w1 * cpd[i - 1] + w2 * cpd[i] + e * f
        r = y[i] - (f * kt + cpd[i] * vp)
        sse += r * r
    return sse


@_jit
def _tofts_normal(code, y, theta, cpd, steps, group, wk, a, g):
    """J^T J, J^T r and the SSE of Tofts / Extended Tofts at theta in one pass over the frames (the
    convolution, its derivative by kep, the Jacobian of _fit_kernels._evaluate and their products)."""
    kt = theta[0] / _S_PER_MIN
    ve = theta[1]
    k = kt / ve
    ext = code == EXTENDED_TOFTS
    vp = theta[2] if ext else 0.0
    inv_min = 1.0 / _S_PER_MIN
    c_kt, c_ve = k * inv_min, -kt * k / ve
    for q in range(steps.size):
        _weights(steps[q], k, wk[q])
    e, w1, w2, v1, v2, de = wk[0, 0], wk[0, 1], wk[0, 2], wk[0, 3], wk[0, 4], wk[0, 5]
    uniform = steps.size == 1
    f = df = 0.0
    r = y[0] - cpd[0] * vp                     # frame 0: F = dF = 0, J = (0, 0, cp_0)
    sse = r * r
    g0 = g1 = a00 = a01 = a11 = a02 = a12 = 0.0
    g2, a22 = r * cpd[0], cpd[0] * cpd[0]
    for i in range(1, y.size):
        if not uniform:
            q = group[i - 1]
            e, w1, w2, v1, v2, de = wk[q, 0], wk[q, 1], wk[q, 2], wk[q, 3], wk[q, 4], wk[q, 5]
        c0, c = cpd[i - 1], cpd[i]
        df = v1 * c0 + v2 * c + e * df + de * f
        f = w1 * c0 + w2 * c + e * f
        r = y[i] - (f * kt + c * vp)
        j0 = f * inv_min + c_kt * df
        j1 = c_ve * df
        sse += r * r
        g0 += j0 * r
        g1 += j1 * r
        a00 += j0 * j0
        a01 += j0 * j1
        a11 += j1 * j1
        g2 += c * r
        a02 += j0 * c
        a12 += j1 * c
        a22 += c * c
    a[0, 0], a[0, 1], a[1, 0], a[1, 1] = a00, a01, a01, a11
    g[0], g[1] = g0, g1
    if ext:
        a[0, 2], a[2, 0], a[1, 2], a[2, 1], a[2, 2] = a02, a02, a12, a12, a22
        g[2] = g2
    return sse


@_jit
def _sse_at(code, y, theta, cpd, icpd, steps, group, w):
    """SSE of the model at theta; +inf when not finite (as _fit_kernels._sse)."""
    if code == TOFTS or code == EXTENDED_TOFTS:
        sse = _tofts_sse(code, y, theta, cpd, steps, group, w.wk)
        return sse if math.isfinite(sse) else np.inf
    _model(code, theta, cpd, icpd, steps, group, w, False)
    sse = 0.0
    for i in range(y.size):
        r = y[i] - w.pred[i]
        sse += r * r
    return sse if math.isfinite(sse) else np.inf


@_jit
def _normal(code, y, theta, cpd, icpd, steps, group, w, a, g):
    """J^T J -> a (P, P), J^T r -> g (P,) at theta; returns the SSE."""
    if code == TOFTS or code == EXTENDED_TOFTS:
        return _tofts_normal(code, y, theta, cpd, steps, group, w.wk, a, g)
    _model(code, theta, cpd, icpd, steps, group, w, True)
    pred, jac = w.pred, w.jac
    n_par = theta.size
    sse = 0.0
    for i in range(y.size):
        pred[i] = y[i] - pred[i]           # the residual, in place
        sse += pred[i] * pred[i]
    for p in range(n_par):
        acc = 0.0
        for i in range(y.size):
            acc += jac[p, i] * pred[i]
        g[p] = acc
        for q in range(p, n_par):
            acc = 0.0
            for i in range(y.size):
                acc += jac[p, i] * jac[q, i]
            a[p, q] = acc
            a[q, p] = acc
    return sse


@_jit
def _solve(m, b, x):
    """m x = b for a small system: cofactors for P = 2 and 3 (as _fit_kernels._solve2/_solve3), Gaussian
    elimination with partial pivoting otherwise (m and b are overwritten)."""
    n = b.size
    if n == 2:
        det = m[0, 0] * m[1, 1] - m[0, 1] * m[0, 1]
        x[0] = (m[1, 1] * b[0] - m[0, 1] * b[1]) / det
        x[1] = (m[0, 0] * b[1] - m[0, 1] * b[0]) / det
        return
    if n == 3:
        x[0], x[1], x[2] = _solve3(m[0, 0], m[0, 1], m[0, 2], m[1, 1], m[1, 2], m[2, 2], b[0], b[1], b[2])
        return
    for c in range(n):
        piv = c
        for r in range(c + 1, n):
            if abs(m[r, c]) > abs(m[piv, c]):
                piv = r
        if piv != c:
            for j in range(n):
                m[c, j], m[piv, j] = m[piv, j], m[c, j]
            b[c], b[piv] = b[piv], b[c]
        for r in range(c + 1, n):
            fac = m[r, c] / m[c, c]
            for j in range(c, n):
                m[r, j] -= fac * m[c, j]
            b[r] -= fac * b[c]
    for c in range(n - 1, -1, -1):
        acc = b[c]
        for j in range(c + 1, n):
            acc -= m[c, j] * x[j]
        x[c] = acc / m[c, c]


@_jit
def _levenberg_marquardt(code, y, theta, cpd, icpd, steps, group, lo, hi, max_iter, w, normal_out, primed=np.nan):
    """Projected Levenberg-Marquardt of one voxel from ``theta`` (updated in place), as
    _fit_kernels._levenberg_marquardt (xtol 1e-7, ftol 1e-12); returns (sse, status) and leaves J^T J as
    the iteration last built it in ``normal_out`` (P, P). w: the thread's scratch (:func:`scratch`).
    ``primed``: not NaN when w.a, w.g already hold the normal equations at theta and this is their SSE."""
    xtol, ftol = 1e-7, 1e-12
    a, g, m, b, step, trial = w.a, w.g, w.m, w.b, w.step, w.trial
    n_par = theta.size
    sse = primed if not math.isnan(primed) else _normal(code, y, theta, cpd, icpd, steps, group, w, a, g)
    normal_out[:, :] = a
    if not math.isfinite(sse):
        return sse, _FAILED
    status = _NOT_CONVERGED
    lam = 1e-3
    for _ in range(max_iter):
        dmax = 0.0
        for p in range(n_par):
            dmax = max(dmax, a[p, p])
        fixed = w.fixed
        for p in range(n_par):
            scale = max(hi[p] - lo[p], 1e-12)
            at_lo = theta[p] <= lo[p] + 1e-12 * scale and g[p] <= 0
            at_hi = theta[p] >= hi[p] - 1e-12 * scale and g[p] >= 0
            fixed[p] = at_lo or at_hi or a[p, p] <= 1e-14 * dmax
        for p in range(n_par):
            for q in range(n_par):
                m[p, q] = 0.0 if (fixed[p] or fixed[q]) else a[p, q]
            if fixed[p]:
                m[p, p] = 1.0
                b[p] = 0.0
            else:
                m[p, p] = a[p, p] + lam * a[p, p]
                b[p] = g[p]
        _solve(m, b, step)
        small_step = True
        for p in range(n_par):
            v = theta[p] + step[p]             # as np.clip then "not finite -> theta": +-inf clips, NaN stays
            v = theta[p] if math.isnan(v) else min(max(v, lo[p]), hi[p])
            trial[p] = v
            scale = max(hi[p] - lo[p], 1e-12)
            if abs(v - theta[p]) > xtol * (abs(theta[p]) + xtol * scale):
                small_step = False
        # the trial's SSE with its normal equations: most steps are accepted, and then they are needed
        s_new = _normal(code, y, trial, cpd, icpd, steps, group, w, w.a2, w.g2)
        better = math.isfinite(s_new) and s_new <= sse
        small_change = abs(sse - s_new) <= ftol * sse
        converged = small_step or (better and small_change) or lam > 1e10
        if better:
            theta[:] = trial
            sse = s_new
            lam = max(lam * 0.2, 1e-12)
        else:
            lam = lam * 8.0
        if converged:
            status = _OK
            break
        if better:
            a[:, :] = w.a2
            g[:] = w.g2
    normal_out[:, :] = a
    if status == _OK:
        for p in range(n_par):
            scale = max(hi[p] - lo[p], 1e-12)
            if theta[p] <= lo[p] + 1e-9 * scale or theta[p] >= hi[p] - 1e-9 * scale:
                status = _AT_BOUND
    return sse, status


# ---- linear least squares (Murase) -------------------------------------------------------------
@_jit
def _running_integral(t, y, out, sign):
    """out = sign * cumulative trapezoidal integral of y from the first frame."""
    out[0] = 0.0
    acc = 0.0
    for i in range(1, y.size):
        acc += 0.5 * (t[i] - t[i - 1]) * (y[i - 1] + y[i])
        out[i] = sign * acc
    return out


@_jit
def _adjoint_integral(t, v, out):
    """out = L^T v for the running-integral operator L (L @ y = the cumulative trapezoid of y):
    (L^T v)_j = h_j/2 R_j + h_(j+1)/2 R_(j+1), R_j = sum of v_i for i >= j, h_j = t_j - t_(j-1) (0 at the ends)."""
    n = v.size
    r_next = 0.0                                   # R_(j+1)
    for j in range(n - 1, -1, -1):
        r = r_next + v[j]
        h_j = t[j] - t[j - 1] if j > 0 else 0.0
        h_next = t[j + 1] - t[j] if j < n - 1 else 0.0
        out[j] = 0.5 * h_j * r + 0.5 * h_next * r_next
        r_next = r
    return out


@_jit
def _dot(a, b):
    acc = 0.0
    for i in range(a.size):
        acc += a[i] * b[i]
    return acc


@_jit
def _lls_at(code, yy, qq, qy, pr, sc, out):
    """Murase LLS of one voxel at one delay, as _fit_kernels._lls. ``pr``: the voxel's products with the
    delay's shared curves (cp.y, icp.y, (L^T cp).y, (L^T icp).y: q.icp = -(L^T icp).y and q.cp =
    -(L^T cp).y for q = -L y), ``sc``: the curves' own products (icp.icp, icp.cp, cp.cp). The model
    parameters -> out[:P], the unknowns beta -> out[4:4+P]; returns the linear-system SSE."""
    ycp, yicp = pr[0], pr[1]
    a00 = sc[0]
    if code == PATLAK:
        a01, a11 = sc[1], sc[2]
        det = a00 * a11 - a01 * a01
        b0 = (a11 * yicp - a01 * ycp) / det
        b1 = (a00 * ycp - a01 * yicp) / det
        out[0], out[1], out[4], out[5] = b0 * _S_PER_MIN, b1, b0, b1
        return yy - b0 * yicp - b1 * ycp
    qicp = -pr[3]
    if code == TOFTS:
        det = a00 * qq - qicp * qicp
        b0 = (qq * yicp - qicp * qy) / det
        b1 = (a00 * qy - qicp * yicp) / det
        ktrans, kep = b0 * _S_PER_MIN, b1 * _S_PER_MIN
        out[0], out[1], out[4], out[5] = ktrans, ktrans / kep, b0, b1
        return yy - b0 * yicp - b1 * qy
    b0, b1, b2 = _solve3(a00, qicp, sc[1], qq, -pr[2], sc[2], yicp, qy, ycp)   # q.cp = -(L^T cp).y
    ktrans = (b0 - b1 * b2) * _S_PER_MIN
    out[0], out[1], out[2] = ktrans, ktrans / (b1 * _S_PER_MIN), b2
    out[4], out[5], out[6] = b0, b1, b2
    return yy - b0 * yicp - b1 * qy - b2 * ycp


@_jit
def _lls_search(code, yy, qq, qy, proj, scal, n_par, best, trial):
    """LLS at each delay slot (proj: the voxel's (S, 4) products, scal (S, 3) the curves' own), keeping the
    first of the least linear-system SSE (not finite counts as +inf), as _fit_kernels._lls_search; returns
    (SSE, slot) and leaves the parameters and unknowns in ``best``."""
    best_sse, best_j = np.inf, 0
    for j in range(proj.shape[0]):
        sse = _lls_at(code, yy, qq, qy, proj[j], scal[j], trial)
        finite = math.isfinite(sse)
        for p in range(n_par):
            finite = finite and math.isfinite(trial[p])
        if not finite:
            sse = np.inf
        if j == 0 or sse < best_sse:
            best_sse, best_j = sse, j
            best[:] = trial
    return best_sse, best_j


@_jit
def _lls_covariance_terms(code, t, q, beta, cp, icp, lt_cp, lt_icp, w, a, gm, mid):
    """The terms of the LLS covariance at the chosen delay, for _fit_kernels._linear_covariance: the normal
    matrix A^T A of the unknowns -> a, the derivatives of the model parameters by the unknowns -> gm, and
    (Tofts, Extended Tofts) the sandwich A^T W A = B^T B with B = (I + kep L)^T A -> mid."""
    if code == PATLAK:
        a[0, 0], a[0, 1], a[1, 1] = _dot(icp, icp), _dot(icp, cp), _dot(cp, cp)
        a[1, 0] = a[0, 1]
        gm[0, 0], gm[0, 1], gm[1, 0], gm[1, 1] = _S_PER_MIN, 0.0, 0.0, 1.0
        return
    n_par = 2 if code == TOFTS else 3
    k = beta[1]
    cols = w.f                                     # A's columns, then B's: reuse the curve scratch
    lt_q = _adjoint_integral(t, q, w.df)
    bq = w.f2
    for i in range(q.size):
        bq[i] = q[i] + k * lt_q[i]
    b_icp = w.df2
    for i in range(q.size):
        b_icp[i] = icp[i] + k * lt_icp[i]
    a[0, 0], a[0, 1], a[1, 1] = _dot(icp, icp), _dot(icp, q), _dot(q, q)
    mid[0, 0], mid[0, 1], mid[1, 1] = _dot(b_icp, b_icp), _dot(b_icp, bq), _dot(bq, bq)
    if n_par == 3:
        for i in range(q.size):
            cols[i] = cp[i] + k * lt_cp[i]
        a[0, 2], a[1, 2], a[2, 2] = _dot(icp, cp), _dot(q, cp), _dot(cp, cp)
        mid[0, 2], mid[1, 2], mid[2, 2] = _dot(b_icp, cols), _dot(bq, cols), _dot(cols, cols)
    for i in range(n_par):
        for j in range(i):
            a[i, j] = a[j, i]
            mid[i, j] = mid[j, i]
    b0, b1 = beta[0], beta[1]
    for i in range(n_par):
        for j in range(n_par):
            gm[i, j] = 0.0
    if code == TOFTS:
        gm[0, 0] = _S_PER_MIN
        gm[1, 0], gm[1, 1] = 1.0 / b1, -b0 / (b1 * b1)
        return
    b2 = beta[2]
    gm[0, 0], gm[0, 1], gm[0, 2] = _S_PER_MIN, -_S_PER_MIN * b2, -_S_PER_MIN * b1
    gm[1, 0], gm[1, 1], gm[1, 2] = 1.0 / b1, -b0 / (b1 * b1), -1.0
    gm[2, 2] = 1.0


# ---- starting values: variable projection on a grid ----------------------------------------------
@_jit
def _nnls2(yy, b0, b1, g00, g01, g11):
    """min |y - a0 f0 - a1 f1|^2 with a0, a1 >= 0 (as _fit_kernels._nnls2); returns (a0, a1, sse)."""
    det = g00 * g11 - g01 * g01
    a0 = (g11 * b0 - g01 * b1) / det
    a1 = (g00 * b1 - g01 * b0) / det
    sse = yy - a0 * b0 - a1 * b1
    if a0 >= 0 and a1 >= 0 and math.isfinite(sse):
        return a0, a1, sse
    o0 = max(b0 / g00, 0.0)
    o1 = max(b1 / g11, 0.0)
    s0, s1 = yy - o0 * b0, yy - o1 * b1
    if s0 <= s1:
        return o0, 0.0, s0
    return 0.0, o1, s1


@_jit
def _grid_tofts(code, yy, ycp, fy, gff, fcp, cpcp, kep_grid, ve_hi, theta):
    """Tofts / Extended Tofts start at one delay from the voxel's products fy (K,) with the grid curves
    (and ycp = cp.y): best amplitudes for every grid kep, the first of the least SSE, as
    _fit_kernels._grid_start; parameters -> theta, returns the grid SSE."""
    best, best_k, best_a, best_vp = np.inf, 0, 0.0, 0.0
    for k in range(kep_grid.size):
        if code == TOFTS:
            a = max(fy[k] / gff[k, k], 0.0)
            vp = 0.0
            sse = yy - a * fy[k]
        else:
            a, vp, sse = _nnls2(yy, fy[k], ycp, gff[k, k], fcp[k], cpcp)
        if k == 0 or sse < best:
            best, best_k, best_a, best_vp = sse, k, a, vp
    ktrans = best_a * _S_PER_MIN
    kep = kep_grid[best_k] * _S_PER_MIN
    theta[0] = ktrans
    theta[1] = ktrans / kep if kep > 0 else ve_hi
    if code == EXTENDED_TOFTS:
        theta[2] = best_vp
    return best


@_jit
def _grid_2cxm(yy, fy, gff, rates, theta, best_sse):
    """2CXM start at one delay from the voxel's products fy (R,) with the grid curves: a bi-exponential on
    every pair of grid rates, converted to (Fp, PS, ve, vp), keeping the first valid of the least SSE
    below ``best_sse``, as _fit_kernels._grid_2cxm; updates theta and returns the best SSE."""
    n_r = rates.size
    for i in range(n_r):
        for j in range(i + 1, n_r):
            a_minus, a_plus, sse = _nnls2(yy, fy[i], fy[j], gff[i, i], gff[i, j], gff[j, j])
            fp_u, ps_u, ve, vp = _biexp(rates[j], rates[i], a_plus, a_minus)
            ok = True
            for v in (fp_u, ps_u, ve, vp):
                ok = ok and math.isfinite(v) and v > 0
            if ok and sse < best_sse:
                best_sse = sse
                theta[0], theta[1], theta[2], theta[3] = fp_u, ps_u, ve, vp
    return best_sse


@_jit
def _grid_products(fgrid, slot, y, proj_row, n_lls, fy):
    """The voxel's products with the grid curves of a start slot: from the chunk's matrix product when the
    fit has one start delay (proj_row[n_lls:]), else computed here."""
    n_g = fgrid.shape[1]
    if fgrid.shape[0] == 1:
        for k in range(n_g):
            fy[k] = proj_row[n_lls + k]
    else:
        for k in range(n_g):
            fy[k] = _dot(fgrid[slot, k], y)


# ---- one chunk ---------------------------------------------------------------------------------
@_jit
def _fit_rows(code, method, y_rows, proj, t, steps, group, cp_lat, icp_lat, lt_cp, lt_icp, search, scal, fit_delay,
              default_d, lo, hi, max_iter, kep_grid, ve_hi, fgrid, gff, fcp, cpcp, rates, covariance, cp, lattice, fine,
              theta_out, sse_out, sst_out, status_out, delay_out, delay_s_out, normal_out, lin_a, lin_g, lin_mid,
              lin_sse):
    """Fit every row of y_rows (n, T): statuses of invalid and flat curves, then LLS (``method`` LLS) or
    the start + Levenberg-Marquardt (+ the delay profile walk) of fitting._fit_chunk. ``search`` (S,): the
    lattice indices of the delays the LLS searches (the whole lattice for method LLS, the coarse start
    lattice for NLLS), ``proj`` (n, 4 S + G): the voxels' products with the curves of those delays (cp,
    icp, L^T cp, L^T icp) and with the G grid curves when S = 1 (one matrix product per chunk);
    ``scal`` (S, 3) the curves' own products; fgrid (S, G, T), gff (S, G, G), fcp (S, G), cpcp (S,) the
    grid curves and products per slot; cp the input, lattice (D,) the lattice delays (s) of step ``fine``.
    Writes the outputs in place; delay_out is the lattice index (-1 without a fit), delay_s_out the delay
    (s; with the delay fitted, between lattice points where the SSE's parabola puts it); default_d the
    index nearest 0 s, the 2CXM start where no grid pair gives valid parameters."""
    # this thread's own copies of the arrays every chunk shares: numba counts the references to an array
    # (its views, its slices passed on) atomically, and two threads counting on the same arrays contend
    # for one cache line at every call - the fit then scaled 1.3x on 2 cores instead of about 2x
    t, steps, group, cp_lat, icp_lat, lt_cp, lt_icp = (t.copy(), steps.copy(), group.copy(), cp_lat.copy(),
                                                       icp_lat.copy(), lt_cp.copy(), lt_icp.copy())
    search, scal, lo, hi, kep_grid, fgrid, gff = (search.copy(), scal.copy(), lo.copy(), hi.copy(), kep_grid.copy(),
                                                  fgrid.copy(), gff.copy())
    fcp, cpcp, rates, cp, lattice = fcp.copy(), cpcp.copy(), rates.copy(), cp.copy(), lattice.copy()
    n, n_t = y_rows.shape
    n_par = lo.size
    n_s = search.size
    n_lls = 4 * n_s if code != TWO_CXM else 0
    w = scratch(n_t, n_par, steps.size, max(rates.size, kep_grid.size))
    q = np.empty(n_t)
    blocked = method == LLS and steps.size == 1 and (code == TOFTS or code == EXTENDED_TOFTS)
    lls_best = np.empty(8)
    lls_trial = np.empty(8)
    th = np.empty(n_par)
    cand = np.empty(n_par)
    nm = np.empty((n_par, n_par))
    n_lat = cp_lat.shape[0]
    for v in range(n):
        y = y_rows[v]
        s1 = s2 = 0.0
        for i in range(n_t):
            s1 += y[i]
            s2 += y[i] * y[i]
        delay_out[v] = -1
        if not (math.isfinite(s1) and math.isfinite(s2)):      # a NaN or Inf sample (or sums that overflow)
            finite = True
            for i in range(n_t):
                finite = finite and math.isfinite(y[i])
            if not finite:
                status_out[v] = _INVALID
                continue
        flat = True
        for i in range(1, n_t):
            if y[i] != y[0]:
                flat = False
                break
        if flat:
            status_out[v] = _NO_SIGNAL
            continue
        sst_out[v] = s2 - s1 * s1 / n_t
        yy = s2
        lin, slot, d, start_d, g_sse, primed = np.inf, 0, search[0], search[0], np.inf, np.nan
        pr = proj[v]
        if code != TWO_CXM:
            _running_integral(t, y, q, -1.0)
            qq, qy = _dot(q, q), _dot(q, y)
            lin, slot = _lls_search(code, yy, qq, qy, pr[:n_lls].reshape((n_s, 4)), scal, n_par, lls_best, lls_trial)
            d = search[slot]
        if method == LLS:
            finite = True
            clipped = False
            for p in range(n_par):
                x = lls_best[p]
                finite = finite and math.isfinite(x)
                c = min(max(x, lo[p]), hi[p])
                clipped = clipped or c != x
                theta_out[v, p] = c if math.isfinite(x) else np.nan
            status_out[v] = _AT_BOUND if clipped else _OK
            delay_out[v] = d
            delay_s_out[v] = lattice[d]
            if not finite:
                sse_out[v] = np.nan
            elif blocked:
                sse_out[v] = np.inf              # the model's SSE: after the loop, many voxels at a time
            else:
                sse_out[v] = _sse_at(code, y, theta_out[v], cp_lat[d], icp_lat[d], steps, group, w)
            if covariance:
                _lls_covariance_terms(code, t, q, lls_best[4:], cp_lat[d], icp_lat[d], lt_cp[d], lt_icp[d], w,
                                      lin_a[v], lin_g[v], lin_mid[v])
                lin_sse[v] = lin
            continue
        # ---- start: the LLS estimate and the grid, the one of lower SSE
        if code != TWO_CXM:
            for p in range(n_par):
                x = lls_best[p]
                x = 0.5 * (lo[p] + hi[p]) if not math.isfinite(x) else x
                th[p] = min(max(x, lo[p]), hi[p])
            start_d = d
        if code == TOFTS or code == EXTENDED_TOFTS:
            _grid_products(fgrid, slot, y, pr, n_lls, w.fy)
            g_sse = max(_grid_tofts(code, yy, pr[4 * slot], w.fy, gff[slot], fcp[slot], cpcp[slot], kep_grid, ve_hi,
                                    cand), 0.0)
        elif code == TWO_CXM:
            cand[0], cand[1], cand[2], cand[3] = _FALLBACK_2CXM
            start_d = default_d
            for j in range(n_s):
                _grid_products(fgrid, j, y, pr, n_lls, w.fy)
                s_new = _grid_2cxm(yy, w.fy, gff[j], rates, cand, g_sse)
                if s_new < g_sse:
                    g_sse, start_d = s_new, search[j]
            g_sse = max(g_sse, 0.0)
        if code != PATLAK:
            moved = False
            for p in range(n_par):
                c = min(max(cand[p], lo[p]), hi[p])
                moved = moved or c != cand[p]
                cand[p] = c
            if code == TWO_CXM:
                th[:] = cand
            else:
                if moved:
                    g_sse = _sse_at(code, y, cand, cp_lat[start_d], icp_lat[start_d], steps, group, w)
                # the LLS start wins in most voxels (97 % of simulated Extended Tofts curves): its SSE comes
                # with the normal equations the iteration starts from
                primed = _normal(code, y, th, cp_lat[start_d], icp_lat[start_d], steps, group, w, w.a, w.g)
                l_sse = primed if math.isfinite(primed) else np.inf
                if g_sse < l_sse:
                    th[:] = cand
                    primed = np.nan
        # ---- Levenberg-Marquardt at the start delay, then the profile walk along the lattice
        d = start_d
        sse, status = _levenberg_marquardt(code, y, th, cp_lat[d], icp_lat[d], steps, group, lo, hi, max_iter, w,
                                           normal_out[v], primed)
        delay_s_out[v] = lattice[d]
        if fit_delay:
            moved = False
            s_left = s_right = np.nan                # the fitted SSE at the best delay's lattice neighbours
            for direction in (-1, 1):
                if direction == 1 and moved:     # the profile fell to the left: right of the start it rises
                    break
                d_try = d + direction
                while 0 <= d_try < n_lat and math.isfinite(sse):
                    cand[:] = th
                    s_new, st = _levenberg_marquardt(code, y, cand, cp_lat[d_try], icp_lat[d_try], steps, group, lo,
                                                     hi, max_iter, w, nm)
                    if not s_new < sse:
                        if direction == -1:
                            s_left = s_new
                        else:
                            s_right = s_new
                        break
                    if direction == -1:
                        s_right = sse
                    else:
                        s_left = sse
                    th[:] = cand
                    sse, status, d = s_new, st, d_try
                    normal_out[v] = nm
                    moved = True
                    d_try += direction
            delay_s_out[v] = lattice[d]
            # between the lattice points: the vertex of the parabola through the three fitted SSEs
            off = _vertex(s_left, sse, s_right) if code != TWO_CXM else 0.0   # (fitting._profile_delay)
            if off != 0.0:
                d_star = lattice[d] + off * fine
                _shifted(t, cp, d_star, w.cps, w.icps)
                cand[:] = th
                s_new, st = _levenberg_marquardt(code, y, cand, w.cps, w.icps, steps, group, lo, hi, max_iter, w, nm)
                if s_new < sse:
                    th[:] = cand
                    sse, status = s_new, st
                    normal_out[v] = nm
                    delay_s_out[v] = d_star
        theta_out[v] = th
        sse_out[v] = sse
        status_out[v] = status
        delay_out[v] = d
    if blocked:
        _blocked_sse(code, y_rows, theta_out, delay_out, sse_out, cp_lat, steps[0])


_BLOCK = 8


@_jit
def _vertex(s_left, s_mid, s_right):
    """Offset (in lattice steps, |offset| < 1/2) of the vertex of the parabola through the SSEs at a lattice
    delay and its two neighbours (the middle the least), as fitting._delay_vertex; 0 without both
    neighbours or a convex parabola, or for an offset below 1e-3 step."""
    if not (math.isfinite(s_left) and math.isfinite(s_right)):
        return 0.0
    denom = s_left - 2.0 * s_mid + s_right
    if not denom > 0.0:
        return 0.0
    off = 0.5 * (s_left - s_right) / denom
    off = min(max(off, -0.5), 0.5)
    return off if abs(off) >= 1e-3 else 0.0


@_jit
def _shifted(t, cp, delay_s, out, icp_out):
    """cp(t - delay) as models.shift_input (linear interpolation, 0 before the first sample, the last value
    after the end) -> out, and its running integral -> icp_out."""
    n = t.size
    j = 0
    for i in range(n):
        s = t[i] - delay_s
        if s < t[0]:
            out[i] = 0.0
        elif s >= t[n - 1]:
            out[i] = cp[n - 1]
        else:
            while t[j + 1] <= s:
                j += 1
            frac = (s - t[j]) / (t[j + 1] - t[j])
            out[i] = cp[j] * (1.0 - frac) + cp[j + 1] * frac
    _running_integral(t, out, icp_out, 1.0)


@_jit
def _blocked_sse(code, y_rows, theta, delay, sse_out, cp_lat, h):
    """The SSE of Tofts / Extended Tofts at theta for the voxels whose sse_out is +inf (uniform frames
    of interval h), ``_BLOCK`` voxels at a time: their convolutions are independent, so stepping them
    together through the frames hides the latency of each one's recursion (one voxel at a time, the
    recursion alone bounds the speed of the linear fit)."""
    n, n_t = y_rows.shape
    idx = np.empty(_BLOCK, dtype=np.int64)
    blk = np.empty((7, _BLOCK))
    e, w1, w2, kt, vp, f, acc = blk[0], blk[1], blk[2], blk[3], blk[4], blk[5], blk[6]
    dd = np.empty(_BLOCK, dtype=np.int64)
    wk = np.empty(6)
    v = 0
    while v < n:
        m = 0
        while v < n and m < _BLOCK:
            if sse_out[v] == np.inf:
                idx[m] = v
                m += 1
            v += 1
        for b in range(m):
            j = idx[b]
            kt[b] = theta[j, 0] / _S_PER_MIN
            vp[b] = theta[j, 2] if code == EXTENDED_TOFTS else 0.0
            _weights(h, kt[b] / theta[j, 1], wk)
            e[b], w1[b], w2[b] = wk[0], wk[1], wk[2]
            dd[b] = delay[j]
            f[b] = 0.0
            r = y_rows[j, 0] - cp_lat[dd[b], 0] * vp[b]
            acc[b] = r * r
        shared = cp_lat.shape[0] == 1                  # no delay: one input for all
        for i in range(1, n_t):
            if shared:
                c0, c1 = cp_lat[0, i - 1], cp_lat[0, i]
                for b in range(m):
                    f[b] = w1[b] * c0 + w2[b] * c1 + e[b] * f[b]
                    r = y_rows[idx[b], i] - (f[b] * kt[b] + c1 * vp[b])
                    acc[b] += r * r
                continue
            for b in range(m):
                c0, c1 = cp_lat[dd[b], i - 1], cp_lat[dd[b], i]
                f[b] = w1[b] * c0 + w2[b] * c1 + e[b] * f[b]
                r = y_rows[idx[b], i] - (f[b] * kt[b] + c1 * vp[b])
                acc[b] += r * r
        for b in range(m):
            sse_out[idx[b]] = acc[b] if math.isfinite(acc[b]) else np.inf


# ---- the Python side: shared curves of a fit, one chunk ------------------------------------------
def _shared(ctx, method):
    """The curves every voxel of a fit shares, computed once per fit context and model: the input at
    every lattice delay (one row, the input itself, without delay) with its running integral and their
    images under L^T, the lattice indices the LLS searches and the basis of the chunk's matrix product,
    and the grid convolutions at the start delays."""
    key = ("compiled", ctx.model, method)
    if key in ctx._cache:
        return ctx._cache[key]
    from . import _fit_kernels as fk
    t, cp = ctx.t, ctx.cp
    if ctx.fit_delay:
        fine, coarse = ctx.delay_steps()
        lattice = ctx.delay_grid(fine)
        if method == "lls":
            search = np.arange(lattice.size)
        else:
            start = ctx.delay_grid(coarse)
            search = np.unique(np.abs(lattice[None, :] - start[:, None]).argmin(axis=1))
        default_d = int(np.abs(lattice - 0.0).argmin())
        cp_lat = np.stack([_m.shift_input(t, cp, d) for d in lattice])
    else:
        lattice = np.zeros(1)
        search = np.zeros(1, dtype=np.int64)
        default_d = 0
        cp_lat = cp[None, :].copy()
    icp_lat = _m.cumulative_integral(t, cp_lat, axis=1)
    lt_cp, lt_icp = _adjoint_rows(t, cp_lat), _adjoint_rows(t, icp_lat)
    steps, group = _m._step_groups(np.diff(t))
    code = MODEL_CODES[ctx.model]
    kep_grid = fk._KEP_GRID_PER_MIN / fk.S_PER_MIN
    rates = fk._RATE_GRID_PER_S
    n_s, n_t = search.size, t.size
    c, ic = cp_lat[search], icp_lat[search]
    scal = np.stack([np.einsum("st,st->s", ic, ic), np.einsum("st,st->s", ic, c), np.einsum("st,st->s", c, c)], axis=1)
    basis = [] if code == TWO_CXM else [np.stack([c, ic, lt_cp[search], lt_icp[search]], axis=1).reshape(-1, n_t)]
    if method == "nlls" and code in (TOFTS, EXTENDED_TOFTS, TWO_CXM):
        grid = kep_grid if code != TWO_CXM else rates
        f = np.stack([_m.exp_convolution(t, cp_lat[d], grid).T for d in search])     # (S, G, T)
        gff = np.einsum("sit,sjt->sij", f, f)
        fcp = np.einsum("skt,st->sk", f, c)
        if n_s == 1:
            basis.append(f[0])
    else:
        f, gff, fcp = np.zeros((n_s, 1, n_t)), np.zeros((n_s, 1, 1)), np.zeros((n_s, 1))
    arrays = dict(t=t, cp_lat=cp_lat, icp_lat=icp_lat, lt_cp=lt_cp, lt_icp=lt_icp, steps=steps, kep_grid=kep_grid,
                  rates=rates, fgrid=f, gff=gff, fcp=fcp, cpcp=scal[:, 2], scal=scal,
                  basis=np.concatenate(basis, axis=0).T if basis else np.zeros((n_t, 1)))
    out = {k: _kernel_array(v, np.float64) for k, v in arrays.items()}
    out.update(lattice=_kernel_array(lattice, np.float64), search=_kernel_array(search, np.int64),
               group=_kernel_array(group, np.int64), cp=_kernel_array(cp, np.float64), default_d=default_d, code=code,
               fine=float(ctx.delay_steps()[0]) if ctx.fit_delay else 1.0)
    ctx._cache[key] = out
    return out


def chunk_memory(ctx, method):
    """(bytes per voxel, shared bytes) of a fit's compiled chunks beyond the rows: the voxel's products with
    the shared curves (one matrix product per chunk) and its outputs, and the curves every fit of the
    context shares (each thread's kernel works on its own copy). Makes the shared curves of every model
    the fit uses (``model="auto"``: each candidate's), so the threads find them made."""
    per_voxel = shared = 0
    for model in registry.AUTO_CANDIDATES if ctx.model == "auto" else (ctx.model,):
        sub = ctx if model == ctx.model else dataclasses.replace(ctx, model=model)
        sh = _shared(sub, method)
        n_par = len(registry.MODELS[model].parameters)
        outputs = 8 * (n_par * n_par * (3 if method == "lls" else 1) + 2 * n_par + 8)
        per_voxel = max(per_voxel, 8 * sh["basis"].shape[1] + outputs)
        shared += sum(v.nbytes for v in sh.values() if isinstance(v, np.ndarray))
    return int(per_voxel), int(shared)


def _adjoint_rows(t, v):
    """L^T applied to every row of v (D, T), L the running trapezoidal integral (see _adjoint_integral), in
    O(T) per row: no (T, T) matrix at a thousand frames."""
    r = np.cumsum(v[:, ::-1], axis=1)[:, ::-1]                  # R_j = sum of v_i for i >= j
    h = np.diff(t)
    out = np.zeros_like(v)
    out[:, 1:] += 0.5 * h * r[:, 1:]                            # h_j / 2 R_j
    out[:, :-1] += 0.5 * h * r[:, 1:]                           # h_(j+1) / 2 R_(j+1)
    return out


def _kernel_array(a, dtype):
    """``a`` as the kernels are compiled for: C-contiguous, aligned, writeable, of ``dtype`` (numba compiles
    a new version for every other layout or a read-only array: a copy is cheaper than that)."""
    return np.require(a, dtype, ["C_CONTIGUOUS", "ALIGNED", "WRITEABLE"])


def fit_rows(ctx, method, rows):
    """Fit the voxels ``rows`` (n, T) of one chunk (float64 C-contiguous rows are read in place). Returns
    {"theta" (n, P), "sse", "sst", "status" (int8), "delay" (n,) s or None, "cov" (nested list, see
    _fit_kernels._inverse_normal) or None}; invalid and flat curves have their status and NaN."""
    sh = _shared(ctx, method)
    n, n_t = rows.shape
    lo, hi = (_kernel_array(v, np.float64) for v in ctx.limits())
    n_par = lo.size
    theta = np.full((n, n_par), np.nan)
    sse, sst = np.full(n, np.nan), np.full(n, np.nan)
    status = np.full(n, _FAILED, dtype=np.int8)
    delay = np.full(n, -1, dtype=np.int64)
    delay_s = np.full(n, np.nan)
    normal = np.full((n if method == "nlls" else 1, n_par, n_par), np.nan)
    want_lin = bool(method == "lls" and ctx.uncertainty)
    m_lin = n if want_lin else 1
    lin_a, lin_g, lin_mid = (np.zeros((m_lin, n_par, n_par)) for _ in range(3))
    lin_sse = np.full(m_lin, np.nan)
    rows = _kernel_array(rows, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        proj = rows @ sh["basis"]                        # NaN rows stay NaN; those voxels are not fitted
    _fit_rows(sh["code"], LLS if method == "lls" else NLLS, rows, proj, sh["t"], sh["steps"], sh["group"], sh["cp_lat"],
              sh["icp_lat"], sh["lt_cp"], sh["lt_icp"], sh["search"], sh["scal"], bool(ctx.fit_delay), sh["default_d"],
              lo, hi, int(ctx.max_iter), sh["kep_grid"], float(ctx.bounds["ve"][1]), sh["fgrid"], sh["gff"], sh["fcp"],
              sh["cpcp"], sh["rates"], want_lin, sh["cp"], sh["lattice"], sh["fine"], theta, sse, sst, status, delay,
              delay_s, normal, lin_a, lin_g, lin_mid, lin_sse)
    out = {"theta": theta, "sse": sse, "sst": sst, "status": status, "delay": delay_s if ctx.fit_delay else None,
           "cov": None}
    if ctx.uncertainty:
        from . import _fit_kernels as fk
        if method == "lls":
            nested = [[lin_a[:, i, j] for j in range(n_par)] for i in range(n_par)]
            g = [[lin_g[:, i, j] for j in range(n_par)] for i in range(n_par)]
            mid = None if ctx.model == "patlak" else [[lin_mid[:, i, j] for j in range(n_par)] for i in range(n_par)]
            out["cov"] = fk._linear_covariance(ctx, nested, g, lin_sse, mid)
        else:
            out["cov"] = fk._nlls_covariance(ctx, normal, sse)
    return out
