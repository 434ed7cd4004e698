"""DICOM writers for the tests (pydicom), writing a DCE series the way scanners do.

- :func:`classic_series`: one MR file per slice and frame, in shuffled order, with the timing tags of a
  vendor: ``siemens`` Acquisition Time per slice, Content Time, Acquisition Number; ``ge`` Trigger Time
  (ms) with one Acquisition Time for the series; ``philips`` Temporal Position Identifier, Trigger Time
  and an Acquisition Time per dynamic; ``none`` no timing that varies.
- :func:`enhanced_file`: one Enhanced MR Image Storage file holding all frames with per-frame
  functional groups (Philips and Siemens), and :func:`enhanced_folder` (one such file per time point).
- :func:`rgb_file`, :func:`non_dicom_files` (a DICOMDIR, a text file, a thumbnail).

Geometry is given as Slicer's IJK->RAS matrix (mm); signals as (K, J, I, T) arrays; times in s.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DICOMDIR = "1.2.840.10008.1.3.10"
ROOT = "1.2.826.0.1.3680043.2.1125.77"
STUDY_UID = ROOT + ".1"
SERIES_UID = ROOT + ".2"
FRAME_OF_REFERENCE_UID = ROOT + ".4"
MANUFACTURER = {"siemens": "SIEMENS", "ge": "GE MEDICAL SYSTEMS", "philips": "Philips Medical Systems",
                "none": "ACME"}
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def geometry(matrix):
    """(row direction, column direction, PixelSpacing [row, column] mm, slice step vector, origin) in LPS."""
    m = LPS @ np.asarray(matrix, dtype=float)
    di, dj = np.linalg.norm(m[:3, 0]), np.linalg.norm(m[:3, 1])
    return m[:3, 0] / di, m[:3, 1] / dj, [dj, di], m[:3, 2], m[:3, 3]


def ds_text(values, fmt="{:.6f}"):
    return [fmt.format(float(x)) for x in values]


def tm(seconds_of_day: float) -> str:
    """Seconds after midnight as DICOM TM (wrapping past midnight)."""
    s = seconds_of_day % 86400
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{int(h):02d}{int(m):02d}{sec:09.6f}"


def dt(date: str, seconds_of_day: float) -> str:
    """A DICOM DT from a date (YYYYMMDD) and seconds after its midnight (< 24 h)."""
    return date + tm(seconds_of_day)


def save(ds: Dataset, path: str, transfer_syntax=ExplicitVRLittleEndian, raw=False) -> str:
    """Write ``ds`` as a DICOM file (preamble, file meta) with pydicom 2.4 or 3; ``raw``: the bare data set
    in implicit VR little endian, without preamble and file meta (as old scanners and some exports do)."""
    v3 = int(pydicom.__version__.split(".")[0]) >= 3
    if raw:
        if v3:
            pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
        else:
            ds.is_little_endian, ds.is_implicit_VR = True, True
            pydicom.dcmwrite(path, ds, write_like_original=True)
        return path
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", DICOMDIR)
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", ROOT + ".9.9")
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = ROOT + ".0"
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    if v3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:                                                     # pydicom 2.x
        ds.is_little_endian = True
        ds.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
        pydicom.dcmwrite(path, ds, write_like_original=False)
    return path


def _image_module(ds, rows, cols, signed=True, bits=16):
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0


def _pixels(a, signed=True, bits=16):
    dtype = {(8, False): "u1", (8, True): "i1", (16, False): "<u2", (16, True): "<i2", (32, False): "<u4",
             (32, True): "<i4"}[(bits, signed)]
    return np.ascontiguousarray(np.rint(a), dtype=dtype).tobytes()


def _patient_study(ds, series_uid, vendor, field_t):
    ds.PatientName = "DCE^Phantom"
    ds.PatientID = "DCE001"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240314"
    ds.Modality = "MR"
    ds.Manufacturer = MANUFACTURER.get(vendor, vendor)
    ds.SeriesDescription = "DCE dynamic"
    ds.SeriesNumber = 7
    if field_t is not None:
        ds.MagneticFieldStrength = field_t


def classic_series(folder, signal, matrix, t_s, vendor="siemens", *, series_uid=SERIES_UID, tr_ms=4.2,
                   flip_deg=14.0, field_t=3.0, start_s=10 * 3600 + 15 * 60, slice_dt_s=0.01, signed=True,
                   slope=None, intercept=None, edit=None, seed=1, transfer_syntax=ExplicitVRLittleEndian,
                   raw=False):
    """A dynamic series as one classic MR file per slice and frame (names in shuffled order).

    ``edit(ds, k, t)`` may change a file's dataset (slice k, frame t) before it is written; returning
    False leaves the file out. ``raw``: files without preamble and file meta. Returns the folder."""
    os.makedirs(folder, exist_ok=True)
    row, col, spacing, step, origin = geometry(matrix)
    K, J, I, T = signal.shape
    jobs = [(k, t) for t in range(T) for k in range(K)]
    names = list(range(len(jobs)))
    random.Random(seed).shuffle(names)
    for n, (k, t) in enumerate(jobs):
        ds = Dataset()
        ds.SOPClassUID = MR_IMAGE
        ds.SOPInstanceUID = f"{series_uid}.{n + 1}"
        _patient_study(ds, series_uid, vendor, field_t)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.InstanceNumber = n + 1                              # time-major, as the scanners number them
        ds.ImagePositionPatient = ds_text(origin + step * k, "{:.4f}")
        ds.ImageOrientationPatient = ds_text(np.r_[row, col])
        ds.PixelSpacing = ds_text(spacing)
        ds.SliceThickness = f"{np.linalg.norm(step):.4f}"
        ds.SpacingBetweenSlices = f"{np.linalg.norm(step):.4f}"
        ds.RepetitionTime = tr_ms
        ds.EchoTime = 1.8
        ds.FlipAngle = flip_deg
        ds.ScanningSequence = "GR"
        when = start_s + t_s[t] + slice_dt_s * k
        if vendor == "siemens":
            ds.AcquisitionTime = tm(when)
            ds.ContentTime = tm(when + 2.0)
            ds.AcquisitionNumber = t + 1
        elif vendor == "ge":
            ds.TriggerTime = f"{1000 * t_s[t]:.1f}"
            ds.AcquisitionTime = ds.ContentTime = tm(start_s)
        elif vendor == "philips":
            ds.TemporalPositionIdentifier = t + 1
            ds.NumberOfTemporalPositions = T
            ds.TriggerTime = f"{1000 * t_s[t]:.1f}"
            ds.AcquisitionTime = tm(start_s + t_s[t])
            ds.ContentTime = tm(start_s)
            ds.AcquisitionNumber = 1
        else:
            ds.AcquisitionTime = ds.ContentTime = tm(start_s)
        _image_module(ds, J, I, signed)
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept or 0, "US"
        stored = signal[k, :, :, t] if slope is None else (signal[k, :, :, t] - (intercept or 0)) / slope
        ds.PixelData = _pixels(stored, signed)
        if edit is not None and edit(ds, k, t) is False:
            continue
        save(ds, os.path.join(folder, f"IM_{names[n]:05d}"), transfer_syntax, raw)
    return folder


def _item(**kwargs) -> Dataset:
    d = Dataset()
    for k, v in kwargs.items():
        setattr(d, k, v)
    return d


def enhanced_file(path, signal, matrix, t_s, *, vendor="philips", series_uid=SERIES_UID, instance=1, tr_ms=4.2,
                  flip_deg=14.0, field_t=3.0, start_s=10 * 3600, slice_dt_s=0.01, time="acquisition",
                  temporal_index=True, shared_geometry=True, frame_order="time", rescale=(1.0, 0.0),
                  rescale_per_frame=False, seed=0, edit_frame=None, transfer_syntax=ExplicitVRLittleEndian):
    """One Enhanced MR Image Storage file holding ``signal`` (K, J, I, T) as K*T frames.

    ``time``: where each frame's time is: "acquisition" (FrameAcquisitionDateTime), "reference"
    (FrameReferenceDateTime), "cardiac" (TriggerTime in CardiacSynchronizationSequence), "mr-timing"
    (TriggerTime in MRTimingAndRelatedParametersSequence) or None. ``frame_order``: "time" (all slices of
    frame 0 first), "slice" or "shuffled". ``rescale`` (slope, intercept) are applied to the stored
    values. ``edit_frame(item, k, t)`` may change a frame's functional groups. Returns the path."""
    row, col, spacing, step, origin = geometry(matrix)
    K, J, I, T = signal.shape
    order = [(k, t) for t in range(T) for k in range(K)]
    if frame_order == "slice":
        order = [(k, t) for k in range(K) for t in range(T)]
    elif frame_order == "shuffled":
        random.Random(seed).shuffle(order)
    slope, intercept = rescale
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_MR_IMAGE
    ds.SOPInstanceUID = f"{series_uid}.{instance}"
    _patient_study(ds, series_uid, vendor, field_t)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = instance
    ds.ContentTime = tm(start_s)
    ds.AcquisitionDateTime = dt("20240314", start_s + (t_s[0] if T == 1 else 0.0))
    ds.NumberOfFrames = len(order)
    _image_module(ds, J, I)
    timing = _item(RepetitionTime=tr_ms, FlipAngle=flip_deg, EchoTrainLength=1)
    measures = _item(PixelSpacing=ds_text(spacing), SliceThickness=f"{np.linalg.norm(step):.4f}",
                     SpacingBetweenSlices=f"{np.linalg.norm(step):.4f}")
    orientation = _item(ImageOrientationPatient=ds_text(np.r_[row, col]))
    transformation = _item(RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US")
    shared = Dataset()
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    if shared_geometry:
        shared.PixelMeasuresSequence = Sequence([measures])
        shared.PlaneOrientationSequence = Sequence([orientation])
    if not rescale_per_frame:
        shared.PixelValueTransformationSequence = Sequence([transformation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, data = [], []
    for n, (k, t) in enumerate(order):
        when = start_s + t_s[t] + slice_dt_s * k
        content = _item(FrameAcquisitionNumber=t + 1, StackID="1", InStackPositionNumber=k + 1,
                        DimensionIndexValues=[t + 1, k + 1])
        if temporal_index:
            content.TemporalPositionIndex = t + 1
        if time == "acquisition":
            content.FrameAcquisitionDateTime = dt("20240314", when)
        elif time == "reference":
            content.FrameReferenceDateTime = dt("20240314", when + 1.5)
        content.FrameAcquisitionDuration = 1000.0
        item = Dataset()
        item.FrameContentSequence = Sequence([content])
        item.PlanePositionSequence = Sequence([_item(ImagePositionPatient=ds_text(origin + step * k, "{:.4f}"))])
        if not shared_geometry:
            keywords = ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices")
            item.PixelMeasuresSequence = Sequence([_item(**{kw: measures.get(kw) for kw in keywords})])
            item.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=orientation[0x00200037].value)])
        if time == "cardiac":
            item.CardiacSynchronizationSequence = Sequence([_item(TriggerTime=f"{1000 * t_s[t]:.1f}",
                                                                  NominalCardiacTriggerDelayTime=0.0)])
        elif time == "mr-timing":
            item.MRTimingAndRelatedParametersSequence = Sequence([_item(RepetitionTime=tr_ms, FlipAngle=flip_deg,
                                                                        TriggerTime=f"{1000 * t_s[t]:.1f}")])
        if rescale_per_frame:
            item.PixelValueTransformationSequence = Sequence([_item(RescaleSlope=slope, RescaleIntercept=intercept,
                                                                    RescaleType="US")])
        if edit_frame is not None:
            edit_frame(item, k, t)
        frames.append(item)
        data.append(_pixels((signal[k, :, :, t] - intercept) / slope))
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = b"".join(data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return save(ds, path, transfer_syntax)


def enhanced_folder(folder, signal, matrix, t_s, **kwargs):
    """One enhanced file per time point (each holding all slices of that frame), named in shuffled order;
    each file's frames carry their own FrameAcquisitionDateTime unless ``time`` says otherwise."""
    os.makedirs(folder, exist_ok=True)
    T = signal.shape[-1]
    names = list(range(T))
    random.Random(3).shuffle(names)
    start = kwargs.pop("start_s", 10 * 3600)
    for t in range(T):
        enhanced_file(os.path.join(folder, f"EN{names[t]:03d}.dcm"), signal[..., t:t + 1], matrix, [0.0],
                      start_s=start + t_s[t], instance=t + 1, **kwargs)
    return folder


def rgb_file(path, series_uid=ROOT + ".3", rows=6, cols=8) -> str:
    """A colour (RGB) secondary capture, as a screenshot saved to PACS."""
    ds = Dataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = series_uid + ".1"
    _patient_study(ds, series_uid, "siemens", None)
    ds.Modality = "OT"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(rows * cols * 3, dtype=np.uint8).tobytes()
    return save(ds, path)


def non_dicom_files(folder) -> list:
    """A DICOMDIR, a text file and a PNG thumbnail, as exports put next to the images. Returns the paths."""
    os.makedirs(folder, exist_ok=True)
    d = Dataset()
    d.FileSetID = "DCE"
    d.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    d.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    d.FileSetConsistencyFlag = 0
    d.DirectoryRecordSequence = Sequence([])
    paths = [save(d, os.path.join(folder, "DICOMDIR"))]
    with open(os.path.join(folder, "README.txt"), "w", encoding="utf-8") as f:
        f.write("Exported by the PACS viewer.\n")
    with open(os.path.join(folder, "thumbnail.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    paths += [os.path.join(folder, "README.txt"), os.path.join(folder, "thumbnail.png")]
    return paths
