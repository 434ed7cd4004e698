"""The command line, run as a user runs it, and a few properties of the models and the fit."""

import subprocess
import sys

import numpy as np

from DCEPerfusionLib import aif, fitting, models


def _run(*args):
    return subprocess.run([sys.executable, "-m", "DCEPerfusionLib", *args], capture_output=True, text=True, encoding="utf-8",
                          timeout=300)


def test_convolution_is_linear_and_shift_invariant(rng):
    t = np.arange(80) * 2.0
    a, b = aif.parker(t, delay_s=10), aif.georgiou(t, delay_s=30)
    k = np.array([0.002, 0.02])
    fa, fb = models.exp_convolution(t, a, k), models.exp_convolution(t, b, k)
    np.testing.assert_allclose(models.exp_convolution(t, 2 * a - 0.5 * b, k), 2 * fa - 0.5 * fb, atol=1e-12)
    # delaying the input by whole frames delays the output by the same frames
    shifted = models.exp_convolution(t, models.shift_input(t, a, 10.0), k)
    np.testing.assert_allclose(shifted[5:], fa[:-5], atol=1e-12)


def test_fit_is_independent_of_voxel_order_and_shape(rng):
    t = np.arange(60) * 5.0
    cp = aif.parker(t, delay_s=20)
    kt, ve, vp = rng.uniform(0.05, 0.5, 24), rng.uniform(0.1, 0.5, 24), rng.uniform(0.01, 0.1, 24)
    ct = models.extended_tofts(t, cp, kt, ve, vp) + rng.normal(0, 0.01, (24, t.size))
    flat = fitting.fit(ct, t, cp)
    perm = rng.permutation(24)
    shuffled = fitting.fit(ct[perm].reshape(2, 3, 4, t.size), t, cp)
    for key in ("ktrans", "ve", "vp", "r2"):
        np.testing.assert_allclose(shuffled.maps[key].reshape(-1), flat.maps[key][perm], rtol=1e-7, atol=1e-10)


def test_float32_input_gives_float64_maps_close_to_float64_fit(rng):
    t = np.arange(60) * 5.0
    cp = aif.parker(t, delay_s=20)
    ct = models.extended_tofts(t, cp, rng.uniform(0.05, 0.5, 50), 0.3, 0.05) + rng.normal(0, 0.005, (50, t.size))
    r64 = fitting.fit(ct, t, cp)
    r32 = fitting.fit(ct.astype(np.float32), t, cp)
    assert r32.maps["ktrans"].dtype == np.float64
    np.testing.assert_allclose(r32.maps["ktrans"], r64.maps["ktrans"], rtol=1e-4, atol=1e-6)
