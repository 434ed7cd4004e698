"""Lesion statistics with 95 % confidence intervals (core/lesionci.py, core/regionstats.py) and the ΔVp
interval in the response call (core/response.py): coverage in simulated lesion pairs with a known true
change, spatially correlated tissue heterogeneity and per-voxel fit noise of known SE; narrowing with SNR;
determinism; the hot-spot statistics; the "indeterminate" call when the interval straddles the cut-off."""

import numpy as np
import pytest
from scipy import ndimage

from DCEPerfusionLib.core import lesionci, regionstats, response
from DCEPerfusionLib.core.registry import RESPONSE_STATISTICS

SHAPE = (10, 22, 22)


def _lesion_mask():
    k, j, i = np.indices(SHAPE)
    return ((k - 4.5) / 4.0) ** 2 + ((j - 10.5) / 8.0) ** 2 + ((i - 10.5) / 8.0) ** 2 <= 1.0


def _exam(rng, mean_vp, se_vp, cv=0.3, corr_voxels=1.0):
    """A vp map (fraction): a lesion of mean ``mean_vp`` whose tissue varies with coefficient ``cv`` over
    ~``corr_voxels`` voxels, plus fit noise N(0, se_vp) per voxel; and its SE map."""
    field = ndimage.gaussian_filter(rng.standard_normal(SHAPE), corr_voxels)
    field /= field.std()
    tissue = mean_vp * (1.0 + cv * field)
    vp = tissue + se_vp * rng.standard_normal(SHAPE)
    return vp, np.full(SHAPE, se_vp)


def _pair_interval(rng, true_change_pct, se_vp, statistic="mean", n_boot=300, cv=0.3, corr_voxels=0.7):
    mask = _lesion_mask()
    rows = []
    for mean_vp in (0.06, 0.06 * (1 + true_change_pct / 100.0)):
        vp, se = _exam(rng, mean_vp, se_vp, cv=cv, corr_voxels=corr_voxels)
        rows.append(regionstats.region_statistics({"vp": vp, "vp_se": se}, {"L": mask}, 8.0, n_boot=n_boot))
    r = response.assess_lesion(response.exam_values(rows[0], "L", statistic),
                               response.exam_values(rows[1], "L", statistic), "L", statistic=statistic)
    return r.call.delta_vp_ci_lower_pct, r.call.delta_vp_ci_upper_pct, r


@pytest.mark.slow
@pytest.mark.parametrize("statistic, corr_voxels, highest", [("mean", 0.7, 0.98), ("mean", 1.0, 0.98),
                                                             ("median", 0.7, 1.0)])
def test_delta_vp_ci_covers_the_true_change_in_90_to_98_percent_of_pairs(statistic, corr_voxels, highest):
    """Tissue varying by 30 % and correlated over ~1.4-2 voxels (Gaussian smoothing of sd 0.7-1 voxel, as a
    point-spread function gives), fit noise of SE 0.015 (vp 0.06): the population's true ΔVp is -35 %.
    The median's interval is conservative (it is widened by the mean's design effect; ~99 % measured)."""
    rng = np.random.default_rng(2024)
    true = -35.0
    hits, n = 0, 120
    for _ in range(n):
        lo, hi, _ = _pair_interval(rng, true, se_vp=0.015, statistic=statistic, corr_voxels=corr_voxels)
        assert lo < hi
        hits += lo <= true <= hi
    coverage = hits / n
    assert 0.90 <= coverage <= highest, f"coverage {coverage:.3f}"


