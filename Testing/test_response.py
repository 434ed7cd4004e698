"""Response assessment: the vp call on synthetic exam pairs with known truth, size measures on analytic
shapes, and the rigid registration that carries a lesion from the baseline to the follow-up."""

import numpy as np
import pytest

from DCEPerfusionLib import aif, concentration, fitting, phantom, regionstats, response
from DCEPerfusionLib.core.size import NO_PROGRESSION, PROGRESSION, size_change, size_measures
from DCEPerfusionLib.files import images, registration

LESION_KT, LESION_VE, LESION_VP, LESION_T10 = phantom.TISSUES["lesion"]


def _exam_rows(lesion_vp, seed):
    """Fit a phantom whose lesion has plasma volume ``lesion_vp`` and return its lesion statistics rows."""
    ph = phantom.make_phantom(shape=(2, 24, 24), snr=60.0, seed=seed,
                              tissues={"lesion": (LESION_KT, LESION_VE, lesion_vp, LESION_T10)})
    acq = ph.acquisition
    conc = concentration.signal_to_concentration(ph.signal, tr_s=acq["tr_s"], flip_angle_deg=acq["flip_angle_deg"],
                                                 t10_s=ph.t10_s, r1_per_mM_s=acq["r1_per_mM_s"],
                                                 n_baseline=acq["n_baseline"])
    cp = aif.parker(ph.t_s, hct=acq["hct"], delay_s=acq["bolus_s"])
    lesion = ph.labels == phantom.LABELS["lesion"]
    res = fitting.fit(conc, ph.t_s, cp, model="extended_tofts", mask=lesion)
    rows = regionstats.region_statistics(res.maps, {"lesion": lesion}, 8.0)
    return rows, float(ph.truth["vp"][lesion].mean())


@pytest.fixture(scope="module")
def exams():
    out = {"baseline": _exam_rows(LESION_VP, 1), "halved": _exam_rows(LESION_VP / 2, 2),
           "risen": _exam_rows(LESION_VP * 1.6, 3), "tiny": _exam_rows(0.002, 4)}
    truth = {k: v[1] for k, v in out.items()}
    return {k: v[0] for k, v in out.items()} | {"truth": truth}


def test_vp_halving_is_a_success_and_a_rise_a_suspected_failure(exams):
    base = response.exam_values(exams["baseline"], "lesion")
    ok = response.assess_lesion(base, response.exam_values(exams["halved"], "lesion"))
    assert ok.call.call == response.SUCCESS
    assert ok.change_pct["vp"] == pytest.approx(-50.0, abs=5.0)  # the truth: -50 %
    assert abs(ok.change_pct["ktrans"]) < 5.0 and abs(ok.change_pct["ve"]) < 5.0
    assert ok.baseline["vp"] == pytest.approx(exams["truth"]["baseline"], rel=0.05)  # mean vp of the lesion
    bad = response.assess_lesion(base, response.exam_values(exams["risen"], "lesion"))
    assert bad.call.call == response.FAILURE and bad.change_pct["vp"] == pytest.approx(60.0, abs=6.0)
    assert "above the cut-off -20 %" in bad.call.reason
    # the cut-off is configurable: with -60 % even the halving is "suspected failure"
    strict = response.assess_lesion(base, response.exam_values(exams["halved"], "lesion"), cutoff_pct=-60)
    assert strict.call.call == response.FAILURE


def test_the_chosen_statistic_is_used(exams):
    for stat in response.STATISTICS:
        base = response.exam_values(exams["baseline"], "lesion", statistic=stat)
        row = next(r for r in exams["baseline"] if r.map == "vp")
        assert base.values["vp"] == row.values[stat]
    with pytest.raises(ValueError, match="statistic='max'"):
        response.exam_values(exams["baseline"], "lesion", statistic="max")


