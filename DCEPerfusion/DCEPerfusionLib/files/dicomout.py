"""An exam's results as DICOM objects a PACS holds beside the source series, written with highdicom:

- one **Parametric Map** (PS3.3 A.75) per map - every kinetic map of the model, r2, status, the delay and
  the standard-error maps: float32 frames (Float Pixel Data), voxels not fitted NaN as in the NRRD maps; a
  Real World Value Mapping (PS3.3 C.7.6.16.2.11) with the map's UCUM unit (/min for Ktrans, kep and PS; 1
  for ve, vp and r2; ml/100 ml/min for Fp; s for the delay) and its quantity (DCM CID 4107 codes for Ktrans,
  kep, ve, vp; :mod:`.dicomcodes` for the rest); the display window of the map's registry entry;
- one **Segmentation** (PS3.3 A.51, binary): every lesion segment, the normal-marrow reference segment and
  the AIF's artery voxels when the AIF was image-derived (MANUAL for the segments given, AUTOMATIC for a
  detected AIF);

each in a series of its own, in the source's study and frame of reference, with the source's patient
and study attributes, its first frame's images as source images (Referenced Series / Source Image
Sequence) and the DCE grid's geometry (plane positions and orientation, pixel spacing, slice spacing).

The folder is written complete or not at all (:func:`atomic.result_folder`); ``dicom_objects.json`` (the
record, also summary.json's ``dicom``) is written last and lists every object with its UIDs, the segment
numbers and notes. A result whose series was not read from DICOM is refused with one line: DICOM
results belong to a source study.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import warnings

import numpy as np

from .. import __version__
from ..core.registry import MAPS, MODELS
from . import atomic, dicom, dicomcodes, dicomref, results
from .images import LPS

log = logging.getLogger(__name__)

RECORD = "dicom_objects.json"
SEGMENTATION = "segmentation.dcm"
MANUFACTURER = "DCEPerfusion"
#: Series numbers of the results: the Parametric Maps from PM_SERIES_NUMBER (one per map, in map
#: order), the Segmentation at SEG_SERIES_NUMBER - high, away from a scanner's numbers.
PM_SERIES_NUMBER = 9100
SEG_SERIES_NUMBER = 9000
NOT_DICOM = ("--dicom-out: the DCE series {source!r} was not read from DICOM - DICOM objects belong to the source "
             "study; fit the exam's DICOM folder (or leave out --dicom-out)")


def map_file(name: str) -> str:
    return f"{name}.dcm"


def is_ours(name: str) -> bool:
    """Whether ``name`` is a file :func:`write_dicom_exam` writes."""
    return name in (RECORD, SEGMENTATION) or (name.endswith(".dcm") and name[:-4] in MAPS)


def check_highdicom() -> None:
    """ValueError (one line) when highdicom is not installed."""
    _highdicom()


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise ValueError("DICOM export: needs the Python package highdicom - install it (pip install highdicom)") \
            from None
    return highdicom


def check_exportable(result) -> dicomref.DicomSource:
    """The result's :class:`~.dicomref.DicomSource`; ValueError (one line) when it has none or lacks the
    UIDs every derived object needs - before anything is fitted or written, where the caller can."""
    return check_series(result.series)


def check_series(series) -> dicomref.DicomSource:
    """:func:`check_exportable` for a series."""
    source = getattr(series, "dicom", None)
    if source is None:
        raise ValueError(NOT_DICOM.format(source=series.source))
    _check_source(source, series.source)
    return source


def _check_source(source: dicomref.DicomSource, where: str) -> None:
    for uid, what in ((source.study_instance_uid, "Study"), (source.series_instance_uid, "Series")):
        if not uid:
            raise ValueError(f"DICOM export: the DICOM series {where!r} has no {what} Instance UID - results cannot be "
                             "put in its study beside it; export the series from the scanner or PACS again")
    _highdicom()


def check_folder(folder: str) -> None:
    """Before a fit: whether the DICOM series in ``folder`` can be exported - its headers read (not its
    pixels), its UIDs checked and one Parametric Map made in memory from them, so that a header highdicom
    refuses is found before the fit, not after. ValueError (one line)."""
    where = f"DICOM folder {folder!r}"
    paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))]
    scan = dicom.scan_series(paths, where, frame_interval_s=1.0)
    source = dicomref.source_of_scan(scan, where, quiet=True)
    _check_source(source, folder)
    hd = _highdicom()
    patient_study, _ = dicomref.conformed_patient_study(source)
    sources = _made(lambda: _sources(source, patient_study), "the copies of the source headers")
    shape = (len(scan.frames[0]), scan.rows, scan.cols)
    geometry = _geometry(hd, scan.matrix, shape[0], _thickness(source.headers))
    _made(lambda: _parametric_map(hd, "vp", np.zeros(shape, dtype=np.float32), sources, geometry, PM_SERIES_NUMBER,
                                  "extended_tofts"), "a Parametric Map")


def _sources(source: dicomref.DicomSource, patient_study: dict) -> list:
    """Copies of the source headers with the frame of reference and the patient and study attributes the
    derived objects copy, as :func:`dicomref.conformed_patient_study` gives them (the files are not touched)."""
    out = []
    for ds in source.headers:
        ds = copy.deepcopy(ds)
        for keyword, value in patient_study.items():
            setattr(ds, keyword, value)
        ds.FrameOfReferenceUID = source.frame_of_reference_uid
        _share_geometry(ds)
        if "PerFrameFunctionalGroupsSequence" not in ds and _number(ds, "SliceThickness") is None:
            spacing = _number(ds, "SpacingBetweenSlices")            # highdicom reads the thickness of each image
            ds.SliceThickness = _ds(spacing) if spacing else "1"
        out.append(ds)
    return out


def _number(ds, keyword):
    """A positive finite number of ``ds.keyword``, or None (:func:`files.dicom._number`'s reading)."""
    value = dicom._number(dicom._get(ds, keyword))
    return value if value is not None and value > 0 else None


def _ds(x: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters: 10 significant digits)."""
    return f"{float(x):.10g}"


def _share_geometry(ds) -> None:
    """An enhanced source whose pixel measures or plane orientation are per frame (PS3.3 C.7.6.16 allows
    either) gets its first frame's as shared ones too: highdicom reads them from the shared groups only."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames:
        return
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    if not ds.get("SharedFunctionalGroupsSequence"):
        ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    shared = ds.SharedFunctionalGroupsSequence[0]
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if keyword not in shared and keyword in frames[0]:
            setattr(shared, keyword, copy.deepcopy(frames[0].get(keyword)))


def _geometry(hd, ijk_to_ras, n_slices: int, thickness_mm):
    """(pixel measures, plane orientation, plane positions of the slices k = 0 .. n_slices - 1) of the DCE
    grid, in LPS: a row runs along I, a column along J (Image Orientation's first and second triplets),
    Pixel Spacing is [between rows (J), between columns (I)]; the slice thickness is the source's (else the
    slice spacing)."""
    lps = LPS @ np.asarray(ijk_to_ras, dtype=float)
    steps = np.linalg.norm(lps[:3, :3], axis=0)                  # mm along I, J, K
    orientation = np.r_[lps[:3, 0] / steps[0], lps[:3, 1] / steps[1]]
    positions = slice_positions_lps(ijk_to_ras, n_slices)
    thickness = thickness_mm or steps[2]
    patient = hd.CoordinateSystemNames.PATIENT
    fit = lambda x: float(_ds(x))     # noqa: E731 - highdicom 0.22 writes spacing between slices unformatted
    measures = hd.PixelMeasuresSequence(pixel_spacing=[fit(steps[1]), fit(steps[0])],
                                        slice_thickness=fit(thickness), spacing_between_slices=fit(steps[2]))
    position = _tolerant(hd.PlanePositionSequence)
    return (measures, _tolerant(hd.PlaneOrientationSequence)(patient, [float(x) for x in orientation]),
            [position(patient, [float(x) for x in p]) for p in positions])


def slice_positions_lps(ijk_to_ras, n_slices: int) -> np.ndarray:
    """(n_slices, 3) Image Position (Patient) of the slices k = 0 .. n_slices - 1 of a grid (mm, LPS): the
    position of voxel (0, 0, k)."""
    lps = LPS @ np.asarray(ijk_to_ras, dtype=float)
    k = np.arange(int(n_slices), dtype=float)
    return (lps[:3, 2:3] * k + lps[:3, 3:4]).T


def _tolerant(base):
    """A highdicom plane position or orientation type that compares as unequal (instead of refusing) with a
    value of another type: highdicom 0.22 compares ours with an enhanced source's per-frame positions and
    shared orientation, which it reads as plain datasets, and raises TypeError there (later versions
    compare them themselves)."""

    class Tolerant(base):
        def __eq__(self, other):
            return isinstance(other, base) and base.__eq__(other, self)

        __hash__ = None

    return Tolerant


def _thickness(headers):
    """The source's Slice Thickness (mm; an enhanced file's in its shared or first frame's Pixel Measures), or
    None."""
    ds = headers[0]
    for groups in (ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")):
        measures = groups[0].get("PixelMeasuresSequence") if groups else None
        if measures:
            return _number(measures[0], "SliceThickness")
    return _number(ds, "SliceThickness")


def _common(hd):
    return dict(manufacturer=MANUFACTURER, manufacturer_model_name="DCEPerfusion", software_versions=__version__,
                device_serial_number="1")


def _window(hd, low, high) -> dict:
    """The display window of a map, as the installed highdicom takes it (0.28: a VOI LUT transformation;
    0.22: window centre and width), with the VOI LUT Function LINEAR_EXACT: the maps' windows are narrower
    than 1 (vp: 0 to 0.2), which PS3.3 C.11.2.1.2 permits only with LINEAR_EXACT (:func:`_exact_window`
    sets it on 0.22)."""
    centre, width = (low + high) / 2.0, max(high - low, 1e-6)
    if "voi_lut_transformations" in inspect.signature(hd.pm.ParametricMap.__init__).parameters:
        return {"voi_lut_transformations": [hd.VOILUTTransformation(window_center=centre, window_width=width,
                                                                   voi_lut_function="LINEAR_EXACT")]}
    return {"window_center": centre, "window_width": width}


def _exact_window(pm) -> None:
    for item in pm.SharedFunctionalGroupsSequence[0].get("FrameVOILUTSequence", []):
        item.VOILUTFunction = "LINEAR_EXACT"


#: Frame Anatomy of the maps (PS3.3 C.7.6.16.2.8, a Parametric Map's mandatory functional group): the source's
#: when it has one, else the spine's (SCT 421060004; what DCEPerfusion is for), laterality unpaired.
SPINE = ("421060004", "SCT", "Spine")


def _frame_anatomy(pm, sources) -> None:
    from pydicom.dataset import Dataset
    shared = pm.SharedFunctionalGroupsSequence[0]
    if "FrameAnatomySequence" in shared:
        return
    groups = sources[0].get("SharedFunctionalGroupsSequence") or sources[0].get("PerFrameFunctionalGroupsSequence")
    given = groups[0].get("FrameAnatomySequence") if groups else None
    if given:
        shared.FrameAnatomySequence = copy.deepcopy(given)
        return
    anatomy, region = Dataset(), Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = SPINE
    anatomy.AnatomicRegionSequence = [region]
    anatomy.FrameLaterality = "U"
    shared.FrameAnatomySequence = [anatomy]


def _description(name: str, model: str) -> str:
    """What a PACS lists for the map's series: "DCEPerfusion Ktrans (1/min), Extended Tofts"."""
    info = MAPS[name]
    unit = f" ({info.unit})" if info.unit not in ("1", "code") else ""
    text = f"DCEPerfusion {info.title}{unit}, {MODELS[model].title}"
    return text if len(text) <= 64 else f"DCEPerfusion {info.title}{unit}, {model}"[:64]


def _parametric_map(hd, name, values, sources, geometry, number, model):
    info = MAPS[name]
    data = np.ascontiguousarray(values, dtype=np.float32)
    finite = data[np.isfinite(data)]
    value_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    unit = dicomcodes.UNITS[info.unit]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=name[:16], lut_explanation=f"{info.title}: {info.description}"[:64],
        unit=dicomcodes.coded(unit), value_range=value_range, slope=1.0, intercept=0.0,
        quantity_definition=dicomcodes.coded(dicomcodes.quantity(name)))
    low, high = info.window
    measures, orientation, positions = geometry
    pm = hd.pm.ParametricMap(
        source_images=sources, pixel_array=data, series_instance_uid=hd.UID(), series_number=number,
        sop_instance_uid=hd.UID(), instance_number=1, contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], pixel_measures=measures, plane_orientation=orientation,
        plane_positions=positions, content_label=name.upper()[:16],
        content_description=_description(name, model), **_window(hd, low, high), **_common(hd))
    pm.SeriesDescription = _description(name, model)
    if dicomcodes.quantity(name)[1] == dicomcodes.SCHEME:                   # PS3.3 C.12.1.1.5
        pm.CodingSchemeIdentificationSequence = [dicomcodes.private_scheme_item()]
    _exact_window(pm)
    _frame_anatomy(pm, sources)
    return pm


