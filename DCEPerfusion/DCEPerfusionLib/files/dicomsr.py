"""The response of ``dceperfusion assess`` as a DICOM Structured Report a PACS can hold.

:func:`write_response_sr` writes one Comprehensive 3D SR (PS3.3 A.35.13) in the follow-up's study whose
content is a TID 1500 "Measurement Report" (PS3.16 TID 1500) titled "Dynamic Contrast MR Measurement
Report" (DCM 126002, CID 7021), built with highdicom (0.22 and 0.28). Its Imaging Measurements hold,
per lesion, two measurement groups that share the lesion's Tracking Identifier and Tracking UID (TID
4108, so a viewer follows the lesion across the two exams):

- baseline: a TID 1411 "Volumetric ROI Measurements" group referencing the lesion's segment in the
  baseline exam's SEG (the Referenced Segment, with the source DCE series), Time Point Context (TID 1502:
  "baseline", Time Point Type "Baseline" UMLS C1442488 of CID 6146, order 1), Finding "Lesion" (SCT
  52988006, CID 7151), and the measurements (TID 300) vp, Ktrans, ve, kep (the lesion statistic), the
  longest axial diameter (mm) and the lesion/reference vp ratio;
- follow-up: the same for the follow-up SEG (Time Point Type "Posttreatment" DCM 126074, order 2) with vp,
  Ktrans, ve and kep at follow-up, the percent changes from baseline (ΔVp with the lower and upper limit of its 95 %
  confidence interval, ΔKtrans, Δve, Δkep, the longest diameter and the vp ratio; unit %), the response
  call and the size call as coded Qualitative Evaluations, the reason for the call and the warnings
  between the exams as TEXT items (PS3.16 TID 1411 "Qualitative Evaluations" allows CODE and TEXT;
  highdicom builds CODE ones only, so the TEXT items are appended to the group's container).

A lesion whose segment one exam's SEG does not hold (a lesion with no statistics there) gets a TID 1501
"Measurement and Qualitative Evaluation Group" for that exam instead (no ROI reference). The normal-marrow
reference region (``reference_segment`` in the rows) gets a TID 1411 group per exam with its vp (Finding
"Bone Marrow", SCT 14016003, its segment type in the SEG, as a lesion's Finding is its "Lesion"; TID 1411's
Finding is of CID 7151). Measurements of a map statistic carry the statistic as their Derivation (TID 300
row "Derivation", CID 7464: Mean SCT 373098007, Median SCT 373099004, Peak Value Within ROI DCM 126031 for
``hotspot_peak``) and reference the exam's vp Parametric Map as Source of Measurement (ΔVp: both); the SR's
evidence (Current Requested Procedure Evidence; highdicom 0.28 puts the baseline study's objects under
Pertinent Other Evidence) lists the two SEGs and the two vp Parametric Maps.

Codes. Standard where DICOM has one: the kinetic quantities of CID 4107 / CID 7180 (Ktrans DCM 126312,
kep DCM 126313, ve DCM 126314, vp DCM 126331), "Long axis" (SCT 103339001, CID 7470) for the longest
diameter, "Response Evaluation" (DCM 112020) as the concept of the call, "Indeterminate" (SCT 82334004),
units in UCUM ("1" for fractions and ratios, "%", "mm"), "Imaging procedure" (SCT 363679005, CID 100) as
the procedure reported. DICOM has no codes for a percent change from baseline, the limits of its
confidence interval, a lesion/reference ratio, the call's values "success" and "suspected failure", the
size call, the reason or a warning, nor for the 90th-percentile and top-10 % statistics: those are in the
private coding scheme :data:`SCHEME` ("99DCEPERF", that of :mod:`.dicomcodes`; PS3.16 8.2 allows a
"99"-prefixed private scheme), declared in the SR's Coding Scheme Identification Sequence (PS3.3
C.12.1.1.5), see :data:`PRIVATE_CODES`. Segment finding types and units are those of :mod:`.dicomcodes`.

Numbers that are None (or not finite) in the rows are left out, never written as NaN. The file is
written under a temporary name and renamed (:func:`atomic.replacing`); an existing file is refused
without ``overwrite``.
"""

