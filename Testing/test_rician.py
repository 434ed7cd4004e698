"""Noise-aware concentration (core/rician.py, ``noise_sigma``): the Rician mean and its inversion, single-sample
correction, recovery of concentrations at baseline SNR 1.5 (per voxel and for an artery's mean), unchanged
results at SNR >= 50, a Rician digital reference object (two sets of 30 parameter patches), bad inputs."""

import numpy as np
import pytest
from conftest import KTRANS_TOL, VE_TOL, within

from DCEPerfusionLib.apps import cli
from DCEPerfusionLib.core import aif, concentration, fitting, models, pipeline, rician
from DCEPerfusionLib.core.options import AnalysisOptions
from DCEPerfusionLib.core.series import Series4D

ACQ = dict(tr_s=0.005, flip_angle_deg=15.0, r1_per_mM_s=4.5)
N_BASELINE = 10
T_S = np.arange(60) * 5.0
CP = aif.parker(T_S, hct=0.42, delay_s=T_S[N_BASELINE])


def _magnitude(clean, sigma, rng):
    return np.abs(clean + sigma * (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)))


def _signal(conc, t10_s=1.0):
    return concentration.concentration_to_signal(conc, t10_s=np.full(conc.shape[:-1], t10_s), **ACQ)


def _conc(signal, noise_sigma, t10_s=1.0):
    return concentration.signal_to_concentration(signal, t10_s=t10_s, n_baseline=N_BASELINE, noise_sigma=noise_sigma,
                                                 warn=False, **ACQ)


def test_rician_mean_its_inversion_and_the_single_sample_correction(rng):
    snr = np.array([0.0, 0.5, 1.5, 3.0, 10.0, 80.0])
    m = _magnitude(snr[:, None] * np.ones((1, 200000)), 1.0, rng)
    np.testing.assert_allclose(m.mean(axis=1), rician.rician_mean(snr), rtol=0.005)
    np.testing.assert_allclose(m.var(axis=1), rician.rician_variance(snr), rtol=0.02)
    np.testing.assert_allclose(rician.invert_mean(2.0 * rician.rician_mean(snr), 2.0), 2.0 * snr, atol=1e-3)
    assert rician.invert_mean(0.5, 1.0) == 0.0 and np.isnan(rician.invert_mean(np.nan, 1.0))
    corrected = rician.correct_sample(m[2:5], 1.0).mean(axis=1)          # SNR 1.5, 3, 10: within 1.5 %
    np.testing.assert_allclose(corrected, snr[2:5], rtol=0.015)
    assert m[2].mean() > 1.2 * 1.5                                       # the bias it removes: 25 % at SNR 1.5


def test_estimate_sigma_from_the_baseline_frames(rng):
    for snr in (1.5, 3.0, 20.0):
        sigma, source = rician.estimate_sigma(_magnitude(np.full((20000, N_BASELINE), 3.0 * snr), 3.0, rng))
        assert sigma == pytest.approx(3.0, rel=0.03), snr
        assert "Koay & Basser" in source
    mixed = np.concatenate([_magnitude(np.full((n, N_BASELINE), a), 3.0, rng) for n, a in
                            ((3000, 0.0), (3000, 4.5), (14000, 60.0))])        # background, dark marrow, muscle
    assert rician.estimate_sigma(mixed)[0] == pytest.approx(3.0, rel=0.05)


def test_concentrations_recovered_at_baseline_snr_1_5_per_voxel_and_for_roi_means(rng):
    truth = models.extended_tofts(T_S, CP, 0.2, 0.4, 0.05)                # a lesion curve, peak ~0.6 mM
    clean = _signal(np.tile(truth, (3000, 1)))
    sigma = clean[0, 0] / 1.5
    noisy = _magnitude(clean, sigma, rng)
    late = T_S > T_S[N_BASELINE] + 30
    area = truth[late].sum()
    biased = _conc(noisy, None)
    corrected = _conc(noisy, sigma)
    # per voxel: the median voxel's enhancement (the fit sees each voxel); the uncorrected is > 20 % low
    assert np.median(np.nansum(biased[:, late], axis=1)) < 0.8 * area
    assert np.median(np.nansum(corrected[:, late], axis=1)) == pytest.approx(area, rel=0.06)
    # ROI mean (an artery of 3000 voxels): the mean signal, the Rician mean inverted with one voxel's sigma
    roi = rician.invert_mean(noisy.mean(axis=0), sigma)
    roi_conc = _conc(roi[None], None)[0]
    np.testing.assert_allclose(roi_conc[late], truth[late], atol=0.03)
    assert _conc(noisy.mean(axis=0)[None], None)[0][late].sum() < 0.85 * area     # the mean of magnitudes: biased


