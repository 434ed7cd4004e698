"""The kernels behind :func:`fitting.fit`: per-voxel status codes, the model evaluated for a chunk of
voxels with its factored Jacobian, the linear (Murase) solution, the starting values (LLS and a
variable-projection grid), the projected Levenberg-Marquardt iteration, the parameter covariances and
standard errors, and the AICc. All work on time-major
chunks ``yt`` (T, n); parameters are (n, P) in the registry's order and units (1/min, fractions,
ml/100 ml/min); the kernels convert to 1/s with :mod:`units`. See :mod:`fitting` for the methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import models as _m
from .registry import MODELS, uncertainty_maps
from .units import FP_ML_PER_100ML_PER_MIN_PER_S, S_PER_MIN


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

_KEP_GRID_PER_MIN = np.concatenate([[0.0], np.geomspace(2e-3, 50.0, 27)])
#: 2CXM start (fp ml/100 ml/min, ps 1/min, ve, vp) where no pair of grid rates gives valid parameters
_2CXM_FALLBACK_START = (20.0, 0.1, 0.2, 0.02)
_RATE_GRID_PER_S = np.geomspace(2e-4, 2.0, 18)
_MAX_START_DELAYS = 60   # the start searches at most about this many delays


# ---- one chunk of voxels: the fit context ------------------------------------------------
@dataclass
class _Context:
    """What every kernel needs: frame times (s), the plasma AIF (mM), the model key, the bounds, whether
    the delay is fitted, the LM iteration limit and whether standard errors are wanted."""

    t: np.ndarray
    cp: np.ndarray
    model: str
    bounds: dict
    fit_delay: bool
    max_iter: int
    uncertainty: bool = False
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def names(self):
        return MODELS[self.model].parameters

    def limits(self):
        lo = np.array([self.bounds[k][0] for k in self.names])
        hi = np.array([self.bounds[k][1] for k in self.names])
        return lo, hi

    def uniform(self) -> bool:
        """Whether the frames are equally spaced (as ``models.cumulative_integral`` decides it)."""
        if "uniform" not in self._cache:
            dt = np.diff(self.t)
            self._cache["uniform"] = bool(np.all(np.abs(dt - dt[0]) <= 1e-12 * abs(dt[0])))
        return self._cache["uniform"]

    def integral_matrix(self):
        """L (T, T) with L @ y = ``models.cumulative_integral(t, y)``."""
        if "integral" not in self._cache:
            self._cache["integral"] = _m.cumulative_integral(self.t, np.eye(self.t.size), axis=0)
        return self._cache["integral"]

    def delay_steps(self):
        """(fine step, coarse step) in s. Delays live on a lattice of multiples of the fine step: half the
        median frame interval divided into equal parts of at most 1 s, so that whole- and half-frame
        shifts are exactly representable."""
        lo, hi = self.bounds["delay_s"]
        half = 0.5 * float(np.median(np.diff(self.t)))
        fine = half / max(1, int(np.ceil(half / 1.0 - 1e-9)))
        coarse = fine * max(1, int(np.ceil((hi - lo) / _MAX_START_DELAYS / fine)))
        return fine, coarse

    def delay_grid(self, step):
        lo, hi = self.bounds["delay_s"]
        k = np.arange(np.ceil(lo / step - 1e-9), np.floor(hi / step + 1e-9) + 1)
        grid = k * step
        return grid if grid.size else np.array([min(max(0.0, lo), hi)])


# ---- linear least squares (Murase) -----------------------------------------------------------
def _tissue_terms(ctx: _Context, yt):
    """The terms of the Murase design that depend only on the tissue curves yt (T, n), the same at every
    delay: (y.y, q, q.q, q.y) with q = -ICt (T, n) the column multiplying kep (None for Patlak)."""
    yy = np.einsum("tn,tn->n", yt, yt)
    if ctx.model == "patlak":
        return yy, None, None, None
    q = _m.cumulative_integral(ctx.t, yt, axis=0)
    q *= -1.0
    return yy, q, np.einsum("tn,tn->n", q, q), np.einsum("tn,tn->n", q, yt)


def _lls(ctx: _Context, yt, cp, covariance=False, tissue=None):
    """Murase LLS of yt (T, n) for input ``cp`` (T,) (``tissue``: :func:`_tissue_terms` of yt, computed
    here when not given); returns model parameters (n, P), the linear-system
    SSE (n,) and, with ``covariance``, the covariance of the parameters (a P x P nested list of (n,)
    arrays, :func:`_mm`; NaN where singular), else None: that of the linear solve carried to the model
    parameters by the delta method (G cov G^T, G their derivatives by the linear unknowns). For Patlak
    the design A is noise-free and the covariance is s^2 (A^T A)^-1, s^2 = SSE / (T - P - delay). For
    Tofts and Extended Tofts the column -ICt holds the integrated noise of the tissue curve itself: to
    first order the estimate moves by (A^T A)^-1 A^T (I + kep L) e for noise e (L the running-integral
    operator), so the covariance is the sandwich s^2 (A^T A)^-1 A^T W A (A^T A)^-1 with
    W = (I + kep L)(I + kep L)^T - without it the intervals of Ktrans and ve cover the truth in only
    about 87 % of the voxels instead of 95 %."""
    t = ctx.t
    icp = _m.cumulative_integral(t, cp)
    yy, q, qq, qy = tissue if tissue is not None else _tissue_terms(ctx, yt)
    ycp, yicp = cp @ yt, icp @ yt
    if ctx.model == "patlak":
        a00, a01, a11 = icp @ icp, icp @ cp, cp @ cp
        beta = _solve2(a00, a01, a11, yicp, ycp)
        sse = yy - beta[0] * yicp - beta[1] * ycp
        theta = np.stack([beta[0] * S_PER_MIN, beta[1]], axis=1)
        if not covariance:
            return theta, sse, None
        g = [[S_PER_MIN, 0.0], [0.0, 1.0]]
        return theta, sse, _linear_covariance(ctx, [[a00, a01], [a01, a11]], g, sse)
    qicp = icp @ q
    if ctx.model == "tofts":
        a00 = icp @ icp
        beta = _solve2(a00, qicp, qq, yicp, qy)
        sse = yy - beta[0] * yicp - beta[1] * qy
        ktrans, kep = beta[0] * S_PER_MIN, beta[1] * S_PER_MIN
        with np.errstate(divide="ignore", invalid="ignore"):
            ve = ktrans / kep
            theta = np.stack([ktrans, ve], axis=1)
            if not covariance:
                return theta, sse, None
            a = [[a00, qicp], [qicp, qq]]
            g = [[S_PER_MIN, 0.0],                               # d(ktrans, ve) / d(beta0, beta1)
                 [1.0 / beta[1], -beta[0] / beta[1] ** 2]]
        return theta, sse, _linear_covariance(ctx, a, g, sse, _noisy_design(ctx, a, [(0, icp)], q, qq, beta[1]))
    # extended Tofts: unknowns (Ktrans + kep vp, kep, vp)
    a00, a02, a22, cpq = icp @ icp, icp @ cp, cp @ cp, cp @ q
    beta = _solve3(a00, qicp, a02, qq, cpq, a22, yicp, qy, ycp)
    sse = yy - beta[0] * yicp - beta[1] * qy - beta[2] * ycp
    kep_per_s, vp = beta[1], beta[2]
    ktrans = (beta[0] - kep_per_s * vp) * S_PER_MIN
    with np.errstate(divide="ignore", invalid="ignore"):
        ve = ktrans / (kep_per_s * S_PER_MIN)
        theta = np.stack([ktrans, ve, vp], axis=1)
        if not covariance:
            return theta, sse, None
        a = [[a00, qicp, a02], [qicp, qq, cpq], [a02, cpq, a22]]
        g = [[S_PER_MIN, -S_PER_MIN * beta[2], -S_PER_MIN * beta[1]],   # d(ktrans, ve, vp) / d(beta)
             [1.0 / beta[1], -beta[0] / beta[1] ** 2, -1.0],
             [0.0, 0.0, 1.0]]
    return theta, sse, _linear_covariance(ctx, a, g, sse, _noisy_design(ctx, a, [(0, icp), (2, cp)], q, qq, beta[1]))


def _linear_covariance(ctx, a, g, sse, middle=None):
    """G cov G^T with cov = s^2 A^-1 (``middle`` None) or the sandwich s^2 A^-1 middle A^-1, for the
    normal matrix A and the derivatives G of the model parameters by the unknowns (small matrices:
    nested lists, :func:`_mm`): as H = G A^-1, then s^2 H G^T or s^2 H middle H^T."""
    inv = _inverse_normal(a, np.size(sse))
    with np.errstate(invalid="ignore", over="ignore"):
        h = _mm(g, inv)
        cov = _mm(h, _transpose(g), symmetric=True) if middle is None else \
            _mm(_mm(h, middle), _transpose(h), symmetric=True)
        return _scaled(cov, _residual_variance(ctx, sse, len(a)))


def _noisy_design(ctx, a, shared, q, qq, k):
    """A^T W A = A^T A + k A^T (L + L^T) A + k^2 (L^T A)^T (L^T A), W = (I + k L)(I + k L)^T, for the
    Murase design A whose column 1 is q = -ICt (T, n) and whose other columns are the shared curves
    ``shared`` [(column, curve (T,))]; ``a`` = A^T A, ``qq`` = q.q, ``k`` (n,) = kep in 1/s. Per voxel
    only two products of q with itself need a pass over the curves (:func:`_adjoint_products`); the
    others are products of shared curves (with q: one small matrix product)."""
    p = len(a)
    x = [[0.0] * p for _ in range(p)]
    y = [[0.0] * p for _ in range(p)]
    lm = ctx.integral_matrix()                                     # L (T, T), for the shared curves
    ops = {i: (lm @ v, v @ lm) for i, v in shared}                # L v, L^T v
    rows = []
    for i, v in shared:
        lv, ltv = ops[i]
        for j, w in shared:
            x[i][j] = float(v @ (ops[j][0] + ops[j][1]))
            y[i][j] = float(ltv @ ops[j][1])
        rows += [lv + ltv, lm @ ltv]                               # (L + L^T) v and L L^T v
    with_q = np.stack(rows) @ q                                    # (2 * shared, n)
    for s_i, (i, _) in enumerate(shared):
        x[i][1] = x[1][i] = with_q[2 * s_i]
        y[i][1] = y[1][i] = with_q[2 * s_i + 1]
    uq, uu = _adjoint_products(ctx, q, qq)
    x[1][1], y[1][1] = 2.0 * uq, uu
    with np.errstate(invalid="ignore", over="ignore"):
        k2 = k * k
        out = [[None] * p for _ in range(p)]
        for i in range(p):
            for j in range(i, p):
                out[i][j] = out[j][i] = a[i][j] + k * x[i][j] + k2 * y[i][j]
    return out


def _adjoint_products(ctx, q, qq):
    """(u.q, u.u) per voxel for u = L^T q, q (T, n), ``qq`` = q.q, without a (T, n) buffer (fresh big
    arrays cost page faults): rows of the reverse running sum R_j = sum of q_k for k >= j are built one
    at a time. Uniform frames (u = h (R - q/2) - h/2 R_0 e_0): u.q = h/2 S (S - q_0) with S = R_0, since
    R.q = (S^2 + q.q)/2, and u.u from |R|^2 alone. Otherwise u_j = w_(j-1) + w_j with w_j = h_j/2 R_(j+1)
    (h the frame intervals; the trapezoid weights of L), accumulated row by row."""
    n_t = q.shape[0]
    dt = np.diff(ctx.t)
    acc_r = np.zeros(q.shape[1])
    if ctx.uniform():
        h = float(dt[0])
        r = np.zeros(q.shape[1])
        tmp = np.empty_like(r)
        for j in range(n_t - 1, -1, -1):
            r += q[j]
            np.multiply(r, r, out=tmp)
            acc_r += tmp
        s, q0 = r, q[0]
        uq = 0.5 * h * s * (s - q0)
        rr = acc_r - 0.5 * s * s - 0.25 * qq                       # |R - q/2|^2
        uu = h * h * (rr - (s - 0.5 * q0) ** 2 + 0.25 * (s - q0) ** 2)
        return uq, uu
    half = 0.5 * dt
    r = q[n_t - 1].copy()                                          # R_(T-1)
    w = half[n_t - 2] * r                                          # w_(T-2)
    uq = w * q[n_t - 1]                                            # u_(T-1) = w_(T-2)
    uu = w * w
    for j in range(n_t - 2, -1, -1):                               # u_j = w_(j-1) + w_j
        r += q[j]                                                  # R_j
        w_before = half[j - 1] * r if j else 0.0                   # w_(j-1)
        u = w_before + w
        uq += u * q[j]
        uu += u * u
        w = w_before
    return uq, uu


def _mm(a, b, symmetric=False):
    """Products of small matrices whose entries are per-voxel (n,) arrays or shared scalars (nested
    lists: many (n,) vectors stay cheap where one (P, P, n) stack would be a fresh big array); scalar
    zeros and ones are skipped. ``symmetric``: the product is known to be symmetric, only its upper
    triangle is computed."""
    rows, inner, cols = len(a), len(b), len(b[0])
    out = [[None] * cols for _ in range(rows)]
    for i in range(rows):
        for k in range(i if symmetric else 0, cols):
            acc = None
            for j in range(inner):
                x, y = a[i][j], b[j][k]
                if _is(x, 0.0) or _is(y, 0.0):
                    continue
                term = y if _is(x, 1.0) else x if _is(y, 1.0) else x * y
                acc = term if acc is None else acc + term
            out[i][k] = 0.0 if acc is None else acc
            if symmetric:
                out[k][i] = out[i][k]
    return out


def _is(value, constant):
    """Whether ``value`` is the shared scalar ``constant`` (not a per-voxel array)."""
    return isinstance(value, float) and value == constant


def _transpose(a):
    return [list(col) for col in zip(*a)]


def _lls_search(ctx: _Context, yt, delays, covariance=False):
    """LLS at one delay (``delays`` None) or the best of several by linear-system SSE.
    Returns (theta, delay or None, sse, covariance or None; see :func:`_lls`)."""
    tissue = _tissue_terms(ctx, yt)
    if delays is None:
        theta, sse, cov = _lls(ctx, yt, ctx.cp, covariance, tissue)
        return theta, None, sse, cov
    best_theta, best_delay, best_sse, best_cov = None, None, None, None
    for d in delays:
        theta, sse, cov = _lls(ctx, yt, _m.shift_input(ctx.t, ctx.cp, d), covariance, tissue)
        sse = np.where(np.isfinite(sse) & np.all(np.isfinite(theta), axis=1), sse, np.inf)
        if best_theta is None:
            best_theta, best_delay, best_sse, best_cov = theta, np.full(yt.shape[1], d), sse, cov
        else:
            better = sse < best_sse
            best_theta[better], best_delay[better], best_sse[better] = theta[better], d, sse[better]
            if covariance:
                for row, new in zip(best_cov, cov):
                    for entry, value in zip(row, new):
                        entry[better] = value[better]
    return best_theta, best_delay, best_sse, best_cov


def _solve2(a00, a01, a11, b0, b1):
    with np.errstate(divide="ignore", invalid="ignore"):
        det = a00 * a11 - a01 * a01
        return np.stack([(a11 * b0 - a01 * b1) / det, (a00 * b1 - a01 * b0) / det])


def _solve3(a00, a01, a02, a11, a12, a22, b0, b1, b2):
    """Symmetric 3x3 systems by cofactors, vectorised: (3, ...)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.stack(solve3(a00, a01, a02, a11, a12, a22, b0, b1, b2))


