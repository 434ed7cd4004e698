"""Speed, memory and accuracy of DCEPerfusion's fitting against the machine's limits and competent peers,
in one run (issue 14's targets).

Machine limits, measured first and again after the timed rows (the shared machine: the better of the two
is used): numpy float64 matmul rate (2048 x 2048, best of 3, the BLAS threads threadpoolctl reports),
memory read rate (np.add.reduce over a 1 GiB float64 array, best of 3, on 1 thread and on all cores over
equal parts), the CPU count. Every fit row is set against them:
  * LLS: ratio = fit time / the time to read its input once at the better measured read rate;
  * NLLS: an achieved GFLOP/s from the FLOP model below, and its fraction of the matmul rate.

FLOP model (a lower bound of the arithmetic a fit does). The model evaluations are counted by running the
same fit on the pure-numpy path on a subset (at most 4,000 voxels, 1 thread) with
``_fit_kernels._evaluate`` wrapped: every evaluation of n voxels at T frames (the Levenberg-Marquardt
steps and the SSE checks of the start) adds n*T voxel-frames to its kind. FLOPs per voxel-frame
(multiplications and additions):
  value only (model, residual and SSE):     Tofts 9, Extended Tofts 11, Patlak 6, 2CXM 17;
  with the Jacobian and the normal equations (value, dF/dk recursion, J^T J from the factored Jacobian,
  J^T r):                                   Tofts 32, Extended Tofts 34, Patlak 10, 2CXM 59;
  + 5 for the shifted input when a delay is fitted.
  (exp-convolution recursion F_i = e F_{i-1} + D(g0 cp_{i-1} + g1 cp_i): 5 per frame, dF/dk 7; the 2CXM
  two recursions and their two dF/dk, J^T J from its 4 basis curves.)
Not counted: the start's LLS solves and variable-projection grid products, the bookkeeping, the small
solves, the standard errors. The compiled engine is assumed to do the numpy path's iterations (same
algorithm); if the evaluations cannot be counted (the kernels moved), the bound is one Jacobian and one
value evaluation per voxel, and the row says "(1 iter bound)".

Data: 60 frames at 5 s, Parker AIF (Hct 0.45, bolus at 20 s); Extended Tofts tissue with Ktrans
0.01-0.5 /min, ve 0.1-0.6, vp 0.005-0.1, Gaussian noise SD 0.005 mM. Delay rows: delays drawn from
-8, -5.5, ..., 7 s (np.arange(-8, 8.5, 2.5)). 2CXM rows: models.two_compartment_exchange with Fp 10-80
ml/100ml/min, PS 0.05-0.3 /min, ve 0.1-0.4, vp 0.02-0.1 (OSIPI's DCEmodels 2CXM cases span Fp 5-40,
PS 0.05-0.15, ve 0.1-0.2, vp 0.02-0.1; widened as in Testing/test_fitting.py). The 1,321-frame rows:
t = arange(1321) * 0.5 s (11 min at 0.5 s, a golden-angle radial / view-sharing reconstruction's rate).
The study: 256 x 256 x 20 voxels x 60 frames, float32 input.

Our rows run fitting.fit with n_threads = the CPU count, engine "numba" and "numpy" when fit takes
``engine=`` (else numpy only, said in the row). NLLS rows use fit's default uncertainty=True.

Peers (1 thread each, BLAS limited to 1 thread; on subsets of the same voxels, rates per voxel):
  * curve_fit ETM: scipy.optimize.curve_fit per voxel on an Extended Tofts whose convolution is
    scipy.signal.lfilter of the exact piecewise-linear-input recursion (models.py docstring), bounds those
    of fitting.DEFAULT_BOUNDS (ve from 1e-6: kep = Ktrans/ve), p0 (Ktrans 0.1, ve 0.3, vp 0.02); bounds make
    curve_fit use scipy's 'trf', so the same fit is also timed unbounded ("LM unbounded": MINPACK's
    Levenberg-Marquardt, about 4x faster here). The faster of the two is the target peer of the NLLS rows;
  * curve_fit ETM + delay: the same with a continuous delay (input shifted by np.interp), delay bounds
    fitting.DEFAULT_BOUNDS['delay_s'], p0 delay 0 s;
  * dcmri (bench extra, skipped if not installed): Tissue(kinetics="HF", water_exchange="FF").train on the
    SPGR signal of the same concentrations.
The self-check before timing: the lfilter model equals models.extended_tofts (with and without delay, 60
and 1,321 frames) to 1e-12 mM.

Timing: every timed row is the median of the same number of interleaved repeats (--repeats N; repeat r
runs every row once, round robin), so a slow phase of the shared machine slows all rows alike. Working
memory: peak RSS minus the RSS once the input is built, in a fresh subprocess per case (the kernels warmed
on a few voxels first; the peak is reset through /proc/self/clear_refs; tracemalloc cannot see numba's
allocations). Compile time: fitting.compile_kernels() in a fresh subprocess with an empty
NUMBA_CACHE_DIR (cold) and again with that cache filled (warm).

Accuracy per row: median absolute errors, the fraction within the OSIPI tolerances (Ktrans 0.005 + 10 %,
ve 0.05, vp 0.025), the coverage of +-1.96 SE (rows with SEs), the delay error (delay rows), the fraction
of status ok / at bound.

    python3 run.py bench            (or: python benchmarks/bench_fit.py --quick for a smaller run)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import curve_fit
from scipy.signal import lfilter
from threadpoolctl import threadpool_info, threadpool_limits

from DCEPerfusionLib import aif, concentration, fitting, models

CPUS = os.cpu_count() or 1
HCT = 0.45
NOISE_MM = 0.005
TR_S, FA_DEG, R1_PER_MM_S, T10_S = 0.005, 15.0, 5.0, 1.4
T60 = np.arange(60) * 5.0
T1321 = np.arange(1321) * 0.5
DELAYS_S = np.arange(-8, 8.5, 2.5)
HAS_ENGINE = "engine" in inspect.signature(fitting.fit).parameters
ENGINES = (("numba", "numpy") if HAS_ENGINE and getattr(fitting, "compiled_available", lambda: False)()
           else ("numpy",))
VE_FLOOR = 1e-6


def parker(t):
    return aif.parker(t, hct=HCT, delay_s=20.0)


# ---- data --------------------------------------------------------------------------------------
def make_etm(n, t, seed, delays=False, dtype=np.float64):
    """Extended Tofts curves (n, T) + noise, the truth; with ``delays`` each voxel's input is delayed by one of
    DELAYS_S (truth["delay_s"])."""
    rng = np.random.default_rng(seed)
    cp = parker(t)
    truth = {"ktrans": rng.uniform(0.01, 0.5, n), "ve": rng.uniform(0.1, 0.6, n), "vp": rng.uniform(0.005, 0.1, n)}
    d = rng.choice(DELAYS_S, n) if delays else np.zeros(n)
    if delays:
        truth["delay_s"] = d
    ct = np.empty((n, t.size), dtype=dtype)
    step = max(1, 6_000_000 // t.size)
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        for dv in np.unique(d[sl]):
            rows = np.flatnonzero(d[sl] == dv) + s
            ct[rows] = models.extended_tofts(t, cp, truth["ktrans"][rows], truth["ve"][rows], truth["vp"][rows],
                                             delay_s=float(dv))
        ct[sl] += rng.normal(0.0, NOISE_MM, (sl.stop - s, t.size))
    return ct, truth


def make_2cxm(n, seed):
    rng = np.random.default_rng(seed)
    truth = {"fp": rng.uniform(10, 80, n), "ps": rng.uniform(0.05, 0.3, n), "ve": rng.uniform(0.1, 0.4, n),
             "vp": rng.uniform(0.02, 0.1, n)}
    ct = models.two_compartment_exchange(T60, parker(T60), truth["fp"], truth["ps"], truth["ve"], truth["vp"])
    return ct + rng.normal(0.0, NOISE_MM, ct.shape), truth


# ---- machine limits ------------------------------------------------------------------------------
def machine_limits():
    rng = np.random.default_rng(0)
    n = 2048
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    a @ b
    mm = min(_seconds(lambda: a @ b) for _ in range(3))
    blas = sorted({f"{d.get('internal_api')} {d.get('num_threads')} threads" for d in threadpool_info()
                   if d.get("user_api") == "blas"})
    del a, b
    x = np.ones(2**27)          # 1 GiB float64, pages touched
    one = min(_seconds(lambda: np.add.reduce(x)) for _ in range(3))
    parts = np.array_split(x, CPUS)
    with ThreadPoolExecutor(CPUS) as pool:
        many = min(_seconds(lambda: list(pool.map(np.add.reduce, parts))) for _ in range(3))
    lim = {"gflops": 2 * n**3 / mm / 1e9, "blas": ", ".join(blas) or "unknown", "read_1": x.nbytes / one / 1e9,
           "read_n": x.nbytes / many / 1e9}
    lim["read"] = max(lim["read_1"], lim["read_n"])
    print(f"machine: {CPUS} CPUs; float64 matmul 2048^2: {lim['gflops']:.1f} GFLOP/s ({lim['blas']}); "
          f"memory read (np.add.reduce, 1 GiB): {lim['read_1']:.1f} GB/s on 1 thread, {lim['read_n']:.1f} GB/s "
          f"on {CPUS}")
    return lim


def _seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---- FLOP model ------------------------------------------------------------------------------------
FLOPS_VALUE = {"tofts": 9, "extended_tofts": 11, "patlak": 6, "2cxm": 17}
FLOPS_JACOBIAN = {"tofts": 32, "extended_tofts": 34, "patlak": 10, "2cxm": 59}
FLOPS_DELAY = 5


@contextlib.contextmanager
def counting_evaluations():
    """Counter {(model, jacobian, delayed): voxel-frames} of the numpy kernels' model evaluations."""
    from DCEPerfusionLib.core import _fit_kernels as fk
    counts = collections.Counter()
    orig = getattr(fk, "_evaluate", None)
    if orig is None:
        yield counts
        return

    def wrapped(ctx, theta, delay, jacobian=True):
        counts[(ctx.model, bool(jacobian), delay is not None)] += theta.shape[0] * ctx.t.size
        return orig(ctx, theta, delay, jacobian=jacobian)

    patched = [m for m in (fk, fitting) if getattr(m, "_evaluate", None) is orig]
    for m in patched:
        m._evaluate = wrapped
    try:
        yield counts
    finally:
        for m in patched:
            m._evaluate = orig


