"""Inputs as people bring them, and unit slips refused: the chain's plausibility checks, the detected
bolus arrival, small and prescribed AIFs, a fit region, the field strength from the header, the one rule
for frame times (file or given interval) and what summary.json records as used."""

import dataclasses

import numpy as np
import pytest

from DCEPerfusionLib import phantom, pipeline
from DCEPerfusionLib.core import bolus, multivolume, plausibility
from DCEPerfusionLib.core.geometry import Volume
from DCEPerfusionLib.core.options import AnalysisOptions
from DCEPerfusionLib.core.series import resolve_frame_times
from DCEPerfusionLib.files import exam


def _opts(ph, **kw):
    acq = ph.acquisition
    base = dict(n_baseline=acq["n_baseline"], t10_s=1.6, r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"],
                method="lls")
    return AnalysisOptions(**{**base, **kw})


# ============================================================================== bolus arrival
@pytest.mark.parametrize("snr", [60.0, 8.0])
def test_bolus_arrival_gives_the_phantoms_baseline(snr):
    ph = phantom.make_phantom(shape=(2, 20, 24), snr=snr, seed=1)
    found = bolus.arrival(ph.signal, ph.t_s)
    assert found.n_baseline == ph.acquisition["n_baseline"] and found.time_s == ph.acquisition["bolus_s"]
    artery = ph.labels == phantom.LABELS["artery"]
    assert bolus.arrival(ph.signal, ph.t_s, artery).n_baseline == ph.acquisition["n_baseline"]


@pytest.mark.parametrize("bolus_s", [12.0, 47.5, 62.0, 100.0])
def test_bolus_arrival_follows_the_bolus_never_after_it(bolus_s):
    """At frame resolution: the onset found is the last frame at or before the true onset, or the one
    before it (whose frame may already hold the foot of the bolus); the baseline is the frames before."""
    ph = phantom.make_phantom(shape=(2, 16, 16), bolus_s=bolus_s, seed=2)
    found = bolus.arrival(ph.signal, ph.t_s)
    assert bolus_s - 2 * 5.0 < found.time_s <= bolus_s
    assert found.n_baseline in (ph.acquisition["n_baseline"] - 1, ph.acquisition["n_baseline"])


@pytest.mark.parametrize("bolus_s", [-3.0, 0.0, 8.0])
def test_a_series_that_starts_with_the_bolus_asks_for_the_baseline_frames(bolus_s):
    ph = phantom.make_phantom(shape=(2, 16, 16), bolus_s=bolus_s, seed=3)
    with pytest.raises(ValueError, match=r"rises at frame [12], leaving fewer than 2 baseline frames .*--baseline-frames"):
        bolus.arrival(ph.signal, ph.t_s)


def test_a_small_slow_lesion_at_low_snr_is_not_taken_for_an_early_bolus():
    """No artery in the field of view: 32 voxels of a slowly enhancing lesion in flat tissue, SNR 5 - the
    voxels are chosen by their mean enhancement over many frames, and a rise must hold over three frames
    and 3 noise SDs, so noise maxima do not make an early bolus (they did with a 3-frame maximum)."""
    t = np.arange(60) * 5.0
    from DCEPerfusionLib.core import aif, concentration, models
    cp = aif.parker(t, delay_s=60.0)
    lesion = np.zeros((4, 32, 32), bool)
    lesion[:, :1, :8] = True
    conc = np.where(lesion[..., None], models.extended_tofts(t, cp, 0.03, 0.2, 0.005), 0.0)
    s = concentration.spgr_signal(1 / 1.4 + 5.0 * conc, 0.004, 15.0, m0=1000.0)
    sigma = float(concentration.spgr_signal(1 / 1.4, 0.004, 15.0, m0=1000.0)) / 5.0
    found = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        noisy = np.hypot(s + rng.normal(0, sigma, s.shape), rng.normal(0, sigma, s.shape))
        found.append(bolus.arrival(noisy, t).n_baseline)
    assert all(n in (11, 12, 13) for n in found), found                      # onset at frame 12 (60 s)


def test_no_enhancement_asks_for_the_baseline_frames():
    flat = np.random.default_rng(0).normal(100, 1, (2, 8, 8, 40))
    with pytest.raises(ValueError, match="found no baseline followed by a lasting rise .*--baseline-frames"):
        bolus.arrival(flat, np.arange(40) * 5.0)


