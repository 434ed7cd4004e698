"""Tracer-kinetic forward models: Tofts, Extended Tofts, Patlak and the two-compartment exchange model.

Convolutions are exact for an arterial input that is piecewise linear between its samples: for the
kernel exp(-k t) the convolution obeys the recursion (e.g. Flouri et al., MRM 2016;76:998, appendix)

    F_i = e^{-k D} F_{i-1} + D [g0(kD) cp_{i-1} + g1(kD) cp_i],     D = t_i - t_{i-1},
    g0(x) = (1 - e^{-x} - x e^{-x}) / x^2,     g1(x) = (x - 1 + e^{-x}) / x^2,

which reduces to the trapezoidal rule for k = 0. Arterial delay shifts the input (linear interpolation,
zero before the first sample). The integral starts at the first frame.

Units: t in s; Ktrans, kep, PS in 1/min; Fp in ml/100 ml/min; ve, vp fractions; concentrations in mM.
Parameters may be scalars or arrays of any voxel shape; the result is ``(..., T)``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import cumulative_trapezoid

from ._checks import as_float_array, check_times
from .units import FP_ML_PER_100ML_PER_MIN_PER_S, S_PER_MIN

# Taylor coefficients of g0, g1 around x = 0 (used for |x| < _SERIES_X to avoid cancellation).
_N_SERIES = 9
_G0_COEF = np.array([(-1) ** n * (n - 1) / math.factorial(n) for n in range(2, _N_SERIES + 2)])
_G1_COEF = np.array([(-1) ** n / math.factorial(n) for n in range(2, _N_SERIES + 2)])
_SERIES_X = 0.05


def _poly(coef, x):
    out = np.zeros_like(x)
    for c in coef[::-1]:
        out = out * x + c
    return out


def _poly_deriv(coef, x):
    d = coef[1:] * np.arange(1, coef.size)
    return _poly(d, x)


def _weights(x, derivative=False):
    """E = e^{-x}, g0(x), g1(x) (and dg0/dx, dg1/dx), stable for all x >= 0."""
    x = np.asarray(x, dtype=float)
    small = np.abs(x) < _SERIES_X
    xs = np.where(small, 1.0, x)
    em = np.expm1(-xs)
    e = np.exp(-x)
    g0 = np.where(small, _poly(_G0_COEF, x), (-em - xs * (em + 1.0)) / xs**2)
    g1 = np.where(small, _poly(_G1_COEF, x), (xs + em) / xs**2)
    if not derivative:
        return e, g0, g1
    h = -em / xs
    dg0 = np.where(small, _poly_deriv(_G0_COEF, x), ((em + 1.0) - 2.0 * g0) / xs)
    dg1 = np.where(small, _poly_deriv(_G1_COEF, x), (h - 2.0 * g1) / xs)
    return e, g0, g1, dg0, dg1


def _step_groups(dt):
    """Group the frame intervals so uniform sampling computes its weights once."""
    if dt.size and np.allclose(dt, dt[0], rtol=1e-9, atol=0.0):
        return np.array([dt[0]]), np.zeros(dt.size, dtype=np.int64)
    uniq, inverse = np.unique(dt, return_inverse=True)
    return uniq, inverse


def exp_convolution(t_s, cp, k_per_s, derivative: bool = False):
    """Exact convolution of a piecewise-linear input with exp(-k t), time-major.

    t_s: (T,) seconds; cp: (T,) or (T, N); k_per_s: (N,) rates in 1/s (>= 0).
    Returns F (T, N) in mM s, and dF/dk (T, N) when ``derivative``.
    """
    t = np.asarray(t_s, dtype=float)
    k = np.asarray(k_per_s, dtype=float).reshape(-1)
    cp = np.asarray(cp, dtype=float)
    n_t, n = t.size, k.size
    steps, group = _step_groups(np.diff(t))
    x = steps[:, None] * k[None, :]
    w = _weights(x, derivative)
    e = w[0]
    uniform = steps.size == 1
    # source terms of each interval, D [g0 cp_{i-1} + g1 cp_i], computed for all intervals at once and
    # written where the recursion then adds the decayed previous value: F_i = e F_{i-1} + source_i
    f = np.empty((n_t, n))
    f[0] = 0.0
    _interval_sources(f[1:], steps[:, None] * w[1], steps[:, None] * w[2], cp, group, uniform)
    if derivative:
        df = np.empty((n_t, n))
        df[0] = 0.0
        _interval_sources(df[1:], steps[:, None] ** 2 * w[3], steps[:, None] ** 2 * w[4], cp, group, uniform)
        de = -steps[:, None] * e
    tmp = np.empty(n)
    for i in range(1, n_t):
        g = 0 if uniform else group[i - 1]
        np.multiply(e[g], f[i - 1], out=tmp)
        f[i] += tmp
        if derivative:
            np.multiply(e[g], df[i - 1], out=tmp)
            df[i] += tmp
            np.multiply(de[g], f[i - 1], out=tmp)
            df[i] += tmp
    if derivative:
        return f, df
    return f


def _interval_sources(out, w0, w1, cp, group, uniform):
    """out[i] = w0 cp[i] + w1 cp[i+1] per interval i; w0, w1 are (groups, n), cp (T,) or (T, n)."""
    a, b = cp[:-1], cp[1:]
    if a.ndim == 1:
        if uniform:  # shared input and weights: one (T-1, 2) @ (2, n) product
            np.matmul(np.stack([a, b], axis=1), np.stack([w0[0], w1[0]]), out=out)
            return
        a, b = a[:, None], b[:, None]
    if uniform:
        np.multiply(a, w0[0], out=out)
        out += b * w1[0]
    else:
        np.multiply(a, w0[group], out=out)
        out += b * w1[group]


def cumulative_integral(t_s, y, axis=-1):
    """Cumulative trapezoidal integral along ``axis`` starting at 0 at the first sample (exact for
    piecewise-linear y)."""
    y = np.asarray(y, dtype=float)
    t = np.asarray(t_s, dtype=float)
    dt = np.diff(t)
    axis = axis % y.ndim
    if dt.size and np.allclose(dt, dt[0], rtol=1e-12, atol=0.0):
        first = np.take(y, [0], axis=axis)
        # uniform sampling: dt * (running sum - half the current sample - half the first sample)
        out = _running_sum(y, axis)
        out -= 0.5 * y
        out -= 0.5 * first
        out *= dt[0]
        return out
    return cumulative_trapezoid(y, t, axis=axis, initial=0.0)


def _running_sum(y, axis):
    """np.cumsum along ``axis``; row by row when that axis is the slow one (numpy's accumulate is not
    vectorised across the fast axis, a loop of whole-row additions is several times faster - the reason
    the uniform case does not simply call scipy's cumulative_trapezoid)."""
    if y.ndim < 2 or axis != 0:
        return np.cumsum(y, axis=axis)
    out = np.empty_like(y)
    out[0] = y[0]
    for i in range(1, y.shape[0]):
        np.add(out[i - 1], y[i], out=out[i])
    return out


def shift_input(t_s, cp, delay_s):
    """Input delayed by ``delay_s`` seconds: cp(t - delay), linear interpolation, 0 before the first sample
    and the last value after the end. ``delay_s`` scalar -> (T,); array (N,) -> (T, N)."""
    t = np.asarray(t_s, dtype=float)
    cp = np.asarray(cp, dtype=float)
    d = np.asarray(delay_s, dtype=float)
    if d.ndim == 0:
        if d == 0:
            return cp
        return np.interp(t - d, t, cp, left=0.0, right=cp[-1])
    s = t[:, None] - d.reshape(1, -1)
    j = np.clip(np.searchsorted(t, s, side="right") - 1, 0, t.size - 2)
    t0, t1 = t[j], t[j + 1]
    frac = np.clip((s - t0) / (t1 - t0), 0.0, 1.0)
    out = cp[j] * (1 - frac) + cp[j + 1] * frac
    out = np.where(s < t[0], 0.0, out)
    return out


def _prepare(t_s, cp, params):
    t = check_times(t_s, "t_s", min_frames=2)
    cp = as_float_array(cp, "cp")
    if cp.shape != t.shape:
        raise ValueError(f"cp: shape {cp.shape} must equal the shape of t_s {t.shape}")
    arrs = [as_float_array(p, name) for name, p in params.items()]
    try:
        shape = np.broadcast_shapes(*[a.shape for a in arrs])
    except ValueError:
        raise ValueError("model parameters: shapes " + ", ".join(f"{n}{a.shape}" for n, a in zip(params, arrs))
                         + " do not broadcast to one voxel shape") from None
    flat = [np.broadcast_to(a, shape).reshape(-1) for a in arrs]
    return t, cp, shape, flat


def _finish(f_tn, shape):
    return np.ascontiguousarray(f_tn.T).reshape(shape + (f_tn.shape[0],))


def _delayed(t, cp, delay_s):
    d = float(delay_s)
    if not np.isfinite(d):
        raise ValueError(f"delay_s={delay_s}: must be a finite number of seconds")
    return shift_input(t, cp, d)


def tofts(t_s, cp, ktrans_per_min, ve, delay_s: float = 0.0):
    """Standard Tofts model (Tofts et al., JMRI 1999;10:223): Ct = Ktrans cp * exp(-kep t), kep = Ktrans/ve.

    cp: plasma concentration (T,) mM; returns tissue concentration (..., T) in mM."""
    t, cp, shape, (ktrans, ve) = _prepare(t_s, cp, {"ktrans_per_min": ktrans_per_min, "ve": ve})
    cp = _delayed(t, cp, delay_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        kep = np.where(ve > 0, ktrans / np.where(ve > 0, ve, 1.0), 0.0) / S_PER_MIN
    f = exp_convolution(t, cp, kep)
    return _finish(f * (ktrans / S_PER_MIN)[None, :], shape)


def extended_tofts(t_s, cp, ktrans_per_min, ve, vp, delay_s: float = 0.0):
    """Extended Tofts model: Ct = vp cp + Ktrans cp * exp(-kep t) (Tofts et al. 1999; Sourbron & Buckley,
    MRM 2011;66:735). Returns (..., T) in mM."""
    t, cp, shape, (ktrans, ve, vp) = _prepare(t_s, cp, {"ktrans_per_min": ktrans_per_min, "ve": ve, "vp": vp})
    cp = _delayed(t, cp, delay_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        kep = np.where(ve > 0, ktrans / np.where(ve > 0, ve, 1.0), 0.0) / S_PER_MIN
    f = exp_convolution(t, cp, kep)
    return _finish(f * (ktrans / S_PER_MIN)[None, :] + cp[:, None] * vp[None, :], shape)


def patlak(t_s, cp, ktrans_per_min, vp, delay_s: float = 0.0):
    """Patlak model (Patlak et al., J Cereb Blood Flow Metab 1983;3:1): Ct = vp cp + Ktrans int_0^t cp.
    Returns (..., T) in mM."""
    t, cp, shape, (ktrans, vp) = _prepare(t_s, cp, {"ktrans_per_min": ktrans_per_min, "vp": vp})
    cp = _delayed(t, cp, delay_s)
    icp = cumulative_integral(t, cp)
    return _finish(icp[:, None] * (ktrans / S_PER_MIN)[None, :] + cp[:, None] * vp[None, :], shape)


#: Floor of the root of the 2CXM characteristic equation (1/s) where it divides: the root is 0 only at
#: Fp = PS = 0, where every numerator it divides is 0 too (rates and amplitudes 0, no NaN).
_ROOT_FLOOR_PER_S = 1e-300


def two_compartment_rates(fp_per_s, ps_per_s, ve, vp):
    """Bi-exponential form of the 2CXM impulse response R(t) = a_plus e^{-k_plus t} + a_minus e^{-k_minus t}
    (Sourbron & Buckley, Phys Med Biol 2012;57:R1, eq. 36-37). Inputs in 1/s and fractions; returns
    (k_plus, k_minus, a_plus, a_minus) in 1/s - the first four values of
    :func:`two_compartment_rate_derivatives`, whose docstring has the formulas."""
    return two_compartment_rate_derivatives(fp_per_s, ps_per_s, ve, vp)[:4]


def two_compartment_rate_derivatives(fp_per_s, ps_per_s, ve, vp):
    """The 2CXM rates and amplitudes (:func:`two_compartment_rates`) and their partial derivatives.

    Inputs: plasma flow Fp and PS in 1/s, ve and vp fractions (clamped to >= 1e-12 like the model);
    scalars or arrays of one shape. Returns a flat tuple of 20 values: (k_plus, k_minus, a_plus, a_minus)
    in 1/s, then d(k_plus)/d(Fp, PS, ve, vp), d(k_minus)/d(...), d(a_plus)/d(...), d(a_minus)/d(...) row by
    row (per 1/s for Fp and PS, per unit fraction for ve and vp). The derivatives are those of the
    formulas at the clamped ve, vp (one-sided at the clamp).

    With kb = Fp/vp, q = PS/vp, ke = PS/ve (Sourbron & Buckley 2012, eq. 36-37: kp = kb + q), the rates
    are the roots of k^2 - s k + ke kb = 0, s = kb + q + ke, written without cancellation: the
    discriminant D = s^2 - 4 ke kb = u^2 + w with u = kb - ke - q, w = 4 q kb (>= 0 as computed),
    root = sqrt(D), k_plus = (s + root)/2, k_minus = ke kb / k_plus; the amplitudes a_minus = Fp e_minus,
    a_plus = Fp (1 - e_minus) with e_minus = (k_plus - kb)/root = (root - u)/(2 root), root - u computed as
    n + (n^2 + w)/(root + m), m = max(u, 0), n = max(-u, 0) (root^2 - m^2 = n^2 + w), which does not cancel
    where u > 0 (the usual kb > ke + q). Derivatives by the chain rule: d root = (u du + dw/2)/root,
    d k_minus = (d(ke kb) - k_minus d k_plus)/k_plus, d e_minus = (u dw - 2 w du) / (4 root^3).

    Guard: where the root (or k_plus) divides it is max(root, 1e-300); the root is 0 only at Fp = PS = 0
    (D = u^2 + 4 Fp PS / vp^2 with u = 0 there), where every numerator it divides is 0 too: the rates and
    a_minus are 0, e_minus is 0 as on the axis PS = 0 (a_plus = Fp, d a_plus / d Fp = 1, so Fp keeps its
    influence on the fit there) and every value is finite, never NaN or Inf. Written
    with arithmetic, np.sqrt and np.maximum only (no branches, no array methods), so that the one function
    serves numpy arrays and ``numba.njit`` with float scalars (the compiled fit kernels)."""
    vp = np.maximum(vp, 1e-12)
    ve = np.maximum(ve, 1e-12)
    kb = fp_per_s / vp                   # 1 / blood-plasma transit time through the vessel
    q = ps_per_s / vp                    # kp - kb, kp = (Fp + PS) / vp: 1 / plasma mean transit time
    ke = ps_per_s / ve                   # 1 / interstitial mean transit time
    s = kb + q + ke
    u = kb - ke - q
    w = 4.0 * q * kb
    root = np.sqrt(u * u + w)
    rg = np.maximum(root, _ROOT_FLOOR_PER_S)
    m = np.maximum(u, 0.0)
    n = np.maximum(-u, 0.0)
    r_minus_u = n + (n * n + w) / np.maximum(root + m, _ROOT_FLOOR_PER_S)
    k_plus = 0.5 * (s + root)
    kpg = np.maximum(k_plus, _ROOT_FLOOR_PER_S)
    k_minus = ke * kb / kpg
    e_minus = 0.5 * r_minus_u / rg
    e_plus = 1.0 - e_minus
    a_plus = fp_per_s * e_plus
    a_minus = fp_per_s * e_minus
    # derivatives of the intermediates by (Fp, PS, ve, vp); zeros written out
    inv_vp, inv_ve = 1.0 / vp, 1.0 / ve
    kb_f, kb_v = inv_vp, -kb * inv_vp                  # kb by Fp, vp
    q_p, q_v = inv_vp, -q * inv_vp                     # q by PS, vp
    ke_p, ke_e = inv_ve, -ke * inv_ve                  # ke by PS, ve
    s_f, s_p, s_e, s_v = kb_f, q_p + ke_p, ke_e, kb_v + q_v
    u_f, u_p, u_e, u_v = kb_f, -ke_p - q_p, -ke_e, kb_v - q_v
    w_f, w_p, w_v = 4.0 * q * kb_f, 4.0 * q_p * kb, 4.0 * (q_v * kb + q * kb_v)
    r_f = (u * u_f + 0.5 * w_f) / rg
    r_p = (u * u_p + 0.5 * w_p) / rg
    r_e = (u * u_e) / rg
    r_v = (u * u_v + 0.5 * w_v) / rg
    kp_f, kp_p, kp_e, kp_v = 0.5 * (s_f + r_f), 0.5 * (s_p + r_p), 0.5 * (s_e + r_e), 0.5 * (s_v + r_v)
    # k_minus = ke kb / k_plus
    km_f = (ke * kb_f - k_minus * kp_f) / kpg
    km_p = (ke_p * kb - k_minus * kp_p) / kpg
    km_e = (ke_e * kb - k_minus * kp_e) / kpg
    km_v = (ke * kb_v - k_minus * kp_v) / kpg
    # e_minus: (u dw - 2 w du) / (4 root^3), divided step by step (0 stays 0 at root = 0)
    em_f = 0.25 * ((u * w_f - 2.0 * w * u_f) / rg / rg / rg)
    em_p = 0.25 * ((u * w_p - 2.0 * w * u_p) / rg / rg / rg)
    em_e = 0.25 * ((-2.0 * w * u_e) / rg / rg / rg)
    em_v = 0.25 * ((u * w_v - 2.0 * w * u_v) / rg / rg / rg)
    # a_minus = Fp e_minus, a_plus = Fp e_plus = Fp (1 - e_minus)
    am_f, am_p, am_e, am_v = e_minus + fp_per_s * em_f, fp_per_s * em_p, fp_per_s * em_e, fp_per_s * em_v
    ap_f, ap_p, ap_e, ap_v = e_plus - fp_per_s * em_f, -fp_per_s * em_p, -fp_per_s * em_e, -fp_per_s * em_v
    return (k_plus, k_minus, a_plus, a_minus,
            kp_f, kp_p, kp_e, kp_v,
            km_f, km_p, km_e, km_v,
            ap_f, ap_p, ap_e, ap_v,
            am_f, am_p, am_e, am_v)


def two_compartment_exchange(t_s, cp, fp_ml_per_100ml_per_min, ps_per_min, ve, vp, delay_s: float = 0.0):
    """Two-compartment exchange model (Brix et al., MRM 2004;52:420; Sourbron & Buckley 2011).

    fp in ml/100 ml/min (plasma flow), PS in 1/min, ve and vp fractions. Returns (..., T) in mM."""
    t, cp, shape, (fp, ps, ve, vp) = _prepare(
        t_s, cp, {"fp_ml_per_100ml_per_min": fp_ml_per_100ml_per_min, "ps_per_min": ps_per_min, "ve": ve, "vp": vp})
    cp = _delayed(t, cp, delay_s)
    return _finish(_two_compartment_tn(t, cp, fp / FP_ML_PER_100ML_PER_MIN_PER_S, ps / S_PER_MIN, ve, vp), shape)


def _two_compartment_tn(t, cp, fp_per_s, ps_per_s, ve, vp):
    """2CXM curves (T, N) for plasma flow and PS in 1/s (the kernels' units)."""
    k_plus, k_minus, a_plus, a_minus = two_compartment_rates(fp_per_s, ps_per_s, ve, vp)
    f_plus = exp_convolution(t, cp, k_plus)
    f_minus = exp_convolution(t, cp, k_minus)
    return f_plus * a_plus[None, :] + f_minus * a_minus[None, :]