def flops_per_voxel(ct, t, cp, fit_kw):
    """(FLOPs per voxel by the model above, exact count?) from a numpy-path run on at most 4,000 voxels."""
    sub = ct.reshape(-1, t.size)[:4000]
    kw = dict(fit_kw, n_threads=1)
    if HAS_ENGINE:
        kw["engine"] = "numpy"
    with counting_evaluations() as counts:
        fitting.fit(sub, t, cp, **kw)
    if counts:
        total = sum(v * ((FLOPS_JACOBIAN if jac else FLOPS_VALUE)[m] + (FLOPS_DELAY if dl else 0))
                    for (m, jac, dl), v in counts.items())
        return total / sub.shape[0], True
    model = fit_kw.get("model", "extended_tofts")
    model = "extended_tofts" if model == "auto" else model
    return (FLOPS_JACOBIAN[model] + FLOPS_VALUE[model]) * t.size, False


# ---- peers ---------------------------------------------------------------------------------------------
_G0 = [(-1) ** n * (n - 1) / math.factorial(n) for n in range(2, 12)]
_G1 = [(-1) ** n / math.factorial(n) for n in range(2, 12)]


def _g(x):
    """e^{-x}, g0(x), g1(x) of the piecewise-linear-input recursion (Taylor series below x = 0.05)."""
    e = math.exp(-x)
    if x < 0.05:
        return e, sum(c * x**i for i, c in enumerate(_G0)), sum(c * x**i for i, c in enumerate(_G1))
    return e, (1.0 - e - x * e) / (x * x), (x - 1.0 + e) / (x * x)