def solve3(a00, a01, a02, a11, a12, a22, b0, b1, b2):
    """The solution (x0, x1, x2) of a symmetric 3x3 system by cofactors; arithmetic only, for arrays and,
    compiled by numba, for scalars (core/_compiled.py)."""
    c00 = a11 * a22 - a12 * a12
    c01 = a02 * a12 - a01 * a22
    c02 = a01 * a12 - a02 * a11
    c11 = a00 * a22 - a02 * a02
    c12 = a01 * a02 - a00 * a12
    c22 = a00 * a11 - a01 * a01
    det = a00 * c00 + a01 * c01 + a02 * c02
    return ((c00 * b0 + c01 * b1 + c02 * b2) / det, (c01 * b0 + c11 * b1 + c12 * b2) / det,
            (c02 * b0 + c12 * b1 + c22 * b2) / det)


# ---- starting values -------------------------------------------------------------------------
def _start(ctx: _Context, yt):
    """Starting values (theta, delay): the lower-SSE of the LLS estimate and the variable-projection grid.
    With the delay fitted the LLS searches the coarse delay lattice and the grid is evaluated at the
    delay the LLS chose (a grid per delay cost more than half of the fit's work for no better fits;
    the profile walk of the fit then refines the delay); the 2CXM, which has no LLS, searches its grid
    over the coarse lattice."""
    lo, hi = ctx.limits()
    delays = ctx.delay_grid(ctx.delay_steps()[1]) if ctx.fit_delay else None
    candidates = []
    lls_delay = None
    if ctx.model != "2cxm":
        theta, lls_delay, _, _ = _lls_search(ctx, yt, delays)
        theta = np.where(np.isfinite(theta), theta, 0.5 * (lo + hi))
        candidates.append((np.clip(theta, lo, hi), lls_delay, None))
    if ctx.model in ("tofts", "extended_tofts", "2cxm"):
        theta, delay, sse = _grid_start(ctx, yt, delays, voxel_delay=lls_delay)
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


