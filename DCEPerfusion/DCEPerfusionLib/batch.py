"""A whole cohort from a manifest, on Dask: every exam fitted (in parallel on a local cluster or an
existing scheduler), every lesion assessed, the cohort statistics computed.

Manifest (CSV): ``patient, lesion, timepoint, dce, segmentation, outcome``; one row per lesion and
timepoint ("baseline" / "follow-up"); paths relative to the manifest; ``outcome`` (success / failure)
may be empty when unknown. Exams (patient + timepoint) are fitted once for all their lesions.
Resumable: an exam whose ``summary.json`` exists is not fitted again. A failing exam does not stop the
others; it is listed with its error in ``batch_summary.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("patient", "lesion", "timepoint", "dce", "segmentation", "outcome")
TIMEPOINTS = ("baseline", "follow-up")


@dataclasses.dataclass
class ExamJob:
    exam_id: str
    patient: str
    timepoint: str
    dce: str
    segmentation: str
    lesions: list
    out_dir: str


def read_manifest(path: str, out_dir: str) -> tuple[list[ExamJob], list[dict]]:
    """Exam jobs and lesion rows from a manifest; ValueError naming the row for bad rows."""
    if not os.path.exists(path):
        raise ValueError(f"manifest {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        raise ValueError(f"manifest {path}: has no rows")
    missing = [c for c in MANIFEST_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"manifest {path}: missing column(s) {', '.join(missing)} "
                         f"(need {', '.join(MANIFEST_COLUMNS)})")
    jobs: dict[tuple, ExamJob] = {}
    for n, r in enumerate(rows, start=1):
        if r["timepoint"] not in TIMEPOINTS:
            raise ValueError(f"manifest row {n}: timepoint {r['timepoint']!r} is not 'baseline' or 'follow-up'")
        if r["outcome"] and r["outcome"].lower() not in ("success", "failure"):
            raise ValueError(f"manifest row {n}: outcome {r['outcome']!r} is not success, failure or empty")
        if not r["patient"] or not r["lesion"]:
            raise ValueError(f"manifest row {n}: patient and lesion must not be empty")
        key = (r["patient"], r["timepoint"])
        dce = os.path.join(base, r["dce"])
        seg = os.path.join(base, r["segmentation"]) if r["segmentation"] else ""
        job = jobs.get(key)
        if job is None:
            exam_id = f"{r['patient']}_{r['timepoint']}".replace(os.sep, "_")
            job = jobs[key] = ExamJob(exam_id, r["patient"], r["timepoint"], dce, seg, [],
                                      os.path.join(out_dir, "exams", exam_id))
        elif job.dce != dce or job.segmentation != seg:
            raise ValueError(f"manifest row {n}: patient {r['patient']} {r['timepoint']} lists another DCE or "
                             "segmentation than an earlier row - one exam per patient and timepoint")
        job.lesions.append(r["lesion"])
    return list(jobs.values()), rows


def run_exam(job: ExamJob, options, overwrite: bool = False) -> dict:
    """Fit one exam (a Dask task). Returns {"exam_id", "status": ok|skipped|failed, "statistics" | "error"}."""
    from . import exams
    summary = os.path.join(job.out_dir, "summary.json")
    try:
        if os.path.exists(summary) and not overwrite:
            with open(summary, encoding="utf-8") as f:
                return {"exam_id": job.exam_id, "status": "skipped", "statistics": json.load(f)["statistics"]}
        if not os.path.exists(job.dce):
            raise ValueError(f"DCE input {job.dce} does not exist")
        if job.segmentation and not os.path.exists(job.segmentation):
            raise ValueError(f"segmentation {job.segmentation} does not exist")
        opts = dataclasses.replace(options, lesions=list(job.lesions))
        exam = exams.fit_exam(job.dce, opts, job.segmentation or None)
        exams.write_exam(exam, job.out_dir, overwrite=True)
        return {"exam_id": job.exam_id, "status": "ok", "statistics": exams.statistics_rows(exam.statistics)}
    except Exception as exc:  # one failing exam must not stop the cohort: report it
        return {"exam_id": job.exam_id, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def run_batch(manifest: str, out_dir: str, options, scheduler: str | None = None, n_workers: int = 2,
              cutoff_pct: float = -20.0, overwrite: bool = False) -> dict:
    """Fit all exams on Dask, assess every lesion, compute the cohort statistics; write
    ``responses.csv``/``.json``, ``cohort_statistics.json`` and ``batch_summary.json`` into ``out_dir``."""
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    from . import cohort, exams, response
    from .demo import _report_dict, response_rows

    jobs, rows = read_manifest(manifest, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        futures = client.map(run_exam, jobs, options=options, overwrite=overwrite, pure=False)
        results = {}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="exams", disable=None):
            res = fut.result()
            results[res["exam_id"]] = res
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

    def stats_of(patient, timepoint):
        res = results.get(f"{patient}_{timepoint}".replace(os.sep, "_"))
        if not res or res["status"] == "failed":
            return []
        return exams.statistics_from_rows(res["statistics"])

    lesions = {}
    for r in rows:
        lesions.setdefault((r["patient"], r["lesion"]), r["outcome"].lower())
    responses, cohort_rows = [], []
    for (patient, lesion), outcome in lesions.items():
        resp = response.assess_lesion(response.exam_values(stats_of(patient, "baseline"), lesion),
                                      response.exam_values(stats_of(patient, "follow-up"), lesion),
                                      f"{patient}/{lesion}", cutoff_pct=cutoff_pct)
        responses.append(resp)
        if outcome and resp.call.call != response.INDETERMINATE:
            cohort_rows.append({"lesion_id": resp.lesion, "patient_id": patient, "outcome": outcome,
                                "delta_vp_pct": resp.change_pct["vp"]})
    rrows = response_rows(responses)
    exams.write_csv(os.path.join(out_dir, "responses.csv"), rrows, overwrite=True)
    exams.write_json(os.path.join(out_dir, "responses.json"), rrows, overwrite=True)
    cohort_note = "computed"
    try:
        lesion_table = cohort.cohort_from_rows(cohort_rows, source="batch cohort")
        rep = cohort.cohort_report(lesion_table, vp_cutoff_pct=cutoff_pct)
        exams.write_json(os.path.join(out_dir, "cohort_statistics.json"), _report_dict(rep), overwrite=True)
    except ValueError as exc:
        cohort_note = f"not computed: {exc}"
    failed = [{"exam": k, "error": v["error"]} for k, v in results.items() if v["status"] == "failed"]
    summary = {"exams": len(jobs), "fitted": sum(v["status"] == "ok" for v in results.values()),
               "skipped": sum(v["status"] == "skipped" for v in results.values()), "failed": failed,
               "lesions": len(responses), "cohort_statistics": cohort_note}
    exams.write_json(os.path.join(out_dir, "batch_summary.json"), summary, overwrite=True)
    for f in failed:
        log.error("exam %s failed: %s", f["exam"], f["error"])
    return summary
