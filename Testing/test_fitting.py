"""Fitting: round trips on noise-free data, status codes, masks, progress/cancel, bad arguments."""

import numpy as np
import pytest

from DCEPerfusionLib import aif, fitting, models
from DCEPerfusionLib.core import _fit_kernels

T = np.arange(60) * 5.0
CP = aif.parker(T, delay_s=20)


def _truth(rng, n):
    return rng.uniform(0.02, 0.6, n), rng.uniform(0.1, 0.6, n), rng.uniform(0.005, 0.15, n)


@pytest.mark.parametrize("model", ["tofts", "extended_tofts", "patlak"])
def test_round_trip_noise_free_nlls_and_lls(rng, model):
    kt, ve, vp = _truth(rng, 300)
    if model == "tofts":
        ct, ref = models.tofts(T, CP, kt, ve), {"ktrans": kt, "ve": ve}
    elif model == "extended_tofts":
        ct, ref = models.extended_tofts(T, CP, kt, ve, vp), {"ktrans": kt, "ve": ve, "vp": vp}
    else:
        ct, ref = models.patlak(T, CP, kt, vp), {"ktrans": kt, "vp": vp}
    res = fitting.fit(ct, T, CP, model=model, method="nlls")
    for k, v in ref.items():
        np.testing.assert_allclose(res.maps[k], v, rtol=1e-6, atol=1e-9, err_msg=k)
    assert np.all(res.maps["status"] == fitting.OK)
    assert np.all(res.maps["r2"] > 1 - 1e-10)
    # fit -> forward -> fit again gives the same numbers
    again = fitting.fit(fitting.predict(res, T, CP), T, CP, model=model)
    for k in ref:
        np.testing.assert_allclose(again.maps[k], res.maps[k], rtol=1e-6, atol=1e-9)
    # LLS (Murase) is exact for noise-free piecewise-linear data only approximately; it must be close
    lls = fitting.fit(ct, T, CP, model=model, method="lls")
    np.testing.assert_allclose(lls.maps["ktrans"], kt, rtol=0.05, atol=2e-3)


def test_round_trip_2cxm(rng):
    n = 40
    fp, ps = rng.uniform(10, 80, n), rng.uniform(0.05, 0.3, n)
    ve, vp = rng.uniform(0.1, 0.4, n), rng.uniform(0.02, 0.1, n)
    ct = models.two_compartment_exchange(T, CP, fp, ps, ve, vp)
    res = fitting.fit(ct, T, CP, model="2cxm")
    for k, v in {"fp": fp, "ps": ps, "ve": ve, "vp": vp}.items():
        np.testing.assert_allclose(res.maps[k], v, rtol=1e-4, err_msg=k)


def _2cxm_jacobian(theta, delay):
    """The Jacobian (T, n, 4) that the fit's factored form (basis, coef) of the 2CXM stands for."""
    ctx = _fit_kernels._Context(t=T, cp=CP, model="2cxm", bounds=fitting.DEFAULT_BOUNDS, fit_delay=delay is not None,
                                max_iter=1)
    pred, (basis, coef) = _fit_kernels._evaluate(ctx, theta, delay)
    basis = np.stack([np.broadcast_to(b.reshape(T.size, -1), pred.shape) for b in basis])
    return pred, np.einsum("btn,nbp->tnp", basis, coef)


