"""The end-to-end demo on the synthetic spine phantom: a baseline and a follow-up exam (the L2
metastasis responds - vp halves - while it grows, the L3 metastasis fails - vp rises - and the small L1
metastasis changes too little to be told from the cut-off), written as files, fitted once from those
files, compared lesion by lesion, set in a small cohort, and reported. The patient moves during the
follow-up exam (breathing and a shift halfway, :func:`moving_signal`); it is fitted with rigid motion
correction, and the report shows the displacement over time.

Writes into the output folder: ``report.html`` (self-contained), ``inputs/<exam>/`` (4D NRRD with
MultiVolume keys, T1 map, anatomy, ``.seg.nrrd``), ``<exam>/`` (maps as NRRD, statistics, curves,
summary; the follow-up's ``motion.csv``), ``<exam>.mrb`` (a Slicer scene per exam built from that same
fit, when the slicer-core wheel - the ``scene`` extra - is installed), ``figures/`` (PNG and SVG),
``responses.csv``/``.json`` and ``cohort.csv`` plus ``cohort_statistics.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np

from ..core import cohort, motion, phantom, pipeline
from ..core.options import AnalysisOptions
from ..core.registry import CALL_COLOURS, MAPS, MODELS
from ..files import exam, images, results
from ..files.series import write_dce_nrrd

# The reporting layer (matplotlib) is imported where figures are drawn, so write_exam_inputs and demo_options
# also work where matplotlib is not installed (Slicer's Python, whose tests use them to write input files).

log = logging.getLogger(__name__)

LESIONS = ("L2 metastasis", "L3 metastasis", "L1 metastasis")
#: The vertebrae, discs and canal are this many of the 6 slices wide (muscle beside them): anatomy that changes
#: across the slices, so that a registration can see motion across them too.
VERTEBRA_WIDTH_SLICES = 4
#: Per exam: {lesion: vp} changes and {lesion: radius factor}. At follow-up the L2 metastasis responds - its vp
#: halves - although it has grown (size says progression: the paper's point, AJNR 2023;44:1451); L3 fails (vp
#: rises); the small L1 metastasis changes by -18 %, too close to the -20 % cut-off for its voxels to tell.
EXAMS = {"baseline": ({}, {}),
         "follow-up": ({"L2 metastasis": 0.06, "L3 metastasis": 0.19, "L1 metastasis": 0.0984}, {"L2 metastasis": 1.3})}
#: The exams whose patient moved (:func:`moving_signal`) and the correction they are fitted with.
MOTION = {"follow-up": "rigid"}
TRUTH_OUTCOME = {"L2 metastasis": "success", "L3 metastasis": "failure", "L1 metastasis": "failure"}
AIF_SEGMENT = "aorta"
BLOOD_T10_S = 1.6
NO_SCENE = ("no .mrb scenes and slice renderings: they need the slicer-core wheel - "
            "pip install 'dceperfusion[scene]'")


def write_exam_inputs(folder, ph, matrix, signal=None) -> exam.ExamFiles:
    """Write one exam's inputs as a scanner and Slicer would leave them: the DCE series as a 4D NRRD with
    MultiVolume keys, a T1 map, an anatomy volume and a ``.seg.nrrd`` with the lesions and the aorta.
    ``signal``: the series to write instead of the phantom's own (e.g. :func:`moving_signal`'s); the
    anatomy, T1 map and segments stay in the phantom's (the reference) position."""
    acq = ph.acquisition
    dce = write_dce_nrrd(os.path.join(folder, "dce.nrrd"), ph.signal if signal is None else signal, ph.t_s, matrix,
                         acq["tr_s"], acq["flip_angle_deg"])
    lesions = [name for name in LESIONS if np.any(ph.labels == phantom.SPINE_LABELS[name])]   # those drawn
    segs = {name: ph.labels == phantom.SPINE_LABELS[name] for name in (*lesions, AIF_SEGMENT)}
    seg = images.write_segmentation(os.path.join(folder, "lesions.seg.nrrd"), segs, matrix)
    t1 = images.write_volume(os.path.join(folder, "t1.nrrd"), ph.t10_s.astype(np.float32), matrix)
    images.write_volume(os.path.join(folder, "anatomy.nrrd"), _anatomy(ph), matrix)
    return exam.ExamFiles(dce=dce, segmentation=seg, t1_map=t1, aif_segment=AIF_SEGMENT, lesions=lesions)


