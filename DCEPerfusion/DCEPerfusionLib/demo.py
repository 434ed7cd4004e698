"""The end-to-end demo on the synthetic spine phantom: a baseline and a follow-up exam (the L2
metastasis responds - vp halves - and the L3 metastasis fails - vp rises), written as files, fitted
from those files, compared lesion by lesion, set in a small cohort, and reported.

Writes into the output folder: ``report.html`` (self-contained), ``inputs/<exam>/`` (4D NRRD with
MultiVolume keys, T1 map, anatomy, ``.seg.nrrd``), ``<exam>/`` (maps as NRRD, statistics, summary),
``<exam>.mrb`` (a Slicer scene per exam, when the slicer-core wheel is installed), ``figures/`` (PNG
and SVG), ``responses.csv``/``.json`` and ``cohort.csv`` plus ``cohort_statistics.json``.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from . import cohort, exams, figures, io, phantom, response
from .report import Report

log = logging.getLogger(__name__)

LESIONS = ("L2 metastasis", "L3 metastasis")
EXAMS = {"baseline": {}, "follow-up": {"L2 metastasis": 0.06, "L3 metastasis": 0.19}}
TRUTH_OUTCOME = {"L2 metastasis": "success", "L3 metastasis": "failure"}


def _exam_files(folder, ph, matrix):
    """Write one exam's inputs; returns (dce path, segmentation path, T1 path, anatomy path)."""
    sig = np.transpose(ph.signal, (2, 1, 0, 3))
    acq = ph.acquisition
    labels = np.transpose(ph.labels, (2, 1, 0))
    dce = io.write_dce_nrrd(os.path.join(folder, "dce.nrrd"), sig, ph.t_s, matrix, acq["tr_s"],
                            acq["flip_angle_deg"])
    segs = {name: labels == phantom.SPINE_LABELS[name] for name in (*LESIONS, "aorta")}
    seg = io.write_segmentation(os.path.join(folder, "lesions.seg.nrrd"), segs, matrix)
    t1 = io.write_volume(os.path.join(folder, "t1.nrrd"), np.transpose(ph.t10_s, (2, 1, 0)).astype(np.float32),
                         matrix)
    anatomy = io.write_volume(os.path.join(folder, "anatomy.nrrd"),
                              sig[..., : acq["n_baseline"]].mean(axis=-1).astype(np.float32), matrix)
    return dce, seg, t1, anatomy


def run(out_dir: str = "output", overwrite: bool = False, seed: int = 0, snr: float = 30.0, progress=log.info) -> dict:
    """Run the demo; returns a dict of what was computed and written (for the CLI and tests)."""
    t_start = time.perf_counter()
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty - choose another folder or pass --overwrite")
    os.makedirs(out_dir, exist_ok=True)
    matrix = phantom.spine_matrix()
    results, files, phantoms = {}, {}, {}
    for n, (exam, change) in enumerate(EXAMS.items()):
        ph = phantom.make_spine_phantom(lesion_vp=change, seed=seed + n, snr=snr)
        phantoms[exam] = ph
        files[exam] = _exam_files(os.path.join(out_dir, "inputs", exam), ph, matrix)
        dce, seg, t1, _ = files[exam]
        opts = exams.ExamOptions(n_baseline=ph.acquisition["n_baseline"], t1_path=t1, aif="segment",
                                 aif_segment="aorta", blood_t10_s=1.6, r1_per_mM_s=ph.acquisition["r1_per_mM_s"],
                                 hct=ph.acquisition["hct"], lesions=list(LESIONS))
        progress(f"fitting the {exam} exam ({ph.labels.size} voxels x {ph.t_s.size} frames)")
        results[exam] = exams.fit_exam(dce, opts, seg)
        exams.write_exam(results[exam], os.path.join(out_dir, exam), overwrite=overwrite)

    progress("assessing the response")
    base, follow = results["baseline"], results["follow-up"]
    responses = []
    for lesion in LESIONS:
        size = response.size_change(response.size_measures(base.masks[lesion], base.series.ijk_to_ras),
                                    response.size_measures(follow.masks[lesion], follow.series.ijk_to_ras))
        responses.append(response.assess_lesion(response.exam_values(base.statistics, lesion),
                                                response.exam_values(follow.statistics, lesion), lesion, size=size))
    rows = response_rows(responses)
    exams.write_csv(os.path.join(out_dir, "responses.csv"), rows, overwrite)
    exams.write_json(os.path.join(out_dir, "responses.json"), rows, overwrite)

    progress("cohort statistics (the two demo lesions and 47 synthetic lesions drawn like the AJNR 2023 cohort)")
    cohort_rows = [{"lesion_id": r.lesion, "patient_id": "demo", "outcome": TRUTH_OUTCOME[r.lesion],
                    "delta_vp_pct": f"{r.change_pct['vp']:.2f}",
                    "delta_size_pct": f"{r.size.change_pct['longest_diameter']:.2f}"} for r in responses]
    cohort_rows += cohort.synthetic_cohort(n_success=37, n_failure=10, seed=seed)
    exams.write_csv(os.path.join(out_dir, "cohort.csv"), cohort_rows, overwrite)
    c = cohort.cohort_from_rows(cohort_rows, source="demo cohort")
    rep = cohort.cohort_report(c)
    exams.write_json(os.path.join(out_dir, "cohort_statistics.json"), _report_dict(rep), overwrite)

    fig_dir = os.path.join(out_dir, "figures")
    figs = {"waterfall": figures.waterfall(c.measures["delta_vp_pct"], c.failure),
            "roc": figures.roc_curves({k: m.roc for k, m in rep.measures.items()}),
            "box": figures.box_strip(c.measures["delta_vp_pct"], c.failure)}
    renders, mrbs = _scenes(out_dir, results, files, phantoms, matrix, progress)
    figs.update(renders)
    for name, fig in figs.items():
        figures.save(fig, os.path.join(fig_dir, name.replace(" ", "_")))
    report_path = _write_report(out_dir, results, responses, rep, figs, phantoms)
    elapsed = time.perf_counter() - t_start
    progress(f"wrote {report_path} in {elapsed:.1f} s")
    return {"responses": responses, "cohort": rep, "report": report_path, "mrb": mrbs, "results": results,
            "phantoms": phantoms, "seconds": elapsed}


