"""Forward models against independent numerical integration and closed forms."""

import numpy as np
import pytest
from scipy.integrate import quad

from DCEPerfusionLib import aif, models


def _numeric_conv(t, cp, k):
    """int_{t0}^{t_i} cp(s) exp(-k (t_i - s)) ds with cp linear between samples, by adaptive quadrature."""
    out = np.zeros(t.size)
    for i in range(1, t.size):
        out[i] = sum(quad(lambda s: np.interp(s, t, cp) * np.exp(-k * (t[i] - s)), t[j], t[j + 1],
                          epsabs=1e-13, epsrel=1e-12)[0] for j in range(i))
    return out


@pytest.mark.parametrize("kep_per_min", [0.0, 1e-4, 0.3, 2.0, 40.0])
def test_exp_convolution_is_exact(kep_per_min):
    t = np.concatenate([np.arange(0, 60, 2.0), 60 + np.cumsum(np.linspace(3, 9, 12))])  # non-uniform
    cp = aif.parker(t, delay_s=10)
    f = models.exp_convolution(t, cp, np.array([kep_per_min / 60]))[:, 0]
    ref = _numeric_conv(t, cp, kep_per_min / 60)
    np.testing.assert_allclose(f, ref, rtol=1e-9, atol=1e-12)


def test_exp_convolution_derivative_matches_finite_difference():
    t = np.arange(40) * 4.0
    cp = aif.parker(t, delay_s=20)
    k = np.array([1e-4, 0.01, 0.2])
    f, df = models.exp_convolution(t, cp, k, derivative=True)
    h = 1e-7
    fd = (models.exp_convolution(t, cp, k + h) - models.exp_convolution(t, cp, k - h)) / (2 * h)
    np.testing.assert_allclose(df, fd, rtol=1e-5, atol=1e-9)


def test_tofts_closed_form_for_step_input():
    # cp = 1 mM from t = 0: Ct = ve (1 - exp(-kep t)) exactly
    t = np.linspace(0, 300, 61)
    cp = np.ones_like(t)
    ct = models.tofts(t, cp, 0.3, 0.25)
    np.testing.assert_allclose(ct, 0.25 * (1 - np.exp(-(0.3 / 0.25) / 60 * t)), rtol=1e-12, atol=1e-14)


def test_extended_tofts_and_patlak_are_consistent():
    t = np.arange(50) * 5.0
    cp = aif.parker(t, delay_s=15)
    # kep -> 0 (ve huge): Extended Tofts tends to Patlak
    etm = models.extended_tofts(t, cp, 0.1, 1e6, 0.05)
    pat = models.patlak(t, cp, 0.1, 0.05)
    np.testing.assert_allclose(etm, pat, rtol=1e-6, atol=1e-9)
    # vp adds vp * cp exactly
    np.testing.assert_allclose(models.extended_tofts(t, cp, 0.2, 0.3, 0.07) - models.tofts(t, cp, 0.2, 0.3),
                               0.07 * cp[None, :][0], atol=1e-14)


def test_2cxm_reduces_to_tofts_when_flow_is_high():
    t = np.arange(60) * 5.0
    cp = aif.parker(t, delay_s=20)
    ps, ve, vp = 0.2, 0.3, 1e-6
    cx = models.two_compartment_exchange(t, cp, 1e5, ps, ve, vp)
    # with infinite flow Ktrans = PS and the plasma term vanishes as vp -> 0
    np.testing.assert_allclose(cx, models.tofts(t, cp, ps, ve), rtol=1e-3, atol=1e-6)


def test_2cxm_matches_numeric_impulse_response():
    t = np.arange(0, 200, 2.0)
    cp = aif.parker(t, delay_s=10)
    fp, ps, ve, vp = 40.0, 0.15, 0.25, 0.05
    kp, km, ap, am = models.two_compartment_rates(fp / 6000, ps / 60, ve, vp)
    # impulse response from the compartment ODEs, checked by integrating them with a fine Euler scheme
    dt = 0.001
    tt = np.arange(0, t[-1] + dt, dt)
    c_in = np.interp(tt, t, cp)
    cpl = np.zeros_like(tt)
    ce = np.zeros_like(tt)
    F, PS = fp / 6000, ps / 60
    for i in range(1, tt.size):
        dcp = (F * (c_in[i - 1] - cpl[i - 1]) - PS * (cpl[i - 1] - ce[i - 1])) / vp
        dce = PS * (cpl[i - 1] - ce[i - 1]) / ve
        cpl[i] = cpl[i - 1] + dt * dcp
        ce[i] = ce[i - 1] + dt * dce
    ode = np.interp(t, tt, vp * cpl + ve * ce)
    ct = models.two_compartment_exchange(t, cp, fp, ps, ve, vp)
    np.testing.assert_allclose(ct, ode, rtol=2e-3, atol=2e-4)
    assert kp > km > 0 and ap > 0 and am > 0