from __future__ import annotations

import logging
import math
import os

from . import dicomcodes

log = logging.getLogger(__name__)

#: The private coding scheme of the concepts DICOM has no code for (PS3.16 8.2), that of the Parametric
#: Maps too (:mod:`.dicomcodes`).
SCHEME = dicomcodes.SCHEME

#: Series number of the SR (the Parametric Maps and the SEG of 'fit --dicom-out' have their own).
SERIES_NUMBER = 9900

#: What to do when an exam has no DICOM record.
REFIT = "fit it again with --dicom-out DICOM_DIR"

#: Private codes of the SR (beside :mod:`.dicomcodes`' of the maps): value -> meaning (what a viewer shows
#: as the concept name; at most 64 characters, the Code Meaning's LO).
PRIVATE_CODES = {
    "DVP": "Percent change of vp from baseline",
    "DVPCILO": "Lower limit of the 95 % CI of the percent change of vp",
    "DVPCIHI": "Upper limit of the 95 % CI of the percent change of vp",
    "DKTRANS": "Percent change of Ktrans from baseline",
    "DVE": "Percent change of ve from baseline",
    "DKEP": "Percent change of kep from baseline",
    "DLONGAX": "Percent change of longest axial diameter from baseline",
    "VPRATIO": "Ratio of lesion vp to reference region vp",
    "DVPRATIO": "Percent change of lesion/reference vp ratio from baseline",
    "SUCCESS": "Treatment success by vp",
    "SUSPFAIL": "Suspected treatment failure by vp",
    "SIZERESP": "Response by longest axial diameter",
    "PROG": "Progression by size",
    "NOPROG": "No progression by size",
    "REASON": "Reason for the response evaluation",
    "WARNING": "Warning on the comparison of the exams",
    "P90": "90th percentile of the voxel values",
    "TOP10": "Mean of the highest 10 % of the voxel values",
}


def _codes():
    """The concepts of the report as highdicom CodedConcepts (imported here: highdicom is optional
    until an SR is written)."""
    from highdicom.sr import CodedConcept as C
    coded = dicomcodes.coded

    def private(value):
        return C(value, SCHEME, PRIVATE_CODES[value])
    codes = {key: private(key) for key in PRIVATE_CODES}
    codes.update({name: coded(dicomcodes.QUANTITIES[name]) for name in ("vp", "ktrans", "ve", "kep")})
    codes.update({
        "long axis": C("103339001", "SCT", "Long axis"),
        "response": C("112020", "DCM", "Response Evaluation"), "indeterminate": C("82334004", "SCT", "Indeterminate"),
        "title": C("126002", "DCM", "Dynamic Contrast MR Measurement Report"),
        "procedure": C("363679005", "SCT", "Imaging procedure"),
        "lesion": coded(dicomcodes.SEGMENT_CODES["lesion"][1]),
        "reference": coded(dicomcodes.SEGMENT_CODES["reference"][1]),
        "baseline": C("C1442488", "UMLS", "Baseline"), "posttreatment": C("126074", "DCM", "Posttreatment"),
        "unit 1": coded(dicomcodes.UNITS["1"]), "unit 1/min": coded(dicomcodes.UNITS["1/min"]),
        "unit %": coded(dicomcodes.PERCENT),
        "unit mm": coded(dicomcodes.MILLIMETRE),
        "mean": C("373098007", "SCT", "Mean"), "median": C("373099004", "SCT", "Median"),
        "hotspot_peak": C("126031", "DCM", "Peak Value Within ROI"), "percentile_90": private("P90"),
        "top10_mean": private("TOP10")})
    return codes


#: The calls of :mod:`core.response` and :mod:`core.size` -> their code (a key of :func:`_codes`).
CALL_CODES = {"success": "SUCCESS", "suspected failure": "SUSPFAIL", "indeterminate": "indeterminate"}
SIZE_CALL_CODES = {"progression": "PROG", "no progression": "NOPROG", "indeterminate": "indeterminate"}