@pytest.mark.parametrize("delayed", [False, True], ids=["no_delay", "delay"])
def test_2cxm_jacobian_matches_central_differences(rng, delayed):
    n = 24
    lo, hi = np.array([1.0, 0.001, 0.02, 0.005]), np.array([200.0, 5.0, 1.0, 1.0])
    spread = lo * (hi / lo) ** rng.uniform(0, 1, (n, 4))                  # log-uniform over the bounds' range
    # near-degenerate: PS -> 0, Fp -> 0, ve at its floor, vp -> 0, Fp and PS both small on the line
    # kb = ke + q where the two rates nearly coincide, the root small against the rates, huge PS
    near = np.array([[50, 1e-6, 0.3, 0.05], [1e-4, 0.2, 0.3, 0.05], [30, 0.1, 1e-6, 0.05], [30, 0.1, 0.3, 1e-4],
                     [6e-4, 6e-6 / (0.05 / 0.3 + 1), 0.3, 0.05], [1e-3, 1e-5, 0.01, 0.5], [200, 5, 1, 1],
                     [5, 5, 0.05, 0.01], [200, 0.001, 0.02, 0.005]])
    theta = np.concatenate([spread, near])
    delay = rng.uniform(-8, 8, theta.shape[0]) if delayed else None
    pred, jac = _2cxm_jacobian(theta, delay)
    cols = ("fp_ml_per_100ml_per_min", "ps_per_min", "ve", "vp")

    def curve(th):
        if delay is None:
            return models.two_compartment_exchange(T, CP, *th.T).T
        return np.stack([models.two_compartment_exchange(T, CP, *th[i], delay_s=delay[i]) for i in range(len(th))],
                        axis=1)

    np.testing.assert_allclose(pred, curve(theta), rtol=1e-13, atol=1e-15)
    scale = np.max(np.abs(pred), axis=0)
    for p, name in enumerate(cols):
        h = 1e-5 * theta[:, p]
        up, down = theta.copy(), theta.copy()
        up[:, p] += h
        down[:, p] -= h
        fd = (curve(up) - curve(down)) / (2 * h)
        err = np.max(np.abs(jac[:, :, p] - fd), axis=0)
        # relative 1e-6 of the column, or - for a parameter that hardly moves the curve - the differences'
        # own rounding, eps |C| / h, with a margin: 1e-9 |C| / theta
        allowed = 1e-6 * np.max(np.abs(fd), axis=0) + 1e-9 * scale / theta[:, p]
        assert np.all(err <= allowed), (name, theta[err > allowed], (err / allowed)[err > allowed])


def test_delay_round_trip(rng):
    kt, ve, vp = _truth(rng, 50)
    delay = rng.choice([-5.0, -2.5, 0.0, 5.0, 7.5], 50)
    ct = np.stack([models.extended_tofts(T, CP, kt[i], ve[i], vp[i], delay_s=delay[i]) for i in range(50)])
    res = fitting.fit(ct, T, CP, model="extended_tofts", fit_delay=True)
    np.testing.assert_allclose(res.maps["delay_s"], delay, atol=1e-9)
    np.testing.assert_allclose(res.maps["ktrans"], kt, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.maps["vp"], vp, rtol=1e-6, atol=1e-9)


def test_bad_voxels_get_status_not_exceptions(rng):
    kt, ve, vp = _truth(rng, 6)
    ct = models.extended_tofts(T, CP, kt, ve, vp).reshape(2, 3, T.size)
    ct[0, 0, 5] = np.nan
    ct[0, 1, :] = 0.0
    ct[1, 0, 7] = np.inf
    before = ct.copy()
    mask = np.ones((2, 3), dtype=bool)
    mask[1, 2] = False
    res = fitting.fit(ct, T, CP, mask=mask)
    np.testing.assert_array_equal(ct, before)  # input untouched
    st = res.maps["status"]
    assert st[0, 0] == fitting.INVALID_INPUT and st[1, 0] == fitting.INVALID_INPUT
    assert st[0, 1] == fitting.NO_SIGNAL
    assert st[1, 2] == fitting.MASKED_OUT
    assert st[0, 2] == fitting.OK and st[1, 1] == fitting.OK
    assert np.isnan(res.maps["ktrans"][0, 0]) and np.isfinite(res.maps["ktrans"][1, 1])
    assert res.status_counts()["invalid input"] == 2


