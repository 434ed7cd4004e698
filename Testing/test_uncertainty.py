"""Standard errors per voxel (fitting.fit(uncertainty=True)) and the model choice by AICc (model="auto").

Calibration: on simulated Extended Tofts curves (60 frames of 5 s, Parker AIF, Ktrans U(0.05, 0.4) /min,
ve U(0.15, 0.5), vp U(0.01, 0.1), Gaussian noise SD 0.005 and 0.02 mM on C), the interval +-1.96 SE
covers the truth in 93-97 % of the voxels of status ok, for Ktrans, ve, vp (and kep), with either
method. Model choice: SNR = peak of the noise-free tissue curve / noise SD, per voxel.
"""

import numpy as np
import pytest

from DCEPerfusionLib import aif, fitting, models, registry

T = np.arange(60) * 5.0
CP = aif.parker(T, delay_s=20)
N = 4000


def _etm_truth(rng, n=N):
    return {"ktrans": rng.uniform(0.05, 0.4, n), "ve": rng.uniform(0.15, 0.5, n), "vp": rng.uniform(0.01, 0.1, n)}


def _coverage(res, truth, sel):
    return {k: float(np.mean(np.abs(res.maps[k][sel] - v[sel]) <= 1.96 * res.maps[f"{k}_se"][sel]))
            for k, v in truth.items()}


@pytest.fixture(scope="module")
def etm_fits():
    """{(method, sigma): (result, truth)} on one set of curves with two noise levels."""
    rng = np.random.default_rng(2024)
    truth = _etm_truth(rng)
    truth["kep"] = truth["ktrans"] / truth["ve"]
    clean = models.extended_tofts(T, CP, truth["ktrans"], truth["ve"], truth["vp"])
    out = {}
    for sigma in (0.005, 0.02):
        ct = clean + rng.normal(0.0, sigma, clean.shape)
        for method in ("nlls", "lls"):
            out[method, sigma] = fitting.fit(ct, T, CP, model="extended_tofts", method=method), truth
    return out


@pytest.mark.parametrize("method", ["nlls", "lls"])
@pytest.mark.parametrize("sigma", [0.005, 0.02])
def test_intervals_cover_the_truth_in_95_percent_of_the_voxels(etm_fits, method, sigma):
    res, truth = etm_fits[method, sigma]
    ok = res.maps["status"] == fitting.OK
    assert ok.mean() >= 0.95, res.status_counts()                     # (and converged: not 'not converged')
    for key, cover in _coverage(res, truth, ok).items():
        assert 0.93 <= cover <= 0.97, f"{method} sigma {sigma}: {key} covered in {cover:.3f} of the ok voxels"
    for key in ("ktrans", "ve", "vp", "kep"):
        assert np.isfinite(res.maps[f"{key}_se"][ok]).all()


@pytest.mark.parametrize("method", ["nlls", "lls"])
def test_intervals_narrow_with_snr(etm_fits, method):
    low, _ = etm_fits[method, 0.02]
    high, _ = etm_fits[method, 0.005]
    for key in ("ktrans", "ve", "vp", "kep"):
        ratio = np.nanmedian(low.maps[f"{key}_se"]) / np.nanmedian(high.maps[f"{key}_se"])
        assert 3.0 < ratio < 5.0, f"{key}: SE ratio {ratio:.2f} for a noise ratio of 4"
    # and per voxel: the same curve with less noise has the narrower interval
    assert np.mean(low.maps["ktrans_se"] > high.maps["ktrans_se"]) > 0.99


def test_intervals_are_calibrated_on_unequally_spaced_frames():
    """The linear fit's design noise is summed row by row in a path of its own for unequal frame intervals."""
    rng = np.random.default_rng(4)
    t = np.concatenate([np.arange(0, 60, 2.0), 60 + np.cumsum(rng.uniform(4, 10, 35))])
    cp = aif.parker(t, delay_s=20)
    truth = _etm_truth(rng, 2000)
    ct = models.extended_tofts(t, cp, truth["ktrans"], truth["ve"], truth["vp"]) + rng.normal(0, 0.01, (2000, t.size))
    for method in ("lls", "nlls"):
        res = fitting.fit(ct, t, cp, method=method)
        for key, cover in _coverage(res, truth, res.maps["status"] == fitting.OK).items():
            assert 0.93 <= cover <= 0.97, f"{method}: {key} covered in {cover:.3f}"