def test_indeterminate_calls_say_why(exams):
    base = response.exam_values(exams["baseline"], "lesion")
    missing = response.assess_lesion(base, None)
    assert missing.call.call == response.INDETERMINATE and "follow-up exam has no statistics" in missing.call.reason
    tiny = response.assess_lesion(response.exam_values(exams["tiny"], "lesion"), base)
    assert tiny.call.call == response.INDETERMINATE and "below 0.005" in tiny.call.reason
    few = response.ExamValues(values={"vp": 0.1}, voxel_count=6, excluded_voxel_count=30)
    poor = response.assess_lesion(base, few)
    assert poor.call.call == response.INDETERMINATE and "6 voxels with a good fit (17 %" in poor.call.reason
    no_vp = response.ExamValues(values={"ktrans": 0.2, "ve": 0.3}, voxel_count=100, excluded_voxel_count=0)
    assert "no vp map" in response.assess_lesion(base, no_vp).call.reason


def test_call_boundaries():
    b = response.ExamValues({"vp": 0.10}, 100, 0)
    at = response.assess_lesion(b, response.ExamValues({"vp": 0.08}, 100, 0))   # exactly -20 %
    assert at.change_pct["vp"] == pytest.approx(-20.0) and at.call.call == response.SUCCESS
    above = response.assess_lesion(b, response.ExamValues({"vp": 0.0801}, 100, 0))
    assert above.call.call == response.FAILURE
    assert np.isnan(response.percent_change(0.0, 1.0)) and response.percent_change(2.0, 3.0) == 50.0


def _grid(spacing, shape):
    m = np.diag(list(spacing) + [1.0])
    k, j, i = np.indices(shape)
    return m, np.stack([i * spacing[0], j * spacing[1], k * spacing[2]], axis=-1)


def test_size_of_a_sphere_and_an_ellipsoid_on_anisotropic_voxels():
    spacing = (0.7, 0.9, 3.0)
    m, xyz = _grid(spacing, (30, 80, 90))
    centre = np.array([31.3, 36.1, 44.2])
    d = xyz - centre
    sphere = (d ** 2).sum(-1) <= 12.0 ** 2
    size = size_measures(sphere, m)
    voxel = max(spacing[:2])
    assert abs(size.longest_diameter_mm - 24.0) <= voxel
    assert abs(size.perpendicular_diameter_mm - 24.0) <= voxel
    assert size.bidimensional_mm2 == pytest.approx(size.longest_diameter_mm * size.perpendicular_diameter_mm)
    assert size.volume_cm3 == pytest.approx(4 / 3 * np.pi * 12.0 ** 3 / 1000, rel=0.05)
    assert abs(size.slice_index * spacing[2] - centre[2]) <= spacing[2]
    # ellipsoid with semi-axes 15 (R), 8 (A), 9 (S) mm, rotated 30 degrees in the axial plane
    t = np.deg2rad(30)
    u = d[..., 0] * np.cos(t) + d[..., 1] * np.sin(t)
    v = -d[..., 0] * np.sin(t) + d[..., 1] * np.cos(t)
    ell = (u / 15.0) ** 2 + (v / 8.0) ** 2 + (d[..., 2] / 9.0) ** 2 <= 1
    size = size_measures(ell, m)
    assert abs(size.longest_diameter_mm - 30.0) <= voxel
    assert abs(size.perpendicular_diameter_mm - 16.0) <= voxel
    assert size.volume_cm3 == pytest.approx(4 / 3 * np.pi * 15 * 8 * 9 / 1000, rel=0.05)
    empty = size_measures(np.zeros((3, 4, 5), bool), m)
    assert empty.voxel_count == 0 and empty.slice_index == -1


