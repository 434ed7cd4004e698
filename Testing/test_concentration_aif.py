"""Signal <-> concentration, T1 mapping, relaxivity presets and AIFs."""

import logging

import numpy as np
import pytest

from DCEPerfusionLib import aif, concentration, models


def test_signal_concentration_round_trip(rng):
    t = np.arange(40) * 5.0
    c = models.extended_tofts(t, aif.parker(t, delay_s=30), rng.uniform(0.05, 0.5, (4, 5)), 0.3, 0.05)
    t10 = rng.uniform(0.8, 2.0, (4, 5))
    s = concentration.concentration_to_signal(c, tr_s=0.004, flip_angle_deg=15, t10_s=t10, r1_per_mM_s=4.5, m0=800)
    back = concentration.signal_to_concentration(s, tr_s=0.004, flip_angle_deg=15, t10_s=t10, r1_per_mM_s=4.5,
                                                 n_baseline=5)
    np.testing.assert_allclose(back, c, atol=1e-10)


def test_signal_above_ceiling_is_flagged_not_inf(caplog):
    s = np.array([[100.0, 100.0, 100.0, 150.0, 1e6, 120.0]])
    with caplog.at_level(logging.WARNING):
        c, flags = concentration.signal_to_concentration(s, tr_s=0.005, flip_angle_deg=20, t10_s=1.0,
                                                         r1_per_mM_s=4.0, n_baseline=3, return_flags=True)
    assert np.isnan(c[0, 4]) and np.all(np.isfinite(np.delete(c[0], 4)))
    assert flags.n_saturated == 1 and flags.saturated[0, 4]
    assert "SPGR ceiling" in caplog.text


@pytest.mark.parametrize("kwargs,match", [
    (dict(tr_s=0), "tr_s"), (dict(tr_s=-1), "tr_s"),
    (dict(flip_angle_deg=0), "flip angle"), (dict(flip_angle_deg=120), "flip angle"),
    (dict(t10_s=0.0), "t10_s"), (dict(t10_s=np.ones(3)), "t10_s"),
    (dict(n_baseline=6), "n_baseline"), (dict(n_baseline=0), "n_baseline"),
    (dict(r1_per_mM_s=0), "r1_per_mM_s"),
])
def test_conversion_bad_arguments(kwargs, match):
    args = dict(tr_s=0.005, flip_angle_deg=15, t10_s=1.0, r1_per_mM_s=4.0, n_baseline=2)
    args.update(kwargs)
    s = np.ones((2, 6))
    with pytest.raises(ValueError, match=match):
        concentration.signal_to_concentration(s, **args)


def test_relaxivity_presets():
    assert concentration.relaxivity("gadobutrol", 1.5) == 5.2
    assert concentration.relaxivity("Gadavist", 3) == 5.0
    assert concentration.relaxivity("Dotarem", 3.0) == 3.5
    assert concentration.relaxivity("gadopentetate", 3.0) == 3.7
    with pytest.raises(ValueError, match="r1_per_mM_s"):
        concentration.relaxivity("gadoxetate", 3.0)


def test_vfa_t1_vectorised_with_b1_map(rng):
    fa = np.array([2.0, 5.0, 10.0, 15.0, 20.0])
    t1 = rng.uniform(0.5, 2.5, (3, 4))
    b1 = rng.uniform(0.8, 1.2, (3, 4))
    s = concentration.spgr_signal(1 / t1[..., None], 0.005, fa * b1[..., None], 1000.0)
    for method in ("linear", "nonlinear"):
        fit = concentration.vfa_t1(s, fa, 0.005, method=method, b1=b1)
        np.testing.assert_allclose(fit.t1_s, t1, rtol=1e-8)
        np.testing.assert_allclose(fit.m0, 1000.0, rtol=1e-8)
    bad = s.copy()
    bad[0, 0, 2] = -1
    fit = concentration.vfa_t1(bad, fa, 0.005, method="nonlinear")
    assert fit.status[0, 0] == 3 and np.isnan(fit.t1_s[0, 0]) and np.isfinite(fit.t1_s[1, 1])
    with pytest.raises(ValueError, match="flip_angles_deg"):
        concentration.vfa_t1(s, fa[:3], 0.005)


def test_population_aifs_shape_delay_and_hct():
    t = np.arange(0, 300, 1.0)
    for name in aif.POPULATION_MODELS:
        cp = aif.population(name, t, delay_s=12.0)
        assert np.all(cp[t < 12] == 0) and cp.max() > 0.8 and np.all(np.isfinite(cp))
    np.testing.assert_allclose(aif.parker(t, hct=0.4), aif.parker(t, hct=0.0) / 0.6)
    np.testing.assert_allclose(aif.georgiou(t, hct=0.35), aif.georgiou(t, hct=0.0) / 0.65)
    with pytest.raises(ValueError, match="hct"):
        aif.parker(t, hct=42)
    with pytest.raises(ValueError, match="unknown population"):
        aif.population("tofts", t)


def test_georgiou_recirculation_present():
    t = np.arange(0, 120, 0.5)
    cb = aif.georgiou(t, hct=0)
    first = np.argmax(cb)
    # a second local maximum (recirculation) after the first pass
    d = np.diff(cb[first:])
    assert np.any((d[:-1] < 0) & (d[1:] > 0))


def test_image_derived_aif(rng):
    t = np.arange(60) * 2.0
    cb = aif.parker(t, hct=0.0, delay_s=10)
    conc = np.zeros((5, 5, 2, t.size)) + 0.1
    mask = np.zeros((5, 5, 2), bool)
    mask[1:3, 1:3, :] = True
    conc[mask] = cb * rng.uniform(0.7, 1.0, (mask.sum(), 1))
    conc[1, 1, 0] = cb  # the full-strength voxel
    cp = aif.image_derived(conc, mask, hct=0.4, method="top", top_fraction=0.1)
    np.testing.assert_allclose(cp.max(), cb.max() / 0.6, rtol=0.15)
    with pytest.raises(ValueError, match="at least 3"):
        aif.image_derived(conc, np.zeros((5, 5, 2), bool), hct=0.4)


def test_automatic_aif_finds_the_artery(rng):
    t = np.arange(60) * 5.0
    cp = aif.parker(t, delay_s=20)
    shape = (24, 24, 3)
    ktrans = rng.uniform(0.05, 0.8, shape)
    conc = models.extended_tofts(t, cp, ktrans, rng.uniform(0.1, 0.5, shape), rng.uniform(0, 0.1, shape))
    artery = np.zeros(shape, bool)
    artery[5:8, 15:18, :] = True
    conc[artery] = cp * 0.58
    conc = conc + rng.normal(0, 0.05, conc.shape)
    found = aif.detect(conc, t, n_voxels=10, hct=0.42)
    assert found.mask.sum() == 10
    assert np.mean(artery[found.mask]) >= 0.9
    np.testing.assert_allclose(found.cp, cp, atol=0.1 * cp.max())
