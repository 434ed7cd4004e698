"""What a motion correction leaves for the user: motion.csv, summary.json's ``motion`` entry, the
command line's options (and their refusals), the batch manifest's column, the figure of the
displacement over time and its section of the report. One small moving exam is registered once (a
module fixture); everything else reads its outputs or draws a synthetic motion."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from DCEPerfusionLib import phantom
from DCEPerfusionLib.apps import batch, cli, demo
from DCEPerfusionLib.core import motion
from DCEPerfusionLib.files import exam

COLUMNS = ["frame", "time_s", "tx_mm", "ty_mm", "tz_mm", "rx_deg", "ry_deg", "rz_deg", "displacement_mm"]
FAST = ["--baseline-frames", "6", "--r1", "4.5", "--blood-t10", "1.6", "--method", "lls", "--fit-lesions-only",
        "--no-uncertainty", "--aif-segment", "aorta", "--lesion", "L2 metastasis"]
N_FRAMES = 20


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A small spine exam whose patient moves (:func:`demo.moving_signal`), fitted by ``dceperfusion fit
    --motion-correction rigid`` in-process; the result the command wrote it from and the progress messages."""
    root = tmp_path_factory.mktemp("moved")
    matrix = phantom.spine_matrix((3.0, 3.0, 4.0))
    ph = phantom.make_spine_phantom(shape=(6, 48, 32), n_frames=N_FRAMES, seed=2, snr=40.0)
    files = demo.write_exam_inputs(str(root / "in"), ph, matrix, demo.moving_signal(ph, matrix))
    captured, messages = {}, []
    real = exam.fit_exam

    def spy(files_, options, progress=None):
        def record(fraction, message):
            messages.append(message)
            return progress(fraction, message) if progress else None
        captured["result"] = real(files_, options, progress=record)
        return captured["result"]

    args = ["fit", files.dce, "--segmentation", files.segmentation, "--out", str(root / "out"), *FAST,
            "--motion-correction", "rigid", "--motion-reference-frames", "4"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(exam, "fit_exam", spy)
        mp.setattr(sys, "stdout", io.StringIO())
        assert cli.main(args) == 0
        printed = json.loads(sys.stdout.getvalue())
    return {"root": root, "files": files, "out": root / "out", "result": captured["result"], "messages": messages,
            "args": args, "ph": ph, "printed": printed}


def _csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_motion_csv_has_a_row_per_frame_with_the_estimates_values(moved):
    est = moved["result"].motion
    assert est is not None and est.kind == "rigid"
    names, rows = _csv(moved["out"] / "motion.csv")
    assert names == COLUMNS and len(rows) == N_FRAMES
    assert [int(r["frame"]) for r in rows] == list(range(N_FRAMES))
    np.testing.assert_allclose([float(r["time_s"]) for r in rows], moved["ph"].t_s)
    np.testing.assert_allclose([[float(r[c]) for c in COLUMNS[2:8]] for r in rows], est.parameters, rtol=1e-12)
    np.testing.assert_allclose([float(r["displacement_mm"]) for r in rows], est.displacement_mm, rtol=1e-12)
    # the patient moved: several mm, the reference frames (the mean pose of the last 4) close to still
    assert est.max_displacement_mm > 3.0 and est.reference_frames == list(range(N_FRAMES - 4, N_FRAMES))


def test_summary_holds_the_motion_entry_and_the_options(moved):
    est = moved["result"].motion
    with open(moved["out"] / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    entry = summary["motion"]
    assert entry == {**json.loads(json.dumps(est.summary())), "file": "motion.csv"}
    assert entry["correction"] == "rigid" and entry["reference_frames"] == est.reference_frames
    assert entry["max_displacement_mm"] == pytest.approx(est.max_displacement_mm)
    assert entry["max_displacement_voxels"] == pytest.approx(est.max_displacement_mm / 3.0)
    assert entry["frame_of_max_displacement"] == int(np.argmax(est.displacement_mm))
    assert summary["options_given"]["motion_correction"] == "rigid"
    assert summary["options_given"]["motion_reference_frames"] == 4
    assert any(w.startswith("motion: frames moved up to") for w in summary["warnings"])   # above one voxel
    assert "motion.csv" in exam.OUR_NAMES and exam.is_ours("motion.csv")
    assert moved["printed"]["motion"] == {k: entry[k] for k in ("correction", "max_displacement_mm",
                                                                 "max_displacement_voxels")}
    assert "motion.csv" in moved["printed"]["files"]


def test_the_progress_shows_the_registration(moved):
    shown = moved["messages"]
    assert any(m.startswith("motion: the reference") for m in shown)
    assert any(m == f"motion: rigid registration, frame {N_FRAMES}/{N_FRAMES}" for m in shown)
    first_fit = next(i for i, m in enumerate(shown) if m.startswith("fitting"))
    assert all(not m.startswith("motion:") for m in shown[first_fit:])                 # registered before the fit


def test_without_correction_the_summary_says_none_and_no_motion_csv_is_written(moved, tmp_path, capsys):
    args = ["fit", moved["files"].dce, "--segmentation", moved["files"].segmentation, "--out", str(tmp_path / "o"),
            *FAST]
    capsys.readouterr()
    assert cli.main(args) == 0
    with open(tmp_path / "o" / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["motion"] == {"correction": "none"} and "motion" not in summary["values_used"]
    assert json.loads(capsys.readouterr().out)["motion"] == {"correction": "none"}
    assert summary["options_given"]["motion_correction"] == "none"
    assert not (tmp_path / "o" / "motion.csv").exists()


def test_a_result_is_refitted_only_when_the_motion_options_changed(moved, tmp_path):
    files = exam.ExamFiles(dce=moved["files"].dce, segmentation=moved["files"].segmentation, aif_segment="aorta",
                           lesions=["L2 metastasis"])
    same = cli._options(cli.build_parser().parse_args(moved["args"]))
    assert exam.settings_differ(str(moved["out"]), files, same) == []
    assert exam.settings_differ(str(moved["out"]), files, dataclasses.replace(same, motion_correction="none")) == \
        ["motion_correction"]
    assert exam.settings_differ(str(moved["out"]), files, dataclasses.replace(same, motion_reference_frames=5)) == \
        ["motion_reference_frames"]
    # a result from before the motion options existed was made without correction; without correction the
    # number of reference frames does not matter
    with open(moved["out"] / "summary.json", encoding="utf-8") as f:
        old = json.load(f)
    for key in ("motion_correction", "motion_reference_frames"):
        del old["options_given"][key]
    (tmp_path / "summary.json").write_text(json.dumps(old), encoding="utf-8")
    still = dataclasses.replace(same, motion_correction="none")
    assert exam.settings_differ(str(tmp_path), files, still) == []
    assert exam.settings_differ(str(tmp_path), files, dataclasses.replace(still, motion_reference_frames=3)) == []
    assert exam.settings_differ(str(tmp_path), files, same) == ["motion_correction", "motion_reference_frames"]
    assert exam.settings_differ(str(tmp_path), files, dataclasses.replace(same, motion_reference_frames=5)) == \
        ["motion_correction"]


def test_the_batch_manifest_column_sets_the_correction_per_exam(moved, tmp_path):
    files = moved["files"]
    manifest = tmp_path / "manifest.csv"
    rows = [("P1", "baseline", ""), ("P1", "follow-up", "Rigid"), ("P2", "baseline", "model")]
    manifest.write_text("patient,lesion,timepoint,dce,segmentation,outcome,motion_correction\n" + "".join(
        f"{p},L2 metastasis,{tp},{files.dce},{files.segmentation},success,{mc}\n" for p, tp, mc in rows))
    jobs, _ = batch.read_manifest(str(manifest), str(tmp_path / "b"))
    assert [j.motion_correction for j in jobs] == ["", "rigid", "model"]
    manifest.write_text(manifest.read_text().replace("model", "elastic"))
    with pytest.raises(ValueError, match=r"row 3.*motion_correction: motion correction 'elastic': use one of none, "
                                         r"rigid, affine, model"):
        batch.read_manifest(str(manifest), str(tmp_path / "b"))
    # the column wins over the command line's option: the exam fitted with rigid correction is finished
    options = dataclasses.replace(cli._options(cli.build_parser().parse_args(moved["args"])), motion_correction="none",
                                  n_baseline=None)
    job = batch.ExamJob("P1_follow-up", "P1", "follow-up", files.dce, files.segmentation, "", ["L2 metastasis"],
                        str(moved["out"]), baseline_frames=6, motion_correction="rigid")
    assert batch.run_exam(job, options, aif_segment="aorta") == {"exam_id": "P1_follow-up", "status": "skipped"}
    plain = batch.run_exam(dataclasses.replace(job, motion_correction=""), options, aif_segment="aorta")
    assert plain["status"] == "failed" and "other motion_correction - pass --overwrite" in plain["error"]


def test_the_options_reach_the_analysis_and_bad_values_are_one_line(moved, tmp_path, capsys):
    parser = cli.build_parser()
    base = ["fit", "x.nrrd", "--out", "o", "--baseline-frames", "6"]
    opts = cli._options(parser.parse_args([*base, "--motion-correction", "affine", "--motion-reference-frames", "8"]))
    assert (opts.motion_correction, opts.motion_reference_frames) == ("affine", 8)
    plain = cli._options(parser.parse_args(base))
    assert (plain.motion_correction, plain.motion_reference_frames) == ("none", motion.REFERENCE_FRAMES)
    b = cli._options(parser.parse_args(["batch", "m.csv", "--out", "o", "--motion-correction", "model"]))
    assert b.motion_correction == "model"
    dce, seg = moved["files"].dce, moved["files"].segmentation
    cases = [([*base, "--motion-reference-frames", "0"], "motion reference frames = 0: must be a whole number of at "
              "least 1"),
             ([*base, "--motion-reference-frames", "2.5"], "argument --motion-reference-frames: invalid int value"),
             (["fit", dce, "--segmentation", seg, "--out", str(tmp_path / "x"), *FAST, "--motion-correction", "rigid",
               "--motion-reference-frames", str(N_FRAMES)],
              f"motion reference frames = {N_FRAMES}: the series has only {N_FRAMES} frames - use fewer")]
    for args, message in cases:
        capsys.readouterr()
        try:
            code = cli.main(args)
        except SystemExit as exc:          # argparse's usage errors exit (as the command does: code 2)
            code = exc.code
        assert code == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    # as a user runs it: a process, exit code 2 and one line naming the choices
    run = subprocess.run([sys.executable, "-m", "DCEPerfusionLib", *base, "--motion-correction", "elastic"],
                         capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "--motion-correction: invalid choice: 'elastic' (choose from 'none', 'rigid', 'affine', 'model')" in \
        run.stderr
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["fit", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--motion-correction {none,rigid,affine,model}" in shown and "--motion-reference-frames N" in shown


# ------------------------------------------------------------------------------------ figure and report
def _synthetic_estimate(n=30, voxel_mm=1.5):
    t_s = np.arange(n) * 5.0
    params = phantom.breathing_and_step_motion(t_s, seed=3)
    c = np.array([10.0, -20.0, 5.0])
    transforms = motion.euler_matrix(params, c)
    corners = motion.box_corners_lps((6, 40, 30), np.diag([voxel_mm, voxel_mm, 4.0, 1.0]))
    est = motion.MotionEstimate("rigid", transforms, c, params, motion.displacements_mm(transforms, corners),
                                motion.reference_frames(n), voxel_mm)
    return t_s, est


def test_the_motion_figure_draws_the_displacement_whole_with_the_voxel_line_and_the_reference():
    pytest.importorskip("matplotlib", reason="the figures need matplotlib (Slicer does not bundle it)")
    import io

    from matplotlib.colors import to_rgb

    from DCEPerfusionLib import figures
    t_s, est = _synthetic_estimate()
    fig = figures.motion_figure(t_s, est)
    fig.savefig(io.BytesIO(), format="png")                      # laid out and drawn: the limits as shown
    ax, ax_t, ax_r = fig.axes
    (curve,) = [line for line in ax.get_lines() if line.get_label().startswith("largest displacement")]
    x, y = (np.asarray(v, dtype=float) for v in curve.get_data())
    np.testing.assert_allclose(x, t_s)
    np.testing.assert_allclose(y, est.displacement_mm)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 <= x.min() and x.max() <= x1 and y0 <= 0 and y.max() < y1          # the whole curve on the chart
    (voxel,) = [line for line in ax.get_lines() if line.get_label() == "1 voxel (1.5 mm)"]
    assert np.all(np.asarray(voxel.get_ydata(), dtype=float) == 1.5) and voxel.get_linestyle() == "--"
    assert y0 < 1.5 < y1
    assert any(t.get_text() == "1 voxel" for t in ax.texts)                     # labelled on the line too
    (worst,) = [line for line in ax.get_lines() if line.get_label().startswith("largest: ")]
    k = int(np.argmax(est.displacement_mm))
    assert worst.get_xdata()[0] == t_s[k] and worst.get_ydata()[0] == est.displacement_mm[k]
    assert f"{est.max_displacement_mm:.1f} mm ({est.max_displacement_voxels:.1f} voxels), frame {k}" in \
        worst.get_label()
    (shade,) = [p for p in ax.patches if p.get_label().startswith("reference: mean of frames 25-29")]
    xs = shade.get_patch_transform().transform(shade.get_path().vertices)[:, 0]   # (a Polygon or a Rectangle)
    assert t_s[24] < xs.min() < t_s[25] and t_s[29] < xs.max()                     # the reference frames, only
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(legend) >= {"1 voxel (1.5 mm)", curve.get_label(), worst.get_label()}
    for a, cols, unit in ((ax_t, slice(0, 3), "(mm)"), (ax_r, slice(3, 6), "(degrees)")):
        assert a.get_ylabel().endswith(unit)
        drawn = [line for line in a.get_lines() if not line.get_label().startswith("_")]
        assert [line.get_label() for line in drawn][:3] in (["tx", "ty", "tz"], ["rx", "ry", "rz"])
        for line, values in zip(drawn, est.parameters[:, cols].T):
            np.testing.assert_allclose(line.get_ydata(), values)
            lo, hi = a.get_ylim()
            assert lo <= values.min() and values.max() <= hi
        handles = dict(zip([t.get_text() for t in a.get_legend().get_texts()], a.get_legend().legend_handles))
        assert all(to_rgb(handles[line.get_label()].get_color()) == to_rgb(line.get_color()) for line in drawn)
    assert ax_r.get_xlabel() == "time (s)" and ax.get_ylabel() == "displacement (mm)"
    with pytest.raises(ValueError, match="29 frame times for a motion of 30 frames"):
        figures.motion_figure(t_s[:-1], est)


def test_the_report_gives_the_largest_displacement_and_the_figure(tmp_path):
    pytest.importorskip("matplotlib", reason="the figures need matplotlib (Slicer does not bundle it)")
    from DCEPerfusionLib.reporting.report import Report
    t_s, est = _synthetic_estimate()
    r = Report("motion")
    r.motion("follow-up", t_s, est, folder="follow-up")
    html = open(r.write(str(tmp_path / "r.html")), encoding="utf-8").read()
    k = int(np.argmax(est.displacement_mm))
    over = int(np.sum(est.displacement_mm > 1.5))
    assert (f"Largest displacement of the fit region {est.max_displacement_mm:.1f} mm "
            f"({est.max_displacement_voxels:.1f} voxels of 1.5 mm) at frame {k} ({t_s[k]:g} s); {over} of 30 frames "
            "moved more than 1 voxel") in html
    assert "mean of frames 25-29" in html and "follow-up/motion.csv" in html
    assert html.count("data:image/png;base64,") == 1 and 'alt="motion: follow-up (rigid correction)' in html