def test_the_chain_detects_and_reports_the_baseline(small):
    ph, series, masks = small
    res = pipeline.analyse(series, _opts(ph, n_baseline=None), lesions={"lesion": masks["lesion"]})
    assert res.options.n_baseline == ph.acquisition["n_baseline"]
    assert res.provenance["n_baseline"]["source"].startswith("detected: the signal of the")
    given = pipeline.analyse(series, _opts(ph), lesions={"lesion": masks["lesion"]})
    assert given.provenance["n_baseline"] == {"value": ph.acquisition["n_baseline"], "source": "given"}
    np.testing.assert_array_equal(res.maps["vp"], given.maps["vp"])


# ============================================================================== plausibility
@pytest.mark.parametrize("kw,message", [
    (dict(t10_s=1400.0), r"T10 \(constant pre-contrast T1\) = 1400 s: .*looks like ms; give seconds \(1.4\)"),
    (dict(blood_t10_s=1600.0), r"blood T10 .* = 1600 s: .*looks like ms; give seconds \(1.6\)"),
    (dict(tr_s=0.004 / 1000), r"TR = 0.004 ms \(given\): outside 0.1-1000 ms - .*--tr-ms 4 "),
    (dict(tr_s=2.0), r"TR = 2000 ms \(given\): .*excitation TR"),
    (dict(flip_angle_deg=0.26), r"flip angle = 0.26 degrees \(given\): .*radians; give degrees \(14.9\)"),
])
def test_unit_slips_in_the_options_are_refused(small, kw, message):
    ph, _, _ = small
    with pytest.raises(ValueError, match=message):
        _opts(ph, **kw).checked()


def test_unit_slips_in_the_series_are_refused(small):
    ph, series, _ = small
    as_ms = dataclasses.replace(series, t_s=series.t_s * 1000)                    # ms labels read as s
    with pytest.raises(ValueError, match="frames 5000 s apart - they look like ms read as s"):
        pipeline.analyse(as_ms, _opts(ph))
    as_s = dataclasses.replace(series, t_s=series.t_s / 1000)                     # s labels read as ms
    with pytest.raises(ValueError, match="frames 0.005 s apart - they look like s read as ms"):
        pipeline.analyse(as_s, _opts(ph))
    tr_in_s = dataclasses.replace(series, tr_s=4.0)                               # a header TR of 4 s
    with pytest.raises(ValueError, match=r"TR = 4000 ms \(header of phantom\)"):
        pipeline.analyse(tr_in_s, _opts(ph))
    wrapped = series.signal.astype(np.int32)
    wrapped = ((wrapped * 200 + 2 ** 15) % 2 ** 16 - 2 ** 15).astype(np.float32)  # uint16 stored as int16
    with pytest.raises(ValueError, match="samples are negative .*int16 wrap"):
        pipeline.analyse(dataclasses.replace(series, signal=wrapped), _opts(ph))
    t1 = Volume(np.full(series.shape_kji, 1400.0), series.ijk_to_ras, "T1 map t1.nrrd")
    with pytest.raises(ValueError, match="median T1 1400 s when read in s .*set the T1 map unit to 'ms' or 'auto'"):
        pipeline.analyse(series, _opts(ph, t1_map_unit="s"), t1_map=t1)
    shallow = series.signal.copy()
    shallow[0, 0, 0, 3] = -0.5                                                   # filter ringing in air
    res = pipeline.analyse(dataclasses.replace(series, signal=shallow), _opts(ph))
    assert any("slightly negative" in w and "used as they are" in w for w in res.warnings)
    assert res.maps["status"][0, 0, 0] == 0                                      # fitted, as the warning says


def test_plausible_ranges_are_clinical():
    assert plausibility.check_tr_s(0.0035, "x") == 0.0035
    assert plausibility.check_frame_spacing(np.arange(1321) * 0.5, "x", "y") == 0.5   # fast single-slice DCE
    assert plausibility.check_t1_s(4.0, "T10") == 4.0
    assert plausibility.check_signal(np.ones((2, 2, 3)), "s") == ""


