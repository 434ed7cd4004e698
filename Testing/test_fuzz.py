"""Seeded fuzzing of every file loader (``fuzzing.py``): read_dce on 4D NRRD (Slicer raw and gzip, as this
package writes it) and on 4D NIfTI with a JSON sidecar, read_segmentation on .seg.nrrd and labelmaps,
read_volume, read_aif_csv, read_manifest, read_cohort_csv and an exam summary.json. Every mutated input
must be read or refused with a one-line ValueError naming it: no other exception, no hang, no crash, no
input changed. A fixed number of cases per loader (about a minute in all; DCEPERFUSION_FUZZ_CASES sets
another), always the same cases; ``benchmarks/fuzz_loaders.py`` runs longer."""

import os

import pytest

import fuzzing

CASES = int(os.environ.get("DCEPERFUSION_FUZZ_CASES", "2500"))


@pytest.mark.parametrize("loader", list(fuzzing.LOADERS))
def test_fuzzed_inputs_are_read_or_refused_cleanly(tmp_path, loader):
    seed = 1000 + list(fuzzing.LOADERS).index(loader)
    report = fuzzing.run(fuzzing.LOADERS[loader], fuzzing.seeds_for(loader), CASES, seed, str(tmp_path / "cases"),
                         timeout_s=60.0, name=loader)
    summary = "\n".join(report.lines())
    assert not report.seed_failures, summary
    assert report.cases == CASES and report.ok > 0 and report.refused > 0, summary
    assert report.findings == [], summary


def test_the_runner_records_what_is_not_a_value_error(tmp_path):
    """The runner itself: an exception other than ValueError, a hang and a bad message are found."""
    seeds = {"a.txt": b"hello 12 world\n", "b.txt": b"\x00\x01\x02binary"}
    report = fuzzing.run(_picky, seeds, 24, 3, str(tmp_path / "cases"), timeout_s=1.0, name="picky")
    kinds = {f.kind for f in report.findings}
    assert {"exception", "hang", "message"} <= kinds, "\n".join(report.lines())
    ex = next(f for f in report.uncaught)
    assert ex.type == "KeyError" and "test_fuzz.py" in ex.place and "_picky" in ex.place
    assert report.cases == 24 and report.seed_failures == []


def _picky(path):
    """Reads the seeds; of mutated inputs, fails in every way the runner has to notice."""
    import time
    with open(path, "rb") as f:
        data = f.read() if os.path.isfile(path) else b""
    if data in (b"hello 12 world\n", b"\x00\x01\x02binary"):
        return
    n = len(data) % 4
    if n == 0:
        raise KeyError("not a ValueError")
    if n == 1:
        time.sleep(5)
    if n == 2:
        raise ValueError("a message\nof two lines, not naming the file")
    raise ValueError(f"{path}: refused cleanly")
