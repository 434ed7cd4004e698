"""The ``dceperfusion`` command line: ``fit``, ``assess``, ``cohort``, ``batch`` and ``demo``.

Every subcommand has ``--help`` with units; outputs are JSON and CSV (maps NRRD or NIfTI); existing
outputs are never overwritten without ``--overwrite``, never onto an input, and are complete or absent
(:mod:`..files.atomic`). Bad input, a full disk or a folder that cannot be written end with exit code 2
and one line on stderr naming the input or path and the fix; Ctrl-C with exit code 130 and one line.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from types import SimpleNamespace

from .. import __version__
from ..core import registry            # plain Python: the command answers (and Ctrl-C) before numpy loads
from ..core.units import MS_PER_S

log = logging.getLogger(__name__)

#: The file 'assess --dicom-out' writes into its folder.
DICOM_SR = "response_sr.dcm"

#: The options' defaults, shown in --help: the registry's, which :class:`AnalysisOptions` uses too.
_DEFAULTS = SimpleNamespace(**registry.DEFAULT_OPTIONS)


def _progress_bar(label: str):
    """A tqdm bar as a chain progress callback (fraction 0..1, message); None (no bar) where tqdm is not
    installed, e.g. in Slicer's Python."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    state = {}

    def update(fraction, message):
        if "bar" not in state:
            state["bar"] = tqdm(total=100, desc=label, unit="%", leave=False, disable=None)
        bar = state["bar"]
        bar.n = int(round(100 * fraction))
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if fraction >= 1:
            bar.close()
    return update


def _options(args):
    """The analysis options from the parsed arguments (the command line only fills them in)."""
    from ..core.options import AnalysisOptions
    if args.override_frame_times and not args.frame_interval:
        raise ValueError("--override-frame-times: give the frame interval that replaces the file's frame times "
                         "(--frame-interval S)")
    return AnalysisOptions(
        n_baseline=args.baseline_frames, tr_s=args.tr_ms / MS_PER_S if args.tr_ms is not None else None,
        flip_angle_deg=args.flip_deg, frame_interval_s=args.frame_interval,
        override_frame_times=args.override_frame_times, t10_s=args.t10, blood_t10_s=args.blood_t10,
        contrast_agent=args.agent, field_strength_t=args.field, r1_per_mM_s=args.r1, aif_source=_aif_source(args),
        hct=args.hct, model=args.model, method=args.method, fit_delay=args.fit_delay,
        fit_lesions_only=args.fit_lesions_only, noise_sigma=_noise_sigma(args.noise_sigma),
        uncertainty=args.uncertainty, motion_correction=args.motion_correction,
        motion_reference_frames=args.motion_reference_frames).checked()


def _noise_sigma(value):
    """--noise-sigma: None, 'auto' or a number > 0 (signal units)."""
    if value is None or value == "auto":
        return value
    try:
        sigma = float(value)
    except ValueError:
        sigma = float("nan")
    if not sigma > 0 or sigma == float("inf"):
        raise ValueError(f"--noise-sigma {value}: give the noise sigma in signal units (a number > 0) or 'auto'")
    return sigma


def _aif_source(args) -> str:
    """--aif, or what the AIF inputs given imply (a CSV: prescribed; an artery: segment)."""
    implied = ("prescribed" if getattr(args, "aif_csv", None) else
               "segment" if args.aif_segment or getattr(args, "aif_mask", None) else None)
    if args.aif is None:
        return implied or _DEFAULTS.aif_source
    if implied and implied != args.aif:
        flag = "--aif-csv" if implied == "prescribed" else "--aif-segment/--aif-mask"
        raise ValueError(f"--aif {args.aif}: contradicts {flag} (an AIF of source '{implied}') - give one AIF")
    return args.aif