def test_image_derived_aif_of_the_pipeline_uses_the_corrected_mean_signal(rng):
    shape = (2, 20, 20)
    artery = np.zeros(shape, bool)
    artery[:, 2:18, 2:12] = True                                            # 320 voxels
    lesion = np.zeros(shape, bool)
    lesion[:, 4:16, 13:19] = True
    cb = CP * (1 - 0.42)
    conc = np.zeros(shape + (T_S.size,))
    conc[artery] = cb
    conc[lesion] = models.extended_tofts(T_S, CP, 0.2, 0.4, 0.05)
    t10 = np.where(artery, 1.9, 1.0)
    clean = concentration.concentration_to_signal(conc, t10_s=t10, **ACQ)
    clean[artery] *= clean[lesion][0, 0] / clean[artery][0, 0]             # the same baseline in blood and lesion
    sigma = float(clean[lesion][0, 0] / 1.5)                               # baseline SNR 1.5
    series = Series4D(_magnitude(clean, sigma, rng).astype(np.float32), T_S, np.eye(4), ACQ["tr_s"],
                      ACQ["flip_angle_deg"], "frame labels (test)", "rician")
    kw = dict(lesions={"lesion": lesion}, aif_mask=artery, aif_name="aorta", fit_mask=lesion | artery)
    opts = dict(n_baseline=N_BASELINE, aif_source="segment", blood_t10_s=1.9, r1_per_mM_s=ACQ["r1_per_mM_s"],
                hct=0.42)
    plain = pipeline.analyse(series, AnalysisOptions(**opts), **kw)
    fixed = pipeline.analyse(series, AnalysisOptions(noise_sigma=sigma, **opts), **kw)
    late = T_S > T_S[N_BASELINE] + 30
    assert fixed.cp_mM[late].sum() == pytest.approx(CP[late].sum(), rel=0.05)
    assert abs(plain.cp_mM[late].sum() / CP[late].sum() - 1) > 0.15
    per_voxel = concentration.series_to_concentration(series.signal, t10, n_baseline=N_BASELINE, noise_sigma=sigma,
                                                      **ACQ)[0]                # corrected per voxel, then averaged:
    assert aif.image_derived(per_voxel, artery)[late].sum() < 0.95 * CP[late].sum()    # still low
    assert "Rician-corrected mean signal" in fixed.aif_description
    assert fixed.provenance["noise_sigma"] == {"value": sigma, "source": "given"}
    assert plain.provenance["noise_sigma"]["value"] is None
    auto = pipeline.analyse(series, AnalysisOptions(noise_sigma="auto", **opts), **kw)
    assert auto.provenance["noise_sigma"]["value"] == pytest.approx(sigma, rel=0.05)
    assert "baseline frames" in auto.provenance["noise_sigma"]["source"]


# ------------------------------------------------------------------ a Rician digital reference object
KTRANS_PER_MIN = (0.02, 0.05, 0.1, 0.2, 0.35)
VE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
VP = (0.01, 0.05)                                  # two sets of 5 x 6 = 30 patches


def rician_dro(snr, seed=0, patch_voxels=36, t10_s=1.0):
    """(signal (60 patches x voxels, T), sigma, patch parameters (60, 3)): Extended Tofts curves for the OSIPI-like
    grid of Ktrans x ve in two vp sets, Parker AIF, SPGR signal (TR 5 ms, 15 deg, T10 1 s, r1 4.5/(mM s)), complex
    Gaussian noise of sigma = baseline / ``snr`` (``snr`` None: noise-free), magnitude."""
    params = np.array([(k, v, p) for p in VP for k in KTRANS_PER_MIN for v in VE])
    kt, ve, vp = (np.repeat(params[:, i], patch_voxels) for i in range(3))
    clean = _signal(models.extended_tofts(T_S, CP, kt, ve, vp), t10_s)
    if snr is None:
        return clean, 0.0, params
    sigma = float(clean[:, 0].mean() / snr)
    return _magnitude(clean, sigma, np.random.default_rng(seed)), sigma, params


def lins_ccc(x, y):
    """Lin's concordance correlation coefficient (Biometrics 1989;45:255)."""
    x, y = np.nan_to_num(np.asarray(x, float)), np.asarray(y, float)
    return 2 * np.cov(x, y, bias=True)[0, 1] / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def dro_score(signal, params, noise_sigma):
    """(patches within the OSIPI tolerances of Ktrans and ve, CCC Ktrans, CCC ve, patch medians) from
    voxel-wise Extended Tofts fits."""
    fit = fitting.fit(_conc(signal, noise_sigma), T_S, CP, model="extended_tofts", method="nlls")
    est = {k: np.nanmedian(fit.maps[k].reshape(len(params), -1), axis=1) for k in ("ktrans", "ve")}
    ok = within(est["ktrans"], params[:, 0], **KTRANS_TOL) & within(est["ve"], params[:, 1], **VE_TOL)
    return int(ok.sum()), lins_ccc(est["ktrans"], params[:, 0]), lins_ccc(est["ve"], params[:, 1]), est


