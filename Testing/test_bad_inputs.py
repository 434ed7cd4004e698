"""Real inputs, clean failures: the bad-input and fault matrix of the command line and the API.

What scanners and other tools write is read right or refused clearly: every case asserts the exit code
(0 ok, 2 bad input or unwritable output, 130 Ctrl-C, batch 1 when an exam failed), the ONE line on
stderr (``dceperfusion: error: ...`` naming the input and the fix) or, for inputs accepted with a
warning, the warning and the voxel status; that no input file changed (sha256 before and after); that
no partial file is left anywhere (no name holding ".partial"); and that a result, when written, is
complete and readable (summary.json strict JSON, every map read by SimpleITK, nothing else in the folder).

The inputs are written by the library's writers (as the demo does) and by hand the way scanners and
other tools write them (:mod:`badinputs`). The cases are the specification: a case that fails because
the library does not (yet) do what it says is kept as it is.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import badinputs as bad
from DCEPerfusionLib import phantom
from DCEPerfusionLib.apps import cli, demo
from DCEPerfusionLib.core import pipeline
from DCEPerfusionLib.core.options import AnalysisOptions
from DCEPerfusionLib.files import exam, images, series

PY = [sys.executable, "-m", "DCEPerfusionLib"]
M = phantom.spine_matrix((3.0, 3.0, 4.0))
SHAPE = (4, 48, 32)
L = phantom.SPINE_LABELS
#: What every fit of this file uses unless a case is about one of them: r1 given, the blood T10, only the
#: lesions fitted (fast).
FAST = ["--r1", "4.5", "--blood-t10", "1.6", "--fit-lesions-only"]
#: Status codes of fitted voxels (ok, not converged, at bound) and of voxels outside the fit region.
FITTED, MASKED_OUT = (0, 1, 2), 5
ERROR = "dceperfusion: error: "
FAR = np.array(M, dtype=float)
FAR[:3, 3] += 1000.0                                      # a grid 1 m away from the DCE volume


# ============================================================================================ fixtures
@dataclass
class Shared:
    root: Path
    ph: phantom.Phantom
    files: exam.ExamFiles


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    ph = phantom.make_spine_phantom(shape=SHAPE, seed=1, snr=40.0)
    files = demo.write_exam_inputs(str(root / "exam"), ph, M)
    return Shared(root, ph, files)


@dataclass
class Ctx:
    """One case's world: its tmp folder, the shared exam, the output folder and the bad file (``f``)."""

    tmp: Path
    sh: Shared
    f: str = ""
    side: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def out(self) -> str:
        return str(self.tmp / "fitout")

    @property
    def dce(self) -> str:
        return self.sh.files.dce

    @property
    def seg(self) -> str:
        return self.sh.files.segmentation

    @property
    def t1(self) -> str:
        return self.sh.files.t1_map

    @property
    def ph(self):
        return self.sh.ph

    @property
    def labels(self):
        return self.sh.ph.labels

    def p(self, name: str) -> str:
        return str(self.tmp / name)

    def bad(self, path: str) -> str:
        self.f = str(path)
        return self.f

    def fit(self, dce=None, *extra, seg=True, fast=FAST) -> list:
        return ["fit", dce or self.dce, *(["--segmentation", self.seg, "--aif-segment", "aorta"] if seg else []),
                "--out", self.out, *fast, *extra]

    def edited(self, keys=None, fields=None, drop=(), name="dce.nrrd") -> str:
        return self.bad(bad.edit_nrrd(self.dce, self.p(name), keys, fields, drop))

    def with_signal(self, signal_kjit, name="dce.nrrd") -> str:
        """The shared DCE NRRD with other data (raw float, the same header otherwise)."""
        lines, _ = bad.split_nrrd(self.dce)
        lines = ["encoding: raw" if ln.startswith("encoding: ") else ln for ln in lines]
        return self.bad(bad.join_nrrd(self.p(name), lines, np.ascontiguousarray(signal_kjit, np.float32).tobytes()))

    def signal(self) -> np.ndarray:
        return bad.nrrd_data(self.dce).reshape(*SHAPE, -1).copy()

    def labelmap(self, name, labels, matrix=M) -> str:
        return self.bad(bad.write_labelmap(self.p(name), labels, matrix))

    def aorta_mask(self, name="aorta_mask.nrrd") -> str:
        return self.labelmap(name, (self.labels == L["aorta"]).astype(np.uint8))

    def nifti(self, sidecar, name="dce.nii.gz") -> str:
        path = bad.write_nifti_4d(self.p(name), self.ph.signal, M, sidecar)
        self.side = bad.sidecar_of(path)
        return self.bad(path)

    def sidecar(self, **changes) -> dict:
        base = {"Modality": "MR", "MagneticFieldStrength": 3, "RepetitionTimeExcitation": 0.004, "FlipAngle": 15,
                "VolumeTiming": [float(t) for t in self.ph.t_s]}
        base.update(changes)
        return {k: v for k, v in base.items() if v is not None}

    def csv(self, text, name="aif.csv", encoding="utf-8") -> str:
        return self.bad(bad.write_text(self.p(name), text, encoding))

    def fit_csv(self, text, **kw) -> list:
        """fit with a prescribed AIF from the CSV ``text`` (the lesion L2 reported)."""
        return ["fit", self.dce, "--segmentation", self.seg, "--lesion", "L2 metastasis", "--aif-csv",
                self.csv(text, **kw), "--out", self.out, *FAST]

    def aif_text(self, **kw) -> str:
        return bad.aif_csv(self.ph.t_s, self.ph.cp, **kw)

    def result(self, *extra) -> str:
        """A previous result in ``out`` (a fit of the shared exam)."""
        rc = cli.main([str(a) for a in self.fit(None, *extra)])
        assert rc == 0
        return self.out

    def fmt(self, pattern: str) -> str:
        values = {"f": self.f, "side": self.side, "dce": self.dce, "seg": self.seg, "t1": self.t1, "out": self.out,
                  "tmp": str(self.tmp)}
        return pattern.format(**{k: re.escape(v) for k, v in values.items()})


@dataclass
class Case:
    """argv(ctx) -> the command line; code: the exit code; error: the regex the one stderr line matches
    after 'dceperfusion: error: ' ({f}, {dce}, {out}... the case's paths); check(ctx, run): more
    assertions on an accepted run; replaces_out: the case may change files under ctx.out (--overwrite)."""

    id: str
    argv: Callable
    code: int = 0
    error: str = ""
    check: Callable | None = None
    replaces_out: bool = False

    def __repr__(self):
        return self.id


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    printed: dict | None = None
    summary: dict | None = None
    folder: str = ""


# ============================================================================================ checks
def snapshot(ctx: Ctx) -> dict:
    return bad.sha256_tree(ctx.tmp, ctx.sh.root)


def assert_untouched(ctx: Ctx, before: dict, allow_under: str | None = None):
    after = snapshot(ctx)
    changed = [p for p, h in before.items() if after.get(p) != h
               and not (allow_under and p.startswith(allow_under.rstrip(os.sep) + os.sep))]
    assert not changed, f"inputs changed or removed: {changed}"
    left = bad.partial_names(ctx.tmp, ctx.sh.root)
    assert not left, f"partial files left: {left}"
    return after


def assert_one_line(ctx: Ctx, stderr: str, pattern: str):
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith(ERROR) or line.startswith("dceperfusion: interrupted"), line
    if pattern:
        regex = ctx.fmt(pattern)
        assert re.search(regex, line), f"stderr line does not match {regex!r}:\n{line}"


def assert_complete(folder: str, listed=None) -> dict:
    """A complete, readable result folder: strict-JSON summary.json, every map read by SimpleITK on the
    DCE grid, the CSV files readable, and (when ``listed``) exactly the files the run said it wrote."""
    import SimpleITK as sitk
    names = sorted(os.listdir(folder))
    if listed is not None:
        assert names == sorted(listed), (names, listed)
    summary = bad.strict_json(os.path.join(folder, "summary.json"))
    for n in names:
        path = os.path.join(folder, n)
        if n.endswith((".nrrd", ".nii.gz")):
            img = sitk.ReadImage(path)
            assert img.GetSize()[:3] == SHAPE[::-1], (n, img.GetSize())
        elif n.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            assert rows or n == "statistics.csv", n
    for key in ("ktrans", "ve", "vp", "status"):
        assert any(n.startswith(key + ".") for n in names), (key, names)
    check_values_used(summary)
    return summary