def _grid_start(ctx: _Context, yt, delays, voxel_delay=None):
    """Variable projection over a grid of rates (and delays): best amplitudes per grid point in closed form.
    Works on (grid, n) arrays; yt is (T, n). ``delays``: the delays (D,) every voxel searches (None: no
    delay); or ``voxel_delay`` (n,): each voxel's grid at its own delay (the voxels of one delay together).
    Returns (theta, delay or None, SSE of theta)."""
    t = ctx.t
    n = yt.shape[1]
    if voxel_delay is not None:
        theta, sse = np.empty((n, len(ctx.names))), np.empty(n)
        for d in np.unique(voxel_delay):
            sub = np.flatnonzero(voxel_delay == d)
            theta[sub], _, sse[sub] = _grid_start(ctx, yt[:, sub], [d])
        return theta, voxel_delay.copy(), sse
    yy = np.einsum("tn,tn->n", yt, yt)
    # kept where no grid point has a finite SSE (the 2CXM grid without a valid pair)
    best = np.tile(_2CXM_FALLBACK_START, (n, 1)) if ctx.model == "2cxm" else np.zeros((n, len(ctx.names)))
    best_delay = np.zeros(n)
    best_sse = np.full(n, np.inf)
    cols_n = np.arange(n)
    for d in ([0.0] if delays is None else delays):
        cpd = _m.shift_input(t, ctx.cp, d)
        if ctx.model in ("tofts", "extended_tofts"):
            f = _m.exp_convolution(t, cpd, _KEP_GRID_PER_MIN / S_PER_MIN)   # (T, K)
            fy = f.T @ yt                                              # (K, n)
            gff = np.einsum("tk,tk->k", f, f)[:, None]
            if ctx.model == "tofts":
                a, sse = _nnls1(yy, fy, gff)
            else:
                a, vp, sse = _nnls2(yy, fy, cpd @ yt, gff, (f.T @ cpd)[:, None], cpd @ cpd)
            k = np.argmin(sse, axis=0)
            s = sse[k, cols_n]
            ktrans = a[k, cols_n] * S_PER_MIN
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
    best = np.tile(_2CXM_FALLBACK_START, (n, 1))             # where no grid pair gives valid parameters
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
    """Invert models.two_compartment_rates: (rates 1/s, amplitudes 1/s) -> (fp ml/100ml/min, ps 1/min, ve, vp)
    stacked (4, ...)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.stack(np.broadcast_arrays(*biexp_parameters(k_plus, k_minus, a_plus, a_minus)))


def biexp_parameters(k_plus, k_minus, a_plus, a_minus):
    """(fp ml/100ml/min, ps 1/min, ve, vp) of the bi-exponential impulse response with rates k_plus > k_minus
    and amplitudes a_plus, a_minus (1/s); arithmetic only, for arrays and, compiled by numba, for scalars
    (core/_compiled.py)."""
    fp = a_plus + a_minus
    e_minus = a_minus / fp
    kb = k_plus - e_minus * (k_plus - k_minus)
    ke = k_plus * k_minus / kb
    kp = k_plus + k_minus - ke
    vp = fp / kb
    ps = kp * vp - fp
    ve = ps / ke
    return fp * FP_ML_PER_100ML_PER_MIN_PER_S, ps * S_PER_MIN, ve, vp


# ---- model evaluation with Jacobian ----------------------------------------------------------
def _evaluate(ctx: _Context, theta, delay, jacobian=True):
    """Model (T, n) for parameters theta (n, P) at arterial delays ``delay`` (n,) s (None: no delay).

    With ``jacobian`` also returns the Jacobian in factored form (basis, coef): a list of curves, each
    (T, n) or shared (T,), and coefficients (n, B, P) such that dC/dtheta_p = sum_b coef[:, b, p] basis_b.
    For the Tofts family the basis is (F, dF/dk, cp), which keeps the normal equations to a few passes;
    for the 2CXM it is (F+, dF+/dk, F-, dF-/dk) of its two exponentials (models.two_compartment_rate_derivatives)."""
    t = ctx.t
    cpd = ctx.cp if delay is None else _m.shift_input(t, ctx.cp, delay)
    cpd_tn = cpd if cpd.ndim == 2 else cpd[:, None]
    n = theta.shape[0]
    if ctx.model in ("tofts", "extended_tofts"):
        ktrans_per_s = theta[:, 0] / S_PER_MIN
        ve = theta[:, 1]
        k = ktrans_per_s / ve
        if jacobian:
            f, df = _m.exp_convolution(t, cpd, k, derivative=True)
        else:
            f = _m.exp_convolution(t, cpd, k)
        # without the Jacobian F is not needed afterwards: scale it in place
        pred = np.multiply(f, ktrans_per_s, out=None if jacobian else f)
        if ctx.model == "extended_tofts":
            pred += cpd_tn * theta[:, 2]
        if not jacobian:
            return pred, None
        n_par = theta.shape[1]
        coef = np.zeros((n, 3, n_par))
        coef[:, 0, 0] = 1.0 / S_PER_MIN   # d/dKtrans (1/min) at fixed ve: F/60 + Ktrans/60 dF/dk k/Ktrans
        coef[:, 1, 0] = k / S_PER_MIN
        coef[:, 1, 1] = -ktrans_per_s * k / ve       # d/dve
        if n_par == 3:
            coef[:, 2, 2] = 1.0              # d/dvp
        return pred, ([f, df, cpd], coef)
    if ctx.model == "patlak":
        icp = _m.cumulative_integral(t, cpd, axis=0)
        icp_tn = icp if icp.ndim == 2 else icp[:, None]
        pred = icp_tn * (theta[:, 0] / S_PER_MIN) + cpd_tn * theta[:, 1]
        if not jacobian:
            return pred, None
        coef = np.zeros((n, 2, 2))
        coef[:, 0, 0] = 1.0 / S_PER_MIN
        coef[:, 1, 1] = 1.0
        return pred, ([icp, cpd], coef)
    # 2CXM: C = a_plus F(k_plus) + a_minus F(k_minus), F(k) = cp * e^{-k t}; analytic Jacobian with the
    # basis (F+, dF+/dk, F-, dF-/dk) and the derivatives of the rates and amplitudes by the parameters
    fp_per_s, ps_per_s = theta[:, 0] / FP_ML_PER_100ML_PER_MIN_PER_S, theta[:, 1] / S_PER_MIN
    if not jacobian:
        return _m._two_compartment_tn(t, cpd, fp_per_s, ps_per_s, theta[:, 2], theta[:, 3]), None
    r = _m.two_compartment_rate_derivatives(fp_per_s, ps_per_s, theta[:, 2], theta[:, 3])
    k_plus, k_minus, a_plus, a_minus = r[:4]
    f_plus, df_plus = _m.exp_convolution(t, cpd, k_plus, derivative=True)
    f_minus, df_minus = _m.exp_convolution(t, cpd, k_minus, derivative=True)
    pred = f_plus * a_plus
    pred += f_minus * a_minus
    # d/d(fp ml/100ml/min, ps 1/min, ve, vp) = d/d(Fp 1/s, PS 1/s, ve, vp) * (1/6000, 1/60, 1, 1)
    unit = (1.0 / FP_ML_PER_100ML_PER_MIN_PER_S, 1.0 / S_PER_MIN, 1.0, 1.0)
    d = np.asarray(r[4:]).reshape(4, 4, n) * np.asarray(unit)[None, :, None]   # (k+, k-, a+, a-) x theta
    coef = np.empty((n, 4, 4))
    coef[:, 0] = d[2].T                      # F+ : d a_plus
    coef[:, 1] = (d[0] * a_plus).T           # dF+/dk : a_plus d k_plus
    coef[:, 2] = d[3].T                      # F- : d a_minus
    coef[:, 3] = (d[1] * a_minus).T          # dF-/dk : a_minus d k_minus
    return pred, ([f_plus, df_plus, f_minus, df_minus], coef)


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
    projected onto the bounds. The working set shrinks as voxels converge. Returns (theta, sse, status,
    normal): ``normal`` (n, P, P) is J^T J as the iteration last built it - at the returned theta, or for
    a voxel that converged on an accepted step at the point before that last, negligible step (for the
    standard errors; no extra model evaluation)."""
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
    normal_out = a.copy()
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
        normal_out[idx] = a
    at_bound = np.any(_at_bounds(theta_out, lo, hi), axis=1)
    status_out = np.where((status_out == OK) & at_bound, AT_BOUND, status_out).astype(np.int8)
    return theta_out, sse_out, status_out, normal_out


