"""The compiled (numba) fit kernels against the numpy kernels: the contract of ``fitting.fit(engine=...)``.

engine="numba" and engine="numpy" run the same algorithm (start, Levenberg-Marquardt, delay profile,
standard errors) in another order of floating-point operations, so they must give the same numbers up to
rounding and the same statuses, NaN where NaN:

- noise-free model curves: every map within 1e-9 relative. The iteration converges quadratically on a
  zero-residual curve, so even an engine that stops one iteration earlier is within ~1e-14 (measured: the
  numpy kernels on inputs perturbed by 1e-15 relative agree to 1e-11). Not the standard errors and the
  AICc: they are computed from the SSE, which is rounding there (~1e-30 mM^2, differing by a factor of 2
  between summation orders); for those only the NaN pattern is compared.
- noisy curves (seeded noise of 0.01 mM, and the OSIPI reference data): every map, the standard errors
  and the AICc included, within 1e-6 relative. With a residual LM converges linearly and stops once a
  step is below 1e-7 of the parameter, so an engine whose rounding makes one more (or one fewer) step
  moves a parameter by about that last step (measured with the perturbed inputs: up to 1.2e-7 relative in
  a kep SE, 7e-8 in a 2CXM vp); 1e-6 leaves a margin of about 10.

The numba half skips without numba (pytest.importorskip); the engine-argument tests run either way.
"""

import numpy as np
import pytest

from conftest import cells, read_osipi
from DCEPerfusionLib import aif, fitting, models, registry

T = np.arange(40) * 6.0
CP = aif.parker(T, delay_s=18)
RTOL = 1e-9          # noise-free curves (module doc)
NOISY_RTOL = 1e-6    # noisy curves (module doc)
ATOL = 1e-15         # the map's unit: where a value is exactly 0 on one side (a bound) and rounding on the other
NOISE_MM = 0.01


@pytest.fixture(scope="module")
def compiled():
    """One compilation (or load from numba's cache) for the whole module: seconds it took."""
    pytest.importorskip("numba")
    seconds = fitting.compile_kernels()
    assert isinstance(seconds, float) and seconds >= 0.0
    assert fitting.compile_kernels() == 0.0      # compiled once per process
    return seconds


def _window(rng, key, n, lo_frac=0.05):
    """Values spread over the registry's display window of ``key`` (not at its ends, which are bounds)."""
    lo, hi = registry.MAPS[key].window
    return rng.uniform(lo + lo_frac * (hi - lo), hi, n)


DELAY_BOUNDS = {"delay_s": (-5.0, 5.0)}   # narrower than the default: fewer delays to search, a faster file


def _delays(rng, n):
    """Delays on the fit's delay lattice (multiples of its step, 1 s for 6 s frames) inside DELAY_BOUNDS."""
    step = 0.5 * float(np.median(np.diff(T))) / 3        # the lattice step of fitting's delay search for 6 s frames
    return step * rng.integers(-4, 5, n)


def _curves(model, n, fit_delay, noisy=False, seed=7):
    """Curves (n, T) of ``model`` with parameters spread over the display windows, noise-free or with
    Gaussian noise of NOISE_MM. ``auto``: Extended Tofts curves with vp > 0 (a clear AICc winner)."""
    rng = np.random.default_rng(seed)
    delay = _delays(rng, n) if fit_delay else np.zeros(n)
    truth = {k: _window(rng, k, n) for k in ("ktrans", "ve", "vp", "fp", "ps")}
    gen = {"tofts": (models.tofts, ("ktrans", "ve")), "patlak": (models.patlak, ("ktrans", "vp")),
           "extended_tofts": (models.extended_tofts, ("ktrans", "ve", "vp")),
           "auto": (models.extended_tofts, ("ktrans", "ve", "vp")),
           "2cxm": (models.two_compartment_exchange, ("fp", "ps", "ve", "vp"))}[model]
    ct = np.stack([gen[0](T, CP, *(truth[k][i] for k in gen[1]), delay_s=delay[i]) for i in range(n)])
    return ct + rng.normal(0.0, NOISE_MM, ct.shape) if noisy else ct