def _segments(result) -> list:
    """(name in the record, label, mask (K, J, I) bool, role, algorithm type) of every segment the SEG holds:
    the lesions and the reference under their names, the AIF's artery as "AIF" (or "AIF (detected)"); a label
    taken already (a lesion named "AIF", names alike in their first 64 characters) gets " (2)", " (3)", ...;
    the record keys the lesions by their full names, the artery by its label."""
    out = [(name, np.asarray(mask, dtype=bool), "reference" if name == result.reference else "lesion", "MANUAL")
           for name, mask in result.lesions.items()]
    if result.aif_mask is not None:
        detected = result.options.aif_source == "automatic"
        name = "AIF (detected)" if detected else "AIF"
        out.append((name, np.asarray(result.aif_mask, dtype=bool), "aif", "AUTOMATIC" if detected else "MANUAL"))
    labels, unique = [], []
    for name, mask, role, algorithm in out:              # a lesion named "AIF", or names alike in 64 characters
        label, n = name[:64], 2
        while label in labels:
            suffix = f" ({n})"
            label, n = name[:64 - len(suffix)] + suffix, n + 1
        labels.append(label)
        unique.append((label if role == "aif" else name, label, mask, role, algorithm))
    return unique


def _segmentation(hd, segments, sources, geometry):
    descriptions = []
    for number, (_, name, _, role, algorithm) in enumerate(segments, start=1):
        category, kind = dicomcodes.SEGMENT_CODES[role]
        extra = {}
        if algorithm == "AUTOMATIC":
            extra["algorithm_identification"] = hd.AlgorithmIdentificationSequence(
                name="DCEPerfusion AIF detection", version=__version__,
                family=dicomcodes.coded(dicomcodes.AIF_DETECTION_FAMILY))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=dicomcodes.coded(category),
            segmented_property_type=dicomcodes.coded(kind),
            algorithm_type=getattr(hd.seg.SegmentAlgorithmTypeValues, algorithm), **extra))
    pixels = np.stack([mask for _, _, mask, _, _ in segments], axis=-1).astype(np.uint8)
    measures, orientation, positions = geometry
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, pixel_measures=measures, plane_orientation=orientation,
        plane_positions=positions, omit_empty_frames=False, content_label="LESIONS",
        content_description="DCEPerfusion segments", **_common(hd))
    if any(algorithm == "AUTOMATIC" for *_, algorithm in segments):         # the private algorithm family
        seg.CodingSchemeIdentificationSequence = [dicomcodes.private_scheme_item()]
    return seg