def etm_lfilter(t, cp, ktrans, ve, vp):
    """Extended Tofts (uniform t): F by scipy.signal.lfilter of F_i = e F_{i-1} + D(g0 cp_{i-1} + g1 cp_i),
    F_0 = 0 (initial state -b0 cp_0)."""
    dt = t[1] - t[0]
    e, g0, g1 = _g(ktrans / ve / 60.0 * dt)
    b = [dt * g1, dt * g0]
    f = lfilter(b, [1.0, -e], cp, zi=[-b[0] * cp[0]])[0]
    return ktrans / 60.0 * f + vp * cp


def _bounds(names):
    lo = [VE_FLOOR if k == "ve" else fitting.DEFAULT_BOUNDS[k][0] for k in names]
    return lo, [fitting.DEFAULT_BOUNDS[k][1] for k in names]


def peer_curve_fit(ct, t, delay=False, lm=False):
    """Per-voxel curve_fit of the lfilter Extended Tofts (and a continuous delay): bounded (scipy's 'trf'),
    or with ``lm`` unbounded (MINPACK's Levenberg-Marquardt, curve_fit's fastest method)."""
    cp = parker(t)
    names = ["ktrans", "ve", "vp"] + (["delay_s"] if delay else [])
    p0 = [0.1, 0.3, 0.02] + ([0.0] if delay else [])
    limits = {"method": "lm"} if lm else {"bounds": _bounds(names)}

    def f(_t, kt, ve, vp, d=0.0):
        c = np.interp(t - d, t, cp, left=0.0, right=cp[-1]) if delay else cp
        return etm_lfilter(t, c, kt, ve, vp)

    out = {k: np.full(ct.shape[0], np.nan) for k in names}
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(ct.shape[0]):
            try:
                p, _ = curve_fit(f, t, ct[i], p0=p0, **limits)
            except (RuntimeError, ValueError):
                continue
            for k, v in zip(names, p):
                out[k][i] = v
    return out