def assert_same_fit(got, ref, rtol=NOISY_RTOL, atol=ATOL, noise_free=False):
    """``got`` (engine numba) equals ``ref`` (engine numpy): the same maps, statuses identical, NaN where
    NaN, values within rtol; ``noise_free``: the SE and AICc maps only by their NaN pattern (module doc)."""
    assert got.engine == "numba" and ref.engine == "numpy"
    assert sorted(got.maps) == sorted(ref.maps)
    np.testing.assert_array_equal(got.maps["status"], ref.maps["status"])
    for key, want in ref.maps.items():
        have = got.maps[key]
        assert have.shape == want.shape and have.dtype == want.dtype, key
        np.testing.assert_array_equal(np.isnan(have), np.isnan(want), err_msg=f"{key}: NaN pattern")
        if noise_free and (key.endswith("_se") or key == "aicc"):
            continue
        np.testing.assert_allclose(have, want, rtol=rtol, atol=atol, err_msg=key)


def _both(ct, t=T, cp=CP, **kwargs):
    if kwargs.get("fit_delay") and "bounds" not in kwargs:
        kwargs["bounds"] = DELAY_BOUNDS
    return fitting.fit(ct, t, cp, engine="numba", **kwargs), fitting.fit(ct, t, cp, engine="numpy", **kwargs)


_CASES = [(model, method, delay) for model in ("tofts", "extended_tofts", "patlak", "2cxm", "auto")
          for method in ("lls", "nlls") for delay in (False, True)
          if registry.MODELS[model].linear or method == "nlls"]
_IDS = [f"{m}-{me}-{'delay' if d else 'nodelay'}" for m, me, d in _CASES]


def _n_voxels(model, fit_delay):
    """Voxels per case: a few dozen where every fit is a delay search or three models, more elsewhere."""
    if model == "2cxm":
        return 8 if fit_delay else 30
    return 40 if fit_delay or model == "auto" else 120


@pytest.mark.parametrize("uncertainty", [True, False], ids=["se", "no_se"])
@pytest.mark.parametrize("model,method,fit_delay", _CASES, ids=_IDS)
def test_noise_free_curves_agree(compiled, model, method, fit_delay, uncertainty):
    ct = _curves(model, _n_voxels(model, fit_delay), fit_delay)
    got, ref = _both(ct, model=model, method=method, fit_delay=fit_delay, uncertainty=uncertainty)
    assert_same_fit(got, ref, rtol=RTOL, noise_free=True)
    assert any(k.endswith("_se") for k in ref.maps) == uncertainty
    # the curves are fitted (not all voxels failing alike): almost all inside the bounds or on one
    assert np.mean(ref.maps["status"] <= fitting.AT_BOUND) > 0.9