def _fit(args) -> int:
    from ..files import atomic, exam
    files = exam.ExamFiles(dce=args.dce, segmentation=args.segmentation, t1_map=args.t1,
                           aif_segment=args.aif_segment, lesions=args.lesion or None, aif_mask=args.aif_mask,
                           mask=args.mask, aif_csv=args.aif_csv, reference_segment=args.reference_segment)
    options = _options(args)
    atomic.check_not_inputs([args.out], files.inputs())          # refusals before the fit, not after
    atomic.check_folder_free(args.out, args.overwrite, exam.is_ours, exam.SUMMARY)
    if args.dicom_out:
        _check_dicom_out(args.dicom_out, args.out, args.dce, files.inputs(), args.overwrite)
    result = exam.fit_exam(files, options, progress=_progress_bar("fitting"))
    if args.dicom_out:
        record, paths = _write_exam_with_dicom(result, args, files)
    else:
        record, paths = None, exam.write_exam(result, args.out, args.format, args.overwrite, files=files)
    moved = exam.motion_summary(result)
    print(json.dumps({"out": args.out, "aif": result.aif_description, "status_counts": result.fit.status_counts(),
                      "motion": {k: moved[k] for k in ("correction", "max_displacement_mm", "max_displacement_voxels")
                                 if k in moved},
                      "warnings": result.warnings, "files": [os.path.basename(p) for p in paths],
                      **({"dicom_out": args.dicom_out, "dicom_files": [o["file"] for o in record["objects"]]}
                         if record else {})}, indent=1))
    return 0


def _check_dicom_out(dicom_dir: str, out_dir: str, dce: str, inputs: list, overwrite: bool) -> None:
    """Refusals of ``--dicom-out`` before the fit: a DCE input that is not a DICOM folder, or whose headers
    cannot be exported (:func:`dicomout.check_folder`), no highdicom, the folder being, holding or inside the
    result folder or an input, or holding other files."""
    from ..files import atomic, dicomout
    if not os.path.isdir(dce):
        raise ValueError(dicomout.NOT_DICOM.format(source=dce))
    dicomout.check_highdicom()
    mine = os.path.abspath(dicom_dir)
    for label, other in (("the --out folder", out_dir), *((f"the input {p}", p) for p in inputs if p)):
        other = os.path.abspath(other)
        if os.path.commonpath([mine, other]) in (mine, other):
            raise ValueError(f"--dicom-out {dicom_dir}: is, holds or lies inside {label} - give the DICOM objects a "
                             "folder of their own")
    try:
        atomic.check_folder_free(dicom_dir, overwrite, dicomout.is_ours, dicomout.RECORD)
    except FileExistsError:
        raise ValueError(f"--dicom-out {dicom_dir}: already holds DICOM results - choose another --dicom-out or pass "
                         "--overwrite") from None
    except ValueError as exc:
        raise ValueError(f"--dicom-out {str(exc).replace('output folder ', '', 1)}") from None
    dicomout.check_folder(dce)


def _write_exam_with_dicom(result, args, files) -> tuple:
    """(record, paths): the DICOM objects (:func:`dicomout.write_dicom_exam`), then the exam's folder, whose
    summary.json records them; DICOM objects whose exam folder then cannot be written are removed again."""
    import shutil
    from ..files import dicomout, exam
    existed = os.path.exists(args.dicom_out)
    record = dicomout.write_dicom_exam(result, args.dicom_out, args.overwrite)
    for note in record["notes"]:
        print(f"note: {note}", file=sys.stderr)
    try:
        return record, exam.write_exam(result, args.out, args.format, args.overwrite, files=files, dicom=record)
    except BaseException:
        if not existed:
            shutil.rmtree(args.dicom_out, ignore_errors=True)
        raise