def peer_dcmri(ct):
    import dcmri as dc
    cp = parker(T60)
    signal = concentration.concentration_to_signal(ct, tr_s=TR_S, flip_angle_deg=FA_DEG, t10_s=T10_S,
                                                   r1_per_mM_s=R1_PER_MM_S, m0=1000.0)
    out = {k: np.empty(ct.shape[0]) for k in ("ktrans", "ve", "vp")}
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(ct.shape[0]):
            tissue = dc.Tissue(ca=cp * (1 - HCT) / 1000.0, t=T60, kinetics="HF", water_exchange="FF",
                               sequence="SS", r1=R1_PER_MM_S * 1000.0, R10=1 / T10_S, TR=TR_S, FA=FA_DEG, n0=4,
                               H=HCT)
            tissue.train(T60, signal[i])
            ps, vi, vb = tissue.params("PS", "vi", "vb")
            out["ktrans"][i], out["ve"][i], out["vp"][i] = ps * 60.0, vi, vb * (1 - HCT)
    return out


def self_check():
    """The lfilter peer model against models.extended_tofts; raises if they differ by more than 1e-12 mM."""
    worst = 0.0
    for t in (T60, T1321):
        cp = parker(t)
        for kt, ve, vp, d in [(0.2, 0.3, 0.05, 0.0), (1e-4, 0.9, 0.01, 0.0), (4.0, 0.05, 0.2, 0.0),
                              (0.3, 0.4, 0.03, 3.7), (0.1, 0.2, 0.0, -6.2)]:
            c = np.interp(t - d, t, cp, left=0.0, right=cp[-1]) if d else cp
            worst = max(worst, float(np.max(np.abs(etm_lfilter(t, c, kt, ve, vp)
                                                   - models.extended_tofts(t, cp, kt, ve, vp, delay_s=d)))))
    if worst > 1e-12:
        raise SystemExit(f"self-check failed: the lfilter Extended Tofts differs from models.extended_tofts by "
                         f"{worst:.2e} mM")
    print(f"self-check: lfilter Extended Tofts = models.extended_tofts to {worst:.1e} mM (60 and 1,321 frames, "
          f"with and without delay)")