def test_size_change_and_its_call():
    m, xyz = _grid((1.0, 1.0, 2.0), (20, 60, 60))
    d2 = ((xyz - np.array([30.0, 30.0, 20.0])) ** 2).sum(-1)
    base = size_measures(d2 <= 10.0 ** 2, m)
    grown = size_measures(d2 <= 12.5 ** 2, m)   # +25 % diameter
    same = size_measures(d2 <= 10.5 ** 2, m)
    ch = size_change(base, grown)
    assert ch.call == PROGRESSION and ch.change_pct["longest_diameter"] == pytest.approx(25.0, abs=6.0)
    assert ch.change_pct["volume"] > 60
    assert size_change(base, same).call == NO_PROGRESSION
    assert size_change(base, size_measures(np.zeros((20, 60, 60), bool), m)).call == \
        response.INDETERMINATE
    with pytest.raises(ValueError, match="progression_pct"):
        size_change(base, same, progression_pct=0)


def _rotation(axis, deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(4)
    a, b = [(1, 2), (0, 2), (0, 1)][axis]
    r[a, a] = r[b, b] = c
    r[a, b], r[b, a] = -s, s
    return r


def test_registration_recovers_a_known_rigid_motion_and_carries_the_lesion():
    import SimpleITK as sitk
    rng = np.random.default_rng(0)
    shape, spacing = (24, 64, 64), (1.5, 1.5, 4.0)
    m, xyz = _grid(spacing, shape)
    m[:3, 3] = -np.array([48.0, 48.0, 46.0])
    xyz = xyz + m[:3, 3]
    anatomy = np.zeros(shape, np.float32)
    for c, r, a in [((0, 0, 0), 30, 100), ((10, 5, -10), 10, 300), ((-15, 12, 8), 8, 200), ((5, -20, 20), 12, 150),
                    ((-20, -15, -20), 6, 250)]:
        anatomy += a * np.exp(-((xyz - np.array(c)) ** 2).sum(-1) / (2 * r * r))
    anatomy += rng.normal(0, 2, shape).astype(np.float32)
    motion = _rotation(2, 5.0) @ _rotation(0, 3.0)       # baseline RAS -> follow-up RAS
    motion[:3, 3] = [4.0, -3.0, 2.0]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    back = lps @ np.linalg.inv(motion) @ lps
    tf = sitk.AffineTransform(3)
    tf.SetMatrix(back[:3, :3].ravel().tolist())
    tf.SetTranslation(back[:3, 3].tolist())
    base_img = images.to_sitk(anatomy, m)
    followup = sitk.GetArrayFromImage(sitk.Resample(base_img, base_img, tf, sitk.sitkLinear, 0.0))
    reg = registration.register_rigid(anatomy, m, followup, m)
    truth = np.linalg.inv(motion)
    pts = np.c_[xyz.reshape(-1, 3)[::50], np.ones(xyz.size // 150 + 1)[: xyz.reshape(-1, 3)[::50].shape[0]]]
    err = np.linalg.norm((pts @ reg.followup_to_baseline_ras.T - pts @ truth.T)[:, :3], axis=1)
    assert err.max() < 1.0                                        # within 1 mm everywhere in the volume
    rel = reg.followup_to_baseline_ras[:3, :3] @ motion[:3, :3]   # identity when the rotation is right
    assert np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1, 1))) < 1.0
    assert reg.final_metric < 0 and reg.rotation_deg == pytest.approx(5.83, abs=1.0)
    # the lesion drawn on the baseline lands where the motion put it
    lesion = ((xyz - np.array([10.0, 5.0, -10.0])) ** 2).sum(-1) <= 12.0 ** 2
    carried = registration.propagate_mask(lesion, m, shape, m, reg)
    moved = np.c_[xyz.reshape(-1, 3), np.ones(xyz.size // 3)] @ np.linalg.inv(motion).T
    expect = (((moved[:, :3] - np.array([10.0, 5.0, -10.0])) ** 2).sum(-1) <= 12.0 ** 2).reshape(shape)
    assert 2 * (carried & expect).sum() / (carried.sum() + expect.sum()) > 0.85
    with pytest.raises(ValueError, match="follow-up image: must be finite and not constant"):
        registration.register_rigid(anatomy, m, np.zeros(shape, np.float32), m)
