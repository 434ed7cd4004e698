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
    try:
        v = ds.get(keyword)
    except Exception:                                   # a damaged value counts as absent
        return ""
    return "" if v is None else str(v).strip("\0 ")


def derived_frame_of_reference(series_uid: str) -> str:
    """A Frame of Reference UID for a series that has none: derived from its Series Instance UID (the same on
    every run, so every object exported from the series shares it)."""
    from pydicom.uid import generate_uid
    return generate_uid(entropy_srcs=[series_uid, "DCEPerfusion frame of reference"])


def source_of_scan(scan, where: str) -> DicomSource:
    """The :class:`DicomSource` of a scanned series (:class:`files.dicom.SeriesScan`)."""
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
    for note in notes:
        log.warning("%s: %s", where, note)
    return DicomSource(headers, _text(first, "StudyInstanceUID"), series, frame_uid, notes)


def source_of_files(paths: list, where: str) -> DicomSource:
    """The :class:`DicomSource` of the one series held by the DICOM files ``paths`` (e.g. those a DICOM
    database lists for a series); their headers are read, not their pixels. ValueError naming ``where``
    and the fix (no images, several series, an incomplete series, ...)."""
    from . import dicom
    if not paths:
        raise ValueError(f"{where}: no DICOM files - load the DCE series from the DICOM database")
    scan = dicom.scan_series(list(paths), where, frame_interval_s=1.0)   # the order of the frames, not their times
    return source_of_scan(scan, where)


def patient_study(source: DicomSource) -> dict:
    """{attribute: text} of :data:`PATIENT_STUDY` from the source's first header ("" where absent)."""
    return {k: _text(source.headers[0], k) for k in PATIENT_STUDY}