def _entry(kind, name, file, ds) -> dict:
    return {"kind": kind, "map": name, "file": file, "sop_class_uid": str(ds.SOPClassUID),
            "sop_instance_uid": str(ds.SOPInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID)}


def write_dicom_exam(result, dicom_dir: str, overwrite: bool = False) -> dict:
    """Write the exam's Parametric Maps and Segmentation into ``dicom_dir`` (see the module doc) and return
    the record (also written there as ``dicom_objects.json``). ValueError (one line) for a series not read
    from DICOM or without a Study Instance UID, or without highdicom; a folder holding other files is not
    replaced, a previous export only with ``overwrite``."""
    source = check_exportable(result)
    hd = _highdicom()
    patient_study, notes = dicomref.conformed_patient_study(source)
    for note in notes:
        log.warning("%s: %s", result.series.source, note)
    sources = _made(lambda: _sources(source, patient_study), "the copies of the source headers")
    shape = result.series.shape_kji
    geometry = _geometry(hd, result.series.ijk_to_ras, shape[0], _thickness(source.headers))
    segments = _segments(result)
    objects = []
    with atomic.result_folder(dicom_dir, overwrite, is_ours, RECORD) as tmp:
        for i, (name, values) in enumerate(result.maps.items()):
            pm = _made(lambda: _parametric_map(hd, name, values, sources, geometry, PM_SERIES_NUMBER + i,
                                               result.fit.model), f"the Parametric Map of {name}")
            _save(pm, os.path.join(tmp, map_file(name)))
            objects.append(_entry("parametric map", name, map_file(name), pm))
        if segments:
            seg = _made(lambda: _segmentation(hd, segments, sources, geometry), "the Segmentation")
            _save(seg, os.path.join(tmp, SEGMENTATION))
            objects.append(_entry("segmentation", None, SEGMENTATION, seg))
        record = {"folder": os.path.abspath(dicom_dir), "patient_study": patient_study,
                  "frame_of_reference_uid": source.frame_of_reference_uid,
                  "source_series_uid": source.series_instance_uid, "objects": objects,
                  "segments": {key: number for number, (key, *_) in enumerate(segments, start=1)},
                  "notes": [*source.notes, *notes]}
        results.write_json(os.path.join(tmp, RECORD), record)
    log.info("%s: %d DICOM object(s) written", dicom_dir, len(objects))
    return record


