"""The kernels behind :func:`fitting.fit`: per-voxel status codes, the model evaluated for a chunk of
voxels with its factored Jacobian, the linear (Murase) solution, the starting values (LLS and a
variable-projection grid) and the projected Levenberg-Marquardt iteration. All work on time-major
chunks ``yt`` (T, n); parameters are (n, P) in the registry's order and units (1/min, fractions,
ml/100 ml/min); the kernels convert to 1/s with :mod:`units`. See :mod:`fitting` for the methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import models as _m
from .registry import MODELS
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
_RATE_GRID_PER_S = np.geomspace(2e-4, 2.0, 18)
_MAX_START_DELAYS = 60   # the start searches at most about this many delays


# ---- one chunk of voxels: the fit context ------------------------------------------------
@dataclass
class _Context:
    """What every kernel needs: frame times (s), the plasma AIF (mM), the model key, the bounds, whether
    the delay is fitted and the LM iteration limit."""

    t: np.ndarray
    cp: np.ndarray
    model: str
    bounds: dict
    fit_delay: bool
    max_iter: int

    @property
    def names(self):
        return MODELS[self.model].parameters

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
        coarse = fine * max(1, int(np.ceil((hi - lo) / _MAX_START_DELAYS / fine)))
        return fine, coarse

    def delay_grid(self, step):
        lo, hi = self.bounds["delay_s"]
        k = np.arange(np.ceil(lo / step - 1e-9), np.floor(hi / step + 1e-9) + 1)
        grid = k * step
        return grid if grid.size else np.array([min(max(0.0, lo), hi)])


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
        return np.stack([beta[0] * S_PER_MIN, beta[1]], axis=1), sse
    q = _m.cumulative_integral(t, yt, axis=0)
    q *= -1.0                                                # the column multiplying kep
    qq = np.einsum("tn,tn->n", q, q)
    qy = np.einsum("tn,tn->n", q, yt)
    qicp = icp @ q
    if ctx.model == "tofts":
        beta = _solve2(icp @ icp, qicp, qq, yicp, qy)
        sse = yy - beta[0] * yicp - beta[1] * qy
        ktrans, kep = beta[0] * S_PER_MIN, beta[1] * S_PER_MIN
        with np.errstate(divide="ignore", invalid="ignore"):
            ve = ktrans / kep
        return np.stack([ktrans, ve], axis=1), sse
    # extended Tofts: unknowns (Ktrans + kep vp, kep, vp)
    beta = _solve3(icp @ icp, qicp, icp @ cp, qq, cp @ q, cp @ cp, yicp, qy, ycp)
    sse = yy - beta[0] * yicp - beta[1] * qy - beta[2] * ycp
    kep_per_s, vp = beta[1], beta[2]
    ktrans = (beta[0] - kep_per_s * vp) * S_PER_MIN
    with np.errstate(divide="ignore", invalid="ignore"):
        ve = ktrans / (kep_per_s * S_PER_MIN)
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
        return np.stack(np.broadcast_arrays(fp * FP_ML_PER_100ML_PER_MIN_PER_S, ps * S_PER_MIN, ve, vp))


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
    # 2CXM: forward differences (not on the speed-critical path)
    pred = _m._two_compartment_tn(t, cpd, theta[:, 0] / FP_ML_PER_100ML_PER_MIN_PER_S, theta[:, 1] / S_PER_MIN,
                                  theta[:, 2], theta[:, 3])
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