@pytest.mark.parametrize("statistic, widths", [("mean", (8.0, 16.0)), ("median", (10.0, 19.0))])
def test_delta_vp_ci_brackets_the_change_with_the_width_the_coverage_test_calibrates(statistic, widths):
    """The fast companion of the coverage test above (marked slow: the Slicer-stack runs leave it out), on the
    same chain and the same simulated pairs: each interval holds its own ΔVp, and its width is that of the
    calibrated intervals. Measured on these six pairs: 9.6-12.3 points (mean), 12.9-15.4 (median); without
    the design-effect widening 5.4-7.8, with intervals twice too wide 19-31 - both outside the bounds."""
    rng = np.random.default_rng(5)
    found = []
    for _ in range(6):
        lo, hi, r = _pair_interval(rng, -35.0, se_vp=0.015, statistic=statistic)
        assert lo < r.call.delta_vp_pct < hi and r.change_ci["vp"] == (lo, hi)
        found.append(hi - lo)
    assert widths[0] < min(found) and max(found) < widths[1], found


def test_the_interval_narrows_with_snr():
    widths = {}
    for se in (0.03, 0.01, 0.003):
        rng = np.random.default_rng(7)
        w = [np.subtract(*_pair_interval(rng, -30.0, se, cv=0.1)[1::-1]) for _ in range(8)]
        widths[se] = float(np.median(w))
    assert widths[0.03] > widths[0.01] > widths[0.003] > 0, widths


def test_bootstrap_is_seeded_and_the_exams_streams_differ():
    rng = np.random.default_rng(1)
    vp, se = _exam(rng, 0.05, 0.01)
    mask = _lesion_mask()
    a = lesionci.bootstrap_draws(vp, mask, se, n_boot=200)
    b = lesionci.bootstrap_draws(vp, mask, se, n_boot=200)
    for k in lesionci.CI_STATISTICS:
        np.testing.assert_array_equal(a[k], b[k])
    other = lesionci.bootstrap_draws(vp * 1.0001, mask, se, n_boot=200)
    assert abs(np.corrcoef(a["mean"], other["mean"])[0, 1]) < 0.3     # not the same random stream


def test_the_se_draw_does_not_count_the_noise_twice_and_correlation_widens_the_interval():
    rng = np.random.default_rng(3)
    mask = _lesion_mask()
    vp, se = _exam(rng, 0.05, 0.01, corr_voxels=0.0)           # uncorrelated: the spread is honest as it is
    with_se = lesionci.bootstrap_draws(vp, mask, se, n_boot=600)["mean"].std()
    without = lesionci.bootstrap_draws(vp, mask, None, n_boot=600)["mean"].std()
    assert with_se == pytest.approx(without, rel=0.15)
    assert with_se == pytest.approx(vp[mask].std() / np.sqrt(mask.sum()), rel=0.15)
    resid = np.where(mask, vp - vp[mask].mean(), 0.0)
    assert lesionci.design_effect(resid, mask) == pytest.approx(1.0, abs=0.3)
    vp, se = _exam(rng, 0.05, 0.0, corr_voxels=1.0)
    resid = np.where(mask, vp - vp[mask].mean(), 0.0)
    assert lesionci.design_effect(resid, mask) > 10            # N_eff << N for correlated tissue
    corr = lesionci.bootstrap_draws(vp, mask, None, n_boot=600)["mean"].std()
    assert corr > 3 * vp[mask].std() / np.sqrt(mask.sum())


def test_too_small_a_lesion_has_no_interval_and_no_ci_reason():
    vp = np.full(SHAPE, 0.05)
    mask = np.zeros(SHAPE, bool)
    mask[4, 10:12, 10:12] = True
    rows = regionstats.region_statistics({"vp": vp}, {"L": mask}, 8.0)
    assert all(np.isnan(v) for pair in rows[0].ci.values() for v in pair)