def test_rician_dro_at_baseline_snr_1_5():
    signal, sigma, params = rician_dro(1.5)
    n_before, ccc_k_before, ccc_v_before, _ = dro_score(signal, params, None)
    n_after, ccc_k_after, ccc_v_after, _ = dro_score(signal, params, sigma)
    n_auto, ccc_k_auto, _, _ = dro_score(signal, params, "auto")
    print(f"DRO SNR 1.5: {n_before} -> {n_after} (auto {n_auto}) of 60 patches; CCC Ktrans {ccc_k_before:.3f} -> "
          f"{ccc_k_after:.3f}, ve {ccc_v_before:.3f} -> {ccc_v_after:.3f}")
    assert n_before <= 10
    assert n_after >= 16 and n_auto >= 16
    assert ccc_k_after >= ccc_k_before and ccc_v_after >= ccc_v_before and ccc_k_auto >= ccc_k_before


@pytest.mark.parametrize("snr", [None, 50.0])
def test_noise_free_and_snr_50_results_unchanged_within_1_percent(snr):
    signal, sigma, params = rician_dro(snr, patch_voxels=4)
    _, _, _, plain = dro_score(signal, params, None)
    _, _, _, fixed = dro_score(signal, params, sigma if snr else 1e-6 * signal[:, 0].mean())
    for key in ("ktrans", "ve"):
        np.testing.assert_allclose(fixed[key], plain[key], rtol=0.01, atol=1e-4)
    if snr is None:
        np.testing.assert_allclose(plain["ktrans"], params[:, 0], rtol=1e-3)


def test_sigma_maps_and_the_series_path_agree_with_the_scalar(rng):
    clean = _signal(np.tile(models.extended_tofts(T_S, CP, 0.1, 0.3, 0.02), (2, 3, 4, 1)))
    noisy = _magnitude(clean, 0.01, rng)
    scalar = _conc(noisy, 0.01)
    np.testing.assert_allclose(_conc(noisy, np.full((2, 3, 4), 0.01)), scalar)
    series, _, info = concentration.series_to_concentration(noisy, 1.0, n_baseline=N_BASELINE, noise_sigma=0.01,
                                                            block_voxels=5, **ACQ)
    np.testing.assert_allclose(series, scalar, rtol=1e-5, atol=1e-6)
    assert info["noise_sigma"] == 0.01 and info["noise_sigma_source"] == "given"


@pytest.mark.parametrize("bad, message", [
    (-1.0, "must be finite and > 0"), (0.0, "must be finite and > 0"), (float("nan"), "must be finite and > 0"),
    ("loud", "give the noise sigma in signal units"), (np.ones(3), "does not match the voxel shape")])
def test_bad_noise_sigma(bad, message):
    signal = np.full((2, 2, 12), 100.0)
    with pytest.raises(ValueError, match=message):
        concentration.signal_to_concentration(signal, t10_s=1.0, n_baseline=4, noise_sigma=bad, **ACQ)


def test_bad_noise_sigma_in_the_options_and_the_command_line(capsys):
    with pytest.raises(ValueError, match="noise sigma=-2: the noise sigma must be finite and > 0"):
        AnalysisOptions(noise_sigma=-2).checked()
    with pytest.raises(ValueError, match="noise sigma = .*: give one number"):
        AnalysisOptions(noise_sigma=[1.0, 2.0]).checked()
    assert AnalysisOptions(noise_sigma="auto").checked().noise_sigma == "auto"
    assert AnalysisOptions(noise_sigma="12.5").checked().noise_sigma == 12.5
    with pytest.raises(ValueError, match="needs at least 3 baseline frames"):
        concentration.signal_to_concentration(np.full((20, 12), 100.0), t10_s=1.0, n_baseline=2, noise_sigma="auto",
                                              **ACQ)
    parser = cli.build_parser()
    args = parser.parse_args(["fit", "dce.nrrd", "--out", "x", "--noise-sigma", "auto"])
    assert cli._options(args).noise_sigma == "auto"
    args = parser.parse_args(["fit", "dce.nrrd", "--out", "x", "--noise-sigma", "7"])
    assert cli._options(args).noise_sigma == 7.0
    for bad in ("abc", "-1", "inf"):
        assert cli.main(["fit", "dce.nrrd", "--out", "x", "--noise-sigma", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--noise-sigma {bad}: give the noise sigma in signal units" in err and "\n" not in err