def test_standard_error_maps_have_the_unit_of_their_map():
    for key, info in registry.MODELS.items():
        for se in registry.uncertainty_maps(key):
            base = se[:-len("_se")]
            assert se == registry.se_key(base) and base in info.maps
            assert registry.MAPS[se].unit == registry.MAPS[base].unit, se
            assert not registry.MAPS[se].statistics and registry.MAPS[se].zero_is_unfitted
    assert registry.uncertainty_maps("extended_tofts") == ("ktrans_se", "ve_se", "vp_se", "kep_se")
    assert registry.uncertainty_maps("2cxm") == ("fp_se", "ps_se", "ve_se", "vp_se")


def test_uncertainty_off_leaves_the_other_maps_unchanged():
    rng = np.random.default_rng(1)
    tr = _etm_truth(rng, 300)
    ct = models.extended_tofts(T, CP, tr["ktrans"], tr["ve"], tr["vp"]) + rng.normal(0, 0.01, (300, T.size))
    for method in ("nlls", "lls"):
        on = fitting.fit(ct, T, CP, method=method)
        off = fitting.fit(ct, T, CP, method=method, uncertainty=False)
        assert set(on.maps) - set(off.maps) == {"ktrans_se", "ve_se", "vp_se", "kep_se"}
        for k, v in off.maps.items():
            np.testing.assert_array_equal(on.maps[k], v, err_msg=k)


def test_a_parameter_on_a_bound_has_no_standard_error_and_the_others_stay_calibrated():
    """The rule of the fitting module: NaN for a parameter on a bound (and for kep when Ktrans or ve is);
    the voxel's other parameters keep the SE of the full covariance - which covers the truth as it should."""
    rng = np.random.default_rng(7)
    n = 6000
    kt, ve, vp = rng.uniform(0.05, 0.4, n), rng.uniform(0.15, 0.5, n), rng.uniform(0.0, 0.01, n)
    ct = models.extended_tofts(T, CP, kt, ve, vp) + rng.normal(0.0, 0.02, (n, T.size))
    res = fitting.fit(ct, T, CP)
    m = res.maps
    on_vp = (m["status"] == fitting.AT_BOUND) & (m["vp"] == 0.0)
    assert on_vp.sum() > 200                                         # many vp fits end on the bound 0
    assert np.isnan(m["vp_se"][on_vp]).all()
    assert np.isfinite(m["ktrans_se"][on_vp]).all() and np.isfinite(m["kep_se"][on_vp]).all()
    for key, cover in _coverage(res, {"ktrans": kt, "ve": ve}, on_vp).items():
        assert 0.92 <= cover <= 0.99, f"{key} covered in {cover:.3f} of the voxels with vp on its bound"
    # Ktrans on its bound 0 (a pure vascular curve): its SE, and those of ve and kep, are NaN
    vascular = fitting.fit(0.05 * CP[None] + rng.normal(0, 0.002, (20, T.size)), T, CP, bounds={"ktrans": (0, 5)})
    on_kt = vascular.maps["ktrans"] == 0.0
    assert on_kt.any()
    for key in ("ktrans_se", "kep_se"):
        assert np.isnan(vascular.maps[key][on_kt]).all()
    assert np.isfinite(vascular.maps["vp_se"][on_kt]).all()


