"""Conformance with the OSIPI DCE-DSC-MRI code collection reference data, with OSIPI's tolerances.

Voxels that share an arterial input are fitted in one call (the vectorised path users get);
each case is then checked on its own and reported by label on failure."""

import numpy as np
import pytest

from conftest import DELAY_TOL, FP_TOL, KTRANS_TOL, VE_TOL, VP_TOL, cells, read_osipi, within
from DCEPerfusionLib import aif, concentration, fitting



def _fit_grouped(rows, t_key, c_key, ca_key, model, method, fit_delay, shift_samples=0):
    """Fit rows sharing (t, AIF) together; returns {label: {map: value}}."""
    groups = {}
    for row in rows:
        groups.setdefault((row[t_key], row[ca_key]), []).append(row)
    out = {}
    for (t_cell, ca_cell), members in groups.items():
        t, ca = cells(t_cell), cells(ca_cell)
        ct = np.stack([cells(r[c_key]) for r in members])
        if shift_samples:
            ct = np.concatenate([np.zeros((ct.shape[0], shift_samples)), ct[:, :-shift_samples]], axis=1)
        res = fitting.fit(ct, t, ca, model=model, method=method, fit_delay=fit_delay)
        for i, r in enumerate(members):
            out[r["label"]] = {k: float(v[i]) for k, v in res.maps.items()}
    return out


def _check(rows, fitted, checks, expect_delay=None):
    failures = []
    for row in rows:
        got = fitted[row["label"]]
        for key, ref_key, tol in checks:
            if not within(got[key], float(row[ref_key]), **tol):
                failures.append(f"{row['label']}: {key} {got[key]:.5g} vs {float(row[ref_key]):.5g}")
        if expect_delay is not None and not within(got["delay_s"], expect_delay, **DELAY_TOL):
            failures.append(f"{row['label']}: delay {got['delay_s']:.3g} s vs {expect_delay} s")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("delayed", [False, True], ids=["delay0", "delay5s"])
def test_tofts_dro(delayed):
    rows = read_osipi("DCEmodels", "data", "dce_DRO_data_tofts.csv")
    fitted = _fit_grouped(rows, "t", "C", "ca", "tofts", "nlls", delayed, shift_samples=10 if delayed else 0)
    _check(rows, fitted, [("ktrans", "Ktrans", KTRANS_TOL), ("ve", "ve", VE_TOL)], 5.0 if delayed else None)


@pytest.mark.parametrize("delayed", [False, True], ids=["delay0", "delay5s"])
def test_extended_tofts_dro(delayed):
    rows = read_osipi("DCEmodels", "data", "dce_DRO_data_extended_tofts.csv")
    fitted = _fit_grouped(rows, "t", "C", "ca", "extended_tofts", "nlls", delayed, shift_samples=5 if delayed else 0)
    _check(rows, fitted, [("ktrans", "Ktrans", KTRANS_TOL), ("ve", "ve", VE_TOL), ("vp", "vp", VP_TOL)],
           5.0 if delayed else None)


@pytest.mark.parametrize("method", ["lls", "nlls"])
@pytest.mark.parametrize("name,delay", [("patlak_sd_0.02_delay_0.csv", None), ("patlak_sd_0.02_delay_5.csv", 5.0)])
def test_patlak(method, name, delay):
    rows = read_osipi("DCEmodels", "data", name)
    fitted = _fit_grouped(rows, "t", "C_t", "cp_aif", "patlak", method, delay is not None)
    _check(rows, fitted, [("ktrans", "ps", KTRANS_TOL), ("vp", "vp", VP_TOL)], delay)


@pytest.mark.parametrize("name,delay", [("2cxm_sd_0.001_delay_0.csv", None), ("2cxm_sd_0.001_delay_5.csv", 5.0)])
def test_two_compartment_exchange(name, delay):
    rows = read_osipi("DCEmodels", "data", name)
    fitted = _fit_grouped(rows, "t", "C_t", "cp_aif", "2cxm", "nlls", delay is not None)
    _check(rows, fitted, [("fp", "fp", FP_TOL), ("ps", "ps", KTRANS_TOL), ("ve", "ve", VE_TOL), ("vp", "vp", VP_TOL)],
           delay)