def test_straddling_interval_makes_the_call_indeterminate_unless_turned_off():
    rng = np.random.default_rng(11)
    b = response.ExamValues({"vp": 0.05}, 300, 0, draws={"vp": rng.normal(0.05, 0.004, 1000)})
    f = response.ExamValues({"vp": 0.041}, 300, 0, draws={"vp": rng.normal(0.041, 0.004, 1000)})
    r = response.assess_lesion(b, f, "L")
    assert r.call.call == response.INDETERMINATE
    assert "95 % CI" in r.call.reason and "straddles the cut-off -20 %" in r.call.reason
    lo, hi = r.call.delta_vp_ci_lower_pct, r.call.delta_vp_ci_upper_pct
    assert lo < -20 < hi and r.change_ci["vp"] == (lo, hi)
    off = response.assess_lesion(b, f, "L", indeterminate_when_ci_straddles=False)
    assert off.call.call == response.FAILURE and "95 % CI" in off.call.reason      # -18 % > -20 %
    clear = response.ExamValues({"vp": 0.02}, 300, 0, draws={"vp": rng.normal(0.02, 0.001, 1000)})
    assert response.assess_lesion(b, clear, "L").call.call == response.SUCCESS
    no_draws = response.assess_lesion(response.ExamValues({"vp": 0.05}, 300, 0),
                                      response.ExamValues({"vp": 0.041}, 300, 0), "L")
    assert no_draws.call.call == response.FAILURE and np.isnan(no_draws.call.delta_vp_ci_lower_pct)


def test_hotspot_statistics_ignore_unfitted_voxels_and_match_a_direct_computation():
    rng = np.random.default_rng(5)
    vp = rng.uniform(0.01, 0.05, SHAPE)
    mask = _lesion_mask()
    vp[5, 10, 10] = np.nan                       # a failed fit inside the lesion
    vp[5, 11, 11] = 10.0                         # ... and a hot voxel beside it
    vp[~mask] = 5.0                              # tissue outside must not enter the lesion's hot spot
    rows = regionstats.region_statistics({"vp": vp}, {"L": mask}, 8.0, n_boot=0)
    v = rows[0].values
    valid = mask & np.isfinite(vp)
    best = -np.inf
    for k, j, i in zip(*np.nonzero(valid)):
        nb = tuple(slice(max(c - 1, 0), c + 2) for c in (k, j, i))
        best = max(best, vp[nb][valid[nb]].mean())
    assert v["hotspot_peak"] == pytest.approx(best)
    good = np.sort(vp[valid])
    assert v["top10_mean"] == pytest.approx(good[-int(np.ceil(0.1 * good.size)):].mean())
    assert v["mean"] < v["top10_mean"] and v["hotspot_peak"] < 10.0
    assert rows[0].ci == {}                      # n_boot=0: no intervals


def test_hotspot_statistics_are_response_statistics():
    for name in ("hotspot_peak", "top10_mean"):
        assert name in RESPONSE_STATISTICS
    mask = _lesion_mask()
    base = regionstats.region_statistics({"vp": np.full(SHAPE, 0.05)}, {"L": mask}, 8.0, n_boot=50)
    follow = regionstats.region_statistics({"vp": np.full(SHAPE, 0.02)}, {"L": mask}, 8.0, n_boot=50)
    r = response.assess_lesion(response.exam_values(base, "L", "hotspot_peak"),
                               response.exam_values(follow, "L", "hotspot_peak"), "L", statistic="hotspot_peak")
    assert r.change_pct["vp"] == pytest.approx(-60.0) and r.call.call == response.SUCCESS


def test_percent_change_draws_and_interval():
    d = lesionci.percent_change_draws(np.array([1.0, 2.0, 0.0]), np.array([0.5, 3.0, 1.0]))
    np.testing.assert_allclose(d[:2], [-50.0, 50.0])
    assert np.isnan(d[2])
    assert all(np.isnan(lesionci.percentile_ci(np.arange(5.0))))
    lo, hi = lesionci.percentile_ci(np.arange(1001.0))
    assert (lo, hi) == pytest.approx((25.0, 975.0))
    with pytest.raises(ValueError, match="mask"):
        lesionci.bootstrap_draws(np.zeros((3, 3)), np.zeros((2, 2), bool))
