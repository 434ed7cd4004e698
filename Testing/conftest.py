"""Shared helpers for the tests: where the OSIPI reference data lives and how to read it."""

import csv
import os

import numpy as np
import pytest

OSIPI = os.path.join(os.path.dirname(__file__), "Data", "osipi")

# OSIPI's tolerances for fitted parameters (|error| <= a + r * |reference|)
KTRANS_TOL = dict(a=0.005, r=0.1)
VE_TOL = dict(a=0.05)
VP_TOL = dict(a=0.025)
FP_TOL = dict(a=5.0, r=0.1)
DELAY_TOL = dict(a=1.0)


def read_osipi(*parts):
    """Rows of an OSIPI CSV as dicts with stripped keys; array cells stay strings (see `cells`)."""
    with open(os.path.join(OSIPI, *parts), newline="", encoding="utf-8-sig") as f:
        return [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]


def cells(value):
    """An OSIPI array cell ('1 2 3') as a float array."""
    return np.array(value.split(), dtype=float)


def within(measured, reference, a, r=0.0):
    """OSIPI's pass rule: |measured - reference| <= a + r * |reference| (NaN never passes)."""
    measured = np.asarray(measured, dtype=float)
    reference = np.asarray(reference, dtype=float)
    return np.isfinite(measured) & (np.abs(measured - reference) <= a + r * np.abs(reference))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def small():
    """A small block phantom as the core's series record, with its lesion and artery masks."""
    from DCEPerfusionLib import phantom
    from DCEPerfusionLib.core.series import Series4D
    ph = phantom.make_phantom(shape=(2, 20, 24), snr=60.0, seed=4)
    acq = ph.acquisition
    series = Series4D(ph.signal.astype(np.float32), ph.t_s, np.diag([1.5, 1.5, 4.0, 1.0]), acq["tr_s"],
                      acq["flip_angle_deg"], "frame labels (test)", "phantom")
    masks = {name: ph.labels == phantom.LABELS[name] for name in ("lesion", "artery")}
    return ph, series, masks


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo run once in this process (``demo.run`` into a temporary folder) for the tests that read what it
    computed and wrote (test_pipeline, test_figures): demo.run's dict plus ``fit_calls``, one (shape, mean of
    the last frame) per ``fitting.fit`` call during the run. Needs matplotlib (the demo's figures)."""
    pytest.importorskip("matplotlib", reason="the demo's figures need matplotlib (Slicer does not bundle it)")
    from DCEPerfusionLib import fitting
    from DCEPerfusionLib.apps import demo
    calls = []
    real_fit = fitting.fit

    def counting_fit(ct, *args, **kwargs):
        calls.append((np.shape(ct), float(np.nanmean(ct[..., -1]))))
        return real_fit(ct, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fitting, "fit", counting_fit)
        out = demo.run(str(tmp_path_factory.mktemp("demo") / "out"), progress=lambda *_: None)
    return {**out, "fit_calls": calls}


#: The small oblique-free grid the file-reader tests write: (K, J, I), frame times (s).
GRID_SHAPE = (4, 6, 8)
GRID_T_S = np.array([0.0, 4.5, 9.0, 13.5, 18.0])


def grid_matrix():
    """The IJK->RAS matrix of :data:`GRID_SHAPE` (anisotropic spacing, an offset origin)."""
    m = np.diag([0.8, 0.9, 3.0, 1.0])
    m[:3, 3] = [-12.0, 30.0, -7.5]
    return m


def grid_signal(seed=0, shape=GRID_SHAPE, n=GRID_T_S.size, low=50, high=900):
    """Integer-valued float32 signal (K, J, I, T) on the grid."""
    return np.random.default_rng(seed).integers(low, high, shape + (n,)).astype(np.float32)