def test_signal_to_concentration():
    for row in read_osipi("SI_to_Conc", "data", "SI2Conc_data.csv"):
        s = cells(row["s"])
        n = int(row["numbaselinepts"])
        conc = concentration.signal_to_concentration(
            s, tr_s=float(row["TR"]), flip_angle_deg=float(row["FA"]), t10_s=float(row["T1base"]),
            r1_per_mM_s=float(row["r1"]), baseline_frames=np.arange(1, n))
        ok = within(conc[1:], cells(row["conc"])[1:], a=1e-5, r=1e-5)
        assert ok.all(), f"{row['label']}: {np.count_nonzero(~ok)} samples outside tolerance"


def _t1_cases():
    cases = []
    for name, scale in (("t1_brain_data.csv", 1.0), ("t1_quiba_data.csv", 1000.0)):
        for row in read_osipi("T1_mapping", "data", name):
            cases.append((row["label"], cells(row["FA"]), cells(row["TR"])[0], cells(row["s"]), None,
                          {"linear": float(row["R1"]) * scale, "nonlinear": float(row["R1"]) * scale}))
    for row in read_osipi("T1_mapping", "data", "t1_prostate_data.csv"):
        fa, tr, s = cells(row["FA"]), cells(row["TR"])[0] / 1000.0, cells(row["s"])
        cases.append((row["label"], fa, tr, s, None,
                      {"linear": 1000.0 / float(row["T1 linear"]), "nonlinear": 1000.0 / float(row["T1 nonlinear"])}))
        cases.append((row["label"] + " B1", fa, tr, s, float(row["B1"]) / 100.0,
                      {"linear": 1000.0 / float(row["T1 linear B1cor"]),
                       "nonlinear": 1000.0 / float(row["T1 nonlinear B1cor"])}))
    return cases


# The case OSIPI lists as missed by linear (and two-angle) fits.
KNOWN_LINEAR_MISS = {"Pat5_voxel5_prostaat"}
# Its reference 'T1 linear B1cor' (1058 ms) contradicts the same file's 'T1 linear' (1231 ms) for a B1 of
# 1.005, which can move a DESPOT1 estimate by about 1 %; our linear B1 value (1218 ms) is checked against
# the nonlinear B1-corrected reference instead.
INCONSISTENT_LINEAR_B1_REFERENCE = {"Pat1_voxel5_prostaat B1"}


@pytest.mark.parametrize("method", ["linear", "nonlinear"])
def test_vfa_t1(method):
    failures = []
    for label, fa, tr, s, b1, ref in _t1_cases():
        if method == "linear" and label.split(" ")[0] in KNOWN_LINEAR_MISS:
            continue
        fit = concentration.vfa_t1(s, fa, tr, method=method, b1=b1)
        expected = ref["nonlinear"] if label in INCONSISTENT_LINEAR_B1_REFERENCE else ref[method]
        if not within(1.0 / fit.t1_s, expected, a=0.05, r=0.05):
            failures.append(f"{label}: R1 {1 / fit.t1_s:.4g} vs {expected:.4g} /s")
    assert not failures, "\n".join(failures)


def test_parker_aif_reference():
    for name in ("ParkerAIF_ref.csv", "ParkerAIF_ref_with_delay.csv"):
        rows = read_osipi("PopulationAIF_DCE", "data", name)
        labels = sorted({r["label"] for r in rows})
        for label in labels:
            sel = [r for r in rows if r["label"] == label]
            t_s = np.array([float(r["time"]) for r in sel]) * 60.0
            ref = np.array([float(r["Cb"]) for r in sel])
            delay = float(sel[0]["delay"])
            tol = dict(a=0.1, r=0.1) if "delay" in name else dict(a=1e-4, r=0.01)
            cb = aif.parker(t_s, hct=0.0, delay_s=delay)
            assert within(cb, ref, **tol).all(), f"{name} {label}"


def test_georgiou_aif_reference():
    rows = read_osipi("PopulationAIF_DCE", "data", "GeorgiouAIF_ref.csv")
    for label in sorted({r["label"] for r in rows}):
        sel = [r for r in rows if r["label"] == label]
        t_s = np.array([float(r["time"]) for r in sel]) * 60.0
        ref = np.array([float(r["Cb"]) for r in sel])
        cb = aif.georgiou(t_s, hct=0.0)
        ok = within(cb, ref, a=1e-4, r=0.01)
        assert ok.all(), f"{label}: {np.count_nonzero(~ok)} samples outside tolerance"