def _assess(args) -> int:
    from ..core import examchecks, pipeline
    from ..files import dicomout, dicomsr, exam, results
    base = exam.read_exam_lesions(args.baseline, args.baseline_seg)
    follow = exam.read_exam_lesions(args.followup, args.followup_seg)
    records = sr_path = None
    if args.dicom_out:                                   # refused before the comparison when not possible
        records = dicomsr.exam_record(args.baseline), dicomsr.exam_record(args.followup)
        dicomsr.check_records(*records)
        if os.path.exists(os.path.join(args.dicom_out, dicomout.RECORD)):
            raise ValueError(f"--dicom-out {args.dicom_out}: holds the DICOM objects of a fit - give the SR a folder "
                             "of its own")
        sr_path = os.path.join(args.dicom_out, DICOM_SR)
    lesions = args.lesion or sorted({r.segment for r in base.statistics if r.segment != base.reference})
    if not lesions:
        raise ValueError(f"{args.baseline}: has no lesion statistics - fit it with --segmentation")
    responses = pipeline.compare_exams(base, follow, lesions, statistic=args.statistic, cutoff_pct=args.cutoff,
                                       progression_pct=args.size_progression,
                                       normalise_to_reference=examchecks.check_call_on(args.call_on),
                                       indeterminate_when_ci_straddles=not args.no_ci_indeterminate)
    rows = results.response_rows(responses)
    sr = dicomsr.build_response_sr(rows, *records) if records else None      # (its refusals come first too)
    _write_tables(args, {"responses.csv": rows, "responses.json": rows},
                  [args.baseline, args.followup, args.baseline_seg, args.followup_seg], [sr_path] if sr else ())
    if sr is not None:
        dicomsr.write_dataset(sr, sr_path)
    for r in rows:
        warned = f" - warnings: {r['warnings']}" if r["warnings"] else ""
        print(f"{r['lesion']}: {r['call']} ({r['reason']}){warned}")
    if sr is not None:
        print(f"DICOM SR (TID 1500 measurement report): {sr_path}")
    return 0


def _cohort(args) -> int:
    from ..core import cohort
    from ..files import results
    from ..reporting import figures
    c = cohort.read_cohort_csv(args.csv)
    rep = cohort.cohort_report(c, vp_cutoff_pct=args.cutoff, size_cutoff_pct=args.size_cutoff)
    targets = [os.path.join(args.out, f"{n}.{e}") for n in ("waterfall", "roc", "box") for e in ("png", "svg")]
    _write_tables(args, {"cohort_statistics.json": results.cohort_report_dict(rep)}, [args.csv], targets)
    figs = {"waterfall": figures.waterfall(c.measures["delta_vp_pct"], c.failure, args.cutoff),
            "roc": figures.roc_curves({k: m.roc for k, m in rep.measures.items()}),
            "box": figures.box_strip(c.measures["delta_vp_pct"], c.failure, args.cutoff)}
    for name, fig in figs.items():
        figures.save(fig, os.path.join(args.out, name))
    vp = rep.measures["vp"]
    print(f"{rep.n_lesions} lesions ({rep.n_failure} failures): vp sensitivity "
          f"{vp.performance.sensitivity.estimate:.0%}, specificity {vp.performance.specificity.estimate:.0%}, "
          f"AUC {vp.roc.auc:.2f} ({vp.roc.auc_ci[0]:.2f}-{vp.roc.auc_ci[1]:.2f}), "
          f"Mann-Whitney p = {vp.mann_whitney.p_value:.2g}")
    return 0


def _write_tables(args, tables: dict, inputs: list, more_targets=()) -> None:
    """Write JSON/CSV tables into ``args.out`` after checking every target (and ``more_targets``) is free
    and no input - so a refusal comes before anything is written."""
    from ..files import atomic, results
    paths = {os.path.join(args.out, name): rows for name, rows in tables.items()}
    atomic.check_not_inputs([*paths, *more_targets], inputs)
    for path in [*paths, *more_targets]:
        results.check_free(path, args.overwrite)
    os.makedirs(args.out, exist_ok=True)
    for path, rows in paths.items():
        (results.write_csv if path.endswith(".csv") else results.write_json)(path, rows, args.overwrite)


