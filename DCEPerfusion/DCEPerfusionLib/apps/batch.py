"""A whole cohort from a manifest, on Dask: every exam fitted (in parallel on a local cluster or an
existing scheduler), every lesion assessed, the cohort statistics computed.

Manifest (CSV): ``patient, lesion, timepoint, dce, segmentation, outcome`` and optionally, per exam,
``t1`` (a T1 map), ``aif_mask`` (the artery as a mask file of its own: that exam's AIF is image-derived
from it, instead of the command line's ``--aif-segment``), ``mask`` (the fit region),
``baseline_frames`` (instead of the command line's, or of the detected number) and ``motion_correction``
(none, rigid, affine or model: instead of the command line's ``--motion-correction``, e.g. for the one
exam whose patient moved); one row per lesion and
timepoint ("baseline" / "follow-up"); paths relative to the manifest; ``outcome`` (success / failure) may
be empty when unknown. Exams (patient + timepoint) are fitted once for
all their lesions, by the same files adapter as ``dceperfusion fit``, and compared by the same response
chain as ``dceperfusion assess`` (:func:`pipeline.compare_exams`, with the size change).
Resumable: an exam whose result was made with the same inputs and options is not fitted again (one made
with others fails, naming them, unless ``--overwrite``). A failing exam does not stop the
others; it is listed with its error in ``batch_summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from ..core.registry import VP_CUTOFF_PCT

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("patient", "lesion", "timepoint", "dce", "segmentation", "outcome")
#: Optional columns, per exam (the same in every row of the exam): paths, the baseline frames and the motion
#: correction.
EXAM_COLUMNS = ("t1", "aif_mask", "mask", "baseline_frames", "motion_correction")
TIMEPOINTS = ("baseline", "follow-up")


@dataclasses.dataclass
class ExamJob:
    exam_id: str
    patient: str
    timepoint: str
    dce: str
    segmentation: str
    t1: str
    lesions: list
    out_dir: str
    aif_mask: str = ""
    mask: str = ""
    baseline_frames: int | None = None
    motion_correction: str = ""

    def settings(self) -> tuple:
        return self.dce, self.segmentation, self.t1, self.aif_mask, self.mask, self.baseline_frames, \
            self.motion_correction


def read_manifest(path: str, out_dir: str) -> tuple[list[ExamJob], list[dict]]:
    """Exam jobs and lesion rows from a manifest (CSV, read by :func:`core.tables.read_table`: UTF-8,
    comma/semicolon/tab, a header naming the columns); ValueError naming the manifest, the row and the fix."""
    from ..core import tables
    table = tables.read_table(path, "manifest", ",".join(MANIFEST_COLUMNS))
    table.require(MANIFEST_COLUMNS)
    rows = table.rows
    if not rows:
        raise ValueError(f"{table.label}: has no rows - give one row per lesion and timepoint")
    base = os.path.dirname(os.path.abspath(path))
    jobs: dict[tuple, ExamJob] = {}
    for n, r in enumerate(rows, start=1):
        where = table.where(n)
        if r["timepoint"] not in TIMEPOINTS:
            raise ValueError(f"{where}: timepoint {r['timepoint']!r} is not 'baseline' or 'follow-up'")
        if r["outcome"] and r["outcome"].lower() not in ("success", "failure"):
            raise ValueError(f"{where}: outcome {r['outcome']!r} is not success, failure or empty")
        if not r["patient"] or not r["lesion"]:
            raise ValueError(f"{where}: patient and lesion must not be empty")
        if not r["dce"]:
            raise ValueError(f"{where}: dce is empty - give the DCE series of the exam")
        key = (r["patient"], r["timepoint"])
        paths = {c: os.path.join(base, r[c]) if r.get(c) else "" for c in ("dce", "segmentation", "t1", "aif_mask",
                                                                           "mask")}
        baseline_frames = _baseline_frames(r.get("baseline_frames"), where)
        exam_id = exam_id_of(r["patient"], r["timepoint"])
        found = ExamJob(exam_id, r["patient"], r["timepoint"], paths["dce"], paths["segmentation"], paths["t1"], [],
                        os.path.join(out_dir, "exams", exam_id), paths["aif_mask"], paths["mask"], baseline_frames,
                        _motion_correction(r.get("motion_correction"), where))
        job = jobs.setdefault(key, found)
        if job.settings() != found.settings():
            raise ValueError(f"{where}: patient {r['patient']} {r['timepoint']} lists another dce, segmentation, "
                             f"{', '.join(EXAM_COLUMNS)} than an earlier row - one exam per patient and timepoint")
        job.lesions.append(r["lesion"])
    return list(jobs.values()), rows


def _baseline_frames(value, where):
    """A manifest's baseline_frames, checked by the options' own rule (empty: none)."""
    from ..core.options import AnalysisOptions
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = value
    try:
        return AnalysisOptions(n_baseline=number).checked().n_baseline
    except ValueError as exc:
        raise ValueError(f"{where}: baseline_frames: {exc}") from None


def _motion_correction(value, where) -> str:
    """A manifest's motion_correction (empty: the command line's), checked against the choices."""
    from ..core import motion
    if not value:
        return ""
    try:
        return motion.check_choice(value)
    except ValueError as exc:
        raise ValueError(f"{where}: motion_correction: {exc}") from None


def exam_id_of(patient: str, timepoint: str) -> str:
    return f"{patient}_{timepoint}".replace(os.sep, "_")


def run_exam(job: ExamJob, options, aif_segment: str | None = None, overwrite: bool = False,
             aif_given: bool = False, dicom_dir: str | None = None) -> dict:
    """Fit one exam (a Dask task) into ``job.out_dir``. Returns {"exam_id", "status": ok|skipped|failed[, "error"]}.
    A finished exam is skipped when it was made with the same inputs and options (and, with ``dicom_dir``,
    its DICOM objects are there), and fails (naming what changed) when not, unless ``overwrite``.
    ``aif_given``: the AIF source was chosen on the command line (then an ``aif_mask`` column must not
    contradict it). ``dicom_dir``: the exam's DICOM objects go to ``dicom_dir/<exam_id>``
    (:func:`files.dicomout.write_dicom_exam`); an exam not read from DICOM is fitted without them, and its
    result says why under "dicom"."""
    from ..files import dicomout, exam
    try:
        files = exam.ExamFiles(dce=job.dce, segmentation=job.segmentation or None, t1_map=job.t1 or None,
                               aif_segment=None if job.aif_mask else aif_segment, lesions=list(job.lesions),
                               aif_mask=job.aif_mask or None, mask=job.mask or None)
        if job.aif_mask:
            if aif_given and options.aif_source != "segment":
                raise ValueError(f"manifest column aif_mask ({job.aif_mask}): contradicts --aif {options.aif_source} - "
                                 "leave --aif out or empty the column")
            options = dataclasses.replace(options, aif_source="segment")
        if job.baseline_frames:
            options = dataclasses.replace(options, n_baseline=job.baseline_frames)
        if job.motion_correction:
            options = dataclasses.replace(options, motion_correction=job.motion_correction)
        exam_dicom = os.path.join(dicom_dir, job.exam_id) if dicom_dir else None
        skipped_dicom = None
        if exam_dicom is not None and not os.path.isdir(job.dce):       # fitted all the same, without DICOM
            exam_dicom, skipped_dicom = None, dicomout.NOT_DICOM.format(source=job.dce)
        if os.path.exists(os.path.join(job.out_dir, exam.SUMMARY)) and not overwrite:
            changed = exam.settings_differ(job.out_dir, files, options)
            if changed:
                raise ValueError(f"{job.out_dir}: holds a result made with other {', '.join(changed)} - pass "
                                 "--overwrite to fit it again")
            if exam_dicom is None or exam.dicom_record(job.out_dir, exam_dicom) is not None:
                return {"exam_id": job.exam_id, "status": "skipped", **({"dicom": skipped_dicom} if skipped_dicom
                                                                         else {})}
        result = exam.fit_exam(files, options)
        record = dicomout.write_dicom_exam(result, exam_dicom, overwrite=True) if exam_dicom else None
        exam.write_exam(result, job.out_dir, overwrite=True, files=files, dicom=record)
        return {"exam_id": job.exam_id, "status": "ok", **({"dicom": skipped_dicom} if skipped_dicom else {})}
    except Exception as exc:  # one failing exam must not stop the cohort: report it
        return {"exam_id": job.exam_id, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _response_sr(patient: str, responses: list, jobs: list, done: dict, dicom_dir: str) -> str:
    """Write the patient's response SR (:func:`files.dicomsr.write_response_sr`, the lesions under their segment
    names) as ``dicom_dir/<patient>_response_sr.dcm``; returns its path, or why there is none."""
    from ..files import dicomsr, exam, results
    if any(job is None or done[job.exam_id]["status"] == "failed" for job in jobs):
        return "not written: an exam of the patient is missing or failed"
    try:
        records = [exam.dicom_record(job.out_dir, os.path.join(dicom_dir, job.exam_id)) for job in jobs]
        rows = [{**row, "lesion": row["lesion"][len(patient) + 1:]} for row in results.response_rows(responses)]
        path = os.path.join(dicom_dir, f"{exam_id_of(patient, 'response')}_sr.dcm")
        return dicomsr.write_response_sr(rows, *records, path, overwrite=True)
    except ValueError as exc:
        return f"not written: {exc}"


def run_batch(manifest: str, out_dir: str, options, aif_segment: str | None = None, scheduler: str | None = None,
              n_workers: int = 2, cutoff_pct: float = VP_CUTOFF_PCT, overwrite: bool = False,
              aif_given: bool = False, dicom_dir: str | None = None) -> dict:
    """Fit all exams on Dask, assess every lesion, compute the cohort statistics; write
    ``responses.csv``/``.json``, ``cohort_statistics.json`` and ``batch_summary.json`` into ``out_dir``;
    with ``dicom_dir``, every exam's DICOM objects into ``dicom_dir/<exam_id>`` (:func:`run_exam`) and each
    patient's response SR as ``dicom_dir/<patient>_response_sr.dcm`` (``dicom_sr`` in the summary: its path,
    or why it was not written)."""
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    from ..core import cohort, pipeline, response
    from ..files import exam, results

    options = options.checked()
    jobs, rows = read_manifest(manifest, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        futures = client.map(run_exam, jobs, options=options, aif_segment=aif_segment, overwrite=overwrite,
                             aif_given=aif_given, dicom_dir=dicom_dir and os.path.abspath(dicom_dir), pure=False)
        done = {}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="exams", disable=None):
            res = fut.result()
            done[res["exam_id"]] = res
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

    by_id = {job.exam_id: job for job in jobs}

    def lesions_of(patient, timepoint):
        job = by_id.get(exam_id_of(patient, timepoint))
        if job is None or done[job.exam_id]["status"] == "failed":
            return None
        try:
            return exam.read_exam_lesions(job.out_dir)
        except ValueError as exc:  # e.g. a damaged summary.json of an earlier run: this exam fails, not the batch
            done[job.exam_id] = {"exam_id": job.exam_id, "status": "failed", "error": f"ValueError: {exc}"}
            return None

    outcomes, per_patient, reports = {}, {}, {}
    for r in rows:
        outcomes.setdefault((r["patient"], r["lesion"]), r["outcome"].lower())
        per_patient.setdefault(r["patient"], []).append(r["lesion"])
    responses, cohort_rows = [], []
    for patient, names in per_patient.items():
        names = list(dict.fromkeys(names))
        found = pipeline.compare_exams(lesions_of(patient, "baseline"), lesions_of(patient, "follow-up"), names,
                                       cutoff_pct=cutoff_pct, name_prefix=f"{patient}/")
        responses += found
        if dicom_dir:
            reports[patient] = _response_sr(patient, found, [by_id.get(exam_id_of(patient, tp)) for tp in TIMEPOINTS],
                                            done, dicom_dir)
        for name, resp in zip(names, found):
            outcome = outcomes[(patient, name)]
            if outcome and resp.call.call != response.INDETERMINATE:
                cohort_rows.append({"lesion_id": resp.lesion, "patient_id": patient, "outcome": outcome,
                                    "delta_vp_pct": resp.change_pct["vp"],
                                    "delta_size_pct": resp.size.change_pct["longest_diameter"] if resp.size
                                    else None})
    rrows = results.response_rows(responses)
    results.write_csv(os.path.join(out_dir, "responses.csv"), rrows, overwrite=True)
    results.write_json(os.path.join(out_dir, "responses.json"), rrows, overwrite=True)
    cohort_note = "computed"
    try:
        lesion_table = cohort.cohort_from_rows(cohort_rows, source="batch cohort")
        rep = cohort.cohort_report(lesion_table, vp_cutoff_pct=cutoff_pct)
        results.write_json(os.path.join(out_dir, "cohort_statistics.json"), results.cohort_report_dict(rep),
                           overwrite=True)
    except ValueError as exc:
        cohort_note = f"not computed: {exc}"
    failed = [{"exam": k, "error": v["error"]} for k, v in done.items() if v["status"] == "failed"]
    summary = {"exams": len(jobs), "fitted": sum(v["status"] == "ok" for v in done.values()),
               "skipped": sum(v["status"] == "skipped" for v in done.values()), "failed": failed,
               "lesions": len(responses), "cohort_statistics": cohort_note,
               **({"dicom_sr": reports, "dicom_not_written": {k: v["dicom"] for k, v in done.items() if "dicom" in v}}
                  if dicom_dir else {})}
    results.write_json(os.path.join(out_dir, "batch_summary.json"), summary, overwrite=True)
    for f in failed:
        log.error("exam %s failed: %s", f["exam"], f["error"])
    return summary