# ============================================================================== AIF and fit region
def test_one_and_two_voxel_aifs_are_accepted_with_a_warning(small):
    ph, series, masks = small
    for n in (1, 2):
        one = np.zeros(series.shape_kji, bool)
        one[tuple(np.argwhere(masks["artery"])[:n].T)] = True
        res = pipeline.analyse(series, _opts(ph, aif_source="segment", blood_t10_s=1.9), aif_mask=one,
                               aif_name="aif")
        assert any(f"only {n} voxel(s) on the DCE grid - the AIF is noisy" in w for w in res.warnings)
        assert res.provenance["aif"]["voxels"] == n and np.isfinite(res.cp_mM).all()
    with pytest.raises(ValueError, match="AIF segment \\(segment 'aif'\\): has no voxel on the DCE grid"):
        pipeline.analyse(series, _opts(ph, aif_source="segment"), aif_mask=np.zeros(series.shape_kji, bool),
                         aif_name="aif")


def test_a_prescribed_aif_is_interpolated_onto_the_frames(small):
    ph, series, masks = small
    ref = pipeline.analyse(series, _opts(ph, aif_source="segment", blood_t10_s=1.9), aif_mask=masks["artery"])
    t_fine = np.linspace(0, series.t_s[-1], 237)                  # 1.25 s apart: the frames' times among them
    curve = (t_fine, np.interp(t_fine, series.t_s, ref.cp_mM), "prescribed AIF aif.csv")
    res = pipeline.analyse(series, _opts(ph, aif_source="prescribed", blood_t10_s=1.9), prescribed_aif=curve)
    np.testing.assert_allclose(res.cp_mM, ref.cp_mM, rtol=1e-9, atol=1e-12)
    assert res.aif_description == "prescribed AIF aif.csv" and res.provenance["aif"]["source"] == "prescribed"
    short = (t_fine[:200], curve[1][:200], "prescribed AIF short.csv")
    with pytest.raises(ValueError, match="prescribed AIF short.csv: covers 0-.* s, the frames 0-295 s"):
        pipeline.analyse(series, _opts(ph, aif_source="prescribed"), prescribed_aif=short)
    with pytest.raises(ValueError, match="no AIF curve given .*--aif-csv"):
        pipeline.analyse(series, _opts(ph, aif_source="prescribed"))


def test_a_fit_region_limits_the_fit(small):
    ph, series, masks = small
    region = np.zeros(series.shape_kji, bool)
    region[:, 5:15, 5:15] = True
    res = pipeline.analyse(series, _opts(ph), fit_mask=region)
    assert np.isnan(res.maps["vp"][~region]).all() and np.isfinite(res.maps["vp"][region]).mean() > 0.9
    with pytest.raises(ValueError, match="fit region \\(mask\\): has no voxel"):
        pipeline.analyse(series, _opts(ph), fit_mask=np.zeros(series.shape_kji, bool))


# ============================================================================== field, provenance
def test_the_field_strength_comes_from_the_header_unless_given(small):
    ph, series, _ = small
    at_15 = dataclasses.replace(series, field_strength_t=1.5)
    res = pipeline.analyse(at_15, _opts(ph, r1_per_mM_s=None))
    assert res.provenance["r1_per_mM_s"]["value"] == 5.2
    assert res.provenance["field_strength_t"] == {"value": 1.5, "source": "series header (MagneticFieldStrength)"}
    given = pipeline.analyse(at_15, _opts(ph, r1_per_mM_s=None, field_strength_t=3.0))
    assert given.provenance["field_strength_t"] == {"value": 3.0, "source": "given"}
    siemens = pipeline.analyse(dataclasses.replace(series, field_strength_t=2.89362), _opts(ph, r1_per_mM_s=None))
    assert siemens.provenance["r1_per_mM_s"]["value"] == 5.0                     # gadobutrol at 3 T
    assert siemens.provenance["field_strength_t"] == {
        "value": 3.0, "source": "series header (MagneticFieldStrength 2.89362 T: the 3 T preset)"}
    with pytest.raises(ValueError, match=r"no preset for agent='gadobutrol' at field_strength_t=7.0.*--r1"):
        pipeline.analyse(dataclasses.replace(series, field_strength_t=7.0), _opts(ph, r1_per_mM_s=None))
    default = pipeline.analyse(series, _opts(ph, r1_per_mM_s=None))
    assert default.provenance["field_strength_t"]["source"] == "default"
    with_r1 = pipeline.analyse(at_15, _opts(ph))
    assert "field_strength_t" not in with_r1.provenance and "contrast_agent" not in with_r1.provenance