def test_no_standard_error_where_nothing_was_fitted():
    ct = models.extended_tofts(T, CP, 0.2, 0.3, 0.05)[None].repeat(4, axis=0)
    ct[1] = 0.0                                                      # flat: no signal
    ct[2, 10] = np.nan                                               # invalid input
    res = fitting.fit(ct, T, CP, mask=np.array([True, True, True, False]))
    assert list(res.maps["status"]) == [fitting.OK, fitting.NO_SIGNAL, fitting.INVALID_INPUT, fitting.MASKED_OUT]
    for key in registry.uncertainty_maps("extended_tofts"):
        assert np.isnan(res.maps[key][1:]).all()
        assert res.maps[key][0] >= 0.0                             # noise-free: 0 (or tiny), not NaN
    few = fitting.fit(ct[:1, 5:8], T[:3], CP[5:8])                   # 3 frames, 3 parameters: no residual dof
    assert np.isnan(few.maps["ktrans_se"]).all()


@pytest.mark.parametrize("model", ["tofts", "patlak", "2cxm"])
def test_other_models_have_calibrated_standard_errors(model):
    rng = np.random.default_rng(11)
    n = 1500 if model != "2cxm" else 800
    if model == "2cxm":
        truth = {"fp": rng.uniform(10, 60, n), "ps": rng.uniform(0.05, 0.3, n), "ve": rng.uniform(0.1, 0.4, n),
                 "vp": rng.uniform(0.02, 0.1, n)}
        clean = models.two_compartment_exchange(T, CP, truth["fp"], truth["ps"], truth["ve"], truth["vp"])
    elif model == "tofts":
        truth = {"ktrans": rng.uniform(0.05, 0.4, n), "ve": rng.uniform(0.15, 0.5, n)}
        clean = models.tofts(T, CP, truth["ktrans"], truth["ve"])
    else:
        truth = {"ktrans": rng.uniform(0.01, 0.1, n), "vp": rng.uniform(0.01, 0.1, n)}
        clean = models.patlak(T, CP, truth["ktrans"], truth["vp"])
    res = fitting.fit(clean + rng.normal(0, 0.005, clean.shape), T, CP, model=model)
    ok = res.maps["status"] == fitting.OK
    assert set(registry.uncertainty_maps(model)) <= set(res.maps)
    for key, cover in _coverage(res, truth, ok).items():
        assert 0.92 <= cover <= 0.975, f"{model}: {key} covered in {cover:.3f}"


def test_standard_errors_with_the_delay_fitted():
    rng = np.random.default_rng(3)
    tr = _etm_truth(rng, 400)
    delays = rng.choice([-5.0, 0.0, 5.0], 400)
    ct = np.stack([models.extended_tofts(T, CP, tr["ktrans"][i], tr["ve"][i], tr["vp"][i], delay_s=delays[i])
                   for i in range(400)]) + rng.normal(0, 0.005, (400, T.size))
    for method in ("nlls", "lls"):
        res = fitting.fit(ct, T, CP, fit_delay=True, method=method)
        ok = res.maps["status"] == fitting.OK
        assert np.isfinite(res.maps["ktrans_se"][ok]).all() and "delay_s_se" not in res.maps
        # the SE at the fitted delay: close to calibrated where the delay was found
        found = ok & (np.abs(res.maps["delay_s"] - delays) < 0.01)
        assert _coverage(res, {"ktrans": tr["ktrans"]}, found)["ktrans"] > 0.9


# ----------------------------------------------------------------------------------------- model choice
def _generated(rng, code, n):
    kt, ve, vp = rng.uniform(0.05, 0.4, n), rng.uniform(0.15, 0.5, n), rng.uniform(0.01, 0.1, n)
    if code == 1:                                                   # Patlak: slow uptake, no backflux
        return models.patlak(T, CP, rng.uniform(0.01, 0.2, n), vp)
    if code == 2:
        return models.tofts(T, CP, kt, ve)
    return models.extended_tofts(T, CP, kt, ve, vp)