def check_values_used(summary: dict):
    """summary.json says every value used and where it came from; the preset's agent and field only when
    r1 came from the preset."""
    used = summary["values_used"]
    for key in ("tr_s", "flip_angle_deg", "r1_per_mM_s", "n_baseline"):
        assert isinstance(used[key]["value"], (int, float)) and used[key]["source"], (key, used[key])
    for key in ("frame_times", "t10", "aif"):
        assert used[key]["source"], (key, used[key])
    preset = used["r1_per_mM_s"]["source"] != "given"
    assert ("contrast_agent" in used) == preset and ("field_strength_t" in used) == preset, used
    given = summary["options_given"]
    assert ("contrast_agent" in given) == preset and ("field_strength_t" in given) == preset, given


def run_cli(ctx: Ctx, argv, capsys) -> Run:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return Run(code, out, err)


def run_case(case: Case, ctx: Ctx, capsys) -> Run:
    argv = case.argv(ctx)
    before = snapshot(ctx)
    out_existed = os.path.lexists(ctx.out)
    run = run_cli(ctx, argv, capsys)
    assert run.code == case.code, f"exit code {run.code}, expected {case.code}\nstderr: {run.stderr}"
    after = assert_untouched(ctx, before, ctx.out if case.replaces_out else None)
    if case.code == 0:
        assert "Traceback" not in run.stderr and ERROR not in run.stderr, run.stderr
        run.printed = json.loads(run.stdout)
        run.folder = run.printed["out"]
        run.summary = assert_complete(run.folder, run.printed["files"])
        assert run.printed["warnings"] == run.summary["warnings"]
        if case.check:
            case.check(ctx, run)
    else:
        assert_one_line(ctx, run.stderr, case.error)
        new = sorted(set(after) - set(before))
        assert not new, f"a refused run wrote {new}"
        assert out_existed or not os.path.lexists(ctx.out), f"a refused run made {ctx.out}"
    return run


def read_map(run: Run, name: str) -> np.ndarray:
    arr, _ = images.read_volume(os.path.join(run.folder, f"{name}.nrrd"))
    return arr


def stats(run: Run, segment: str, name: str) -> dict:
    return next(r for r in run.summary["statistics"] if r["segment"] == segment and r["map"] == name)


def warned(text: str):
    def check(ctx, run):
        assert any(re.search(text, w) for w in run.summary["warnings"]), run.summary["warnings"]
    return check


def no_warning(ctx, run):
    assert run.summary["warnings"] == [], run.summary["warnings"]


def spacing_is(value: float, source: str = ""):
    def check(ctx, run):
        t = np.asarray(run.summary["frame_times_s"])
        np.testing.assert_allclose(np.diff(t), value, rtol=1e-5)
        assert re.search(source, run.summary["time_source"]), run.summary["time_source"]
        assert run.summary["values_used"]["frame_times"]["spacing_s"] == pytest.approx(value, rel=1e-5)
    return check


def both(*checks):
    def check(ctx, run):
        for c in checks:
            c(ctx, run)
    return check


# ============================================================================================ builders
def _labels_1_2_3(ctx):
    lab = np.zeros(SHAPE, np.uint8)
    lab[ctx.labels == L["aorta"]] = 1
    lab[ctx.labels == L["L2 metastasis"]] = 2
    lab[ctx.labels == L["L3 metastasis"]] = 3
    return ctx.labelmap("labels.nrrd", lab)


def _empty_lesion_seg(ctx):
    masks = {"L2 metastasis": ctx.labels == L["L2 metastasis"], "L3 metastasis": np.zeros(SHAPE, bool),
             "aorta": ctx.labels == L["aorta"]}
    return ctx.bad(images.write_segmentation(ctx.p("empty_lesion.seg.nrrd"), masks, M))


def _aorta_only_seg(ctx):
    return ctx.bad(images.write_segmentation(ctx.p("aorta.seg.nrrd"), {"aorta": ctx.labels == L["aorta"]}, M))


def _t1_ms(ctx, name="t1_ms.nrrd", matrix=M):
    import SimpleITK as sitk
    img = images.to_sitk((ctx.ph.t10_s * 1000.0).astype(np.float32), matrix)
    sitk.WriteImage(img, ctx.p(name), useCompression=True)
    return ctx.bad(ctx.p(name))


def _slightly_negative(ctx):
    sig = ctx.signal()
    where = np.argwhere(ctx.labels == L["soft tissue"])[:4]
    ctx.extra["negative_voxels"] = where
    for k, j, i in where:
        sig[k, j, i, 30] = -0.5                  # a filtered image's undershoot at one frame
    return ctx.with_signal(sig)


def _damaged_gzip(ctx):
    lines, data = bad.split_nrrd(ctx.dce)
    middle = len(data) // 2
    data = data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 64]) + data[middle + 64:]
    return ctx.bad(bad.join_nrrd(ctx.p("dce.nrrd"), lines, data))


def _flat(ctx):
    sig = ctx.signal()
    return ctx.with_signal(np.repeat(sig[..., :6].mean(axis=-1, keepdims=True), sig.shape[-1], axis=-1))


def _folder(ctx, name):
    os.makedirs(ctx.p(name), exist_ok=True)
    return ctx.bad(ctx.p(name))


def _copy(ctx, src, name):
    shutil.copy(src, ctx.p(name))
    return ctx.bad(ctx.p(name))


def _out_with(ctx, name, text="my notes\n"):
    os.makedirs(ctx.out, exist_ok=True)
    bad.write_text(os.path.join(ctx.out, name), text)


def _t1_inside_out(ctx):
    ctx.result()
    return ctx.bad(shutil.copy(ctx.t1, os.path.join(ctx.out, "t1.nrrd")))


def _dce_in_out(ctx):
    os.makedirs(ctx.out)
    return ctx.bad(shutil.copy(ctx.dce, os.path.join(ctx.out, "dce.nrrd")))


def _status_at(ctx, run, voxels):
    status = read_map(run, "status")
    return np.array([status[tuple(v)] for v in voxels])


# --- checks of accepted runs
def _negative_fitted_as_warned(ctx, run):
    """A few shallow negative samples (a filtered image's noise) are kept and the voxels fitted, as the
    warning says."""
    warned(r"slightly negative .*used as they are")(ctx, run)
    status = _status_at(ctx, run, ctx.extra["negative_voxels"])
    assert np.all(status <= 2), f"voxels with shallow negative samples were not fitted (status {status})"
    assert np.all(np.isfinite([read_map(run, "ktrans")[tuple(v)] for v in ctx.extra["negative_voxels"]]))


def _t1_read_in_ms(ctx, run):
    t10 = run.summary["values_used"]["t10"]
    assert t10["unit"] == "ms" and "t1_ms.nrrd" in t10["source"], t10
    assert 0.1 < stats(run, "L2 metastasis", "ktrans")["mean"] < 0.3


def _labelmap_segments(names):
    def check(ctx, run):
        assert "label 1" in run.summary["aif"], run.summary["aif"]
        assert {r["segment"] for r in run.summary["statistics"]} == set(names)
    return check


def _aif_from_file(name, n_voxels):
    def check(ctx, run):
        aif = run.summary["values_used"]["aif"]
        assert aif["source"] == "segment" and name in aif["description"] and aif["voxels"] == n_voxels, aif
    return check


def _fit_region(ctx, run):
    status = read_map(run, "status")
    inside = np.isin(ctx.labels, [L["marrow"], L["L2 metastasis"], L["L3 metastasis"]])
    assert np.all(status[~inside] == MASKED_OUT)
    assert np.isin(status[ctx.labels == L["L2 metastasis"]], FITTED).all()
    assert run.summary["status_counts"]["outside mask"] == int((~inside).sum())


def _empty_lesion(ctx, run):
    warned(r"lesion 'L3 metastasis' has no voxel")(ctx, run)
    row = stats(run, "L3 metastasis", "vp")
    assert row["voxel_count"] == 0 and row["mean"] is None and row["median"] is None, row
    assert stats(run, "L2 metastasis", "vp")["mean"] > 0


