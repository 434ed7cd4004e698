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