@pytest.fixture(scope="module")
def chosen():
    """{generating code: (curves, result)} at SNR 50 (peak of the noise-free curve / noise SD)."""
    rng = np.random.default_rng(50)
    out = {}
    for code in (1, 2, 3):
        clean = _generated(rng, code, 3000)
        ct = clean + rng.normal(size=clean.shape) * (clean.max(axis=1) / 50.0)[:, None]
        out[code] = ct, fitting.fit(ct, T, CP, model="auto")
    return out


@pytest.mark.parametrize("code", [1, 2, 3])
def test_aicc_picks_the_generating_model(chosen, code):
    _, res = chosen[code]
    picked = np.mean(res.maps["model_choice"] == code)
    assert picked >= 0.9, f"{fitting.MODEL_CHOICE_CODES[code]}: picked in {picked:.3f} of the voxels"


def test_model_choice_maps_follow_the_documented_rules(chosen):
    ct = np.concatenate([chosen[c][0] for c in (1, 2, 3)])
    res = fitting.fit(ct, T, CP, model="auto")
    m = res.maps
    assert list(m) == ["ktrans", "ve", "vp", "kep", "model_choice", "aicc", "ktrans_se", "ve_se", "vp_se",
                       "kep_se", "r2", "status"]
    assert m["model_choice"].dtype == np.int8 and set(np.unique(m["model_choice"])) <= {1, 2, 3}
    patlak, tofts, etm = (m["model_choice"] == c for c in (1, 2, 3))
    assert (m["vp"][tofts] == 0).all() and np.isnan(m["vp_se"][tofts]).all()
    assert np.isnan(m["ve"][patlak]).all() and np.isnan(m["kep"][patlak]).all() and np.isnan(m["ve_se"][patlak]).all()
    assert np.isfinite(m["ve"][tofts | etm]).all() and np.isfinite(m["vp"][patlak | etm]).all()
    assert res.model_counts() == {name: int(np.sum(m["model_choice"] == c))
                                  for c, name in fitting.MODEL_CHOICE_CODES.items() if np.any(m["model_choice"] == c)}
    # the AICc map is that of the chosen model's curve (predict follows the choice per voxel)
    sse = np.sum((ct - fitting.predict(res, T, CP)) ** 2, axis=1)
    k = np.where(etm, 4, 3)                                          # parameters + the residual variance
    n = T.size
    np.testing.assert_allclose(m["aicc"], n * np.log(sse / n) + 2 * k + 2 * k * (k + 1) / (n - k - 1), rtol=1e-6)
    # each voxel's choice is the least AICc of the three single-model fits
    single = {c: fitting.fit(ct, T, CP, model=name, uncertainty=False)
              for c, name in zip((1, 2, 3), registry.AUTO_CANDIDATES)}
    for c, r in single.items():
        sse_c = np.sum((ct - fitting.predict(r, T, CP)) ** 2, axis=1)
        kc = len(registry.MODELS[r.model].parameters) + 1
        aicc_c = n * np.log(sse_c / n) + 2 * kc + 2 * kc * (kc + 1) / (n - kc - 1)
        assert np.all(m["aicc"] <= aicc_c + 1e-6 * np.abs(aicc_c))
        np.testing.assert_allclose(m["ktrans"][m["model_choice"] == c], r.maps["ktrans"][m["model_choice"] == c])


def test_model_choice_with_the_linear_fit_and_the_delay():
    rng = np.random.default_rng(9)
    clean = _generated(rng, 3, 300)
    ct = clean + rng.normal(size=clean.shape) * (clean.max(axis=1) / 50.0)[:, None]
    lls = fitting.fit(ct, T, CP, model="auto", method="lls")
    assert np.mean(lls.maps["model_choice"] == 3) >= 0.9
    delayed = fitting.fit(ct, T, CP, model="auto", fit_delay=True)
    assert "delay_s" in delayed.maps and np.mean(delayed.maps["model_choice"] == 3) >= 0.9
    with pytest.raises(ValueError, match="at least 7 frames"):
        fitting.fit(ct[:, :6], T[:6], CP[:6], model="auto", fit_delay=True)
    assert registry.model("aicc").key == "auto" and registry.MODELS["auto"].linear