def _quietly(make):
    """``make()`` without pydicom's warnings about values longer than their VR allows (the source's over-long
    patient or study values are copied on purpose, and noted once: :func:`dicomref._conform`) and
    highdicom's about a person name of one component (anonymised data: "ANONYMOUS"), once per object."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exceeds the maximum.*length", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name",
                                category=UserWarning)
        return make()


def _made(make, what: str):
    """``make()``, with an error of highdicom's or pydicom's (a source value they refuse or cannot parse) as
    one line naming ``what``."""
    try:
        return _quietly(make)
    except Exception as exc:                        # noqa: BLE001 - pydicom's parse errors are not ValueErrors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"DICOM export: could not make {what} ({reason}) - a value in the source's DICOM headers is "
                         "damaged or not valid DICOM; export the series from the scanner or PACS again") from None


def _save(ds, path: str) -> None:
    """Write ``ds`` in UTF-8 (ISO_IR 192): a patient's or segment's name may be non-ASCII (highdicom 0.22 does
    not copy the source's character set; 0.28 does, and UTF-8 holds whatever it held)."""
    ds.SpecificCharacterSet = "ISO_IR 192"
    _quietly(lambda: write_dataset(ds, path))


def write_dataset(ds, path: str) -> str:
    """A DICOM dataset written to ``path`` (its folder made) through a temporary name
    (:func:`atomic.replacing`), with preamble and file meta (pydicom 3: ``enforce_file_format``; pydicom
    2.4: ``write_like_original=False``)."""
    import pydicom
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic.replacing(path) as tmp:
        try:
            pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
        except TypeError:                                   # pydicom 2.4
            pydicom.dcmwrite(tmp, ds, write_like_original=False)
    log.info("DICOM written: %s", path)
    return path