def _batch(args) -> int:
    from . import batch
    summary = batch.run_batch(args.manifest, args.out, _options(args), aif_segment=args.aif_segment,
                              scheduler=args.scheduler, n_workers=args.workers, cutoff_pct=args.cutoff,
                              overwrite=args.overwrite, aif_given=args.aif is not None, dicom_dir=args.dicom_out)
    print(json.dumps({k: v for k, v in summary.items() if k != "exams"}, indent=1, default=str))
    return 0 if not summary["failed"] else 1


def _demo(args) -> int:
    from . import demo
    from ..files import results
    result = demo.run(args.out, overwrite=args.overwrite, seed=args.seed, snr=args.snr,
                      progress=lambda msg: print(msg, flush=True))
    print()
    for r in results.response_rows(result["responses"]):
        truth = demo.TRUTH_OUTCOME[r["lesion"]]
        print(f"{r['lesion']}: ΔVp {r['delta_vp_pct']:+.1f} % -> {r['call']} (truth: {truth}); size: {r['size_call']}")
    scenes = f"; {', '.join(result['mrb'])} open in 3D Slicer" if result["mrb"] else ""   # else the demo said why
    print(f"\nOpen {result['report']} in a browser{scenes}.")
    return 0


def _add_cutoff(p):
    p.add_argument("--cutoff", type=float, default=registry.VP_CUTOFF_PCT, metavar="PCT",
                   help=f"ΔVp cut-off in %% (default {registry.VP_CUTOFF_PCT:g}): suspected failure above it")


def _add_output(p, out_help="output folder"):
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _add_dicom_out(p):
    p.add_argument("--dicom-out", metavar="DICOM_DIR",
                   help="also write the results as DICOM for a PACS, into this folder (DCE input read from DICOM "
                   "only): one Parametric Map per map (float, real-world units), a Segmentation of the segments "
                   "(and the AIF's artery), in the source study and frame of reference; needs highdicom")