#: Measurements of a lesion's group per exam: (row key, concept, unit (keys of :func:`_codes`), whether it
#: is of the lesion statistic: then the statistic is its Derivation).
def _kinetics(when: str) -> tuple:
    """The Ktrans, ve and kep measurements of the lesion statistic at one exam."""
    return ((f"ktrans_{when}", "ktrans", "unit 1/min", True), (f"ve_{when}", "ve", "unit 1", True),
            (f"kep_{when}", "kep", "unit 1/min", True))


BASELINE_MEASUREMENTS = (("vp_baseline", "vp", "unit 1", True), *_kinetics("baseline"),
                         ("longest_diameter_baseline_mm", "long axis", "unit mm", False),
                         ("vp_ratio_baseline", "VPRATIO", "unit 1", True))
FOLLOWUP_MEASUREMENTS = (("vp_followup", "vp", "unit 1", True), *_kinetics("followup"),
                         ("delta_vp_pct", "DVP", "unit %", True),
                         ("delta_vp_ci_lower_pct", "DVPCILO", "unit %", True),
                         ("delta_vp_ci_upper_pct", "DVPCIHI", "unit %", True),
                         ("delta_ktrans_pct", "DKTRANS", "unit %", True), ("delta_ve_pct", "DVE", "unit %", True),
                         ("delta_kep_pct", "DKEP", "unit %", True),
                         ("longest_diameter_followup_mm", "long axis", "unit mm", False),
                         ("delta_longest_diameter_pct", "DLONGAX", "unit %", False),
                         ("vp_ratio_followup", "VPRATIO", "unit 1", True),
                         ("delta_vp_ratio_pct", "DVPRATIO", "unit %", True))

EXAMS = ("baseline", "follow-up")


# ============================================================================================ records
def check_records(baseline, followup) -> None:
    """ValueError (one line) unless both exams have a DICOM record of 'fit --dicom-out' (summary.json's
    ``dicom``) and the two are of one patient (equal PatientID)."""
    for which, rec in zip(EXAMS, (baseline, followup)):
        if rec is None:
            raise ValueError(f"{which} exam: was fitted without --dicom-out - {REFIT}")
        if not isinstance(rec, dict):
            raise ValueError(f"{which} exam: its DICOM record (summary.json 'dicom') is not an object - {REFIT}")
        for key, kind in (("patient_study", dict), ("objects", list), ("segments", dict),
                          ("source_series_uid", str)):
            if not isinstance(rec.get(key), kind):
                raise ValueError(f"{which} exam: its DICOM record (summary.json 'dicom') has no valid "
                                 f"'{key}' - {REFIT}")
        if not rec["patient_study"].get("StudyInstanceUID"):
            raise ValueError(f"{which} exam: its DICOM record has no StudyInstanceUID - {REFIT}")
    ids = [str(r["patient_study"].get("PatientID", "")) for r in (baseline, followup)]
    if ids[0] != ids[1]:
        raise ValueError(f"the baseline and follow-up exams are of different patients (PatientID {ids[0]!r} and "
                         f"{ids[1]!r}) - give two exams of one patient")


def _object(record: dict, kind: str, map_name=None):
    """The record's object of ``kind`` (and ``map``), or None."""
    for obj in record["objects"]:
        if isinstance(obj, dict) and obj.get("kind") == kind and (map_name is None or obj.get("map") == map_name):
            return obj
    return None


def _evidence(record: dict, obj: dict):
    """A minimal pydicom Dataset standing for ``obj`` of ``record`` (what highdicom needs of evidence:
    its UIDs and the patient/study attributes the SR inherits)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset
    ds = Dataset()
    for key, value in record["patient_study"].items():
        if tag_for_keyword(key) is not None and value is not None:
            setattr(ds, key, str(value))
    ds.SOPClassUID = obj["sop_class_uid"]
    ds.SOPInstanceUID = obj["sop_instance_uid"]
    ds.SeriesInstanceUID = obj["series_instance_uid"]
    return ds


def _number(value):
    """``value`` as a float, or None when absent or not finite (left out of the SR)."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ============================================================================================ content