def test_summary_records_the_values_used(small):
    ph, series, masks = small
    res = pipeline.analyse(series, _opts(ph, n_baseline=None), lesions={"lesion": masks["lesion"]})
    s = exam.summary(res)
    used = s["values_used"]
    assert used["tr_s"] == {"value": ph.acquisition["tr_s"], "source": "header of phantom"}
    assert used["flip_angle_deg"]["source"] == "header of phantom"
    assert used["frame_times"] == {"source": "frame labels (test)", "spacing_s": 5.0}
    assert used["r1_per_mM_s"]["source"] == "given" and used["t10"]["source"] == "constant"
    assert s["options_given"]["n_baseline"] is None and s["options_given"]["tr_s"] is None
    assert "contrast_agent" not in s["options_given"] and "field_strength_t" not in s["options_given"]


# ============================================================================== frame times
def test_a_given_interval_must_agree_with_the_files_times():
    t = np.arange(10) * 5.0 + 100
    assert resolve_frame_times(t, "labels", 10, "x")[0][-1] == 45.0
    agreed, source = resolve_frame_times(t, "labels", 10, "x", frame_interval_s=5.1)
    assert agreed[-1] == 45.0 and "the given interval 5.1 s agrees" in source
    with pytest.raises(ValueError, match="x: the given frame interval 2.5 s contradicts the frame times in the file "
                                         r"\(labels: 5 s apart\) - .*--override-frame-times"):
        resolve_frame_times(t, "labels", 10, "x", frame_interval_s=2.5)
    forced, source = resolve_frame_times(t, "labels", 10, "x", frame_interval_s=2.5, override=True)
    assert forced[-1] == 22.5 and "replacing the file's frame times" in source
    assert resolve_frame_times(None, "", 4, "x", frame_interval_s=2.0)[0].tolist() == [0, 2, 4, 6]


@pytest.mark.parametrize("unit,scale", [("ms", 1e-3), ("s", 1.0), ("sec", 1.0), (None, 1e-3)])
def test_frame_labels_in_their_units(unit, scale):
    keys = {multivolume.FRAME_LABELS: "0,2500,5000"}
    if unit:
        keys[multivolume.TAG_UNITS_KEY] = unit
    t, source = multivolume.frame_labels_s(keys.get, 3, "dce.nrrd")
    np.testing.assert_allclose(t, np.array([0, 2500, 5000]) * scale)
    assert source == f"{multivolume.FRAME_LABELS} ({unit or 'ms'})"


def test_frame_labels_that_count_are_refused():
    keys = {multivolume.FRAME_LABELS: "1,2,3", multivolume.TAG_UNITS_KEY: "count",
            multivolume.TAG_NAME_KEY: "TemporalPositionIdentifier"}
    with pytest.raises(ValueError, match=r"dce.nrrd: MultiVolume.FrameLabels are in 'count' "
                                         r"\(TemporalPositionIdentifier\), not a time - give the frame interval"):
        multivolume.frame_labels_s(keys.get, 3, "dce.nrrd")


def test_a_zero_mean_background_is_kept_and_nan_samples_are_said(small):
    """A float series whose air was made zero-mean (5 % of the samples negative, none deeper than 3 % of
    the maximum) is no int16 wrap: kept, with a warning; NaN samples are counted, not 'negative'."""
    ph, series, _ = small
    sig = series.signal.copy()
    air = np.zeros(series.shape_kji, bool)
    air[:, :4] = True                                                     # a strip of "air"
    sig[air] = np.random.default_rng(0).normal(0, 1.0, sig[air].shape)
    assert (sig < 0).mean() > 0.01 and sig.min() > -0.05 * sig.max()
    assert "slightly negative" in plausibility.check_signal(sig, "dce")
    sig[0, 0, 0, 5] = np.nan
    warning = plausibility.check_signal(sig, "dce")
    assert warning.startswith("signal of 'dce': 1 samples are NaN") and "down to nan" not in warning