def response_rows(responses) -> list[dict]:
    rows = []
    for r in responses:
        rows.append({"lesion": r.lesion, "statistic": r.statistic,
                     "vp_baseline": r.baseline.get("vp"), "vp_followup": r.followup.get("vp"),
                     "delta_vp_pct": r.change_pct.get("vp"), "delta_ktrans_pct": r.change_pct.get("ktrans"),
                     "delta_ve_pct": r.change_pct.get("ve"), "delta_kep_pct": r.change_pct.get("kep"),
                     "call": r.call.call, "reason": r.call.reason,
                     "longest_diameter_baseline_mm": r.size.baseline.longest_diameter_mm if r.size else None,
                     "longest_diameter_followup_mm": r.size.followup.longest_diameter_mm if r.size else None,
                     "delta_longest_diameter_pct": r.size.change_pct["longest_diameter"] if r.size else None,
                     "size_call": r.size.call if r.size else None})
    return rows


def _report_dict(rep: cohort.CohortReport) -> dict:
    out = {"n_lesions": rep.n_lesions, "n_success": rep.n_success, "n_failure": rep.n_failure, "measures": {}}
    for name, m in rep.measures.items():
        p = m.performance
        out["measures"][name] = {
            "cutoff_pct": m.cutoff_pct, "mann_whitney_p": m.mann_whitney.p_value, "mann_whitney_method":
            m.mann_whitney.method, "auc": m.roc.auc, "auc_ci_delong": m.roc.auc_ci,
            "youden_cutoff": m.roc.youden_cutoff,
            **{k: {"estimate": getattr(p, k).estimate, "k": getattr(p, k).k, "n": getattr(p, k).n,
                   "ci": getattr(p, k).ci} for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")}}
    if rep.mcnemar is not None:
        out["mcnemar"] = {"only_vp_correct": rep.mcnemar.b, "only_size_correct": rep.mcnemar.c,
                          "p": rep.mcnemar.p_value}
    return out


def _scenes(out_dir, results, files, phantoms, matrix, progress):
    """A Slicer scene per exam (.mrb) with the module's own analysis, and slice renderings for the
    report. Skipped with a message when the slicer-core wheel is not installed."""
    try:
        from slicer import util

        from . import scene, scene_files, scene_phantom
        from .scene_output import WINDOW_PRESETS, set_ijk_to_ras
    except ImportError:
        log.warning("slicer-core is not installed: no .mrb scenes and no slice renderings (pip install slicer-core)")
        return {}, []
    renders, mrbs, images = {}, [], {}
    for exam, res in results.items():
        progress(f"building the Slicer scene of the {exam} exam")
        hs = scene_files.headless_scene()
        ph = phantoms[exam]
        seg_codes = {name: phantom.SPINE_LABELS[name] for name in (*LESIONS, "aorta")}
        nodes = scene_phantom.add_phantom(hs.scene, ph, matrix=matrix, name=f"DCE {exam}", segments=seg_codes)
        t1 = hs.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"T1 map {exam}")
        arr, m = io.read_volume(files[exam][2])
        util.updateVolumeFromArray(t1, arr.astype(np.float32))
        set_ijk_to_ras(t1, m)
        acq = ph.acquisition
        out = scene.run_analysis(hs.scene, scene.AnalysisInputs(
            dce_sequence=nodes.sequence, n_baseline=acq["n_baseline"], anatomy=nodes.anatomy, t1_map=t1,
            segmentation=nodes.segmentation, segment_ids=[nodes.segment_ids[n] for n in LESIONS],
            aif_source="segment", aif_segment_id=nodes.segment_ids["aorta"], blood_t10_s=1.6,
            r1_per_mM_s=acq["r1_per_mM_s"], hct=acq["hct"], exam_label=exam))
        mrbs.append(scene_files.save_bundle(hs.scene, os.path.join(out_dir, f"{exam}.mrb")))
        nk, nj, ni = nodes.labels_kji.shape
        centre = (matrix @ np.r_[(ni - 1) / 2, (nj - 1) / 2, nk // 2, 1.0])[:3]   # the mid-sagittal slice
        images[exam] = {name: scene_files.render_slice(hs.scene, hs.app_logic, nodes.anatomy, out.map_nodes[name],
                                                       ras_point=centre, orientation="Sagittal", size=(360, 360),
                                                       opacity=0.75)
                        for name in ("vp", "ktrans")}
        images[exam]["anatomy"] = scene_files.render_slice(hs.scene, hs.app_logic, nodes.anatomy, None,
                                                           ras_point=centre, orientation="Sagittal", size=(360, 360))
    for name, title in (("vp", "vp"), ("ktrans", "Ktrans (1/min)")):
        renders[f"{name} maps"] = figures.image_pair(images["baseline"][name], images["follow-up"][name],
                                                     titles=(f"{title}: baseline", f"{title}: follow-up"),
                                                     colour_range=WINDOW_PRESETS[name], colour_label=title)
    renders["anatomy"] = figures.image_pair(images["baseline"]["anatomy"], images["follow-up"]["anatomy"],
                                            titles=("anatomy: baseline", "anatomy: follow-up"))
    return renders, mrbs


def _write_report(out_dir, results, responses, rep, figs, phantoms) -> str:
    from .scene_response import CALL_COLOURS
    r = Report("DCE Perfusion - demo on the synthetic spine phantom")
    r.text("A sagittal lumbar-spine DCE study (60 frames of 5 s, SPGR, Rician noise) with two vertebral metastases, "
           "imaged before and after treatment: in the follow-up the L2 metastasis responds (vp halves) and the L3 "
           "metastasis fails (vp rises). Both exams were written as files and analysed from those files: T1 map, "
           "AIF from the aorta segment, Extended Tofts, nonlinear fit.")
    r.heading("Response per lesion")
    colours = {k: v for k, v in CALL_COLOURS.items()}
    r.table([{"lesion": x["lesion"], "vp baseline": x["vp_baseline"], "vp follow-up": x["vp_followup"],
              "ΔVp %": x["delta_vp_pct"], "ΔKtrans %": x["delta_ktrans_pct"], "call": x["call"],
              "truth": TRUTH_OUTCOME[x["lesion"]], "size call": x["size_call"]}
             for x in response_rows(responses)], caption="vp call: suspected failure when ΔVp > -20 %",
            colours=colours)
    for name in ("vp maps", "ktrans maps", "anatomy"):
        if name in figs:
            r.figure(figs[name], caption=f"{name}: mid-sagittal slice, rendered by Slicer's slice logic")
    r.heading("Parameters against the truth")
    rows = []
    for exam, res in results.items():
        ph = phantoms[exam]
        labels = np.transpose(ph.labels, (2, 1, 0))
        for lesion in LESIONS:
            sel = labels == phantom.SPINE_LABELS[lesion]
            for key in ("ktrans", "ve", "vp"):
                truth = float(np.mean(np.transpose(ph.truth[key], (2, 1, 0))[sel]))
                fit = float(np.nanmedian(res.result.maps[key][sel]))
                rows.append({"exam": exam, "lesion": lesion, "parameter": key, "truth (mean)": truth,
                             "fit (median)": fit, "bias %": 100 * (fit - truth) / truth})
    r.table(rows)
    r.heading("Lesion statistics")
    for exam, res in results.items():
        r.table([x for x in exams.statistics_rows(res.statistics) if x["map"] in ("ktrans", "ve", "vp", "kep")],
                caption=f"{exam}: {res.aif_description}")
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