def test_parameters_respect_bounds_and_report_them(rng):
    # a curve that wants vp < 0 (pure delayed uptake) must stop at vp = 0 with status AT_BOUND
    ct = models.tofts(T, CP, 0.2, 0.3)[None, :] - 0.02 * CP[None, :]
    res = fitting.fit(ct, T, CP, model="extended_tofts")
    assert res.maps["vp"][0] == 0.0
    assert res.maps["status"][0] == fitting.AT_BOUND
    res2 = fitting.fit(ct, T, CP, model="extended_tofts", bounds={"ktrans": (0.0, 0.1)})
    assert res2.maps["ktrans"][0] <= 0.1


def test_chunks_threads_and_progress_give_identical_results(rng):
    kt, ve, vp = _truth(rng, 500)
    ct = models.extended_tofts(T, CP, kt, ve, vp) + rng.normal(0, 0.005, (500, T.size))
    calls = []
    a = fitting.fit(ct, T, CP, chunk_size=64, n_threads=2, progress=lambda d, n: calls.append((d, n)))
    a2 = fitting.fit(ct, T, CP, chunk_size=64, n_threads=2)
    b = fitting.fit(ct, T, CP, chunk_size=10_000, n_threads=1)
    for k in ("ktrans", "ve", "vp", "r2", "status"):
        np.testing.assert_array_equal(a.maps[k], a2.maps[k])  # deterministic
        # another chunking changes the rounding of the matrix products, so a voxel may stop at another
        # iterate within the convergence tolerance
        np.testing.assert_allclose(a.maps[k], b.maps[k], rtol=1e-6, atol=1e-9)
    assert calls[0] == (0, 500) and calls[-1] == (500, 500) and len(calls) == 1 + 8


def test_progress_can_cancel(rng):
    kt, ve, vp = _truth(rng, 300)
    ct = models.extended_tofts(T, CP, kt, ve, vp)
    with pytest.raises(fitting.FitCancelled):
        fitting.fit(ct, T, CP, chunk_size=50, n_threads=1, progress=lambda d, n: d < 100)


def test_noisy_fit_is_unbiased_enough(rng):
    kt, ve, vp = np.full(2000, 0.25), np.full(2000, 0.3), np.full(2000, 0.05)
    ct = models.extended_tofts(T, CP, kt, ve, vp) + rng.normal(0, 0.005, (2000, T.size))
    res = fitting.fit(ct, T, CP)
    assert abs(np.median(res.maps["ktrans"]) - 0.25) < 0.005
    assert abs(np.median(res.maps["vp"]) - 0.05) < 0.002


@pytest.mark.parametrize("kwargs,match", [
    (dict(model="toft"), "model="),
    (dict(method="gd"), "method="),
    (dict(model="2cxm", method="lls"), "nlls"),
    (dict(bounds={"ktrans": (1, 0)}), "lower < upper"),
    (dict(bounds={"kt": (0, 1)}), "unknown parameter"),
    (dict(bounds={"ve": (0, 2)}), "at most 1"),
    (dict(mask=np.ones(3, bool)), "mask"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    ct = models.tofts(T, CP, 0.2, 0.3)[None, :]
    with pytest.raises(ValueError, match=match):
        fitting.fit(ct, T, CP, **kwargs)


def test_bad_time_and_shape_arguments():
    ct = models.tofts(T, CP, 0.2, 0.3)[None, :]
    t_dup = T.copy()
    t_dup[3] = t_dup[2]
    with pytest.raises(ValueError, match="duplicate"):
        fitting.fit(ct, t_dup, CP)
    with pytest.raises(ValueError, match="ct: shape"):
        fitting.fit(ct[:, :-1], T, CP)
    with pytest.raises(ValueError, match="cp: shape"):
        fitting.fit(ct, T, CP[:-1])
    with pytest.raises(ValueError, match="at least 3 frames"):
        fitting.fit(ct[:, :2], T[:2], CP[:2])
    with pytest.raises(ValueError, match="NaN"):
        fitting.fit(ct, T, np.where(T > 100, np.nan, CP))