def _baseline(source: str, value=None):
    def check(ctx, run):
        nb = run.summary["values_used"]["n_baseline"]
        assert nb["source"].startswith(source), nb
        if value is not None:
            assert nb["value"] == value, nb
        else:
            assert nb["value"] in (5, 6), nb                   # the bolus arrives at 30 s (frame 6)
        assert run.summary["options_given"]["n_baseline"] == (value if source == "given" else None)
    return check


def _prescribed(ctx, run):
    aif = run.summary["values_used"]["aif"]
    assert aif["source"] == "prescribed" and "aif.csv" in aif["description"], aif
    np.testing.assert_allclose(run.summary["cp_mM"], ctx.ph.cp, rtol=1e-4, atol=1e-6)


def _preset(agent, field_t, field_source):
    def check(ctx, run):
        used = run.summary["values_used"]
        assert used["contrast_agent"] == agent and used["field_strength_t"]["value"] == field_t, used
        assert re.search(field_source, used["field_strength_t"]["source"]), used["field_strength_t"]
        assert agent in used["r1_per_mM_s"]["source"], used["r1_per_mM_s"]
        assert run.summary["options_given"]["contrast_agent"] == agent
    return check


def _r1_given(ctx, run):
    used = run.summary["values_used"]
    assert used["r1_per_mM_s"] == {"value": 4.5, "source": "given"}
    assert "contrast_agent" not in used and "contrast_agent" not in run.summary["options_given"]


def _tr_given(ctx, run):
    assert run.summary["values_used"]["tr_s"] == {"value": 0.004, "source": "given"}


def _from_sidecar(ctx, run):
    used = run.summary["values_used"]
    assert used["tr_s"]["value"] == pytest.approx(0.004) and "dce.nii.gz" in used["tr_s"]["source"], used["tr_s"]
    assert used["flip_angle_deg"]["value"] == 15


def _replaced(ctx, run):
    assert run.summary["options_given"]["t10_s"] == 1.4          # the old result was fitted with --t10 1.2


def _nifti_preset(ctx, run):
    _from_sidecar(ctx, run)
    _preset("gadobutrol", 1.5, "MagneticFieldStrength")(ctx, run)


# ============================================================================================ the CLI cases
MV = "MultiVolume."
LABELS, UNITS = MV + "FrameLabels", MV + "FrameIdentifyingDICOMTagUnits"
TAG, TR = MV + "FrameIdentifyingDICOMTagName", MV + "DICOM.RepetitionTime"


def t_s(ctx):
    return ctx.ph.t_s