def _at_bounds(theta, lo, hi):
    """(n, P): the parameters on (within 1e-9 of the range from) a bound - the rule of status AT_BOUND."""
    scale = np.maximum(hi - lo, 1e-12)
    return (theta <= lo + 1e-9 * scale) | (theta >= hi - 1e-9 * scale)


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


# ---- uncertainty ------------------------------------------------------------------------------
_SINGULAR = 1e-12   # determinant of the unit-diagonal normal matrix below which it counts as singular


def _residual_variance(ctx, sse, n_par):
    """s^2 = SSE / (T - P), one less with the delay fitted; NaN without residual degrees of freedom."""
    dof = ctx.t.size - n_par - (1 if ctx.fit_delay else 0)
    sse = np.maximum(np.asarray(sse, dtype=float), 0.0)      # the linear-system SSE may round below 0
    return sse / dof if dof > 0 else np.full(sse.shape, np.nan)


def _inverse_normal(a, n):
    """Inverses of symmetric positive semi-definite small matrices per voxel (nested lists of (n,) arrays
    or shared scalars, :func:`_mm`) of ``n`` voxels. A parameter without information (diagonal element
    0, e.g. ve where Ktrans = 0: its row and column are 0 too) is left out - NaN in its row and column,
    the others inverted without it; the whole inverse is NaN where the determinant of the matrix scaled
    to unit diagonal, det(A) / prod(diag A), is below ``_SINGULAR`` (parameters the curve does not tell
    apart). Cofactors for P <= 3, else numpy. Returns a nested list of (n,) arrays."""
    p = len(a)
    a = [[np.broadcast_to(v, (n,)) for v in row] for row in a]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        blank = [a[i][i] == 0 for i in range(p)]
        if any(b.any() for b in blank):                            # decouple them: identity row and column
            a = [[np.where(blank[i], 1.0, a[i][i]) if i == j else np.where(blank[i] | blank[j], 0.0, a[i][j])
                  for j in range(p)] for i in range(p)]
        else:
            blank = None
        diag = a[0][0]
        ok = a[0][0] > 0
        for i in range(1, p):
            diag = diag * a[i][i]
            ok &= a[i][i] > 0
        if p == 1:
            det, cof = a[0][0], [[np.ones(n)]]
        elif p == 2:
            det = a[0][0] * a[1][1] - a[0][1] * a[0][1]
            cof = [[a[1][1], -a[0][1]], [None, a[0][0]]]
        elif p == 3:
            (a00, a01, a02), (_, a11, a12), (_, _, a22) = a
            c00, c01, c02 = a11 * a22 - a12 * a12, a02 * a12 - a01 * a22, a01 * a12 - a02 * a11
            det = a00 * c00 + a01 * c01 + a02 * c02
            cof = [[c00, c01, c02], [None, a00 * a22 - a02 * a02, a01 * a02 - a00 * a12],
                   [None, None, a00 * a11 - a01 * a01]]
        else:
            full = np.empty((n, p, p))
            for i in range(p):
                for j in range(p):
                    full[:, i, j] = a[i][j]
            good = ok & np.all(np.isfinite(full), axis=(1, 2))
            full[~good] = np.eye(p)
            det = np.where(good, np.linalg.det(full), 0.0)
            full[~(det > _SINGULAR * diag)] = np.eye(p)
            inv = np.linalg.inv(full) * det[:, None, None]
            cof = [[inv[:, i, j] for j in range(p)] for i in range(p)]
        ok &= det > _SINGULAR * diag
        bad = ~ok
        cov = [[None] * p for _ in range(p)]
        for i in range(p):
            for j in range(i, p):
                v = cof[i][j] / det
                v[bad if blank is None else bad | blank[i] | blank[j]] = np.nan
                cov[i][j] = cov[j][i] = v
    return cov