# ---- accuracy ------------------------------------------------------------------------------------------
def accuracy(est, truth, keys=("ktrans", "ve", "vp")):
    """Median absolute errors per parameter and, for the Tofts family, the fraction within OSIPI tolerances."""
    e = {k: np.asarray(est[k], dtype=float).reshape(-1) for k in keys}
    out = {f"mae_{k}": float(np.nanmedian(np.abs(e[k] - truth[k]))) for k in keys}
    if keys == ("ktrans", "ve", "vp"):
        ok = ((np.abs(e["ktrans"] - truth["ktrans"]) <= 0.005 + 0.1 * truth["ktrans"])
              & (np.abs(e["ve"] - truth["ve"]) <= 0.05) & (np.abs(e["vp"] - truth["vp"]) <= 0.025))
        out["osipi"] = float(np.mean(ok))
    if "delay_s" in truth and "delay_s" in est:
        err = np.abs(np.asarray(est["delay_s"], dtype=float).reshape(-1) - truth["delay_s"])
        out["mae_delay"], out["delay_1s"] = float(np.nanmedian(err)), float(np.mean(err <= 1.0))
    if "status" in est:
        s = np.asarray(est["status"]).reshape(-1)
        out["ok_or_bound"] = float(np.mean(np.isin(s, (fitting.OK, fitting.AT_BOUND))))
        if f"{keys[0]}_se" in est:
            ok = s == fitting.OK
            out["coverage"] = {k: float(np.mean(np.abs(e[k][ok] - truth[k][ok])
                                                <= 1.96 * np.asarray(est[f"{k}_se"]).reshape(-1)[ok]))
                               for k in keys}
    return out


def describe(acc):
    parts = [f"MAE {k[4:]} {v:.4f}" for k, v in acc.items() if k.startswith("mae_")]
    if "osipi" in acc:
        parts.append(f"OSIPI {100 * acc['osipi']:.1f} %")
    if "delay_1s" in acc:
        parts.append(f"delay within 1 s {100 * acc['delay_1s']:.1f} %")
    if "ok_or_bound" in acc:
        parts.append(f"ok/at bound {100 * acc['ok_or_bound']:.1f} %")
    if "coverage" in acc:
        parts.append("1.96 SE covers " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in acc["coverage"].items()))
    return "; ".join(parts)


# ---- rows --------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    n: int
    threads: int
    fn: object                      # () -> maps
    truth: dict
    keys: tuple = ("ktrans", "ve", "vp")
    kind: str = "ours"              # "ours" | "peer"
    key: str = ""                   # which data set
    engine: str = "-"
    input_bytes: int = 0            # LLS: ratio to the read-once time
    flops: tuple | None = None      # (FLOPs per voxel, exact count?)
    times: list = field(default_factory=list)
    maps: dict | None = None
    ran: str = ""

    def run(self):
        t0 = time.perf_counter()
        out = self.fn()
        self.times.append(time.perf_counter() - t0)
        if isinstance(out, fitting.FitResult):
            self.ran = getattr(out, "engine", "numpy")
            out = out.maps
        self.maps = out

    @property
    def median(self):
        return float(np.median(self.times))

    @property
    def per_voxel(self):
        return self.median / self.n


def ours(ct, t, engine, **kw):
    kw.setdefault("n_threads", CPUS)
    if HAS_ENGINE:
        kw["engine"] = engine
    try:   # JIT compile / load and lazy imports, untimed; a fit this engine refuses skips its row
        fitting.fit(ct.reshape(-1, t.size)[:64], t, parker(t), **kw)
    except (ValueError, NotImplementedError) as e:
        print(f"  skipped {kw}: {e}")
        return None
    return lambda: fitting.fit(ct, t, parker(t), **kw)


