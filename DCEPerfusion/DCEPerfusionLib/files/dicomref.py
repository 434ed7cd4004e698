"""The DICOM identity of a series read from DICOM: what DICOM results derived from it (Parametric Maps,
SEG, SR) must carry to belong to the source study, frame of reference and series.

A :class:`DicomSource` holds the headers (no pixels) of the images of the series' first time frame, one
per slice in the series' K order (or, for enhanced multi-frame series, the file(s) holding them): a
derived object copies the patient and study from them and references them as its source images
(PS3.3 C.7.6.1.1.3 Derivation, C.12.1 SOP Common). :func:`source_of_files` makes one from the files of a
series named by a DICOM database (Slicer's); :func:`files.dicom.read_dicom_series` from the folder it reads.
A series without a Frame of Reference UID (some converters drop it, though the MR IOD requires it) gets
one derived from its Series Instance UID - the same on every export - and a note saying so.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

from . import dicom

log = logging.getLogger(__name__)

#: The patient and study attributes results copy from the source (PS3.3 C.7.1.1 Patient, C.7.2.1 General
#: Study); "" where the source has none (all are Type 2 in the derived objects but the UID).
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                 "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


@dataclasses.dataclass
class DicomSource:
    """A series' DICOM identity: ``headers`` - pydicom Datasets without pixel data of the first time frame's
    images in slice (K) order (enhanced series: the file(s) holding them); the study, series and frame of
    reference UIDs ("" when the files have none, but the frame of reference: see the module doc); ``notes``:
    what had to be filled in."""

    headers: list
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    notes: list = dataclasses.field(default_factory=list)


def _text(ds, keyword) -> str:
    """The text of ``ds.keyword`` ("" when absent or damaged: :func:`files.dicom._get` and ``_text``);
    pydicom's warning about a value longer than its VR allows is left out (:func:`_conform` notes it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exceeds the maximum.*length", category=UserWarning)
        return dicom._text(dicom._get(ds, keyword))


def derived_frame_of_reference(series_uid: str) -> str:
    """A Frame of Reference UID for a series that has none: derived from its Series Instance UID (the same on
    every run, so every object exported from the series shares it)."""
    from pydicom.uid import generate_uid
    return generate_uid(entropy_srcs=[series_uid, "DCEPerfusion frame of reference"])


def source_of_scan(scan, where: str, quiet: bool = False) -> DicomSource:
    """The :class:`DicomSource` of a scanned series (:class:`files.dicom.SeriesScan`); its notes logged as
    warnings unless ``quiet``."""
    by_path = {path: ds for path, ds, _ in scan.headers}
    headers, seen = [], set()
    for im in scan.frames[0]:
        if im.path not in seen:
            seen.add(im.path)
            headers.append(by_path[im.path])
    first = headers[0]
    series = _text(first, "SeriesInstanceUID")
    frame_uids = {_text(ds, "FrameOfReferenceUID") for ds in headers}
    notes = []
    if len(frame_uids) > 1:
        notes.append(f"the images have {len(frame_uids)} Frame of Reference UIDs; the results use the first slice's")
    frame_uid = _text(first, "FrameOfReferenceUID")
    if not frame_uid:
        frame_uid = derived_frame_of_reference(series)
        notes.append("the source has no Frame of Reference UID: the results have a new one (derived from the Series "
                     "Instance UID), so a viewer will not register them to other series of the study on its own")
    for note in notes if not quiet else ():
        log.warning("%s: %s", where, note)
    return DicomSource(headers, _text(first, "StudyInstanceUID"), series, frame_uid, notes)


def source_of_files(paths: list, where: str) -> DicomSource:
    """The :class:`DicomSource` of the one series held by the DICOM files ``paths`` (e.g. those a DICOM
    database lists for a series); their headers are read, not their pixels. ValueError naming ``where``
    and the fix (no images, several series, an incomplete series, ...)."""
    if not paths:
        raise ValueError(f"{where}: no DICOM files - load the DCE series from the DICOM database")
    scan = dicom.scan_series(list(paths), where, frame_interval_s=1.0)   # the order of the frames, not their times
    return source_of_scan(scan, where)


#: Value representations of the patient/study attributes (PS3.6) and their maximum lengths (PS3.5 6.2).
_VR = {"PatientName": ("PN", 64), "PatientID": ("LO", 64), "PatientBirthDate": ("DA", 8), "PatientSex": ("CS", 16),
       "StudyInstanceUID": ("UI", 64), "StudyDate": ("DA", 8), "StudyTime": ("TM", 16), "StudyID": ("SH", 16),
       "AccessionNumber": ("SH", 16), "ReferringPhysicianName": ("PN", 64)}
_SEXES = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}


def _conform(keyword: str, value: str):
    """(the value as a DICOM result can carry it, a note or None): a date or time in another common
    notation (2024-03-14, 10:15:00) rewritten, a sex spelled out (Male) coded, a value that cannot be read
    left empty; an over-long value kept (PACS match patients and studies on the exact text), with a note."""
    vr, limit = _VR[keyword]
    if not value:
        return value, None
    if vr == "DA" or vr == "TM":
        plain = value.replace("-", "").replace(".", "") if vr == "DA" else value.replace(":", "")
        ok = plain.isdigit() and (len(plain) == 8 if vr == "DA" else 2 <= len(plain) <= 6 and len(plain) % 2 == 0)
        if not ok and vr == "TM" and "." in plain:
            whole, _, frac = plain.partition(".")
            ok = whole.isdigit() and len(whole) == 6 and frac.isdigit()
        if ok:
            return plain, (None if plain == value else f"the source's {keyword} {value!r} is written as {plain!r}")
        return "", f"the source's {keyword} {value!r} is not a DICOM {'date' if vr == 'DA' else 'time'}: left empty"
    if keyword == "PatientSex":
        coded = _SEXES.get(value.upper())
        if coded is None:
            return "", f"the source's PatientSex {value!r} is not M, F or O: left empty"
        return coded, (None if coded == value else f"the source's PatientSex {value!r} is written as {coded!r}")
    longest = max(len(part) for part in value.split("^")) if vr == "PN" else len(value)
    if longest > limit:
        return value, f"the source's {keyword} is longer than DICOM allows ({longest} > {limit} characters): copied as it is"
    return value, None


def conformed_patient_study(source: DicomSource):
    """({attribute: text} of :data:`PATIENT_STUDY` from the source's first header, "" where absent, in the
    form DICOM results can carry (:func:`_conform`); the notes of what was rewritten or left empty)."""
    out, notes = {}, []
    for keyword in PATIENT_STUDY:
        out[keyword], note = _conform(keyword, _text(source.headers[0], keyword))
        if note:
            notes.append(note)
    return out, notes


def patient_study(source: DicomSource) -> dict:
    """The patient and study attributes of :func:`conformed_patient_study`."""
    return conformed_patient_study(source)[0]