def _add_exam_options(p):
    d = _DEFAULTS
    g = p.add_argument_group("acquisition and model")
    g.add_argument("--baseline-frames", type=int, metavar="N",
                   help="number of pre-contrast frames before the bolus arrives (default: detected from the signal "
                   "and reported in summary.json)")
    g.add_argument("--t10", type=float, default=d.t10_s, metavar="S",
                   help=f"constant pre-contrast T1 in s where no T1 map is given (default {d.t10_s:g})")
    g.add_argument("--blood-t10", type=float, metavar="S", help="pre-contrast T1 of blood in the AIF segment, s")
    g.add_argument("--tr-ms", type=float, metavar="MS", help="repetition time in ms (default: from the file)")
    g.add_argument("--flip-deg", type=float, metavar="DEG", help="flip angle in degrees (default: from the file)")
    g.add_argument("--frame-interval", type=float, metavar="S", help="time between frames in s, when the file has "
                   "no frame times (one that contradicts the file's frame times is refused)")
    g.add_argument("--override-frame-times", action="store_true", help="use --frame-interval instead of the frame "
                   "times in the file")
    g.add_argument("--agent", default=d.contrast_agent, help="contrast agent for the relaxivity preset "
                   f"({', '.join(registry.CONTRAST_AGENTS)} or a trade name; default {d.contrast_agent})")
    g.add_argument("--field", type=float, metavar="T", help="field strength in tesla, 1.5 or 3, for the "
                   "relaxivity preset (default: the DICOM MagneticFieldStrength, else "
                   f"{registry.DEFAULT_OPTIONS['field_strength_t']:g})")
    g.add_argument("--r1", type=float, metavar="PER_MM_S", help="relaxivity in 1/(mM s), instead of the preset")
    g.add_argument("--hct", type=float, default=d.hct, help=f"hematocrit, fraction (default {d.hct:g})")
    g.add_argument("--aif", choices=list(registry.AIF_SOURCES),
                   help="arterial input: a population curve, 'segment' (mean of --aif-segment or --aif-mask), "
                   "'automatic' or 'prescribed' (--aif-csv) (default: what the AIF inputs given imply, else "
                   f"{d.aif_source})")
    g.add_argument("--aif-segment", metavar="NAME", help="segment of the segmentation inside an artery: its name, "
                   "or a labelmap's label value (e.g. 1; a labelmap's segments are named 'label 1', 'label 2', ...)")
    g.add_argument("--model", default=d.model, choices=list(registry.MODELS),
                   help=f"kinetic model (default {d.model}); auto: per voxel the best of Patlak, Tofts and Extended "
                   "Tofts by AICc, with a model_choice map (1 Patlak, 2 Tofts, 3 Extended Tofts)")
    g.add_argument("--method", default=d.method, choices=list(registry.METHODS), help="lls: linear (Murase); nlls: "
                   f"nonlinear least squares (default {d.method})")
    g.add_argument("--fit-delay", action="store_true", help="also fit the arterial delay (s)")
    g.add_argument("--fit-lesions-only", action="store_true", help="fit only the voxels of the lesion segments")
    g.add_argument("--noise-sigma", metavar="S|auto", help="correct the Rician bias of the magnitude signal: the "
                   "noise sigma of one sample in signal units, or auto (from the baseline frames); default none")
    g.add_argument("--no-uncertainty", dest="uncertainty", action="store_false",
                   help="leave out the standard-error maps (ktrans_se, ve_se, ...; same unit as the map) - a little "
                   "faster")
    m = p.add_argument_group("motion correction")
    m.add_argument("--motion-correction", default=d.motion_correction, choices=list(registry.MOTION_CORRECTIONS),
                   help="register every frame to the reference before the fit (SimpleITK, mutual information): "
                   "rigid (6 degrees of freedom), affine (12), or model (model-driven rigid: then twice more to the "
                   "frames the fitted model predicts, so enhancement is not taken for motion; slowest) (default "
                   f"{d.motion_correction}); writes motion.csv (per frame: tx, ty, tz mm, rx, ry, rz degrees, the "
                   "largest displacement in mm) and warns above 1 voxel. The masks and T1 map are taken to be in the "
                   "reference position")
    m.add_argument("--motion-reference-frames", type=int, default=d.motion_reference_frames, metavar="N",
                   help="the reference is the mean of the last N frames, when the enhancement has plateaued "
                   f"(default {d.motion_reference_frames})")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (exit code 2), like every other error of the command."""

    def error(self, message):
        self.exit(2, f"dceperfusion: error: {message} - see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    # (long: only the declarations of the five subcommands and their help texts)
    p = _Parser(prog="dceperfusion", description="Quantitative DCE-MRI perfusion (DCEPerfusion): "
                                "Ktrans, kep (1/min), ve, vp (fractions) maps, lesion statistics, the vp response "
                                "call and cohort statistics.")
    p.add_argument("--version", action="version", version=f"dceperfusion {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fit", help="fit one exam: maps, lesion statistics, summary",
                       description="Fit a DCE series (DICOM folder, 4D NRRD with MultiVolume keys, or 4D NIfTI with "
                                   "a JSON sidecar) and write the maps (NRRD/NIfTI, NaN where not fitted; see "
                                   "status), statistics.csv and summary.json.")
    f.add_argument("dce", help="DICOM folder, .nrrd or .nii/.nii.gz")
    f.add_argument("--segmentation", metavar="FILE", help=".seg.nrrd or labelmap with the lesions (and the artery)")
    _add_output(f)
    f.add_argument("--format", default="nrrd", choices=["nrrd", "nii.gz"], help="map file format (default nrrd)")
    f.add_argument("--t1", metavar="FILE", help="pre-contrast T1 map (s or ms, detected), NRRD/NIfTI, any grid")
    f.add_argument("--lesion", action="append", metavar="NAME", help="segment to report (repeatable; default: all "
                   "but the AIF segment)")
    f.add_argument("--aif-mask", metavar="FILE", help="the artery as a labelmap or segmentation file of its own "
                   "(every non-zero voxel), any grid")
    f.add_argument("--mask", metavar="FILE", help="the region to fit, a labelmap or segmentation (every non-zero "
                   "voxel), any grid (default: every voxel)")
    f.add_argument("--reference-segment", metavar="NAME", help="segment of the segmentation in a normal-appearing "
                   "vertebral body: reported as the normal-marrow reference (its name or a labelmap's label value)")
    f.add_argument("--aif-csv", metavar="FILE", help="a prescribed AIF: CSV of time (s from the first frame) and "
                   "plasma concentration (mM)")
    _add_dicom_out(f)
    _add_exam_options(f)
    f.set_defaults(func=_fit)

    a = sub.add_parser("assess", help="response of each lesion between two fitted exams",
                       description="Compare the lesion statistics of two 'fit' outputs: percent changes of vp, "
                                   "Ktrans, ve, kep and the call (suspected failure when ΔVp > the cut-off).")
    a.add_argument("baseline", help="output folder (or summary.json) of the baseline fit")
    a.add_argument("followup", help="output folder (or summary.json) of the follow-up fit")
    a.add_argument("--lesion", action="append", metavar="NAME", help="lesion to assess (default: all)")
    a.add_argument("--statistic", default=registry.RESPONSE_STATISTICS[0], choices=registry.RESPONSE_STATISTICS,
                   help=f"lesion statistic compared (default {registry.RESPONSE_STATISTICS[0]})")
    _add_cutoff(a)
    a.add_argument("--no-ci-indeterminate", action="store_true",
                   help="call by ΔVp alone, also when its 95 %% CI straddles the cut-off (default: indeterminate then)")
    a.add_argument("--baseline-seg", metavar="FILE", help="baseline segmentation for the size comparison (default: "
                   "the lesions the fit used, lesions.seg.nrrd in its folder)")
    a.add_argument("--followup-seg", metavar="FILE", help="follow-up segmentation for the size comparison (default: "
                   "lesions.seg.nrrd in its folder)")
    a.add_argument("--size-progression", type=float, default=registry.SIZE_PROGRESSION_PCT, metavar="PCT",
                   help="size call: progression when the longest diameter grows by this %% "
                   f"(default {registry.SIZE_PROGRESSION_PCT:g})")
    a.add_argument("--call-on", default="vp", choices=["vp", "reference-normalised"],
                   help="make the call on the lesion's ΔVp (default) or on the change of its lesion/reference vp "
                   "ratio (both exams fitted with --reference-segment)")
    a.add_argument("--dicom-out", metavar="DICOM_DIR", help="also write the responses as a DICOM Structured Report "
                   "(TID 1500: each lesion's vp at both exams, the percent changes with the 95 %% CI of ΔVp, the "
                   "diameters, the call and its reason), DICOM_DIR/response_sr.dcm, in the follow-up's study; both "
                   "exams fitted from DICOM with 'fit --dicom-out'")
    _add_output(a, "output folder (responses.csv, responses.json)")
    a.set_defaults(func=_assess)

    c = sub.add_parser("cohort", help="cohort statistics from a lesion table",
                       description="Mann-Whitney, sensitivity/specificity/PPV/NPV/accuracy with Wilson and "
                                   "Clopper-Pearson 95%% CIs, ROC/AUC (DeLong CI), Youden cut-off and McNemar, for "
                                   "vp and size; figures as PNG and SVG.")
    c.add_argument("csv", help="CSV with lesion_id, patient_id, outcome (success/failure), delta_vp_pct "
                               "[, delta_size_pct] (percent changes)")
    _add_cutoff(c)
    c.add_argument("--size-cutoff", type=float, default=registry.SIZE_PROGRESSION_PCT, metavar="PCT",
                   help="size change at which the size call says failure, %% "
                   f"(default {registry.SIZE_PROGRESSION_PCT:g})")
    _add_output(c)
    c.set_defaults(func=_cohort)

    b = sub.add_parser("batch", help="fit, assess and summarise a whole cohort on Dask",
                       description="Run every exam of a manifest (CSV: patient, lesion, timepoint, dce, "
                                   "segmentation, outcome and optionally, per exam, t1, aif_mask, mask, "
                                   "baseline_frames and motion_correction; timepoint 'baseline' or 'follow-up') "
                                   "on a Dask cluster, assess every lesion and compute the cohort statistics. "
                                   "Finished exams are skipped on a re-run; a failing exam is listed with its "
                                   "error.")
    b.add_argument("manifest", help="manifest CSV (paths relative to it)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="an existing Dask scheduler (default: a local "
                   "cluster)")
    b.add_argument("--workers", type=int, default=2, help="workers of the local cluster (default 2)")
    _add_cutoff(b)
    b.add_argument("--overwrite", action="store_true", help="redo finished exams and replace outputs")
    b.add_argument("--dicom-out", metavar="DICOM_DIR",
                   help="also write every exam's results as DICOM (as fit --dicom-out), into DICOM_DIR/<patient>_"
                   "<timepoint>/, and each patient's response SR as DICOM_DIR/<patient>_response_sr.dcm; an exam "
                   "not read from DICOM is fitted without them (batch_summary.json says so)")
    _add_exam_options(b)
    b.set_defaults(func=_batch)

    d = sub.add_parser("demo", help="the end-to-end demo on the synthetic spine phantom",
                       description="A baseline and a follow-up exam of a synthetic lumbar spine (one metastasis "
                                   "responds, one fails) are written as files, fitted, compared, put in a small "
                                   "cohort and reported in OUT/report.html, with maps (NRRD) and a Slicer scene "
                                   "(.mrb) per exam.")
    d.add_argument("--out", default="output", help="output folder (default ./output)")
    d.add_argument("--overwrite", action="store_true", help="replace a previous demo output")
    d.add_argument("--snr", type=float, default=30.0, help="signal-to-noise ratio of muscle (default 30)")
    d.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    d.set_defaults(func=_demo)
    return p


class _HeldRecords(logging.Handler):
    """Log records kept until the command ends: shown after a success, dropped after an error - whose one
    line is then all the terminal shows (the warnings of a finished fit are also in its summary)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def show(self, stream):
        for record in self.records:
            print(self.format(record), file=stream)


