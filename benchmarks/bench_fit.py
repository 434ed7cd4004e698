"""Speed and accuracy of DCEPerfusion's fitting, side by side with its Python peers, in one process.

Data: 60 frames at 5 s, Parker AIF (Hct 0.45, bolus at 20 s), Extended Tofts tissue with Ktrans
0.01-0.5 /min, ve 0.1-0.6, vp 0.005-0.1, Gaussian noise SD 0.005 mM. Reported per method: voxel fits
per second (best of repeated runs), peak memory traced during one more run of the fit (numpy
allocations while fitting, the input excluded; tracemalloc is off while timing) and accuracy
(median absolute error; fraction of voxels within the OSIPI tolerances).

Peers, on a subset of the same voxels (they are too slow for the full set):
  * dcmri (PyPI, Tissue(kinetics="HF", water_exchange="FF").train - its extended Tofts model, fitted
    to the SPGR signal of the same concentrations, as dcmri is used);
  * a per-voxel scipy.optimize.curve_fit loop on DCEPerfusion's exact Extended Tofts model.
Ratios are per voxel: (peer seconds per voxel) / (our seconds per voxel).

Standard errors (fitting.fit's default uncertainty=True): the rows of our fits include them; the LLS and
NLLS fits are also timed without them (runs alternating, best of each) and the extra time reported, with
the coverage of the truth by +-1.96 SE. ``--no-uncertainty`` times every row without them. The model choice
per voxel by AICc (model="auto": Patlak, Tofts and Extended Tofts fitted, the least AICc kept) has a row of
its own on the same Extended Tofts curves.

    python3 run.py bench            (or: python benchmarks/bench_fit.py --quick for a smaller run)
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
import warnings

import numpy as np
from scipy.optimize import curve_fit

from DCEPerfusionLib import aif, concentration, fitting, models

T = np.arange(60) * 5.0
HCT = 0.45
CP = aif.parker(T, hct=HCT, delay_s=20.0)
NOISE_MM = 0.005
TR_S, FA_DEG, R1_PER_MM_S, T10_S = 0.005, 15.0, 5.0, 1.4


def make_data(n, seed=0, delay_s=None, dtype=np.float64):
    rng = np.random.default_rng(seed)
    kt = rng.uniform(0.01, 0.5, n)
    ve = rng.uniform(0.1, 0.6, n)
    vp = rng.uniform(0.005, 0.1, n)
    ct = np.empty((n, T.size), dtype=dtype)
    step = 100_000
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        if delay_s is None:
            c = models.extended_tofts(T, CP, kt[sl], ve[sl], vp[sl])
        else:
            c = np.stack([models.extended_tofts(T, CP, kt[i], ve[i], vp[i], delay_s=delay_s[i])
                          for i in range(sl.start, sl.stop)])
        ct[sl] = c + rng.normal(0.0, NOISE_MM, c.shape)
    return ct, {"ktrans": kt, "ve": ve, "vp": vp}


def accuracy(est, truth):
    """Median absolute errors and the fraction within OSIPI tolerances (Ktrans 0.005+10 %, ve 0.05, vp 0.025)."""
    kt, ve, vp = (np.asarray(est[k], dtype=float) for k in ("ktrans", "ve", "vp"))
    ok = (np.abs(kt - truth["ktrans"]) <= 0.005 + 0.1 * truth["ktrans"]) & (np.abs(ve - truth["ve"]) <= 0.05) \
        & (np.abs(vp - truth["vp"]) <= 0.025)
    return {"mae_ktrans": float(np.nanmedian(np.abs(kt - truth["ktrans"]))),
            "mae_vp": float(np.nanmedian(np.abs(vp - truth["vp"]))),
            "within_osipi": float(np.mean(ok))}


def timed(fn, repeat=1, trace_memory=True):
    """Best wall time of ``repeat`` untraced runs, the result, and the peak memory (bytes) of one more run
    under tracemalloc (which slows allocation-heavy code, so it never overlaps the timing)."""
    best, out = np.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    peak = 0
    if trace_memory:
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return best, out, peak


UNCERTAINTY = True   # --no-uncertainty: every row without the standard errors


def ours(ct, method, fit_delay=False, model="extended_tofts", **kw):
    kw.setdefault("uncertainty", UNCERTAINTY)
    return fitting.fit(ct, T, CP, model=model, method=method, fit_delay=fit_delay, **kw).maps


def timed_pair(fn_a, fn_b, repeat=5):
    """Best wall times of ``fn_a`` and ``fn_b`` over ``repeat`` alternating runs (a slower machine phase then
    slows both), and their last results."""
    best_a = best_b = np.inf
    out_a = out_b = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out_a = fn_a()
        best_a = min(best_a, time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_b = fn_b()
        best_b = min(best_b, time.perf_counter() - t0)
    return best_a, out_a, best_b, out_b


def coverage(maps, truth):
    """Fraction of the voxels of status ok whose +-1.96 SE interval holds the truth, per parameter."""
    ok = np.asarray(maps["status"]).reshape(-1) == fitting.OK
    return {k: float(np.mean(np.abs(maps[k].reshape(-1)[ok] - truth[k][ok])
                             <= 1.96 * maps[f"{k}_se"].reshape(-1)[ok])) for k in ("ktrans", "ve", "vp")}


def uncertainty_rows(name, n, ct, truth, method, repeat):
    """The fit with and without standard errors: both rows, the extra time and the coverage."""
    s_on, m_on, s_off, m_off = timed_pair(lambda: ours(ct, method, uncertainty=True),
                                          lambda: ours(ct, method, uncertainty=False), repeat)
    row(f"{name} with SE", n, s_on, 0, accuracy(m_on, truth))
    row(f"{name} without SE", n, s_off, 0, accuracy(m_off, truth))
    cov = coverage(m_on, truth)
    print(f"{'':<44} SE: +{100 * (s_on / s_off - 1):.1f} % fit time; +-1.96 SE covers the truth: "
          + ", ".join(f"{k} {100 * v:.1f} %" for k, v in cov.items()))


def peer_curve_fit(ct):
    out = {k: np.empty(ct.shape[0]) for k in ("ktrans", "ve", "vp")}

    def f(_t, kt, ve, vp):
        return models.extended_tofts(T, CP, kt, ve, vp)

    for i in range(ct.shape[0]):
        try:
            p, _ = curve_fit(f, T, ct[i], p0=(0.1, 0.3, 0.02), bounds=([0, 1e-6, 0], [5, 1, 1]))
        except RuntimeError:
            p = (np.nan,) * 3
        out["ktrans"][i], out["ve"][i], out["vp"][i] = p
    return out


def peer_dcmri(ct):
    import dcmri as dc
    signal = concentration.concentration_to_signal(ct, tr_s=TR_S, flip_angle_deg=FA_DEG, t10_s=T10_S,
                                                   r1_per_mM_s=R1_PER_MM_S, m0=1000.0)
    out = {k: np.empty(ct.shape[0]) for k in ("ktrans", "ve", "vp")}
    for i in range(ct.shape[0]):
        tissue = dc.Tissue(ca=CP * (1 - HCT) / 1000.0, t=T, kinetics="HF", water_exchange="FF", sequence="SS",
                           r1=R1_PER_MM_S * 1000.0, R10=1 / T10_S, TR=TR_S, FA=FA_DEG, n0=4, H=HCT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tissue.train(T, signal[i])
        ps, vi, vb = tissue.params("PS", "vi", "vb")
        out["ktrans"][i], out["ve"][i], out["vp"][i] = ps * 60.0, vi, vb * (1 - HCT)
    return out


def row(name, n, seconds, peak, acc):
    mem = f"{peak / 2**20:9.0f}" if peak else f"{'-':>9}"
    print(f"{name:<44} {n:>9,} {seconds:9.2f} {n / seconds:>12,.0f} {mem} "
          f"{acc['mae_ktrans']:9.4f} {acc['mae_vp']:8.4f} {100 * acc['within_osipi']:7.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10x fewer voxels everywhere (a smoke run)")
    ap.add_argument("--no-peers", action="store_true", help="skip dcmri and curve_fit")
    ap.add_argument("--no-uncertainty", action="store_true", help="time every row without the standard errors "
                    "(the with/without rows still run)")
    args = ap.parse_args()
    global UNCERTAINTY
    UNCERTAINTY = not args.no_uncertainty
    scale = 10 if args.quick else 1
    n_lls, n_nlls, n_delay = 1_000_000 // scale, 100_000 // scale, 100_000 // scale
    n_dcmri, n_cf = 200 // scale * 2, 500 // scale
    print(f"{'method':<44} {'voxels':>9} {'seconds':>9} {'fits/s':>12} {'peak MiB':>9} "
          f"{'MAE Kt':>9} {'MAE vp':>8} {'OSIPI %':>7}")
    ct, truth = make_data(n_lls, seed=1)
    s, m, peak = timed(lambda: ours(ct, "lls"), repeat=5)
    row("DCEPerfusion LLS (Murase)", n_lls, s, peak, accuracy(m, truth))
    uncertainty_rows("DCEPerfusion LLS (Murase)", n_lls, ct, truth, "lls", repeat=5)
    del ct, m

    ct, truth = make_data(n_nlls, seed=2)
    s_nlls, m, peak = timed(lambda: ours(ct, "nlls"), repeat=5)
    row("DCEPerfusion Extended Tofts NLLS", n_nlls, s_nlls, peak, accuracy(m, truth))
    uncertainty_rows("DCEPerfusion Extended Tofts NLLS", n_nlls, ct, truth, "nlls", repeat=5)
    s, m, peak = timed(lambda: ours(ct, "nlls", model="auto"), repeat=3)
    row("DCEPerfusion best by AICc NLLS", n_nlls, s, peak, accuracy(m, truth))
    share = {code: 100 * np.mean(m["model_choice"] == code) for code in (1, 2, 3)}
    print(f"{'':<44} AICc chose Extended Tofts in {share[3]:.1f} % (Tofts {share[2]:.1f} %, Patlak {share[1]:.1f} %)")

    rng = np.random.default_rng(3)
    delays = rng.choice(np.arange(-8, 8.5, 2.5), n_delay)
    ctd, truth_d = make_data(n_delay, seed=3, delay_s=delays)
    s, m, peak = timed(lambda: ours(ctd, "nlls", fit_delay=True))
    acc = accuracy(m, truth_d)
    row("DCEPerfusion Extended Tofts NLLS + delay", n_delay, s, peak, acc)
    print(f"{'':<44} delay within 1 s: {100 * np.mean(np.abs(m['delay_s'] - delays) <= 1):.1f} %")
    ctd = None  # free the delayed data before the study

    # a whole study: 256 x 256 x 20 voxels x 60 frames, float32 input, concentration -> maps
    shape = (256, 256, 20) if not args.quick else (128, 128, 8)
    n_study = int(np.prod(shape))
    cs, truth_s = make_data(n_study, seed=4, dtype=np.float32)
    cs = cs.reshape(shape + (T.size,))
    s, m, peak = timed(lambda: ours(cs, "nlls"))
    row(f"study {shape[0]}x{shape[1]}x{shape[2]}x60, ETM NLLS", n_study, s, peak,
        accuracy({k: m[k].reshape(-1) for k in m}, truth_s))
    cs = m = None

    if not args.no_peers:
        sub = slice(0, n_dcmri)
        ours_sub = ours(ct[sub], "nlls")
        per_voxel_ours = s_nlls / n_nlls
        s_dc, m_dc, peak = timed(lambda: peer_dcmri(ct[sub]), trace_memory=False)
        row("dcmri Tissue HF/FF .train (per voxel)", n_dcmri, s_dc, peak, accuracy(m_dc, {k: v[sub] for k, v in truth.items()}))
        sub2 = slice(0, n_cf)
        s_cf, m_cf, peak = timed(lambda: peer_curve_fit(ct[sub2]), trace_memory=False)
        row("scipy curve_fit loop, exact ETM (per voxel)", n_cf, s_cf, peak,
            accuracy(m_cf, {k: v[sub2] for k, v in truth.items()}))
        acc_sub = accuracy(ours_sub, {k: v[sub] for k, v in truth.items()})
        print()
        print(f"DCEPerfusion on the dcmri subset: MAE Ktrans {acc_sub['mae_ktrans']:.4f}, "
              f"MAE vp {acc_sub['mae_vp']:.4f}, within OSIPI {100 * acc_sub['within_osipi']:.1f} %")
        print(f"speed-up per voxel vs dcmri:     {s_dc / n_dcmri / per_voxel_ours:,.0f} x")
        print(f"speed-up per voxel vs curve_fit: {s_cf / n_cf / per_voxel_ours:,.0f} x")
    print(f"\nprocess peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB")


if __name__ == "__main__":
    main()