def _nlls_covariance(ctx, normal, sse):
    """s^2 (J^T J)^-1 for J^T J (n, P, P), a nested list of (n,) arrays: the asymptotic covariance of the
    least-squares estimate."""
    p = normal.shape[1]
    cov = _inverse_normal([[normal[:, i, j] for j in range(p)] for i in range(p)], normal.shape[0])
    return _scaled(cov, _residual_variance(ctx, sse, p))


def _scaled(cov, s2):
    """The symmetric nested-list matrix ``cov`` times the per-voxel ``s2``."""
    p = len(cov)
    out = [[None] * p for _ in range(p)]
    for i in range(p):
        for j in range(i, p):
            out[i][j] = out[j][i] = cov[i][j] * s2
    return out


def _standard_errors(ctx, theta, cov):
    """Standard errors (n, S) in the order of ``registry.uncertainty_maps(ctx.model)`` from the covariance
    (nested list of (n,) arrays): sqrt of its diagonal, and for kep = Ktrans / ve the delta method,
    var = g^T cov g with g = (1/ve, -Ktrans/ve^2). NaN for a parameter on a bound (its +-SE interval
    would straddle a bound that caps it; the other parameters keep the SE of the full covariance, which
    stays calibrated), for kep when Ktrans or ve is, and where the voxel has no fit or a singular
    normal matrix."""
    names = MODELS[ctx.model].parameters
    lo, hi = ctx.limits()
    bound = _at_bounds(theta, lo, hi) | ~np.isfinite(theta)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for i, k in enumerate(names):
            out[f"{k}_se"] = np.sqrt(cov[i][i])
            out[f"{k}_se"][bound[:, i]] = np.nan
        if "kep" in MODELS[ctx.model].maps:
            i, j = names.index("ktrans"), names.index("ve")
            g0 = 1.0 / theta[:, j]
            g1 = -theta[:, i] / theta[:, j] ** 2
            kep_se = np.sqrt(g0 * g0 * cov[i][i] + g1 * g1 * cov[j][j] + 2 * g0 * g1 * cov[i][j])
            kep_se[bound[:, i] | bound[:, j]] = np.nan
            out["kep_se"] = kep_se
    se = np.stack([out[k] for k in uncertainty_maps(ctx.model)], axis=1)
    se[~np.isfinite(se)] = np.nan
    return se


def _aicc(sse, n_t, k):
    """AICc = n ln(RSS/n) + 2k + 2k(k+1)/(n-k-1) (Burnham & Anderson 2002, eq. 2.14 with the least-squares
    likelihood), ``k`` counting every estimated parameter including the residual variance; RSS floored at
    1e-300 (a noise-free curve), +inf where the SSE is not finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        aicc = n_t * np.log(np.maximum(sse, 1e-300) / n_t) + 2 * k + 2 * k * (k + 1) / (n_t - k - 1)
    return np.where(np.isfinite(aicc), aicc, np.inf)