CLI_CASES = [
    # --- frame times: units of MultiVolume.FrameLabels, given intervals
    Case("frame_labels_in_s_units_ms", lambda c: c.fit(c.edited({LABELS: bad.frame_labels(t_s(c), 1)})), 2,
         r"{f}.*0\.005 s apart.*look like s read as ms.*--frame-interval"),
    Case("frame_labels_in_ms_units_s", lambda c: c.fit(c.edited({UNITS: "s"})), 2,
         r"{f}.*5000 s apart.*look like ms read as s.*--frame-interval"),
    Case("frame_labels_in_s_units_s", lambda c: c.fit(c.edited({LABELS: bad.frame_labels(t_s(c), 1), UNITS: "s"})),
         check=spacing_is(5.0, r"\(s\)")),
    Case("frame_labels_in_s_units_sec",
         lambda c: c.fit(c.edited({LABELS: bad.frame_labels(t_s(c), 1), UNITS: "sec", TAG: "DeltaStartTime"})),
         check=spacing_is(5.0, "sec")),
    Case("frame_labels_in_min_units_min",
         lambda c: c.fit(c.edited({LABELS: bad.frame_labels(t_s(c), 1 / 60), UNITS: "min"})),
         check=spacing_is(5.0, "min")),
    Case("frame_units_count",
         lambda c: c.fit(c.edited({LABELS: bad.frame_labels(np.arange(1, 61), 1), UNITS: "count",
                                   TAG: "TemporalPositionIdentifier"})), 2,
         r"{f}.*'count'.*not a time.*--frame-interval"),
    Case("frame_units_unknown", lambda c: c.fit(c.edited({UNITS: "unknown"})), 2,
         r"{f}.*'unknown'.*not a time.*--frame-interval"),
    Case("frame_units_count_with_interval",
         lambda c: c.fit(c.edited({LABELS: bad.frame_labels(np.arange(1, 61), 1), UNITS: "count"}),
                         "--frame-interval", "5"),
         check=spacing_is(5.0, r"frame interval 5 s")),
    Case("frame_labels_missing", lambda c: c.fit(c.edited(drop=[LABELS, UNITS, TAG])), 2,
         r"{f}: has no frame times - give the frame interval in seconds \(--frame-interval\)"),
    Case("frame_labels_missing_with_interval", lambda c: c.fit(c.edited(drop=[LABELS]), "--frame-interval", "5"),
         check=spacing_is(5.0, r"frame interval 5 s \(given\)")),
    Case("frame_interval_contradicts_file", lambda c: c.fit(None, "--frame-interval", "4"), 2,
         r"{dce}.*frame interval 4 s contradicts the frame times.*5 s apart.*--override-frame-times"),
    Case("frame_interval_override", lambda c: c.fit(None, "--frame-interval", "4", "--override-frame-times"),
         check=spacing_is(4.0, r"replacing the file's frame times")),
    Case("frame_interval_agrees", lambda c: c.fit(None, "--frame-interval", "5"), check=spacing_is(5.0, "agrees")),
    Case("frame_labels_59_for_60_frames",
         lambda c: c.fit(c.edited({LABELS: bad.frame_labels(t_s(c)[:59], 1000)})), 2,
         r"{f}.*59 times for 60 frames.*--frame-interval"),
    Case("frame_labels_not_increasing",
         lambda c: c.fit(c.edited({LABELS: bad.frame_labels(t_s(c)[[0, 1, 3, 2, *range(4, 60)]], 1000)})), 2,
         r"{f}.*not increasing.*--frame-interval"),
    Case("frame_labels_text", lambda c: c.fit(c.edited({LABELS: "0,5000,n/a," + bad.frame_labels(t_s(c)[3:], 1000)})),
         2, r"{f}.*not a list of numbers.*--frame-interval"),
    # --- acquisition values in the wrong unit
    Case("t10_in_ms", lambda c: c.fit(None, "--t10", "1400"), 2,
         r"T10.*1400 s.*looks like ms; give seconds \(1\.4\)"),
    Case("blood_t10_in_ms", lambda c: c.fit(None, "--blood-t10", "1600"), 2,
         r"blood T10.*1600 s.*looks like ms; give seconds \(1\.6\)"),
    Case("tr_ms_given_in_s", lambda c: c.fit(None, "--tr-ms", "0.004"), 2,
         r"TR = 0\.004 ms \(given\): outside 0\.1-1000 ms.*--tr-ms 4\b"),
    Case("tr_header_in_s", lambda c: c.fit(c.edited({TR: "0.004"})), 2,
         r"TR = 0\.004 ms \(header of {f}\): outside 0\.1-1000 ms.*--tr-ms"),
    Case("tr_header_volume_tr", lambda c: c.fit(c.edited({TR: "4000"})), 2,
         r"TR = 4000 ms \(header of {f}\): outside 0\.1-1000 ms.*excitation TR"),
    Case("tr_header_in_s_but_tr_given", lambda c: c.fit(c.edited({TR: "0.004"}), "--tr-ms", "4"), check=_tr_given),
    Case("tr_header_missing", lambda c: c.fit(c.edited(drop=[TR])), 2,
         r"TR: the series '{f}' has no TR in its header - enter TR.*--tr-ms"),
    Case("flip_angle_200", lambda c: c.fit(None, "--flip-deg", "200"), 2, r"flip angle = 200.*\(0, 90\] degrees"),
    Case("hematocrit_in_percent", lambda c: c.fit(None, "--hct", "42"), 2, r"hematocrit = 42.*fraction"),
    Case("relaxivity_negative", lambda c: c.fit(None, "--r1", "-4.5"), 2, r"relaxivity r1.*-4\.5"),
    # --- the signal
    Case("int16_wrapped_signal", lambda c: c.fit(c.bad(bad.int16_wrapped_nrrd(c.dce, c.p("dce.nrrd")))), 2,
         r"{f}.*negative.*int16 wrap.*convert it to unsigned or float"),
    Case("slightly_negative_samples", lambda c: c.fit(_slightly_negative(c), fast=["--r1", "4.5", "--blood-t10", "1.6",
                                                                              "--method", "lls"]),
         check=_negative_fitted_as_warned),
    Case("flat_signal_no_bolus", lambda c: c.fit(_flat(c)), 2,
         r"{f}.*found no baseline followed by a lasting rise.*--baseline-frames"),
    # --- T1 maps
    Case("t1_map_in_ms", lambda c: c.fit(None, "--t1", _t1_ms(c)), check=_t1_read_in_ms),
    Case("t1_map_not_overlapping", lambda c: c.fit(None, "--t1", _t1_ms(c, matrix=FAR)), 2,
         r"{f}: has no positive T1 inside the DCE volume.*T1 map of this study"),
    Case("t1_map_is_a_folder", lambda c: c.fit(None, "--t1", _folder(c, "t1.nrrd")), 2,
         r"{f}: is a folder - give a file"),
    Case("t1_map_truncated", lambda c: c.fit(None, "--t1", c.bad(bad.truncated(c.t1, c.p("t1.nrrd"), 0.7))), 2,
         r"{f}: cannot be read.*is the file complete\?"),
    # --- DCE files
    Case("dce_truncated_nrrd", lambda c: c.fit(c.bad(bad.truncated(c.dce, c.p("dce.nrrd")))), 2,
         r"{f}: cannot be read.*is the file complete\?"),
    Case("dce_truncated_nii_gz",
         lambda c: c.fit(c.bad(bad.truncated(c.nifti(c.sidecar()), c.p("cut.nii.gz"), 0.6))), 2,
         r"{f}: cannot be read.*is the file complete\?"),
    Case("dce_sizes_smaller_than_data", lambda c: c.fit(c.edited(fields={"sizes": "60 32 48 3"})), 2,
         r"{f}: holds more data than its header says.*save it again"),
    Case("dce_sizes_larger_than_data",
         lambda c: c.fit(c.bad(bad.edit_nrrd(bad.raw_nrrd(c.dce, c.p("raw.nrrd")), c.p("dce.nrrd"),
                                             fields={"sizes": "60 32 48 5"}))), 2,
         r"{f}: cannot be read \(its data has \d+ bytes, its sizes 60 32 48 5 of float need \d+\).*complete\?"),
    Case("dce_gzip_data_damaged", lambda c: c.fit(_damaged_gzip(c)), 2,
         r"{f}: cannot be read \(the gzip data is damaged.*complete\?"),
    Case("dce_missing", lambda c: c.fit(c.bad(c.p("nothere.nrrd"))), 2, r"{f} does not exist - check the path"),
    Case("dce_empty_folder", lambda c: c.fit(_folder(c, "dicom")), 2,
         r"{f}.*no DICOM images found.*the DCE series' DICOM files"),
    Case("dce_is_a_3d_volume", lambda c: c.fit(c.bad(c.t1)), 2, r"{f}: expected a 4D NRRD.*"),
    Case("dce_empty_file", lambda c: c.fit(c.bad(bad.write_text(c.p("dce.nrrd"), b""))), 2,
         r"{f}.*(is empty|not a NRRD file)"),
    Case("dce_text_named_nrrd", lambda c: c.fit(c.bad(bad.write_text(c.p("dce.nrrd"), "patient list\n"))), 2,
         r"{f}: is not a NRRD file.*give a \.nrrd"),
    Case("dce_unknown_extension", lambda c: c.fit(_copy(c, c.dce, "dce.mha")), 2,
         r"{f}.*give a DICOM folder, a \.nrrd or a \.nii"),
    # --- 4D NIfTI with a BIDS sidecar
    Case("nifti_sidecar_preset_field", lambda c: c.fit(c.nifti(c.sidecar(MagneticFieldStrength=1.5)),
                                                        fast=["--blood-t10", "1.6", "--fit-lesions-only"]),
         check=_nifti_preset),
    Case("nifti_sidecar_dcm2niix_repetition_time",
         lambda c: c.fit(c.nifti(c.sidecar(RepetitionTimeExcitation=None, RepetitionTime=0.004))), check=_from_sidecar),
    Case("nifti_volume_timing_in_ms",
         lambda c: c.fit(c.nifti(c.sidecar(VolumeTiming=[float(t) * 1000 for t in c.ph.t_s]))), 2,
         r"{f}.*5000 s apart.*look like ms read as s.*--frame-interval"),
    Case("nifti_volume_timing_is_a_string",
         lambda c: c.fit(c.nifti(c.sidecar(VolumeTiming=", ".join(f"{t:g}" for t in c.ph.t_s)))), 2,
         r"{side}: VolumeTiming is the text '0, 5, 10.*not a list - give VolumeTiming as a list of frame times in s"),
    Case("nifti_tr_excitation_in_ms", lambda c: c.fit(c.nifti(c.sidecar(RepetitionTimeExcitation=4))), 2,
         r"{side}: RepetitionTimeExcitation is 4, more than 1 s - values in ms\? give seconds"),
    Case("nifti_flip_angle_is_text", lambda c: c.fit(c.nifti(c.sidecar(FlipAngle="15"))), 2,
         r"{side}: FlipAngle is the text '15' - give the flip angle in degrees as a number"),
    Case("nifti_no_sidecar", lambda c: c.fit(c.nifti(None)), 2,
         r"{f} \(JSON sidecar\): has no frame times - give the frame interval in seconds \(--frame-interval\)"),
    Case("nifti_no_sidecar_values_given",
         lambda c: c.fit(c.nifti(None), "--frame-interval", "5", "--tr-ms", "4", "--flip-deg", "15"),
         check=both(_tr_given, spacing_is(5.0, "given"))),
    Case("nifti_sidecar_not_json", lambda c: c.fit(c.nifti('{"RepetitionTimeExcitation": 0.004,')), 2,
         r"JSON sidecar {side}: not valid JSON.*--frame-interval"),
    # --- segmentations, artery and fit-region masks
    Case("labelmap_aif_segment_by_value",
         lambda c: ["fit", c.dce, "--segmentation", _labels_1_2_3(c), "--aif-segment", "1", "--out", c.out, *FAST],
         check=_labelmap_segments({"label 2", "label 3"})),
    Case("labelmap_lesion_by_value",
         lambda c: ["fit", c.dce, "--segmentation", _labels_1_2_3(c), "--aif-segment", "1", "--lesion", "3",
                    "--out", c.out, *FAST], check=_labelmap_segments({"label 3"})),
    Case("float_image_as_segmentation", lambda c: ["fit", c.dce, "--segmentation", c.bad(c.t1), "--aif-segment",
                                                   "aorta", "--out", c.out, *FAST], 2,
         r"{f}: holds non-integer values - give a labelmap or \.seg\.nrrd, not an image"),
    Case("segmentation_is_a_folder", lambda c: ["fit", c.dce, "--segmentation", _folder(c, "lesions.seg.nrrd"),
                                                "--aif-segment", "aorta", "--out", c.out, *FAST], 2,
         r"{f}: is a folder - give a file"),
    Case("segmentation_truncated",
         lambda c: ["fit", c.dce, "--segmentation", c.bad(bad.truncated(c.seg, c.p("cut.seg.nrrd"), 0.8)),
                    "--aif-segment", "aorta", "--out", c.out, *FAST], 2, r"{f}: cannot be read.*complete\?"),
    Case("aif_segment_misspelt", lambda c: ["fit", c.dce, "--segmentation", c.seg, "--aif-segment", "Aorta",
                                            "--out", c.out, *FAST], 2,
         r"AIF segment 'Aorta': not in the segmentation \(L2 metastasis, L3 metastasis, aorta\).*--aif-segment"),
    Case("lesion_not_in_segmentation", lambda c: c.fit(None, "--lesion", "L4 metastasis"), 2,
         r"lesions \['L4 metastasis'\]: not in the segmentation.*--segmentation"),
    Case("aif_mask_file", lambda c: ["fit", c.dce, "--segmentation", c.seg, "--aif-mask", c.aorta_mask(),
                                     "--lesion", "L2 metastasis", "--lesion", "L3 metastasis", "--out", c.out, *FAST],
         check=both(no_warning, _aif_from_file("aorta_mask.nrrd", 384))),
    Case("aif_mask_one_voxel", lambda c: ["fit", c.dce, "--segmentation", c.seg, "--aif-mask",
                                          c.labelmap("aif1.nrrd", bad.one_voxel_mask(c.labels == L["aorta"], 1)),
                                          "--lesion", "L2 metastasis", "--out", c.out, *FAST],
         check=both(warned(r"only 1 voxel"), _aif_from_file("aif1.nrrd", 1))),
    Case("aif_mask_two_voxels", lambda c: ["fit", c.dce, "--segmentation", c.seg, "--aif-mask",
                                           c.labelmap("aif2.nrrd", bad.one_voxel_mask(c.labels == L["aorta"], 2)),
                                           "--lesion", "L2 metastasis", "--out", c.out, *FAST],
         check=both(warned(r"only 2 voxel"), _aif_from_file("aif2.nrrd", 2))),
    Case("aif_mask_and_aif_segment", lambda c: c.fit(None, "--aif-mask", c.aorta_mask()), 2,
         r"AIF: give either an AIF segment.*\(--aif-segment\) or an AIF mask file \(--aif-mask\), not both"),
    Case("aif_mask_all_zero", lambda c: ["fit", c.dce, "--aif-mask", c.labelmap("zero.nrrd", np.zeros(SHAPE, np.uint8)),
                                         "--out", c.out, "--r1", "4.5"], 2,
         r"AIF mask {f}: has no non-zero voxel - mark the artery .*in a mask of this study"),
    Case("aif_mask_outside_the_volume",
         lambda c: ["fit", c.dce, "--segmentation", c.seg, "--aif-mask",
                    c.labelmap("far.nrrd", (c.labels == L["aorta"]).astype(np.uint8), FAR), "--lesion",
                    "L2 metastasis", "--out", c.out, *FAST], 2,
         r"AIF mask {f}: has no voxel inside the DCE volume - mark the artery"),
    Case("fit_mask_file",
         lambda c: c.fit(None, "--mask", c.labelmap("spine.nrrd", np.isin(
             c.labels, [L["marrow"], L["L2 metastasis"], L["L3 metastasis"]]).astype(np.uint8)),
             fast=["--r1", "4.5", "--blood-t10", "1.6", "--method", "lls"]), check=_fit_region),
    Case("fit_mask_outside_the_volume",
         lambda c: c.fit(None, "--mask", c.labelmap("far.nrrd", np.ones(SHAPE, np.uint8), FAR)), 2,
         r"fit mask {f}: has no voxel inside the DCE volume - mark the region to fit in a mask of this study"),
    Case("fit_mask_is_a_segmentation",
         lambda c: c.fit(None, "--mask", c.bad(c.seg), fast=["--r1", "4.5", "--blood-t10", "1.6", "--method", "lls"]),
         check=lambda c, run: (run.summary["status_counts"]["outside mask"]
                               == int(np.isin(c.labels, [L["soft tissue"], L["muscle"], L["marrow"], L["disc"],
                                                         L["csf"], L["background"]]).sum()))
         or pytest.fail(str(run.summary["status_counts"]))),
    Case("fit_mask_is_a_float_image", lambda c: c.fit(None, "--mask", c.bad(c.t1)), 2,
         r"{f}: holds non-integer values - give a labelmap or \.seg\.nrrd"),
    Case("aif_mask_is_a_folder", lambda c: ["fit", c.dce, "--segmentation", c.seg, "--aif-mask",
                                            _folder(c, "aif.nrrd"), "--lesion", "L2 metastasis", "--out", c.out,
                                            *FAST], 2, r"{f}: is a folder - give a file"),
    Case("aif_source_segment_without_artery",
         lambda c: ["fit", c.dce, "--segmentation", c.seg, "--aif", "segment", "--out", c.out, *FAST], 2,
         r"^(?!.*None).*AIF.*--aif-segment.*--aif-mask"),
    Case("empty_lesion_segment", lambda c: ["fit", c.dce, "--segmentation", _empty_lesion_seg(c), "--aif-segment",
                                            "aorta", "--out", c.out, *FAST], check=_empty_lesion),
    Case("fit_lesions_only_without_lesions",
         lambda c: ["fit", c.dce, "--segmentation", _aorta_only_seg(c), "--aif-segment", "aorta", "--out", c.out,
                    *FAST], 2, r"no lesion segment given - select at least one lesion segment"),
    # --- baseline frames and the AIF
    Case("baseline_frames_detected", lambda c: c.fit(), check=both(_baseline("detected"), _r1_given)),
    Case("baseline_frames_given", lambda c: c.fit(None, "--baseline-frames", "6"), check=_baseline("given", 6)),
    Case("baseline_frames_too_many", lambda c: c.fit(None, "--baseline-frames", "58"), 2,
         r"number of baseline frames = 58: must be between 1 and 57"),
    Case("baseline_frames_zero", lambda c: c.fit(None, "--baseline-frames", "0"), 2,
         r"number of baseline frames = 0: must be a whole number of at least 1"),
    Case("aif_parker_and_aif_csv", lambda c: c.fit(None, "--aif", "parker", "--aif-csv", c.csv(c.aif_text()),
                                                   seg=False), 2,
         r"--aif parker: contradicts --aif-csv.*give one AIF"),
    Case("aif_csv_prescribed", lambda c: c.fit_csv(c.aif_text()), check=_prescribed),
    Case("aif_csv_times_in_ms", lambda c: c.fit_csv(c.aif_text(time_scale=1000)), 2,
         r"AIF file {f}: the times span 295000.*values in ms\? give seconds"),
    Case("aif_csv_time_ms_header",
         lambda c: c.fit_csv(c.aif_text(header=("time_ms", "concentration_mM"), time_scale=1000)), 2,
         r"AIF file {f}: the time column 'time_ms' is in ms - give the times in seconds"),
    Case("aif_csv_two_rows", lambda c: c.fit_csv("time_s,concentration_mM\n0,0\n5,1.2\n"), 2,
         r"AIF file {f}: has 2 row\(s\) - an AIF needs at least 3 time points"),
    Case("aif_csv_letters", lambda c: c.fit_csv(c.aif_text(bad_cell=(3, "n/a"))), 2,
         r"AIF file {f} row 3 \(line 4\): concentration_mM = 'n/a' is not a number"),
    Case("aif_csv_shorter_than_series", lambda c: c.fit_csv(bad.aif_csv(c.ph.t_s[:21], c.ph.cp[:21])), 2,
         r"{f}.*covers 0-100 s, the frames 0-295 s.*whole series"),
    Case("aif_csv_latin1", lambda c: c.fit_csv(c.aif_text(header=("time_s", "concentration_mM_mesurée")),
                                               encoding="latin-1"), 2,
         r"AIF file {f}: is not UTF-8 text.*save it as UTF-8"),
    Case("aif_csv_one_column", lambda c: c.fit_csv("time_s concentration_mM\n0 0\n5 1\n10 2\n"), 2,
         r"AIF file {f}: has one column.*separate the columns by commas.*time_s,concentration_mM"),
    Case("aif_csv_is_a_folder",
         lambda c: ["fit", c.dce, "--segmentation", c.seg, "--lesion", "L2 metastasis", "--aif-csv",
                    _folder(c, "aif.csv"), "--out", c.out, *FAST], 2, r"AIF file {f}: is a folder - give a file"),
    # --- relaxivity: preset or given
    Case("r1_from_agent_and_field", lambda c: c.fit(None, "--agent", "gadobutrol", "--field", "1.5",
                                                    fast=["--blood-t10", "1.6", "--fit-lesions-only"]),
         check=_preset("gadobutrol", 1.5, "given")),
    # --- outputs
    Case("out_holds_a_result", lambda c: (c.result(), c.fit())[1], 2,
         r"{out} already holds a result - choose another --out or pass --overwrite"),
    Case("out_holds_a_result_overwrite", lambda c: (c.result("--t10", "1.2"), c.fit(None, "--overwrite"))[1],
         check=_replaced, replaces_out=True),
    Case("out_holds_other_files", lambda c: (_out_with(c, "notes.txt"), c.fit(None, "--overwrite"))[1], 2,
         r"output folder {out}: holds other files \(notes\.txt\) - give a new or empty folder"),
    Case("out_is_a_file", lambda c: (bad.write_text(c.out, "x"), c.fit(None, "--overwrite"))[1], 2,
         r"output folder {out}: is a file - give a folder"),
    Case("overwrite_onto_the_t1_input", lambda c: c.fit(None, "--t1", _t1_inside_out(c), "--overwrite"), 2,
         r"output {out} would replace the input {f} - write the results elsewhere"),
    Case("out_is_the_input_folder", lambda c: c.fit(_dce_in_out(c), "--overwrite"), 2,
         r"output {out} would replace the input {f}"),
    Case("out_below_a_file", lambda c: ["fit", c.dce, "--segmentation", c.seg, "--aif-segment", "aorta", "--out",
                                        os.path.join(c.bad(bad.write_text(c.p("notes.txt"), "x")), "sub"), *FAST], 2,
         r"{f}.* - .+"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_fit_command_line(case, shared, tmp_path, capsys):
    run_case(case, Ctx(tmp_path, shared), capsys)


# --- the same in a terminal: python -m DCEPerfusionLib, one line and no traceback
SUBPROCESS_IDS = ["t10_in_ms", "frame_units_count", "dce_truncated_nrrd", "int16_wrapped_signal", "aif_csv_letters",
                  "nifti_volume_timing_is_a_string"]


@pytest.mark.parametrize("case", [c for c in CLI_CASES if c.id in SUBPROCESS_IDS], ids=SUBPROCESS_IDS)
def test_refusals_in_a_terminal(case, shared, tmp_path):
    ctx = Ctx(tmp_path, shared)
    argv = [str(a) for a in case.argv(ctx)]
    before = snapshot(ctx)
    out = subprocess.run([*PY, *argv], capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert out.returncode == case.code, out.stderr
    assert_one_line(ctx, out.stderr, case.error)
    after = assert_untouched(ctx, before)
    assert set(after) == set(before) and not os.path.exists(ctx.out)


# ============================================================================================ faults
def _interrupt_on(monkeypatch, module, name, call: int, exc):
    real = getattr(module, name)
    calls = {"n": 0}

    def fake(*a, **kw):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc(a) if callable(exc) else exc
        return real(*a, **kw)
    monkeypatch.setattr(module, name, fake)
    return calls


def test_ctrl_c_while_writing_the_maps(shared, tmp_path, capsys, monkeypatch):
    ctx = Ctx(tmp_path, shared)
    before = snapshot(ctx)
    calls = _interrupt_on(monkeypatch, images, "write_volume", 3, KeyboardInterrupt())
    run = run_cli(ctx, ctx.fit(), capsys)
    assert calls["n"] == 3 and run.code == 130, run.stderr
    assert_one_line(ctx, run.stderr, "")
    assert "interrupted" in run.stderr
    after = assert_untouched(ctx, before)
    assert set(after) == set(before) and not os.path.exists(ctx.out)


def test_ctrl_c_while_overwriting_keeps_the_old_result(shared, tmp_path, capsys, monkeypatch):
    ctx = Ctx(tmp_path, shared)
    ctx.result("--t10", "1.2")
    before = snapshot(ctx)
    _interrupt_on(monkeypatch, images, "write_volume", 3, KeyboardInterrupt())
    run = run_cli(ctx, ctx.fit(None, "--overwrite"), capsys)
    assert run.code == 130, run.stderr
    assert_one_line(ctx, run.stderr, "")
    after = assert_untouched(ctx, before)                      # the old result is untouched, byte for byte
    assert set(after) == set(before)
    assert bad.strict_json(os.path.join(ctx.out, "summary.json"))["options_given"]["t10_s"] == 1.2


def test_ctrl_c_while_fitting(shared, tmp_path, capsys, monkeypatch):
    from DCEPerfusionLib.core import fitting
    ctx = Ctx(tmp_path, shared)
    before = snapshot(ctx)
    _interrupt_on(monkeypatch, fitting, "fit", 1, KeyboardInterrupt())
    run = run_cli(ctx, ctx.fit(), capsys)
    assert run.code == 130, run.stderr
    assert_one_line(ctx, run.stderr, "")
    assert set(assert_untouched(ctx, before)) == set(before) and not os.path.exists(ctx.out)


FAULTS = [  # (id, module, writer, its call that fails, errno, the fix the line names)
    ("permission_denied_writing_a_map", images, "write_volume", 1, errno.EACCES, "choose a folder you can write to"),
    ("disk_full_writing_the_summary", "results", "write_json", 1, errno.ENOSPC, "free some space"),
    ("read_only_folder_writing_a_table", "results", "write_csv", 1, errno.EROFS, "choose a writable folder"),
    ("quota_exceeded_writing_the_segmentation", images, "write_segmentation", 1, errno.EDQUOT, "quota"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f[0] for f in FAULTS])
def test_unwritable_output_one_line(fault, shared, tmp_path, capsys, monkeypatch):
    from DCEPerfusionLib.files import results
    _, module, name, call, code, fix = fault
    module = results if module == "results" else module
    ctx = Ctx(tmp_path, shared)
    before = snapshot(ctx)
    reason = os.strerror(code)

    def failure(args):
        return OSError(code, reason, args[0])             # the writer's path, as the OS names it
    _interrupt_on(monkeypatch, module, name, call, failure)
    run = run_cli(ctx, ctx.fit(), capsys)
    assert run.code == 2, run.stderr
    assert_one_line(ctx, run.stderr, rf"fitout.*{re.escape(reason)} - .*{fix}")
    assert set(assert_untouched(ctx, before)) == set(before) and not os.path.exists(ctx.out)


def test_file_size_limit(shared, tmp_path):
    """A file-size limit (ulimit -f): writes fail with EFBIG (Python ignores SIGXFSZ)."""
    import resource
    ctx = Ctx(tmp_path, shared)
    argv = [str(a) for a in ctx.fit(fast=["--r1", "4.5", "--blood-t10", "1.6"])]   # whole maps: ~20 kB each
    before = snapshot(ctx)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    out = subprocess.run([*PY, *argv], capture_output=True, text=True, encoding="utf-8", timeout=300,
                         preexec_fn=limit)
    assert out.returncode == 2, out.stderr
    assert_one_line(ctx, out.stderr, r"{out}/\w+\.nrrd: could not be written completely - raise the file-size "
                                     r"limit \(ulimit -f\) or write elsewhere")     # the final name, not a temporary
    assert set(assert_untouched(ctx, before)) == set(before) and not os.path.exists(ctx.out)


def test_two_overwriting_runs_leave_one_complete_set(shared, tmp_path):
    """Two `fit --overwrite` into one folder at once (different --t10, so every map tells its run): the
    folder holds the whole set of one of them."""
    ctx = Ctx(tmp_path, shared)
    ctx.result("--t10", "1.4")
    files = exam.ExamFiles(ctx.dce, ctx.seg, aif_segment="aorta")
    refs = {t10: exam.fit_exam(files, AnalysisOptions(t10_s=t10, blood_t10_s=1.6, r1_per_mM_s=4.5,
                                                      aif_source="segment", fit_lesions_only=True))
            for t10 in (1.0, 1.8)}
    assert not np.allclose(refs[1.0].maps["ktrans"], refs[1.8].maps["ktrans"], equal_nan=True)
    before = snapshot(ctx)
    procs = [subprocess.Popen([*PY, *map(str, ctx.fit(None, "--t10", str(t10), "--overwrite"))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t10 in refs]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes and set(codes) <= {0, 2}, outs
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            assert_one_line(ctx, err, r"fitout")
    assert_untouched(ctx, before, ctx.out)
    summary = assert_complete(ctx.out)
    t10 = summary["options_given"]["t10_s"]
    assert t10 in refs
    ref = refs[t10]
    for name, values in ref.maps.items():
        arr, _ = images.read_volume(os.path.join(ctx.out, f"{name}.nrrd"))
        other = refs[1.8 if t10 == 1.0 else 1.0].maps[name]
        np.testing.assert_allclose(arr, values.astype(arr.dtype), rtol=1e-5, equal_nan=True,
                                   err_msg=f"{name}.nrrd is not from the run summary.json is from")
        if name == "ktrans":
            assert not np.allclose(arr, other.astype(arr.dtype), equal_nan=True)
    with open(os.path.join(ctx.out, "statistics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    for r, s in zip(rows, summary["statistics"]):
        assert r["segment"] == s["segment"] and float(r["mean"]) == pytest.approx(s["mean"])


# ============================================================================================ batch
MANIFEST_HEADER = "patient,lesion,timepoint,dce,segmentation,outcome"
BATCH_ARGS = ["--aif", "segment", "--aif-segment", "aorta", *FAST]


def _manifest(ctx, text, encoding="utf-8"):
    return ctx.bad(bad.write_text(ctx.p("manifest.csv"), text, encoding))


def _row(ctx, patient="P1", tp="baseline"):
    return f"{patient},L2 metastasis,{tp},{ctx.dce},{ctx.seg},success"


MANIFEST_CASES = [
    ("latin1", lambda c: _manifest(c, f"{MANIFEST_HEADER}\nBéatrice,L2 metastasis,baseline,{c.dce},{c.seg},success\n",
                                   "latin-1"),
     r"manifest {f}: is not UTF-8 text \(byte 0xe9 on line 2.*save it as UTF-8"),
    ("binary", lambda c: _manifest(c, bad.gz_bytes(b"patient,lesion\n" * 20)),
     r"manifest {f}: is a binary file.*give a CSV table"),
    ("empty", lambda c: _manifest(c, ""), r"manifest {f}: is empty - give a CSV table with a header row"),
    ("one_column", lambda c: _manifest(c, "patient lesion timepoint dce segmentation outcome\nP1 L2 baseline a b c\n"),
     r"manifest {f}: has one column.*separate the columns by commas"),
    ("ragged", lambda c: _manifest(c, f"{MANIFEST_HEADER}\n{_row(c)}\n{_row(c, tp='follow-up')},extra,cells\n"),
     r"manifest {f} row 2 \(line 3\): has 8 cells, the header 6"),
    ("missing_column", lambda c: _manifest(c, "patient,lesion,timepoint,dce,segmentation\nP1,L2,baseline,a,b\n"),
     r"manifest {f}: missing column\(s\) outcome"),
    ("bad_timepoint", lambda c: _manifest(c, f"{MANIFEST_HEADER}\n{_row(c, tp='week 6')}\n"),
     r"manifest {f} row 1 \(line 2\): timepoint 'week 6' is not 'baseline' or 'follow-up'"),
    ("is_a_folder", lambda c: _folder(c, "manifest.csv"), r"manifest {f}: is a folder - give a file"),
]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[f"manifest_{c[0]}" for c in MANIFEST_CASES])
def test_batch_refuses_a_bad_manifest_before_starting(case, shared, tmp_path, capsys):
    pytest.importorskip("dask.distributed", reason="batch runs on Dask (Slicer does not bundle it)")
    _, build, pattern = case
    ctx = Ctx(tmp_path, shared)
    manifest = build(ctx)
    before = snapshot(ctx)
    run = run_cli(ctx, ["batch", manifest, "--out", ctx.out, *BATCH_ARGS], capsys)
    assert run.code == 2, run.stderr
    assert_one_line(ctx, run.stderr, pattern)
    assert set(assert_untouched(ctx, before)) == set(before) and not os.path.exists(ctx.out)


def test_batch_per_exam_columns_and_a_failing_exam(shared, tmp_path):
    """Per-exam t1, aif_mask, mask and baseline_frames columns; one exam (int16-wrapped DCE) fails, the
    others are fitted (exit 1, the error in batch_summary.json)."""
    pytest.importorskip("dask.distributed", reason="batch runs on Dask (Slicer does not bundle it)")
    ctx = Ctx(tmp_path, shared)
    p1f = demo.write_exam_inputs(ctx.p("P1f"), phantom.make_spine_phantom(
        {"L2 metastasis": 0.06, "L3 metastasis": 0.19}, shape=SHAPE, seed=2, snr=40.0), M)
    p2b = demo.write_exam_inputs(ctx.p("P2b"), phantom.make_spine_phantom(shape=SHAPE, seed=3, snr=40.0), M)
    os.makedirs(ctx.p("P2f"))
    p2f_dce = bad.int16_wrapped_nrrd(p2b.dce, ctx.p("P2f/dce.nrrd"))
    aorta = ctx.aorta_mask()
    t1_ms = _t1_ms(ctx)
    half_l2 = (ctx.labels == L["L2 metastasis"]) & (np.indices(SHAPE)[0] < 2)
    fit_region = ctx.labelmap("half_L2.nrrd", half_l2.astype(np.uint8))
    root = ctx.tmp

    def rel(p):
        return os.path.relpath(p, root)
    exams = [("P1", "baseline", ctx.dce, ctx.seg, t1_ms, "", "6", ("L2 metastasis", "L3 metastasis")),
             ("P1", "follow-up", p1f.dce, p1f.segmentation, "", "", "", ("L2 metastasis", "L3 metastasis")),
             ("P2", "baseline", p2b.dce, p2b.segmentation, "", fit_region, "", ("L2 metastasis",)),
             ("P2", "follow-up", p2f_dce, p2b.segmentation, "", "", "", ("L2 metastasis",))]
    rows = []
    for patient, tp, dce, seg, t1, mask, nb, lesions in exams:
        for lesion in lesions:
            rows.append({"patient": patient, "lesion": lesion, "timepoint": tp, "dce": rel(dce),
                         "segmentation": rel(seg), "outcome": "failure" if lesion.startswith("L3") else "success",
                         "t1": rel(t1) if t1 else "", "aif_mask": rel(aorta), "mask": rel(mask) if mask else "",
                         "baseline_frames": nb})
    manifest = ctx.p("manifest.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    before = snapshot(ctx)
    out = subprocess.run([*PY, "batch", manifest, "--out", ctx.out, "--workers", "1", "--aif", "segment", *FAST],
                         capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1, out.stderr
    assert_untouched(ctx, before)
    summary = bad.strict_json(os.path.join(ctx.out, "batch_summary.json"))
    assert summary["exams"] == 4 and summary["fitted"] == 3, summary
    assert [f["exam"] for f in summary["failed"]] == ["P2_follow-up"], summary["failed"]
    assert re.search(r"P2f.dce\.nrrd.*int16 wrap", summary["failed"][0]["error"]), summary["failed"][0]
    exams_dir = os.path.join(ctx.out, "exams")
    assert sorted(os.listdir(exams_dir)) == ["P1_baseline", "P1_follow-up", "P2_baseline"]
    got = {e: assert_complete(os.path.join(exams_dir, e)) for e in os.listdir(exams_dir)}
    for e, s in got.items():
        assert "aorta_mask.nrrd" in s["values_used"]["aif"]["description"], (e, s["values_used"]["aif"])
    p1b = got["P1_baseline"]["values_used"]
    assert p1b["n_baseline"] == {"value": 6, "source": "given"}, p1b["n_baseline"]
    assert "t1_ms.nrrd" in p1b["t10"]["source"] and p1b["t10"]["unit"] == "ms", p1b["t10"]
    assert got["P1_follow-up"]["values_used"]["n_baseline"]["source"].startswith("detected")
    assert got["P1_follow-up"]["values_used"]["t10"]["source"] == "constant"
    status, _ = images.read_volume(os.path.join(exams_dir, "P2_baseline", "status.nrrd"))
    l2 = ctx.labels == L["L2 metastasis"]
    assert np.all(status[l2 & ~half_l2] == MASKED_OUT) and np.isin(status[half_l2], FITTED).all()
    responses = {r["lesion"]: r for r in bad.strict_json(os.path.join(ctx.out, "responses.json"))}
    assert responses["P1/L3 metastasis"]["call"] == "suspected failure"
    assert responses["P2/L2 metastasis"]["call"] == "indeterminate"


# ============================================================================================ the API
def _series(ctx, **changes):
    s = series.read_dce(ctx.dce)
    return dataclasses.replace(s, **changes)


def _analyse(ctx, s=None, options=None, **kw):
    lesions = {n: ctx.labels == L[n] for n in ("L2 metastasis", "L3 metastasis")}
    kw.setdefault("aif_mask", ctx.labels == L["aorta"])
    return pipeline.analyse(s or _series(ctx), options or AnalysisOptions(
        aif_source="segment", blood_t10_s=1.6, r1_per_mM_s=4.5, fit_lesions_only=True), lesions=lesions, **kw)


def _fit_files(ctx, options=None, **files):
    f = dict(dce=ctx.dce, segmentation=ctx.seg, aif_segment="aorta")
    f.update(files)
    return exam.fit_exam(exam.ExamFiles(**f), options or AnalysisOptions(
        aif_source="segment", blood_t10_s=1.6, r1_per_mM_s=4.5, fit_lesions_only=True))


def _wrapped_signal(ctx):
    sig = (ctx.signal() * 250.0).round().clip(0, 65535).astype(np.uint16).view(np.int16).astype(np.float32)
    return _series(ctx, signal=sig)


def _write_twice(ctx):
    result = _fit_files(ctx)
    exam.write_exam(result, ctx.out)
    ctx.extra["first"] = bad.sha256_tree(ctx.out)
    return partial(exam.write_exam, result, ctx.out)


def _write_interrupted(ctx, monkeypatch):
    result = _fit_files(ctx)
    _interrupt_on(monkeypatch, images, "write_volume", 3, KeyboardInterrupt())
    return partial(exam.write_exam, result, ctx.out)


def _options(**kw):
    base = dict(aif_source="segment", blood_t10_s=1.6, r1_per_mM_s=4.5, fit_lesions_only=True)
    base.update(kw)
    return AnalysisOptions(**base)


API_CASES = [  # (id, build(ctx, monkeypatch) -> the call (inputs written), exception, regex | check(ctx, result))
    ("read_dce_frame_units_count",
     lambda c, mp: partial(series.read_dce, c.edited({LABELS: bad.frame_labels(np.arange(1, 61), 1), UNITS: "count"})),
     ValueError, r"{f}.*'count'.*--frame-interval"),
    ("read_dce_frame_units_count_with_interval",
     lambda c, mp: partial(series.read_dce, c.edited({UNITS: "count"}), frame_interval_s=5.0), None,
     lambda c, s: np.testing.assert_allclose(np.diff(s.t_s), 5.0)),
    ("read_dce_frame_units_sec",
     lambda c, mp: partial(series.read_dce, c.edited({LABELS: bad.frame_labels(t_s(c), 1), UNITS: "sec"})), None,
     lambda c, s: np.testing.assert_allclose(s.t_s, c.ph.t_s)),
    ("read_dce_interval_contradicts", lambda c, mp: partial(series.read_dce, c.dce, frame_interval_s=2.5), ValueError,
     r"{dce}.*contradicts.*--override-frame-times"),
    ("read_dce_interval_override", lambda c, mp: partial(series.read_dce, c.dce, 2.5, True), None,
     lambda c, s: np.testing.assert_allclose(np.diff(s.t_s), 2.5)),
    ("read_dce_truncated_nii_gz",
     lambda c, mp: partial(series.read_dce, bad.truncated(c.nifti(c.sidecar()), c.p("cut.nii.gz"), 0.5)), ValueError,
     r"cut\.nii\.gz: cannot be read.*complete\?"),
    ("read_dce_volume_timing_string",
     lambda c, mp: partial(series.read_dce, c.nifti(c.sidecar(VolumeTiming="0 5 10"))), ValueError,
     r"{side}: VolumeTiming is the text"),
    ("read_dce_nifti_sidecar",
     lambda c, mp: partial(series.read_dce, c.nifti(c.sidecar(MagneticFieldStrength=1.5))), None,
     lambda c, s: (s.tr_s == pytest.approx(0.004) and s.flip_angle_deg == 15 and s.field_strength_t == 1.5)
     or pytest.fail(f"sidecar values not read: {s.tr_s}, {s.flip_angle_deg}, {s.field_strength_t}")),
    ("analyse_frame_times_ms_as_s", lambda c, mp: partial(_analyse, c, _series(c, t_s=c.ph.t_s * 1000.0)), ValueError,
     r"5000 s apart.*ms read as s"),
    ("analyse_frame_times_s_as_ms", lambda c, mp: partial(_analyse, c, _series(c, t_s=c.ph.t_s / 1000.0)), ValueError,
     r"0\.005 s apart.*s read as ms"),
    ("analyse_int16_wrap", lambda c, mp: partial(_analyse, c, _wrapped_signal(c)), ValueError, r"int16 wrap"),
    ("analyse_header_tr_in_ms_as_s", lambda c, mp: partial(_analyse, c, _series(c, tr_s=4.0)), ValueError,
     r"TR = 4000 ms \(header of {dce}\)"),
    ("analyse_one_voxel_aif",
     lambda c, mp: partial(_analyse, c, aif_mask=bad.one_voxel_mask(c.labels == L["aorta"]) > 0), None,
     lambda c, r: any("only 1 voxel" in w for w in r.warnings) or pytest.fail(str(r.warnings))),
    ("analyse_baseline_detected", lambda c, mp: partial(_analyse, c), None,
     lambda c, r: r.provenance["n_baseline"]["source"].startswith("detected") or pytest.fail(str(r.provenance))),
    ("analyse_prescribed_aif",
     lambda c, mp: partial(_analyse, c, options=_options(aif_source="prescribed", blood_t10_s=None), aif_mask=None,
                           prescribed_aif=(c.ph.t_s, c.ph.cp, "test curve")), None,
     lambda c, r: np.testing.assert_allclose(r.cp_mM, c.ph.cp)),
    ("analyse_empty_fit_mask", lambda c, mp: partial(_analyse, c, fit_mask=np.zeros(SHAPE, bool)), ValueError,
     r"fit region \(mask\): has no voxel on the DCE grid"),
    ("analyse_mask_on_another_grid", lambda c, mp: partial(_analyse, c, fit_mask=np.ones((4, 24, 16), bool)),
     ValueError, r"mask shape \(4, 24, 16\) is not the DCE grid \(4, 48, 32\)"),
    ("fit_exam_t1_ms_read_as_s", lambda c, mp: partial(_fit_files, c, _options(t1_map_unit="s"), t1_map=_t1_ms(c)),
     ValueError, r"{f}: median T1 \d+(\.\d+)? s when read in s.*the map is in ms"),
    ("fit_exam_t1_s_read_as_ms", lambda c, mp: partial(_fit_files, c, _options(t1_map_unit="ms"), t1_map=c.bad(c.t1)),
     ValueError, r"{f}: median T1 0\.\d+ s when read in ms.*the map is in s"),
    ("fit_exam_t10_in_ms", lambda c, mp: partial(_fit_files, c, AnalysisOptions(t10_s=1400)), ValueError,
     r"looks like ms; give seconds \(1\.4\)"),
    ("fit_exam_aif_segment_and_mask", lambda c, mp: partial(_fit_files, c, aif_mask=c.aorta_mask()), ValueError,
     r"not both"),
    ("fit_exam_aif_csv",
     lambda c, mp: partial(_fit_files, c, _options(aif_source="prescribed", blood_t10_s=None), aif_segment=None,
                           lesions=["L2 metastasis"], aif_csv=c.csv(c.aif_text())), None,
     lambda c, r: r.provenance["aif"]["source"] == "prescribed" or pytest.fail(str(r.provenance["aif"]))),
    ("write_exam_refuses_to_overwrite", lambda c, mp: _write_twice(c), FileExistsError, r"{out}.*--overwrite"),
    ("write_exam_onto_an_input",
     lambda c, mp: partial(exam.write_exam, _fit_files(c), str(c.sh.root / "exam"), files=c.sh.files), ValueError,
     r"would replace the input"),
    ("write_exam_interrupted", _write_interrupted, KeyboardInterrupt, ""),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api(case, shared, tmp_path, monkeypatch):
    _, build, exc, expect = case
    ctx = Ctx(tmp_path, shared)
    call = build(ctx, monkeypatch)
    before = snapshot(ctx)
    if exc is None:
        expect(ctx, call())
    else:
        with pytest.raises(exc) as info:
            call()
        if expect:
            message = str(info.value)
            assert "\n" not in message.strip(), message
            assert re.search(ctx.fmt(expect), message), message
        created = sorted(set(snapshot(ctx)) - set(before))
        assert not created, f"a refused call wrote {created}"
    assert_untouched(ctx, before)
    if "first" in ctx.extra:                               # write_exam_refuses_to_overwrite: the first result stays
        assert bad.sha256_tree(ctx.out) == ctx.extra["first"]