class _Builder:
    """The measurement groups of a report (one instance per SR)."""

    def __init__(self, baseline: dict, followup: dict, statistic: str):
        import highdicom as hd
        from .. import __version__
        self.hd = hd
        self.codes = _codes()
        self.records = dict(zip(EXAMS, (baseline, followup)))
        self.statistic = statistic
        self.algorithm = hd.sr.AlgorithmIdentification(name="DCEPerfusion", version=str(__version__))
        self.evidence = {}                   # SOP Instance UID -> Dataset; the follow-up's SEG first
        for which in ("follow-up", "baseline"):
            for obj in (_object(self.records[which], "segmentation"), self._vp_map(which)):
                if obj is not None:
                    self.evidence.setdefault(obj["sop_instance_uid"], _evidence(self.records[which], obj))

    def _vp_map(self, which):
        return _object(self.records[which], "parametric map", "vp")

    def _source(self, which):
        """Source of Measurement: the exam's vp Parametric Map (empty when it has none)."""
        obj = self._vp_map(which)
        return [] if obj is None else [self.hd.sr.SourceImageForMeasurement(obj["sop_class_uid"],
                                                                            obj["sop_instance_uid"])]

    def measurement(self, which, row, key, code, unit, of_statistic):
        value = _number(row.get(key))
        if value is None:
            return None
        if key == "delta_vp_pct":
            sources = self._source("baseline") + self._source("follow-up")
        elif code in ("vp", "VPRATIO"):
            sources = self._source(which)
        else:
            sources = []
        return self.hd.sr.Measurement(
            name=self.codes[code], value=value, unit=self.codes[unit],
            derivation=self.codes.get(self.statistic) if of_statistic else None,
            referenced_images=sources or None)

    def group(self, which, segment, tracking, finding, measurements, evaluations=(), texts=()):
        """A TID 1411 group on ``segment`` of the exam's SEG, or a TID 1501 group when the SEG has no such
        segment; the TEXT items are appended to the group's container."""
        hd, codes = self.hd, self.codes
        order = EXAMS.index(which) + 1
        time_point = hd.sr.TimePointContext(time_point=which, time_point_order=order,
                                            time_point_type=codes["baseline" if order == 1 else "posttreatment"])
        record = self.records[which]
        seg = _object(record, "segmentation")
        number = record["segments"].get(segment)
        common = dict(tracking_identifier=tracking, time_point_context=time_point, finding_type=codes[finding],
                      algorithm_id=self.algorithm, measurements=[m for m in measurements if m is not None],
                      qualitative_evaluations=list(evaluations) or None)
        if seg is not None and isinstance(number, int) and not isinstance(number, bool):
            ref = hd.sr.ReferencedSegment(
                sop_class_uid=seg["sop_class_uid"], sop_instance_uid=seg["sop_instance_uid"], segment_number=number,
                source_series=hd.sr.SourceSeriesForSegmentation(record["source_series_uid"]))
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **common)
        else:
            log.info("%s exam: no segment %r in its SEG - its measurements go into a group without an ROI",
                     which, segment)
            group = hd.sr.MeasurementsAndQualitativeEvaluations(**common)
        for code, text in texts:
            if text:
                group[0].ContentSequence.append(hd.sr.TextContentItem(
                    name=codes[code], value=str(text), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        return group

    def evaluation(self, code, value_code):
        return self.hd.sr.QualitativeEvaluation(name=self.codes[code], value=self.codes[value_code])

    def lesion_groups(self, row):
        lesion = str(row["lesion"])
        tracking = self.hd.sr.TrackingIdentifier(uid=self.hd.UID(), identifier=lesion)
        base = self.group("baseline", lesion, tracking, "lesion",
                          [self.measurement("baseline", row, *m) for m in BASELINE_MEASUREMENTS])
        evaluations = []
        if row.get("call") in CALL_CODES:
            evaluations.append(self.evaluation("response", CALL_CODES[row["call"]]))
        if row.get("size_call") in SIZE_CALL_CODES:
            evaluations.append(self.evaluation("SIZERESP", SIZE_CALL_CODES[row["size_call"]]))
        warnings = [w for w in str(row.get("warnings") or "").split(" | ") if w]
        follow = self.group("follow-up", lesion, tracking, "lesion",
                            [self.measurement("follow-up", row, *m) for m in FOLLOWUP_MEASUREMENTS], evaluations,
                            [("REASON", row.get("reason")), *(("WARNING", w) for w in warnings)])
        return [base, follow]

    def reference_groups(self, rows):
        """The reference region's groups (one per exam) of the first row that names one."""
        row = next((r for r in rows if r.get("reference_segment")), None)
        if row is None:
            return []
        name = str(row["reference_segment"])
        tracking = self.hd.sr.TrackingIdentifier(uid=self.hd.UID(), identifier=f"reference region {name}")
        return [self.group(which, name, tracking, "reference",
                           [self.measurement(which, row, key, "vp", "unit 1", True)])
                for which, key in zip(EXAMS, ("vp_reference_baseline", "vp_reference_followup"))]


def build_response_sr(rows: list, baseline: dict, followup: dict):
    """The Comprehensive 3D SR (a highdicom ``Comprehensive3DSR``) of the response ``rows``
    (:func:`results.response_rows`) between the exams of the DICOM records ``baseline`` and ``followup``
    (summary.json's ``dicom`` of each 'fit --dicom-out'); see the module's docstring for the content.
    ValueError (one line) for a missing record, two patients, or no rows."""
    check_records(baseline, followup)
    if not rows:
        raise ValueError("response SR: no lesion responses to report - assess at least one lesion")
    import highdicom as hd
    from pydicom.uid import generate_uid            # with fixed entropy: the same device UID on every run
    from .. import __version__
    statistics = {str(r.get("statistic")) for r in rows}
    b = _Builder(baseline, followup, statistics.pop() if len(statistics) == 1 else None)
    groups = [g for r in rows for g in b.lesion_groups(r)] + b.reference_groups(rows)
    device = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=["DCEPerfusion"]), name="DCEPerfusion",
            model_name=f"dceperfusion {__version__}"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=b.codes["procedure"], imaging_measurements=groups, title=b.codes["title"])
    evidence = list(b.evidence.values())
    if not evidence:
        raise ValueError(f"follow-up exam: its DICOM record lists no SEG or vp Parametric Map - {REFIT}")
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="DCEPerfusion", is_complete=True,
        series_description="DCEPerfusion response: vp change and the call", software_versions=str(__version__))
    sr.CodingSchemeIdentificationSequence = [dicomcodes.private_scheme_item()]
    sr.SpecificCharacterSet = "ISO_IR 192"        # UTF-8: the reasons say "ΔVp", names may be non-ASCII
    return sr


def write_response_sr(rows: list, baseline: dict, followup: dict, path: str, overwrite: bool = False) -> str:
    """Write the SR of :func:`build_response_sr` to ``path`` (complete or not at all) and return ``path``.
    FileExistsError when ``path`` exists and not ``overwrite``; every refusal before anything is written."""
    from . import results
    results.check_free(path, overwrite)
    return write_dataset(build_response_sr(rows, baseline, followup), path)


def write_dataset(ds, path: str) -> str:
    """:func:`.dicomout.write_dataset` (the one DICOM file writer)."""
    from . import dicomout
    return dicomout.write_dataset(ds, path)


def exam_record(folder: str):
    """The DICOM record (summary.json's ``dicom``, None when absent) of the exam fitted into ``folder``
    (an output folder of 'dceperfusion fit' or its summary.json): :func:`.exam.dicom_record`."""
    from . import exam
    return exam.dicom_record(folder)