@pytest.mark.parametrize("model,method,fit_delay", _CASES, ids=_IDS)
def test_noisy_curves_agree_with_standard_errors(compiled, model, method, fit_delay):
    ct = _curves(model, _n_voxels(model, fit_delay) // 2, fit_delay, noisy=True, seed=11)
    got, ref = _both(ct, model=model, method=method, fit_delay=fit_delay, uncertainty=True)
    assert_same_fit(got, ref)
    assert np.mean(np.isfinite(ref.maps[registry.uncertainty_maps(model)[0]])) > 0.5   # SEs were computed


def _osipi(name, shift_samples=0):
    """(t, aif, curves) groups of an OSIPI reference file (the loading of test_osipi_conformance)."""
    rows = read_osipi("DCEmodels", "data", name)
    keys = ("t", "C", "ca") if "DRO" in name else ("t", "C_t", "cp_aif")
    groups = {}
    for row in rows:
        groups.setdefault((row[keys[0]], row[keys[2]]), []).append(cells(row[keys[1]]))
    for (t_cell, ca_cell), curves in groups.items():
        ct = np.stack(curves)
        if shift_samples:
            ct = np.concatenate([np.zeros((ct.shape[0], shift_samples)), ct[:, :-shift_samples]], axis=1)
        yield cells(t_cell), cells(ca_cell), ct


@pytest.mark.parametrize("name,model,method,fit_delay,shift", [
    ("dce_DRO_data_tofts.csv", "tofts", "nlls", False, 0),
    ("dce_DRO_data_extended_tofts.csv", "extended_tofts", "nlls", False, 0),
    ("dce_DRO_data_extended_tofts.csv", "extended_tofts", "nlls", True, 5),
    ("patlak_sd_0.02_delay_5.csv", "patlak", "nlls", True, 0),
    ("patlak_sd_0.02_delay_5.csv", "patlak", "lls", True, 0),
    ("2cxm_sd_0.001_delay_0.csv", "2cxm", "nlls", False, 0),
    ("dce_DRO_data_extended_tofts.csv", "auto", "nlls", False, 0),
])
def test_osipi_data_agrees(compiled, name, model, method, fit_delay, shift):
    for t, ca, ct in _osipi(name, shift):
        got, ref = _both(ct, t=t, cp=ca, model=model, method=method, fit_delay=fit_delay, bounds=None)
        assert_same_fit(got, ref)


def _edge_voxels():
    """(8, T) curves: ok, NaN sample, Inf sample, constant, all zero, masked, vp on its bound 0, Ktrans on
    an upper bound of 0.3 1/min (noisy but the constant ones); the mask and the bounds that go with them."""
    ok = models.extended_tofts(T, CP, 0.2, 0.3, 0.05)
    ct = np.stack([ok, ok, ok, np.full(T.size, 0.3), np.zeros(T.size), ok,
                   models.tofts(T, CP, 0.2, 0.3) - 0.02 * CP, models.extended_tofts(T, CP, 0.45, 0.4, 0.02)])
    noisy = [0, 1, 2, 5, 6, 7]
    ct[noisy] += np.random.default_rng(5).normal(0.0, NOISE_MM, (len(noisy), T.size))
    ct[1, 7] = np.nan
    ct[2, 11] = np.inf
    mask = np.ones(ct.shape[0], dtype=bool)
    mask[5] = False
    return ct, mask, {"ktrans": (0.0, 0.3)}


EXPECTED_EDGE_STATUS = [fitting.OK, fitting.INVALID_INPUT, fitting.INVALID_INPUT, fitting.NO_SIGNAL,
                        fitting.NO_SIGNAL, fitting.MASKED_OUT, fitting.AT_BOUND, fitting.AT_BOUND]


@pytest.mark.parametrize("method", ["lls", "nlls"])
@pytest.mark.parametrize("chunk_size,n_threads", [(None, 1), (1, 1), (3, 2)])
def test_edge_voxels_agree(compiled, method, chunk_size, n_threads):
    ct, mask, bounds = _edge_voxels()
    got, ref = _both(ct, model="extended_tofts", method=method, mask=mask, bounds=bounds, chunk_size=chunk_size,
                     n_threads=n_threads)
    assert_same_fit(got, ref)
    np.testing.assert_array_equal(got.maps["status"], EXPECTED_EDGE_STATUS)


def test_2cxm_voxels_without_a_valid_grid_start_agree(compiled):
    """Curves no pair of the 2CXM grid's rates fits with valid parameters (falling, negative, a spike):
    both engines start from the same fallback and give the same maps and statuses."""
    rng = np.random.default_rng(11)
    falling = np.linspace(1.0, 0.0, T.size)
    spike = np.zeros(T.size)
    spike[-1] = 1.0
    ct = np.stack([falling, -_curves("2cxm", 1, False)[0], spike, rng.normal(0.0, NOISE_MM, T.size)])
    for fit_delay in (False, True):
        got, ref = _both(ct, model="2cxm", fit_delay=fit_delay, bounds=DELAY_BOUNDS)
        assert_same_fit(got, ref)


def test_float32_input_and_voxel_shape_agree(compiled):
    ct = _curves("extended_tofts", 12, False, noisy=True).astype(np.float32).reshape(3, 4, T.size)
    got, ref = _both(ct, model="extended_tofts")
    assert_same_fit(got, ref)
    assert got.maps["ktrans"].shape == (3, 4)


@pytest.mark.parametrize("model", ["extended_tofts", "2cxm"])
def test_non_uniform_frame_times_agree(compiled, model):
    t = np.concatenate([np.arange(0, 60, 3.0), 60 + np.cumsum(np.linspace(4, 12, 16))])   # 3 s, then slower
    cp = aif.parker(t, delay_s=15)
    rng = np.random.default_rng(3)
    if model == "2cxm":
        truth = [_window(rng, k, 12) for k in ("fp", "ps", "ve", "vp")]
        ct = models.two_compartment_exchange(t, cp, *truth)
    else:
        ct = models.extended_tofts(t, cp, *(_window(rng, k, 40) for k in ("ktrans", "ve", "vp")))
    ct = ct + rng.normal(0.0, NOISE_MM, ct.shape)
    for fit_delay in (False, True) if model != "2cxm" else (False,):
        got, ref = _both(ct, t=t, cp=cp, model=model, fit_delay=fit_delay)
        assert_same_fit(got, ref)


@pytest.mark.parametrize("model", ["tofts", "2cxm", "auto"])
def test_single_voxel_agrees(compiled, model):
    fit_delay = model != "2cxm"
    ct = _curves(model, 1, fit_delay, noisy=True)[0]     # (T,): no voxel axis
    got, ref = _both(ct, model=model, fit_delay=fit_delay)
    assert_same_fit(got, ref)
    assert got.maps["status"].shape == ()


def test_progress_cancel_stops_the_compiled_fit(compiled):
    ct = _curves("tofts", 40, False)
    calls = []

    def progress(done, total):
        calls.append(done)
        return done < 10

    with pytest.raises(fitting.FitCancelled):
        fitting.fit(ct, T, CP, model="tofts", engine="numba", chunk_size=10, n_threads=1, progress=progress)
    assert calls[0] == 0 and 10 <= calls[-1] < 40          # asked before the first chunk, stopped before the end


# ---- the engine argument itself (no numba needed) --------------------------------------------------------
def test_engines_and_the_engine_that_ran():
    assert fitting.ENGINES == ("auto", "numba", "numpy")
    ct = _curves("tofts", 3, False)
    assert fitting.fit(ct, T, CP, model="tofts", engine="numpy").engine == "numpy"
    auto = fitting.fit(ct, T, CP, model="tofts", engine="auto")
    assert auto.engine == ("numba" if fitting.compiled_available() else "numpy")
    assert fitting.compiled_available() == _numba_importable()


def _numba_importable():
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def test_without_numba_numba_is_a_one_line_error_and_auto_is_numpy(monkeypatch):
    monkeypatch.setattr(fitting, "compiled_available", lambda: False)
    ct = _curves("tofts", 3, False)
    with pytest.raises(ValueError) as err:
        fitting.fit(ct, T, CP, model="tofts", engine="numba")
    msg = str(err.value)
    assert "\n" not in msg and "numba" in msg and "install" in msg, msg
    res = fitting.fit(ct, T, CP, model="tofts", engine="auto")
    assert res.engine == "numpy"
    numpy_maps = fitting.fit(ct, T, CP, model="tofts", engine="numpy").maps
    np.testing.assert_array_equal(res.maps["ktrans"], numpy_maps["ktrans"])


@pytest.mark.parametrize("engine", ["cuda", ""])
def test_bad_engine_names_the_choices(engine):
    ct = _curves("tofts", 2, False)
    with pytest.raises(ValueError) as err:
        fitting.fit(ct, T, CP, model="tofts", engine=engine)
    msg = str(err.value)
    assert "engine" in msg and "\n" not in msg and all(e in msg for e in fitting.ENGINES), msg


def test_kernels_that_fail_to_compile_fall_back_to_numpy_with_one_warning(monkeypatch, caplog):
    """A numba that imports but cannot compile (a broken llvmlite, say): "auto" fits with numpy and warns
    once; engine="numba" is a one-line error naming the fix."""
    def broken():
        raise RuntimeError("LLVM ERROR: no target\nmore lines")

    monkeypatch.setattr(fitting, "compiled_available", lambda: True)
    monkeypatch.setattr(fitting, "_compile_seconds", None)
    monkeypatch.setattr(fitting, "_compile_failed", [])
    monkeypatch.setattr(fitting, "compile_kernels", broken)
    ct = _curves("tofts", 3, False)
    with caplog.at_level("WARNING", logger="DCEPerfusionLib.core.fitting"):
        first = fitting.fit(ct, T, CP, model="tofts", engine="auto")
        second = fitting.fit(ct, T, CP, model="tofts", engine="auto")
    assert first.engine == second.engine == "numpy"
    warned = [r.getMessage() for r in caplog.records if "could not compile" in r.getMessage()]
    assert len(warned) == 1 and "LLVM ERROR: no target" in warned[0] and "more lines" not in warned[0]
    with pytest.raises(ValueError) as err:
        fitting.fit(ct, T, CP, model="tofts", engine="numba")
    assert "\n" not in str(err.value) and "engine='numpy'" in str(err.value)