def main(argv=None) -> int:
    """Run the command; its log records go to stderr (held until success unless -v), and the root
    logger is left as it was found."""
    root = logging.getLogger()
    level = root.level
    handler = None
    try:
        args = build_parser().parse_args(argv)
        handler = logging.StreamHandler(sys.stderr) if args.verbose else _HeldRecords()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO if args.verbose else logging.WARNING)
        logging.captureWarnings(True)      # library warnings (e.g. pydicom's on odd values) held the same way
        _quiet_itk()
        code = args.func(args)
    except KeyboardInterrupt:
        print("dceperfusion: interrupted - no partial result was left", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"dceperfusion: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # full disk, permission denied, read-only folder, file-size limit
        print(f"dceperfusion: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    finally:
        if handler is not None:
            root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
    if isinstance(handler, _HeldRecords):
        handler.show(sys.stderr)
    return code


def _quiet_itk() -> None:
    """ITK's own warnings (printed by C++ straight to stderr, e.g. "Analyze file is deprecated") off for
    this command: what matters reaches the user as a warning or error of ours."""
    try:
        import SimpleITK as sitk
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    except (ImportError, AttributeError):
        pass


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def _os_error(exc: OSError) -> str:
    """An OSError as one line naming the path and the fix."""
    path = exc.filename or "the output"
    reason = exc.strerror or str(exc)
    fixes = {errno.ENOSPC: "free some space", errno.EACCES: "choose a folder you can write to",
             errno.EPERM: "choose a folder you can write to", errno.EROFS: "choose a writable folder",
             errno.EFBIG: "raise the file-size limit (ulimit -f) or write elsewhere",
             getattr(errno, "EDQUOT", -1): "free some of your quota"}
    return _one_line(f"{path}: {reason} - {fixes.get(exc.errno, 'check the path and the disk')}")


if __name__ == "__main__":
    sys.exit(main())