def _rates_textbook(fp_per_s, ps_per_s, ve, vp):
    """Sourbron & Buckley 2012 eq. 36-37 as printed: the roots (s +- sqrt(s^2 - 4 ke kb)) / 2."""
    kp, ke, kb = (fp_per_s + ps_per_s) / vp, ps_per_s / ve, fp_per_s / vp
    s = kp + ke
    root = np.sqrt(s * s - 4 * ke * kb)
    k_plus, k_minus = (s + root) / 2, (s - root) / 2
    e_minus = (k_plus - kb) / (k_plus - k_minus)
    return k_plus, k_minus, fp_per_s * (1 - e_minus), fp_per_s * e_minus


def test_2cxm_rates_match_the_textbook_roots_and_stay_finite_when_degenerate(rng):
    n = 200
    fp, ps = rng.uniform(1, 200, n) / 6000, rng.uniform(0.01, 5, n) / 60
    ve, vp = rng.uniform(0.02, 1, n), rng.uniform(0.005, 1, n)
    got = models.two_compartment_rates(fp, ps, ve, vp)
    for g, r, name in zip(got, _rates_textbook(fp, ps, ve, vp), ("k_plus", "k_minus", "a_plus", "a_minus")):
        # the textbook k_minus = (s - root)/2 cancels (ours is ke kb / k_plus): agreement to its rounding
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12 * np.max(np.abs(r)), err_msg=name)
    out = models.two_compartment_rate_derivatives(fp, ps, ve, vp)
    assert len(out) == 20
    for g, r in zip(out[:4], got):
        np.testing.assert_array_equal(g, r)
    # Fp = PS = 0 (the root is 0), PS = 0, Fp = 0, ve and vp at 0: finite everywhere; at Fp = PS = 0 the
    # plasma amplitude still moves with Fp (a_plus = Fp on the axis PS = 0), so Fp is not stuck at 0
    edge = [np.array(v, dtype=float) for v in ([0, 0, 1e-3, 0, 1e-3, 1e-300], [0, 1e-3, 0, 0, 1e-3, 1e-300],
                                               [0.3, 0.3, 0.3, 0, 0, 0.3], [0.05, 0.05, 0.05, 0, 0, 0.05])]
    out = np.array(models.two_compartment_rate_derivatives(*edge))
    assert np.all(np.isfinite(out)), out
    assert out[12, 0] == 1.0 and out[3, 0] == 0.0          # d a_plus / d Fp, a_minus at Fp = PS = 0
    np.testing.assert_allclose(out[:4, 2], [1e-3 / 0.05, 0.0, 1e-3, 0.0])   # PS = 0: one exponential, kb


def test_rate_derivatives_compile_to_the_same_numbers():
    """The same function compiles with numba.njit on float scalars (the compiled 2CXM kernel calls it so)
    and gives the numbers of the numpy call."""
    numba = pytest.importorskip("numba")
    jit = numba.njit(models.two_compartment_rate_derivatives)
    cases = [(0.01, 0.002, 0.3, 0.05), (50 / 6000, 1e-6 / 60, 0.3, 0.05), (0.0, 0.0, 0.3, 0.05), (1e-3, 0.0, 0.0, 0.0),
             (200 / 6000, 5 / 60, 1.0, 1.0), (0.03, 0.001, 1e-6, 1e-4)]
    for args in cases:
        want = models.two_compartment_rate_derivatives(*(np.array([a]) for a in args))
        have = jit(*args)
        assert len(have) == 20
        np.testing.assert_allclose(have, [w[0] for w in want], rtol=1e-14, atol=0, err_msg=str(args))


def test_models_broadcast_voxel_shapes():
    t = np.arange(30) * 5.0
    cp = aif.parker(t)
    kt = np.full((2, 3), 0.2)
    ct = models.extended_tofts(t, cp, kt, 0.3, np.array([0.01, 0.02, 0.03]))
    assert ct.shape == (2, 3, 30)
    np.testing.assert_allclose(ct[1, 2], models.extended_tofts(t, cp, 0.2, 0.3, 0.03), rtol=1e-14)


def test_model_argument_errors():
    t = np.arange(10.0)
    with pytest.raises(ValueError, match="cp"):
        models.tofts(t, np.ones(9), 0.1, 0.2)
    with pytest.raises(ValueError, match="broadcast"):
        models.tofts(t, np.ones(10), np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="strictly increasing"):
        models.tofts(t[::-1], np.ones(10), 0.1, 0.2)


@pytest.mark.parametrize("t", [np.arange(0, 120, 4.0), np.array([0.0, 1.0, 3.0, 3.5, 7.0, 20.0, 21.0])],
                         ids=["uniform", "irregular"])
def test_cumulative_integral_along_either_axis(rng, t):
    y = rng.normal(size=(5, t.size))
    trapezoid = getattr(np, "trapezoid", None) or np.trapz          # (numpy < 2 names it trapz)
    ref = np.array([[trapezoid(row[:i + 1], t[:i + 1]) for i in range(t.size)] for row in y])
    np.testing.assert_allclose(models.cumulative_integral(t, y, axis=-1), ref, atol=1e-12)
    np.testing.assert_allclose(models.cumulative_integral(t, y.T, axis=0), ref.T, atol=1e-12)
