"""The ``dceperfusion`` command line: ``fit``, ``assess``, ``cohort``, ``batch`` and ``demo``.

Every subcommand has ``--help`` with units; outputs are JSON and CSV (maps NRRD or NIfTI); existing
outputs are never overwritten without ``--overwrite`` and files are written under a temporary name and
then renamed; bad input ends with exit code 2 and one line on stderr naming the input and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import __version__, aif, fitting

log = logging.getLogger(__name__)


def _progress_bar(total_label: str):
    """A tqdm bar as a fitting progress callback (done, total)."""
    from tqdm import tqdm
    state = {}

    def update(done, total):
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=total_label, unit="vox", unit_scale=True, leave=False,
                                disable=None)
        state["bar"].n = done
        state["bar"].refresh()
        if done >= total:
            state["bar"].close()
    return update


def _exam_options(args):
    from .exams import ExamOptions
    return ExamOptions(n_baseline=args.baseline_frames, t10_s=args.t10, t1_path=args.t1, blood_t10_s=args.blood_t10,
                       tr_s=args.tr_ms / 1000.0 if args.tr_ms else None, flip_angle_deg=args.flip_deg,
                       r1_per_mM_s=args.r1, agent=args.agent, field_t=args.field, hct=args.hct, aif=args.aif,
                       aif_segment=args.aif_segment, model=args.model, method=args.method, fit_delay=args.fit_delay,
                       frame_interval_s=args.frame_interval, lesions=args.lesion or None)


def _fit(args) -> int:
    from . import exams
    if os.path.exists(os.path.join(args.out, "summary.json")) and not args.overwrite:
        raise FileExistsError(f"{args.out} already holds a result - choose another --out or pass --overwrite")
    exam = exams.fit_exam(args.dce, _exam_options(args), args.segmentation, progress=_progress_bar("fitting"))
    paths = exams.write_exam(exam, args.out, args.format, args.overwrite)
    print(json.dumps({"out": args.out, "aif": exam.aif_description, "status_counts": exam.result.status_counts(),
                      "files": [os.path.basename(p) for p in paths]}, indent=1))
    return 0


def _load_rows(path):
    from .exams import statistics_from_rows
    summary = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    if not os.path.exists(summary):
        raise ValueError(f"{path}: no summary.json - give the output folder of 'dceperfusion fit'")
    with open(summary, encoding="utf-8") as f:
        data = json.load(f)
    return statistics_from_rows(data.get("statistics", []))


def _assess(args) -> int:
    from . import exams, io, response
    from .demo import response_rows
    base, follow = _load_rows(args.baseline), _load_rows(args.followup)
    lesions = args.lesion or sorted({r.segment for r in base})
    if not lesions:
        raise ValueError(f"{args.baseline}: has no lesion statistics - fit it with --segmentation")
    masks = {}
    for label, path in (("baseline", args.baseline_seg), ("follow-up", args.followup_seg)):
        if path:
            masks[label] = io.read_segmentation(path)
    results = []
    for lesion in lesions:
        size = None
        if len(masks) == 2 and all(lesion in m[0] for m in masks.values()):
            size = response.size_change(response.size_measures(masks["baseline"][0][lesion], masks["baseline"][1]),
                                        response.size_measures(masks["follow-up"][0][lesion], masks["follow-up"][1]),
                                        args.size_progression)
        results.append(response.assess_lesion(response.exam_values(base, lesion, args.statistic),
                                              response.exam_values(follow, lesion, args.statistic), lesion,
                                              statistic=args.statistic, cutoff_pct=args.cutoff, size=size))
    rows = response_rows(results)
    os.makedirs(args.out, exist_ok=True)
    exams.write_csv(os.path.join(args.out, "responses.csv"), rows, args.overwrite)
    exams.write_json(os.path.join(args.out, "responses.json"), rows, args.overwrite)
    for r in rows:
        print(f"{r['lesion']}: {r['call']} ({r['reason']})")
    return 0


def _cohort(args) -> int:
    from . import cohort, exams, figures
    from .demo import _report_dict
    c = cohort.read_cohort_csv(args.csv)
    rep = cohort.cohort_report(c, vp_cutoff_pct=args.cutoff, size_cutoff_pct=args.size_cutoff)
    os.makedirs(args.out, exist_ok=True)
    exams.write_json(os.path.join(args.out, "cohort_statistics.json"), _report_dict(rep), args.overwrite)
    figs = {"waterfall": figures.waterfall(c.measures["delta_vp_pct"], c.failure, args.cutoff),
            "roc": figures.roc_curves({k: m.roc for k, m in rep.measures.items()}),
            "box": figures.box_strip(c.measures["delta_vp_pct"], c.failure, args.cutoff)}
    for name, fig in figs.items():
        for path in (os.path.join(args.out, f"{name}.png"), os.path.join(args.out, f"{name}.svg")):
            if os.path.exists(path) and not args.overwrite:
                raise FileExistsError(f"{path} exists - pass --overwrite")
        figures.save(fig, os.path.join(args.out, name))
    vp = rep.measures["vp"]
    print(f"{rep.n_lesions} lesions ({rep.n_failure} failures): vp sensitivity "
          f"{vp.performance.sensitivity.estimate:.0%}, specificity {vp.performance.specificity.estimate:.0%}, "
          f"AUC {vp.roc.auc:.2f} ({vp.roc.auc_ci[0]:.2f}-{vp.roc.auc_ci[1]:.2f}), "
          f"Mann-Whitney p = {vp.mann_whitney.p_value:.2g}")
    return 0


def _batch(args) -> int:
    from . import batch
    summary = batch.run_batch(args.manifest, args.out, _exam_options(args), scheduler=args.scheduler,
                              n_workers=args.workers, cutoff_pct=args.cutoff, overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in summary.items() if k != "exams"}, indent=1, default=str))
    return 0 if not summary["failed"] else 1


def _demo(args) -> int:
    from . import demo
    result = demo.run(args.out, overwrite=args.overwrite, seed=args.seed, snr=args.snr,
                      progress=lambda msg: print(msg, flush=True))
    print()
    for r in demo.response_rows(result["responses"]):
        truth = demo.TRUTH_OUTCOME[r["lesion"]]
        print(f"{r['lesion']}: ΔVp {r['delta_vp_pct']:+.1f} % -> {r['call']} (truth: {truth}); size: {r['size_call']}")
    print(f"\nOpen {result['report']} in a browser; {', '.join(result['mrb']) or 'no .mrb (slicer-core missing)'} "
          "open in 3D Slicer.")
    return 0


def _add_exam_options(p):
    g = p.add_argument_group("acquisition and model")
    g.add_argument("--baseline-frames", type=int, required=True, metavar="N",
                   help="number of pre-contrast frames before the bolus arrives")
    g.add_argument("--t10", type=float, default=1.0, metavar="S", help="constant pre-contrast T1 in s (default 1.0)")
    g.add_argument("--t1", metavar="FILE", help="pre-contrast T1 map (s or ms, detected) on the DCE grid, NRRD/NIfTI")
    g.add_argument("--blood-t10", type=float, metavar="S", help="pre-contrast T1 of blood in the AIF segment, s")
    g.add_argument("--tr-ms", type=float, metavar="MS", help="repetition time in ms (default: from the file)")
    g.add_argument("--flip-deg", type=float, metavar="DEG", help="flip angle in degrees (default: from the file)")
    g.add_argument("--frame-interval", type=float, metavar="S", help="time between frames in s, when the file has "
                   "no frame times")
    g.add_argument("--agent", default="gadobutrol", help="contrast agent for the relaxivity preset "
                   "(gadobutrol, gadoterate, gadopentetate or a trade name; default gadobutrol)")
    g.add_argument("--field", type=float, default=3.0, metavar="T",
                   help="field strength in tesla, 1.5 or 3 (default 3)")
    g.add_argument("--r1", type=float, metavar="PER_MM_S", help="relaxivity in 1/(mM s), instead of the preset")
    g.add_argument("--hct", type=float, default=0.42, help="hematocrit, fraction (default 0.42)")
    g.add_argument("--aif", default="parker", choices=list(aif.SOURCES),
                   help="arterial input: a population curve, 'segment' (mean of --aif-segment) or 'automatic'")
    g.add_argument("--aif-segment", metavar="NAME", help="segment of --segmentation inside an artery")
    g.add_argument("--model", default="extended_tofts", choices=list(fitting.MODEL_PARAMETERS),
                   help="kinetic model (default extended_tofts)")
    g.add_argument("--method", default="nlls", choices=["lls", "nlls"], help="lls: linear (Murase); nlls: "
                   "nonlinear least squares (default)")
    g.add_argument("--fit-delay", action="store_true", help="also fit the arterial delay (s)")
    g.add_argument("--lesion", action="append", metavar="NAME", help="segment to report (repeatable; default: all "
                   "but the AIF segment)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dceperfusion", description="Quantitative DCE-MRI perfusion (DCEPerfusion): "
                                "Ktrans, kep (1/min), ve, vp (fractions) maps, lesion statistics, the vp response "
                                "call and cohort statistics.")
    p.add_argument("--version", action="version", version=f"dceperfusion {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit one exam: maps, lesion statistics, summary",
                       description="Fit a DCE series (DICOM folder, 4D NRRD with MultiVolume keys, or 4D NIfTI with "
                                   "a JSON sidecar) and write the maps (NRRD/NIfTI, NaN where not fitted; see "
                                   "status), statistics.csv and summary.json.")
    f.add_argument("dce", help="DICOM folder, .nrrd or .nii/.nii.gz")
    f.add_argument("--segmentation", metavar="FILE", help=".seg.nrrd or labelmap with the lesions (and the artery)")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--format", default="nrrd", choices=["nrrd", "nii.gz"], help="map file format (default nrrd)")
    f.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_exam_options(f)
    f.set_defaults(func=_fit)

    a = sub.add_parser("assess", help="response of each lesion between two fitted exams",
                       description="Compare the lesion statistics of two 'fit' outputs: percent changes of vp, "
                                   "Ktrans, ve, kep and the call (suspected failure when ΔVp > the cut-off).")
    a.add_argument("baseline", help="output folder (or summary.json) of the baseline fit")
    a.add_argument("followup", help="output folder (or summary.json) of the follow-up fit")
    a.add_argument("--lesion", action="append", metavar="NAME", help="lesion to assess (default: all)")
    a.add_argument("--statistic", default="mean", choices=["mean", "median", "percentile_90"],
                   help="lesion statistic compared (default mean)")
    a.add_argument("--cutoff", type=float, default=-20.0, metavar="PCT", help="ΔVp cut-off in %% (default -20)")
    a.add_argument("--baseline-seg", metavar="FILE", help="baseline segmentation, for the size comparison")
    a.add_argument("--followup-seg", metavar="FILE", help="follow-up segmentation, for the size comparison")
    a.add_argument("--size-progression", type=float, default=20.0, metavar="PCT",
                   help="size call: progression when the longest diameter grows by this %% (default 20)")
    a.add_argument("--out", required=True, help="output folder (responses.csv, responses.json)")
    a.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    a.set_defaults(func=_assess)

    c = sub.add_parser("cohort", help="cohort statistics from a lesion table",
                       description="Mann-Whitney, sensitivity/specificity/PPV/NPV/accuracy with Wilson and "
                                   "Clopper-Pearson 95%% CIs, ROC/AUC (DeLong CI), Youden cut-off and McNemar, for "
                                   "vp and size; figures as PNG and SVG.")
    c.add_argument("csv", help="CSV with lesion_id, patient_id, outcome (success/failure), delta_vp_pct "
                               "[, delta_size_pct] (percent changes)")
    c.add_argument("--cutoff", type=float, default=-20.0, metavar="PCT", help="ΔVp cut-off in %% (default -20)")
    c.add_argument("--size-cutoff", type=float, default=20.0, metavar="PCT",
                   help="size change at which the size call says failure, %% (default 20)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    c.set_defaults(func=_cohort)

    b = sub.add_parser("batch", help="fit, assess and summarise a whole cohort on Dask",
                       description="Run every exam of a manifest (CSV: patient, lesion, timepoint, dce, "
                                   "segmentation, outcome; timepoint 'baseline' or 'follow-up') on a Dask cluster, "
                                   "assess every lesion and compute the cohort statistics. Finished exams are "
                                   "skipped on a re-run; a failing exam is listed with its error.")
    b.add_argument("manifest", help="manifest CSV (paths relative to it)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="an existing Dask scheduler (default: a local "
                   "cluster)")
    b.add_argument("--workers", type=int, default=2, help="workers of the local cluster (default 2)")
    b.add_argument("--cutoff", type=float, default=-20.0, metavar="PCT", help="ΔVp cut-off in %% (default -20)")
    b.add_argument("--overwrite", action="store_true", help="redo finished exams and replace outputs")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"dceperfusion: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