def _anatomy(ph) -> np.ndarray:
    """The anatomy volume (K, J, I) float32: the mean pre-contrast signal of the still phantom."""
    return ph.signal[..., : ph.acquisition["n_baseline"]].mean(axis=-1).astype(np.float32)


def demo_options(ph, motion_correction: str = "none") -> AnalysisOptions:
    """How the demo analyses an exam: T1 map, AIF from the aorta with a blood T10, Extended Tofts NLLS,
    and ``motion_correction`` (:data:`MOTION`: rigid for the exam whose patient moved)."""
    acq = ph.acquisition
    return AnalysisOptions(n_baseline=acq["n_baseline"], aif_source="segment", blood_t10_s=BLOOD_T10_S,
                           r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"], motion_correction=motion_correction)


def moving_signal(ph, matrix, seed: int = 0) -> np.ndarray:
    """The phantom's series as a patient who breathes and shifts halfway through gives it
    (:func:`phantom.breathing_and_step_motion`: breathing of up to 3 mm, a step of 4.6 mm and 3.5 degrees;
    the last frames, the reference, in the phantom's position). The step stays in the sagittal plane
    (with 6 slices of 4 mm, a shift across them would take a third of the volume out of view).
    Magnitude images are never negative: the cubic interpolation's overshoot at the edge of the air is
    cut at 0."""
    params = phantom.breathing_and_step_motion(ph.t_s, step_mm=(0.0, 3.0, 3.5), seed=seed)
    transforms = motion.euler_matrix(params, motion.centre_lps(ph.labels.shape, matrix))
    return np.maximum(phantom.move_series(ph.signal, matrix, transforms), 0.0)


def run(out_dir: str = "output", overwrite: bool = False, seed: int = 0, snr: float = 30.0, progress=log.info) -> dict:
    """Run the demo; returns a dict of what was computed and written (for the CLI and tests)."""
    from ..reporting import figures
    t_start = time.perf_counter()
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty - choose another folder or pass --overwrite")
    os.makedirs(out_dir, exist_ok=True)
    matrix = phantom.spine_matrix()
    results_by_exam, files, phantoms, signals = {}, {}, {}, {}
    for n, (label, (change, scale)) in enumerate(EXAMS.items()):
        ph = phantom.make_spine_phantom(lesion_vp=change, lesion_scale=scale, lesions=LESIONS, seed=seed + n, snr=snr,
                                        vertebra_width_slices=VERTEBRA_WIDTH_SLICES)
        phantoms[label] = ph
        correction = MOTION.get(label, "none")
        signals[label] = moving_signal(ph, matrix, seed=seed + n) if correction != "none" else ph.signal
        files[label] = write_exam_inputs(os.path.join(out_dir, "inputs", label), ph, matrix, signals[label])
        moved = f", the patient moving: {correction} motion correction" if correction != "none" else ""
        progress(f"fitting the {label} exam ({ph.labels.size} voxels x {ph.t_s.size} frames{moved})")
        results_by_exam[label] = exam.fit_exam(files[label], demo_options(ph, correction))
        exam.write_exam(results_by_exam[label], os.path.join(out_dir, label), overwrite=overwrite, files=files[label])

    progress("assessing the response")
    base, follow = results_by_exam["baseline"], results_by_exam["follow-up"]
    responses = pipeline.compare_exams(base.lesion_data(), follow.lesion_data(), list(LESIONS))
    rows = results.response_rows(responses)
    results.write_csv(os.path.join(out_dir, "responses.csv"), rows, overwrite)
    results.write_json(os.path.join(out_dir, "responses.json"), rows, overwrite)

    progress("cohort statistics (the two demo lesions and 47 synthetic lesions drawn like the AJNR 2023 cohort)")
    cohort_rows = [{"lesion_id": r.lesion, "patient_id": "demo", "outcome": TRUTH_OUTCOME[r.lesion],
                    "delta_vp_pct": f"{r.change_pct['vp']:.2f}",
                    "delta_size_pct": f"{r.size.change_pct['longest_diameter']:.2f}"} for r in responses]
    cohort_rows += cohort.synthetic_cohort(n_success=37, n_failure=10, seed=seed)
    results.write_csv(os.path.join(out_dir, "cohort.csv"), cohort_rows, overwrite)
    c = cohort.cohort_from_rows(cohort_rows, source="demo cohort")
    rep = cohort.cohort_report(c)
    results.write_json(os.path.join(out_dir, "cohort_statistics.json"), results.cohort_report_dict(rep), overwrite)

    ci = {r.lesion: (r.call.delta_vp_ci_lower_pct, r.call.delta_vp_ci_upper_pct) for r in responses}
    lower, upper = ([ci.get(lesion, (np.nan, np.nan))[i] for lesion in c.lesion_ids] for i in (0, 1))
    figs = {"waterfall": figures.waterfall(c.measures["delta_vp_pct"], c.failure, ci=(lower, upper)),
            "roc": figures.roc_curves({k: m.roc for k, m in rep.measures.items()}),
            "box": figures.box_strip(c.measures["delta_vp_pct"], c.failure)}
    mrbs, renders, note = _scenes(out_dir, results_by_exam, phantoms, matrix, progress, signals)
    if note:
        progress(note)
    figs.update(renders or _array_renders(results_by_exam, phantoms))
    figs.update(_curves_figures(results_by_exam))
    figs.update({f"motion {label}": figures.motion_figure(res.t_s, res.motion, title=f"Motion during the {label} exam "
                                                          f"({res.motion.kind} correction)")
                 for label, res in results_by_exam.items() if res.motion is not None})
    for name, fig in figs.items():
        figures.save(fig, os.path.join(out_dir, "figures", name.replace(" ", "_")))
    report_path = _write_report(out_dir, results_by_exam, responses, rep, figs, phantoms,
                                rendered_by_slicer=bool(renders))
    elapsed = time.perf_counter() - t_start
    progress(f"wrote {report_path} in {elapsed:.1f} s")
    return {"responses": responses, "cohort": rep, "report": report_path, "mrb": mrbs, "mrb_note": note,
            "results": results_by_exam, "phantoms": phantoms, "seconds": elapsed}


def _centre_ras(matrix, shape_kji):
    """The centre of the mid-sagittal slice (the phantom's slices run along K)."""
    nk, nj, ni = shape_kji
    return (matrix @ np.r_[(ni - 1) / 2, (nj - 1) / 2, nk // 2, 1.0])[:3]


def _scenes(out_dir, results_by_exam, phantoms, matrix, progress, signals):
    """A Slicer scene per exam (.mrb) holding the inputs a user would load - the DCE series as written
    (``signals``: moving where the patient moved), the anatomy in the reference position - and the outputs
    the module writes, built from the files' result (no second fit), and slice renderings for the report.
    Without the slicer-core wheel: nothing, and the note saying so."""
    try:
        from slicer import util

        from ..scene import analysis, headless, render
        from ..scene import phantom as scene_phantom
        from ..scene.output import set_ijk_to_ras
    except ImportError:
        return [], {}, NO_SCENE
    mrbs, images_by_exam = [], {}
    for label, res in results_by_exam.items():
        progress(f"building the Slicer scene of the {label} exam")
        hs = headless.headless_scene()
        ph = phantoms[label]
        seg_codes = {name: phantom.SPINE_LABELS[name] for name in (*LESIONS, AIF_SEGMENT)}
        nodes = scene_phantom.add_phantom(hs.scene, dataclasses.replace(ph, signal=signals[label]), matrix=matrix,
                                          name=f"DCE {label}", segments=seg_codes)
        if signals[label] is not ph.signal:       # the anatomy where the masks and maps are, not mid-motion
            util.updateVolumeFromArray(nodes.anatomy, _anatomy(ph))
        t1 = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"T1 map {label}")
        util.updateVolumeFromArray(t1, ph.t10_s.astype(np.float32))
        set_ijk_to_ras(t1, matrix)
        out = analysis.write_exam(hs.scene, res, label, anatomy=nodes.anatomy)
        mrbs.append(headless.save_bundle(hs.scene, os.path.join(out_dir, f"{label}.mrb")))
        centre = _centre_ras(matrix, nodes.labels.shape)

        view = {"ras_point": centre, "orientation": "Sagittal", "size": (360, 360)}
        images_by_exam[label] = {name: render.render_slice(hs.scene, hs.app_logic, nodes.anatomy, out.map_nodes[name],
                                                           opacity=0.75, **view) for name in ("vp", "ktrans")}
        images_by_exam[label]["anatomy"] = render.render_slice(hs.scene, hs.app_logic, nodes.anatomy, None, **view)
        images_by_exam[label]["outlines"] = {name: render.render_mask(hs.scene, hs.app_logic, nodes.anatomy,
                                                                      res.lesions[name], **view) for name in LESIONS}
    return mrbs, _pairs(images_by_exam), ""


def _pairs(images_by_exam) -> dict:
    """Baseline / follow-up figures of vp, Ktrans (the lesions outlined) and the anatomy from {exam: {name:
    RGB image, "outlines": {lesion: mask on the images' pixel grid}}}."""
    from ..reporting import figures
    out = {}
    exams = (images_by_exam["baseline"], images_by_exam["follow-up"])
    for name in ("vp", "ktrans", "anatomy"):
        info = MAPS.get(name)
        title = "anatomy" if info is None else (f"{info.title} ({info.unit})" if info.unit != "1" else info.title)
        out[f"{name} maps" if info else name] = figures.image_pair(
            *(e[name] for e in exams), titles=(f"{title}: baseline", f"{title}: follow-up"),
            colour_range=info.window if info else None, colour_label=title if info else "",
            outlines=tuple(e["outlines"] for e in exams) if info else None,
            outline_colours=figures.lesion_colours(LESIONS))
    return out


def _curves_figures(results_by_exam) -> dict:
    """Per exam its AIF and, per lesion, the mean concentration and model fit (colours as the outlines);
    the lesion panels of both exams on one scale, so a rise or drop reads as such."""
    from ..reporting import figures
    curves = {label: figures.lesion_curves_of(res.curves, LESIONS) for label, res in results_by_exam.items()}
    top = 1.05 * max((float(np.nanmax(c)) for lesions in curves.values() for pair in lesions.values() for c in pair),
                     default=0.0)
    return {f"curves {label}": figures.concentration_curves(
        res.t_s, res.cp_mM, curves[label], fit_label=f"{MODELS[res.fit.model].title} fit",
        aif_label=f"AIF (plasma, {AIF_SEGMENT} segment)", title=f"Concentration curves: {label}",
        colours=figures.lesion_colours(LESIONS), c_top_mM=top) for label, res in results_by_exam.items()}


def _array_renders(results_by_exam, phantoms, pixels: int = 360) -> dict:
    """The same pairs drawn from the arrays (matplotlib), when Slicer's slice logic is not available: each
    voxel of the slice a block of pixels (as Slicer shows a map unsmoothed, about ``pixels`` across), so
    an outline is thinner than a voxel."""
    from ..reporting import figures
    images_by_exam = {}
    for label, res in results_by_exam.items():
        ph = phantoms[label]
        k = ph.labels.shape[0] // 2
        f = max(1, pixels // max(ph.labels.shape[1:]))

        def grid(a):  # the slice top to bottom as the rendering shows it, each voxel f x f pixels
            return np.repeat(np.repeat(np.asarray(a)[::-1], f, axis=0), f, axis=1)
        anatomy = grid(_anatomy(ph)[k])
        images_by_exam[label] = {name: figures.overlay_rgb(anatomy, grid(res.maps[name][k]), MAPS[name].window,
                                                           zero_is_unfitted=MAPS[name].zero_is_unfitted)
                                 for name in ("vp", "ktrans")}
        images_by_exam[label]["anatomy"] = figures.overlay_rgb(anatomy, None)
        images_by_exam[label]["outlines"] = {name: grid(res.lesions[name][k]) for name in LESIONS}
    return _pairs(images_by_exam)


def _ci_text(row) -> str:
    """"lower to upper" of a response row's ΔVp 95 % CI (%), or "" when it has none."""
    lo, hi = row["delta_vp_ci_lower_pct"], row["delta_vp_ci_upper_pct"]
    return f"{lo:+.1f} to {hi:+.1f}" if lo is not None and hi is not None else ""


def _write_report(out_dir, results_by_exam, responses, rep, figs, phantoms, rendered_by_slicer: bool) -> str:
    from ..reporting.report import Report
    r = Report("DCE Perfusion - demo on the synthetic spine phantom")
    r.text("A sagittal lumbar-spine DCE study (60 frames of 5 s, SPGR, Rician noise) with three vertebral metastases, "
           "imaged before and after treatment: in the follow-up the L2 metastasis responds (vp halves) although it "
           "has grown - its size says progression, its vp says success (AJNR 2023;44:1451) -, the L3 metastasis "
           "fails (vp rises) and the small L1 metastasis changes by -18 %, too close to the -20 % cut-off for its "
           "95 % confidence interval to tell. The patient breathed and shifted halfway through the follow-up exam; "
           "its frames were registered to the last frames (rigid motion correction) before the fit. Both exams "
           "were written as files and analysed once from those files: T1 map, AIF from the aorta segment, Extended "
           "Tofts, nonlinear fit.")
    r.heading("Response per lesion")
    r.table([{"lesion": x["lesion"], "vp baseline": x["vp_baseline"], "vp follow-up": x["vp_followup"],
              "ΔVp %": x["delta_vp_pct"], "ΔVp 95 % CI": _ci_text(x), "ΔKtrans %": x["delta_ktrans_pct"],
              "call": x["call"], "reason": x["reason"], "truth": TRUTH_OUTCOME[x["lesion"]],
              "size call": x["size_call"], "warnings": x["warnings"] or "none"}
             for x in results.response_rows(responses)],
            caption="vp call: suspected failure when ΔVp > -20 %, indeterminate when its 95 % CI (block bootstrap) "
                    "straddles -20 %",
            colours=CALL_COLOURS)
    how = "rendered by Slicer's slice logic" if rendered_by_slicer else "drawn from the map arrays"
    for name in ("vp maps", "ktrans maps", "anatomy"):
        outlined = ", lesions outlined" if name != "anatomy" else ""
        r.figure(figs[name], caption=f"{name}: mid-sagittal slice, {how}{outlined}")
    r.heading("Concentration curves")
    r.text("Per exam: the arterial input (plasma concentration from the aorta segment) on top; below it one panel "
           "per lesion with the mean concentration of its fitted voxels (points) and the mean of their model curves "
           "(line), in the colour of the lesion's outline on the maps. The lesion panels of both exams share one "
           "scale.")
    for label in results_by_exam:
        r.figure(figs[f"curves {label}"], caption=f"concentration curves: {label}", width="75%")
    moved = [label for label, res in results_by_exam.items() if res.motion is not None]
    if moved:
        r.heading("Motion correction")
        for label in moved:
            res = results_by_exam[label]
            r.motion(label, res.t_s, res.motion, folder=label, fig=figs[f"motion {label}"])
    r.heading("Parameters against the truth")
    rows = []
    for label, res in results_by_exam.items():
        ph = phantoms[label]
        for lesion in LESIONS:
            sel = ph.labels == phantom.SPINE_LABELS[lesion]
            for key in ("ktrans", "ve", "vp"):
                truth = float(np.mean(ph.truth[key][sel]))
                fit = float(np.nanmedian(res.maps[key][sel]))
                row = {"exam": label, "lesion": lesion, "parameter": key, "truth (mean)": truth,
                       "fit (median)": fit, "bias %": 100 * (fit - truth) / truth}
                if f"{key}_se" in res.maps:        # the voxels' own standard errors (NaN at a bound: left out)
                    row["voxel SE (median)"] = float(np.nanmedian(res.maps[f"{key}_se"][sel]))
                rows.append(row)
    r.table(rows, caption="voxel SE: the median over the lesion of each voxel's standard error (the fit's "
                          "covariance), a voxel's precision - not that of the lesion's median" if
            any("voxel SE (median)" in x for x in rows) else "", digits=4)
    r.heading("Lesion statistics")
    for label, res in results_by_exam.items():
        r.table([x for x in results.statistics_rows(res.statistics) if x["map"] in ("ktrans", "ve", "vp", "kep")],
                caption=f"{label}: {res.aif_description}")
    r.heading("Cohort")
    r.text(f"{rep.n_lesions} lesions: the two demo lesions and 47 synthetic lesions drawn to match the group sizes and "
           "mean ΔVp of the AJNR 2023 cohort (38 successes, 11 failures).")
    rows = []
    for name, m in rep.measures.items():
        p = m.performance
        for label, prop in (("sensitivity", p.sensitivity), ("specificity", p.specificity)):
            lo, hi = prop.ci["wilson"]
            rows.append({"measure": name, "quantity": label, "value": prop.estimate, "k/n": f"{prop.k}/{prop.n}",
                         "95 % CI (Wilson)": f"{lo:.2f}-{hi:.2f}"})
        rows.append({"measure": name, "quantity": "AUC", "value": m.roc.auc, "k/n": "",
                     "95 % CI (Wilson)": f"{m.roc.auc_ci[0]:.2f}-{m.roc.auc_ci[1]:.2f} (DeLong)"})
        rows.append({"measure": name, "quantity": "Mann-Whitney p", "value": m.mann_whitney.p_value, "k/n": "",
                     "95 % CI (Wilson)": m.mann_whitney.method})
    r.table(rows)
    if rep.mcnemar is not None:
        r.text(f"McNemar (vp call vs size call): only vp correct {rep.mcnemar.b}, only size correct "
               f"{rep.mcnemar.c}, exact p = {rep.mcnemar.p_value:.3g}.")
    for name in ("waterfall", "roc", "box"):
        r.figure(figs[name], width="70%")
    return r.write(os.path.join(out_dir, "report.html"))