def build_rows(args):
    s = 10 if args.quick else 1
    n_lls, n_nlls, n_2cxm, n_long = 1_000_000 // s, 100_000 // s, 100_000 // s, 32_000 // s
    shape = (128, 128, 8) if args.quick else (256, 256, 20)
    rows, data = [], {}
    data["lls"] = make_etm(n_lls, T60, seed=1)
    data["nlls"] = make_etm(n_nlls, T60, seed=2)
    data["delay"] = make_etm(n_nlls, T60, seed=3, delays=True)
    data["2cxm"] = make_2cxm(n_2cxm, seed=5)
    ct_s, truth_s = make_etm(int(np.prod(shape)), T60, seed=4, dtype=np.float32)
    data["study"] = (ct_s.reshape(shape + (T60.size,)), truth_s)
    data["long"] = make_etm(n_long, T1321, seed=6)
    study = f"study {'x'.join(map(str, shape))}x60 f32 ETM NLLS"
    specs = [  # key, row name, t, fit kwargs, truth keys
        ("lls", "LLS ETM +r2, no SE", T60, dict(method="lls", uncertainty=False), None),
        ("lls", "LLS ETM +r2, SE", T60, dict(method="lls", uncertainty=True), None),
        ("nlls", "ETM NLLS", T60, dict(method="nlls"), None),
        ("nlls", "ETM NLLS, no SE", T60, dict(method="nlls", uncertainty=False), None),
        ("delay", "ETM NLLS + delay", T60, dict(method="nlls", fit_delay=True), None),
        ("2cxm", "2CXM NLLS", T60, dict(method="nlls", model="2cxm"), ("fp", "ps", "ve", "vp")),
        ("nlls", "model=auto NLLS", T60, dict(method="nlls", model="auto"), None),
        ("study", study, T60, dict(method="nlls"), None),
        ("long", "ETM NLLS 1321 frames", T1321, dict(method="nlls"), None),
    ]
    for engine in ENGINES:
        for key, name, t, kw, keys in specs:
            ct, truth = data[key]
            fn = ours(ct, t, engine, **kw)
            if fn is None:
                continue
            row = Row(f"{name} [{engine}]", int(np.prod(ct.shape[:-1])), CPUS, fn, truth,
                      keys or ("ktrans", "ve", "vp"), engine=engine, key=key)
            if kw["method"] == "lls":
                row.input_bytes = ct.nbytes
            else:
                row.flops = flops_per_voxel(ct, t, parker(t), kw)
            rows.append(row)
    if not args.no_peers:
        sub = lambda key, m: (data[key][0][:m], {k: v[:m] for k, v in data[key][1].items()})  # noqa: E731
        for key, name, t, m, delay, lm in [
                ("nlls", "curve_fit lfilter ETM", T60, 300 // s, False, False),
                ("nlls", "curve_fit lfilter ETM, LM unbounded", T60, 300 // s, False, True),
                ("delay", "curve_fit lfilter ETM + delay", T60, 300 // s, True, False),
                ("long", "curve_fit lfilter ETM 1321 frames", T1321, 100 // s, False, False),
                ("long", "curve_fit lfilter ETM 1321 frames, LM unbounded", T1321, 100 // s, False, True)]:
            ct, truth = sub(key, m)
            row = Row(name, m, 1, (lambda ct=ct, t=t, d=delay, lm=lm: peer_curve_fit(ct, t, d, lm)), truth,
                      kind="peer", key=key)
            rows.append(row)
        try:
            import dcmri  # noqa: F401
        except ImportError:
            print("dcmri not installed: its row is skipped (pip install dcmri)")
        else:
            ct, truth = sub("nlls", 40 // s)
            row = Row("dcmri Tissue HF/FF .train", ct.shape[0], 1, lambda ct=ct: peer_dcmri(ct), truth, kind="peer",
                      key="nlls")
            rows.append(row)
    return rows


# ---- subprocess cases -----------------------------------------------------------------------------------
def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def memory_case(spec):
    """In a fresh process: the fit's working memory, peak RSS minus the RSS once the input is built (MB)."""
    t = T60 if spec["frames"] == 60 else T1321
    kw = dict(spec["kw"], n_threads=CPUS)
    if HAS_ENGINE:
        kw["engine"] = spec["engine"]
    warm, _ = make_etm(64, t, seed=9)
    fitting.fit(warm, t, parker(t), **kw)          # kernels compiled / loaded, lazy imports done
    ct, _ = make_etm(spec["n"], t, seed=7)
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                             # resets VmHWM to the current RSS
        how = "VmHWM after clear_refs"
    except OSError:
        how = "ru_maxrss (peak includes building the input)"
    fitting.fit(ct, t, parker(t), **kw)
    peak = _status_kb("VmHWM")
    print(json.dumps({"mb": (peak - base) / 1024, "input_mb": ct.nbytes / 2**20, "how": how}))


def compile_case():
    t0 = time.perf_counter()
    s = fitting.compile_kernels()
    print(json.dumps({"reported": s, "wall": time.perf_counter() - t0}))


def subprocess_json(args, env=None):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                         env=env, check=False)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_rows(args):
    s = 10 if args.quick else 1
    res = []
    for engine in ENGINES:
        for name, frames, n, kw in (("ETM NLLS", 60, 100_000 // s, {"method": "nlls"}),
                                    ("ETM NLLS", 1321, 32_000 // s, {"method": "nlls"}),
                                    ("ETM NLLS + delay", 1321, 32_000 // s, {"method": "nlls", "fit_delay": True}),
                                    ("LLS + delay", 1321, 32_000 // s, {"method": "lls", "fit_delay": True})):
            if engine == "numpy" and kw.get("fit_delay") and kw["method"] == "nlls":
                continue                      # minutes on the numpy engine; its chunks follow the same rule
            spec = {"frames": frames, "n": n, "engine": engine, "kw": kw}
            r = subprocess_json(["--_memory-case", json.dumps(spec)])
            res.append((f"working memory {name} {frames} frames [{engine}]", n, r))
            print(f"  {res[-1][0]}: {r}", flush=True)
    return res


def compile_rows():
    if not hasattr(fitting, "compile_kernels"):
        print("fitting.compile_kernels not available (the compiled engine has not landed): no compile rows")
        return []
    res = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold (empty NUMBA_CACHE_DIR)", "warm (cache filled)"):
            r = subprocess_json(["--_compile-case"], env=env)
            res.append((f"compile_kernels() {label}", r))
            print(f"  {res[-1][0]}: {r}", flush=True)
    return res


# ---- report ---------------------------------------------------------------------------------------------
def report(rows, lim, mem, comp):
    peers = {}   # per data set the faster curve_fit (bounded 'trf' or unbounded MINPACK LM): the target peer
    for r in rows:
        if r.kind == "peer" and r.name.startswith("curve_fit"):
            if r.key not in peers or r.per_voxel < peers[r.key].per_voxel:
                peers[r.key] = r
    base = {r.engine: r for r in rows if r.kind == "ours" and r.name.startswith("ETM NLLS [")}
    table = []
    print(f"\n{'row':<44} {'voxels':>9} {'thr':>3} {'median s':>9} {'fits/s':>11}  accuracy")
    for r in rows:
        acc = accuracy(r.maps, r.truth, r.keys)
        r.acc = acc
        ran = f" (ran {r.ran})" if r.kind == "ours" and r.ran and r.ran != r.engine else ""
        work = f"; {r.flops[0] / 1e3:,.0f} kFLOP/voxel" if r.flops else ""
        print(f"{r.name + ran:<44} {r.n:>9,} {r.threads:>3} {r.median:9.3f} {r.n / r.median:>11,.0f}  "
              f"{describe(acc)}{work}")
    print("(accuracy of each row from its last repeat; peers on the first voxels of the same data)")

    for r in rows:
        vs_peer, limit, target, met = "-", "-", "-", "-"
        if r.input_bytes:
            ratio = r.median / (r.input_bytes / (lim["read"] * 1e9))
            limit = f"{ratio:.0f}x read-once"
            target, met = "<= 12x read-once", _yes(ratio <= 12)
        if r.flops:
            g = r.flops[0] * r.n / r.median / 1e9
            limit = f"{g:.2f} GFLOP/s{'' if r.flops[1] else ' (1 iter bound)'} = {100 * g / lim['gflops']:.1f} % matmul"
        if r.kind == "ours":
            b = base.get(r.engine)
            if r.key in ("nlls", "long") and r.name.startswith(("ETM NLLS [", "ETM NLLS 1321 frames [")):
                need = 300 if r.key == "nlls" else 30
                target, met = f">= {need}x curve_fit", "not run (--no-peers)"
                if r.key in peers:
                    x = peers[r.key].per_voxel / r.per_voxel
                    lm = ", LM unbounded" if peers[r.key].name.endswith("LM unbounded") else ""
                    vs_peer, met = f"{x:,.0f}x faster than the faster curve_fit{lm}", _yes(x >= need)
            elif r.key == "delay" and b is not None:
                x = r.per_voxel / b.per_voxel
                target, met = "<= 3x ETM NLLS; MAE <= 3x curve_fit+delay", _yes(x <= 3) + " (time; MAE not run)"
                vs_peer = f"{x:.1f}x ETM NLLS"
                if "delay" in peers:
                    p = peers["delay"]
                    m = p.n
                    mine = accuracy({k: v.reshape(-1)[:m] for k, v in r.maps.items()},
                                    {k: v[:m] for k, v in r.truth.items()})
                    worst = max(mine[f"mae_{k}"] / max(p.acc[f"mae_{k}"], 1e-12) for k in ("ktrans", "ve", "vp"))
                    vs_peer += (f"; {p.per_voxel / r.per_voxel:,.0f}x faster than curve_fit+delay; "
                                f"MAE {worst:.2f}x the peer's")
                    met = _yes(x <= 3 and worst <= 3)
            elif r.key == "2cxm" and b is not None:
                x = r.per_voxel / b.per_voxel
                vs_peer = f"{x:.1f}x ETM NLLS"
                target = "<= 4x ETM NLLS, >= 95 % ok/at bound"
                met = _yes(x <= 4 and r.acc["ok_or_bound"] >= 0.95)
            elif b is not None and r is not b and not r.input_bytes:
                vs_peer = f"{r.per_voxel / b.per_voxel:.2f}x ETM NLLS per voxel"
        else:
            prefix = {"nlls": "ETM NLLS [", "delay": "ETM NLLS + delay [", "long": "ETM NLLS 1321 frames ["}[r.key]
            mine = [o for o in rows if o.kind == "ours" and o.name.startswith(prefix)]
            vs_peer = "; ".join(f"{o.name} {r.per_voxel / o.per_voxel:,.0f}x faster" for o in mine)
        ran = f" (ran {r.ran})" if r.kind == "ours" and r.ran and r.ran != r.engine else ""
        table.append([r.name + ran, f"{r.n:,}", str(r.threads), f"{r.median:.3f}", f"{r.n / r.median:,.0f}", vs_peer,
                      limit, target, met])
    for name, n, m in mem:
        if "error" in m:
            table.append([name, f"{n:,}", str(CPUS), "-", "-", "-", m["error"], "<= 300 MB", "?"])
        else:
            table.append([name, f"{n:,}", str(CPUS), "-", "-", "-",
                          f"{m['mb']:.0f} MB (input {m['input_mb']:.0f} MB)", "<= 300 MB", _yes(m["mb"] <= 300)])
    for name, c in comp:
        val = c.get("error") or f"{c['reported']:.1f} s reported, {c['wall']:.1f} s wall"
        table.append([name, "-", "1", "-" if "error" in c else f"{c['wall']:.1f}", "-", "-", val, "-", "-"])
    head = ["row", "voxels", "threads", "median s", "fits/s", "vs target peer", "vs machine limit", "target",
            "met?"]
    print(f"\n{len(rows[0].times)} interleaved repeats, median; ours n_threads = {CPUS}, peers 1 thread\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for line in table:
        print("| " + " | ".join(line) + " |")


def _yes(ok):
    return "yes" if ok else "**no**"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10x fewer voxels everywhere, 3 repeats (a smoke run)")
    ap.add_argument("--no-peers", action="store_true", help="skip the curve_fit and dcmri peers")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats per row (default 5, --quick 3)")
    ap.add_argument("--_memory-case", dest="memory_case", help=argparse.SUPPRESS)
    ap.add_argument("--_compile-case", dest="compile_case", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_case:
        return memory_case(json.loads(args.memory_case))
    if args.compile_case:
        return compile_case()
    repeats = args.repeats or (3 if args.quick else 5)
    if repeats < 1:
        ap.error("--repeats: must be at least 1")
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), f"- engines: {', '.join(ENGINES)}"
          + ("" if HAS_ENGINE else " (fitting.fit has no engine= yet: numpy path only)"))
    lim = machine_limits()
    self_check()
    print("compile time:", flush=True)
    comp = compile_rows()
    print("working memory (fresh subprocess per case):", flush=True)
    mem = memory_rows(args)
    print("building the data and counting the FLOPs ...", flush=True)
    rows = build_rows(args)
    for rep in range(repeats):
        for r in rows:
            r.run()
        print(f"repeat {rep + 1}/{repeats} done", flush=True)
    print("machine limits again (the machine is shared: the better of the two measurements is used):")
    again = machine_limits()
    lim = {k: max(v, again[k]) if isinstance(v, float) else v for k, v in lim.items()}
    report(rows, lim, mem, comp)


if __name__ == "__main__":
    main()
