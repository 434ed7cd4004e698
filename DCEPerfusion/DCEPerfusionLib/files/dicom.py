"""A dynamic (DCE) series from a DICOM folder, as the core's :class:`~DCEPerfusionLib.core.series.Series4D`.

What is read (headers with pydicom, ``stop_before_pixels``, so a folder of thousands of files reads fast):

- classic files, one 2D image per file (MR Image Storage and the like), in any order;
- enhanced multi-frame files (Enhanced MR Image Storage, as Philips and Siemens write them): one file
  with all frames, or a folder of them (e.g. one volume per time point). Each frame's geometry comes
  from its functional groups (Plane Position, Plane Orientation, Pixel Measures; per-frame or shared),
  its time from Frame Content (Temporal Position Index for the order; Frame Acquisition or Reference
  DateTime for the time) or a Trigger Time in the Cardiac Synchronization or MR Timing sequences, its
  rescale from Pixel Value Transformation; TR (ms) and flip angle from MR Timing And Related Parameters.

How: the images (files or frames) of the one series in the folder are grouped by slice position, and
the positions sorted along the slice normal. The frame times come from the timing tag present in most
images that varies between frames - Trigger Time (GE, Philips), Acquisition Time (Siemens), Content
Time, Acquisition DateTime; for enhanced files the frame DateTimes first - with ties going to that
order of preference; TM times running past midnight are unwrapped. Frames are ordered by Temporal
Position Identifier/Index when every image has one (Philips), else by that time. A time missing from
a few images (at most a quarter) is filled by linear interpolation or extrapolation from the
neighbouring frames, with a warning and a note in ``time_source``; without a Temporal Position those
images are placed by Instance Number, else Acquisition Number (enhanced: the file's Instance Number
and the frame number), which must order the other images as their times do.
Frame k is the k-th image at every position. IJK->RAS is what SimpleITK's series reader gives (origin
at the first slice along the normal, slice spacing from the first and last positions; one slice:
Spacing Between Slices, else Slice Thickness), in RAS. Pixels are decoded with numpy for uncompressed
transfer syntaxes, by pydicom's decoders otherwise and, for classic files, SimpleITK/GDCM as a last
resort; rescale slope and intercept are applied. TR in s, flip angle in degrees, field strength in T
(Magnetic Field Strength; an old value in gauss is converted).

Other files in the folder (a DICOMDIR, text, thumbnails, reports) are ignored with a log line; a
damaged, colour or undecodable image, or a folder holding several series, is refused with one line
naming the file or folder and the fix (``ValueError``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os

import numpy as np

from ..core.series import Series4D, resolve_frame_times
from ..core.units import MS_PER_S
from .images import LPS

log = logging.getLogger(__name__)

#: At most this fraction of the images may lack the timing tag; their times are then filled in.
MAX_MISSING_TIME_FRACTION = 0.25
#: Media Storage Directory (DICOMDIR).
_DICOMDIR = "1.2.840.10008.1.3.10"
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_MAX_SIDE = 16384                                           # rows or columns of one image
_MAX_DECODED_BYTES = 8 * 2 ** 30                           # one file's pixels after decoding
_CONVERT = "convert it to uncompressed DICOM first (e.g. gdcmconv --raw IN OUT, or dcmdjpeg IN OUT)"

#: (key, label) of the timing tags, in order of preference; values are converted to s.
_CLASSIC_TIMES = (("trigger", "Trigger Time (0018,1060)"), ("acquisition", "Acquisition Time (0008,0032)"),
                  ("content", "Content Time (0008,0033)"), ("acquisition_dt", "Acquisition DateTime (0008,002A)"))
_ENHANCED_TIMES = (("frame_acquisition", "Frame Acquisition DateTime (0018,9074)"),
                   ("frame_reference", "Frame Reference DateTime (0018,9151)"),
                   ("trigger", "Trigger Time (0018,1060)"), ("acquisition_dt", "Acquisition DateTime (0008,002A)"),
                   ("acquisition", "Acquisition Time (0008,0032)"), ("content", "Content Time (0008,0033)"))
_TM_KEYS = ("acquisition", "content")                       # time of day: may run past midnight


class _Refused(ValueError):
    """A one-line refusal of ours (passed through the per-file wrapping)."""


class _Image:
    """One 2D image: a classic file, or one frame (0-based) of a multi-frame file."""

    __slots__ = ("path", "frame", "position", "orientation", "spacing", "single_spacing", "temporal", "order",
                 "times", "slope", "intercept")

    def __init__(self, path, frame=None):
        self.path, self.frame = path, frame
        self.times, self.order = {}, {}

    @property
    def label(self) -> str:
        return self.path if self.frame is None else f"{self.path} (frame {self.frame + 1})"


# ------------------------------------------------------------------------------------------- values
def _get(ds, keyword):
    """``ds.keyword``, or None when absent, empty or unreadable (a damaged value counts as absent)."""
    if ds is None:
        return None
    try:
        v = ds.get(keyword)
    except Exception:                                       # pydicom converts values lazily, on access
        return None
    if v is None or (isinstance(v, str) and not v.strip("\0 ")) or (isinstance(v, bytes) and not v.strip(b"\0 ")):
        return None
    return v


def _numbers(v, n=None):
    """Finite floats of a DS/IS/FD value (one or several), or None when not numbers or not ``n`` of them."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("latin-1")
    items = v.split("\\") if isinstance(v, str) else (list(v) if hasattr(v, "__iter__") else [v])
    try:
        out = [float(x) for x in items]
    except (TypeError, ValueError, OverflowError):
        return None
    if not out or not all(math.isfinite(x) for x in out) or (n is not None and len(out) != n):
        return None
    return out


def _number(v):
    """The first finite number of a value, or None."""
    x = _numbers(v)
    return x[0] if x else None


def _integer(v):
    x = _number(v)
    return int(x) if x is not None and x == int(x) and abs(x) < 2 ** 53 else None


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bytes):
        v = v.decode("latin-1", "replace")
    return str(v).strip("\0 ")


def _show(v, n=32) -> str:
    """A header value for a message: printable, at most ``n`` characters."""
    s = "".join(c if c.isprintable() else "?" for c in _text(v))
    return s if len(s) <= n else s[:n] + "..."


def _tm_s(v):
    """DICOM TM (HHMMSS.ffffff, or the old HH:MM:SS) as seconds after midnight, or None."""
    s = _text(v).replace(":", "")
    if not s:
        return None
    head, _, frac = s.partition(".")
    if not head.isdigit() or len(head) not in (2, 4, 6) or (frac and not frac.isdigit()):
        return None
    h, m, sec = int(head[0:2]), int(head[2:4] or 0), int(head[4:6] or 0)
    if h > 23 or m > 59 or sec > 60:
        return None
    return 3600.0 * h + 60.0 * m + sec + (float("0." + frac) if frac else 0.0)


_EPOCH = datetime.datetime(1970, 1, 1)


def _dt_s(v):
    """DICOM DT (YYYYMMDDHHMMSS.ffffff&ZZXX, trailing parts optional) as seconds since 1970 (UTC when an
    offset is given), or None."""
    s = _text(v)
    offset = 0.0
    for sign in "+-":
        if sign in s[4:]:
            s, _, z = s.rpartition(sign)
            if len(z) != 4 or not z.isdigit():
                return None
            offset = (1 if sign == "+" else -1) * (3600.0 * int(z[:2]) + 60.0 * int(z[2:]))
            break
    head, _, frac = s.partition(".")
    if not head.isdigit() or len(head) < 8 or len(head) % 2 or len(head) > 14 or (frac and not frac.isdigit()):
        return None
    parts = [int(head[i:i + 2]) for i in range(4, len(head), 2)]
    parts += [0] * (5 - len(parts))                        # month, day, hour, minute, second
    try:
        d = datetime.datetime(int(head[:4]), parts[0], parts[1], parts[2], parts[3], min(parts[4], 59))
    except ValueError:
        return None
    return (d - _EPOCH).total_seconds() + (parts[4] == 60) + (float("0." + frac) if frac else 0.0) - offset


def _ms_s(v):
    x = _number(v)
    return x / MS_PER_S if x is not None else None


def _why(exc: BaseException) -> str:
    """An exception as a short phrase for a one-line message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------ headers
def _read_header(path: str):
    """(dataset without pixels, forced) of a DICOM file; None for a file that is not DICOM."""
    import pydicom
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise _Refused(f"{path}: cannot be opened ({exc.strerror}) - check that the file is readable") from None
    if len(head) == 132 and head[128:132] == b"DICM":
        forced = False
    elif len(head) >= 8 and head[:2] in (b"\x08\x00", b"\x02\x00"):
        forced = True                                      # raw DICOM (no preamble): starts at group 0002/0008
    else:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=forced)
    except Exception as exc:
        if forced:
            return None
        raise _Refused(f"{path}: cannot be read as DICOM ({_why(exc)}) - is the file complete? Copy it again "
                       "from the scanner or PACS") from None
    if forced and (_get(ds, "SOPClassUID") is None or _get(ds, "Rows") is None):
        return None
    return ds, forced


def _sop_class(ds) -> str:
    uid = _text(_get(ds, "SOPClassUID"))
    if not uid:
        uid = _text(_get(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID"))
    return uid


def _is_image(ds, path) -> bool:
    """True for a file holding an image; False for other objects (DICOMDIR, reports, presentation
    states); refused when an image file lacks its image attributes (a damaged file)."""
    uid = _sop_class(ds)
    if uid == _DICOMDIR:
        return False
    if _get(ds, "Rows") is not None or _get(ds, "PerFrameFunctionalGroupsSequence") is not None:
        return True
    try:
        from pydicom.uid import UID
        name = UID(uid).name if uid else ""
    except Exception:
        name = ""
    if "Image Storage" in name:
        raise _Refused(f"{path}: an image file ({name}) without Rows (0028,0010) - the file is damaged or "
                       "incomplete; copy it again from the scanner or PACS")
    return False


def _transfer_syntax(ds) -> str:
    return _text(_get(getattr(ds, "file_meta", None), "TransferSyntaxUID"))


def _check_pixel_format(ds, path) -> dict:
    """``{rows, cols, frames, bits, stored, signed}`` after refusing what cannot be a grey-scale DCE image."""
    spp = _integer(_get(ds, "SamplesPerPixel"))
    spp = 1 if spp is None else spp
    photometric = _text(_get(ds, "PhotometricInterpretation")).upper() or "MONOCHROME2"
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _Refused(f"{path}: a colour image ({spp} samples per pixel, {_show(photometric)}; e.g. a secondary "
                       "capture or screenshot) - give the folder of the grey-scale DCE series")
    rows, cols = _integer(_get(ds, "Rows")), _integer(_get(ds, "Columns"))
    if not (rows and cols and 0 < rows <= _MAX_SIDE and 0 < cols <= _MAX_SIDE):
        raise _Refused(f"{path}: Rows/Columns ({_show(_get(ds, 'Rows'))}, {_show(_get(ds, 'Columns'))}) are not an "
                       "image size - the file is damaged; copy it again from the scanner or PACS")
    bits = _integer(_get(ds, "BitsAllocated"))
    stored = _integer(_get(ds, "BitsStored"))
    stored = bits if stored is None else stored
    if bits not in (8, 16, 32) or not (stored and 0 < stored <= bits):
        raise _Refused(f"{path}: Bits Allocated {bits} / Bits Stored {stored} cannot be read (8, 16 or 32 bits "
                       "allocated) - the file is damaged or of an unusual kind; re-export the series as MR images")
    representation = _integer(_get(ds, "PixelRepresentation"))
    if representation not in (None, 0, 1):
        raise _Refused(f"{path}: Pixel Representation is {_show(_get(ds, 'PixelRepresentation'))} (0 or 1 expected) "
                       "- the file is damaged; copy it again from the scanner or PACS")
    n = _get(ds, "NumberOfFrames")
    frames = _integer(n) if n is not None else 1
    if frames is None or frames < 1:
        raise _Refused(f"{path}: Number of Frames is {_show(n)!r} - the file is damaged; copy it again from the "
                       "scanner or PACS")
    if rows * cols * frames * bits // 8 > _MAX_DECODED_BYTES:
        raise _Refused(f"{path}: {frames} frames of {rows}x{cols} pixels are too large to read - the file is "
                       "damaged; copy it again from the scanner or PACS")
    return dict(rows=rows, cols=cols, frames=frames, bits=bits, stored=stored, signed=representation == 1)


def _geometry_of(img, position, orientation, spacing, thickness, between):
    img.position = None if position is None else tuple(position)
    img.orientation = orientation
    img.spacing = spacing
    img.single_spacing = next((x for x in (_number(between), _number(thickness)) if x and x > 0), 1.0)


def _classic_images(path, ds):
    img = _Image(path)
    _geometry_of(img, _numbers(_get(ds, "ImagePositionPatient"), 3), _numbers(_get(ds, "ImageOrientationPatient"), 6),
                 _numbers(_get(ds, "PixelSpacing"), 2), _get(ds, "SliceThickness"), _get(ds, "SpacingBetweenSlices"))
    img.temporal = _integer(_get(ds, "TemporalPositionIdentifier"))
    for keyword, label in (("InstanceNumber", "Instance Number"), ("AcquisitionNumber", "Acquisition Number")):
        v = _integer(_get(ds, keyword))
        img.order[label] = None if v is None else (v,)
    img.times = {"trigger": _ms_s(_get(ds, "TriggerTime")), "acquisition": _tm_s(_get(ds, "AcquisitionTime")),
                 "content": _tm_s(_get(ds, "ContentTime")), "acquisition_dt": _dt_s(_get(ds, "AcquisitionDateTime"))}
    img.slope, img.intercept = _rescale(path, _get(ds, "RescaleSlope"), _get(ds, "RescaleIntercept"))
    return [img]


def _rescale(label, slope, intercept):
    s = 1.0 if slope is None else _number(slope)
    i = 0.0 if intercept is None else _number(intercept)
    if s is None or i is None or s == 0 or abs(s) > 1e30 or abs(i) > 1e30:
        raise _Refused(f"{label}: Rescale Slope/Intercept ({_show(slope)!r}, {_show(intercept)!r}) are not usable "
                       "numbers - the file is damaged; copy it again from the scanner or PACS")
    return s, i


def _first_item(seq):
    try:
        item = seq[0]
    except Exception:
        return None
    return item if hasattr(item, "get") else None


def _group_value(groups, sequence, keyword):
    """``keyword`` from ``sequence`` in the first of ``groups`` (a frame's functional groups, then the shared
    ones) that has it."""
    for g in groups:
        item = _first_item(_get(g, sequence))
        v = _get(item, keyword)
        if v is not None:
            return v
    return None


def _enhanced_images(path, ds, n_frames):
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    try:
        n_items = len(per_frame) if per_frame is not None else 0
    except Exception:
        n_items = 0
    if n_items != n_frames:
        raise _Refused(f"{path}: multi-frame file with {n_frames} frames but {n_items} per-frame functional groups - "
                       "not an enhanced MR file that can be read; convert it to one file per image (e.g. with "
                       "dcm2dcm or emf2sf)")
    shared = _first_item(_get(ds, "SharedFunctionalGroupsSequence"))
    instance = _integer(_get(ds, "InstanceNumber"))
    file_times = {"acquisition_dt": _dt_s(_get(ds, "AcquisitionDateTime")),
                  "acquisition": _tm_s(_get(ds, "AcquisitionTime")), "content": _tm_s(_get(ds, "ContentTime"))}
    top_trigger = _ms_s(_get(ds, "TriggerTime"))
    images = []
    for f in range(n_frames):
        frame = per_frame[f]
        groups = (frame if hasattr(frame, "get") else None, shared)
        img = _Image(path, f)

        def g(sequence, keyword):
            return _group_value(groups, sequence, keyword)

        _geometry_of(img, _numbers(g("PlanePositionSequence", "ImagePositionPatient"), 3),
                     _numbers(g("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                     _numbers(g("PixelMeasuresSequence", "PixelSpacing"), 2),
                     g("PixelMeasuresSequence", "SliceThickness"), g("PixelMeasuresSequence", "SpacingBetweenSlices"))
        img.temporal = _integer(g("FrameContentSequence", "TemporalPositionIndex"))
        img.order["Instance Number and frame number"] = (instance if instance is not None else 0, f)
        trigger = _ms_s(g("CardiacSynchronizationSequence", "TriggerTime"))
        if trigger is None:
            trigger = _ms_s(g("MRTimingAndRelatedParametersSequence", "TriggerTime"))
        img.times = dict(file_times, trigger=trigger if trigger is not None else top_trigger,
                         frame_acquisition=_dt_s(g("FrameContentSequence", "FrameAcquisitionDateTime")),
                         frame_reference=_dt_s(g("FrameContentSequence", "FrameReferenceDateTime")))
        slope, intercept = (g("PixelValueTransformationSequence", "RescaleSlope"),
                            g("PixelValueTransformationSequence", "RescaleIntercept"))
        if slope is None and intercept is None:
            slope, intercept = _get(ds, "RescaleSlope"), _get(ds, "RescaleIntercept")
        img.slope, img.intercept = _rescale(img.label, slope, intercept)
        images.append(img)
    return images


def _acquisition(ds, enhanced):
    """(TR s, flip angle degrees, field strength T) of a file, None where absent or not positive."""
    groups = (_first_item(_get(ds, "SharedFunctionalGroupsSequence")),
              _first_item(_get(ds, "PerFrameFunctionalGroupsSequence"))) if enhanced else ()
    tr = _number(_group_value(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime")) if groups else None
    flip = _number(_group_value(groups, "MRTimingAndRelatedParametersSequence", "FlipAngle")) if groups else None
    tr = _number(_get(ds, "RepetitionTime")) if tr is None else tr
    flip = _number(_get(ds, "FlipAngle")) if flip is None else flip
    field = _number(_get(ds, "MagneticFieldStrength"))
    if field is not None and field > 100:                  # some old files give gauss (15000 = 1.5 T)
        log.warning("Magnetic Field Strength %g read as gauss: %g T", field, field / 1e4)
        field = field / 1e4
    if field is not None and not 0 < field <= 25:
        log.warning("Magnetic Field Strength %g T is not plausible; left out", field)
        field = None
    return (tr / MS_PER_S if tr is not None and tr > 0 else None, flip if flip is not None and flip > 0 else None,
            field if field is not None and field > 0 else None)


# ----------------------------------------------------------------------------------------- geometry
def _check_geometry(images, where):
    """The (row, column) direction cosines, normalised, and pixel spacing shared by all images."""
    missing = [im for im in images if im.position is None]
    if missing:
        raise _Refused(f"{where}: {_some(missing)} without a usable Image Position (Patient) (0020,0032) - not a "
                       "volume series, or damaged files")
    for what, attr, tag in (("Image Orientation (Patient)", "orientation", "(0020,0037)"),
                            ("Pixel Spacing", "spacing", "(0028,0030)")):
        missing = [im for im in images if getattr(im, attr) is None]
        if missing:
            raise _Refused(f"{where}: {_some(missing)} without a usable {what} {tag} - not a volume series, or "
                           "damaged files")
    o = np.array(images[0].orientation)
    row, col = o[:3], o[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if not (0.9 < nr < 1.1 and 0.9 < nc < 1.1) or abs(float(np.dot(row, col))) > 0.05 * nr * nc:
        raise _Refused(f"{where}: Image Orientation (Patient) {list(o)} of {images[0].label} is not two perpendicular "
                       "unit vectors - the file is damaged; copy it again from the scanner or PACS")
    different = [im for im in images if np.max(np.abs(np.array(im.orientation) - o)) > 1e-3]
    if different:
        raise _Refused(f"{where}: {_some(different)} with an orientation other than {images[0].label}'s - the series "
                       "mixes stacks (e.g. a localizer); put the DCE images in a folder of their own")
    sp = np.array(images[0].spacing)
    if not np.all(sp > 0):
        raise _Refused(f"{where}: Pixel Spacing {list(sp)} of {images[0].label} is not positive - the file is damaged; "
                       "copy it again from the scanner or PACS")
    different = [im for im in images if np.max(np.abs(np.array(im.spacing) - sp)) > 1e-4 * np.max(sp) + 1e-6]
    if different:
        raise _Refused(f"{where}: {_some(different)} with a pixel spacing other than {images[0].label}'s - the series "
                       "mixes acquisitions; put the DCE series in a folder of its own")
    return row / nr, col / nc, sp


def _ijk_to_ras(positions, row, col, spacing, single_spacing, where):
    """IJK->RAS (4x4, mm) of slices at ``positions`` (sorted along the normal), as SimpleITK's series reader
    gives it: origin at the first slice, slice spacing from the distance between the first and last."""
    normal = np.cross(row, col)
    p = np.array(positions, dtype=float)
    if len(p) > 1:
        along = p @ normal
        gaps = np.diff(along)
        if gaps.min() <= 1e-3 or gaps.max() - gaps.min() > 0.1 * gaps.mean() + 0.01:
            raise _Refused(f"{where}: slice positions are not evenly spaced along the slice normal "
                           f"({gaps.min():.4g} to {gaps.max():.4g} mm apart) - a slice is missing, or the series holds "
                           "several stacks; export the complete DCE series into a folder of its own")
        dz = float(np.linalg.norm(p[-1] - p[0])) / (len(p) - 1)
        lateral = float(np.linalg.norm(p[-1] - p[0] - (along[-1] - along[0]) * normal))
        if lateral > 0.01 * (along[-1] - along[0]) + 0.01:
            log.warning("%s: the slices are sheared (%.3g mm sideways over the stack; gantry tilt?) - the volume is "
                        "taken as unsheared, as SimpleITK does", where, lateral)
    else:
        dz = float(single_spacing)
    m = np.eye(4)
    m[:3, 0] = row * spacing[1]                              # along a row: column spacing
    m[:3, 1] = col * spacing[0]                              # down a column: row spacing
    m[:3, 2] = normal * dz
    m[:3, 3] = p[0]
    return LPS @ m


def _some(images, n=3) -> str:
    """'2 images (a, b)' naming up to ``n``."""
    names = ", ".join(im.label if hasattr(im, "label") else str(im) for im in images[:n])
    more = f", ... {len(images) - n} more" if len(images) > n else ""
    return f"{len(images)} image{'s' if len(images) != 1 else ''} ({names}{more})"


# ------------------------------------------------------------------------------------------- timing
def _unwrap_midnight(images, key):
    """Times of day (s) of an acquisition that ran past midnight, made continuous (+24 h after midnight)."""
    v = [im.times[key] for im in images if im.times.get(key) is not None]
    if v and max(v) - min(v) > 43200:
        for im in images:
            t = im.times.get(key)
            if t is not None and t < 43200:
                im.times[key] = t + 86400.0


def _fill(t):
    """``t`` (frames) with its NaNs filled linearly from the nearest known frames; and for each filled frame
    (index, how) with how e.g. 'extrapolated from frames 1-2'."""
    t = np.array(t, dtype=float)
    known = np.flatnonzero(np.isfinite(t))
    notes = []
    for k in np.flatnonzero(~np.isfinite(t)):
        before, after = known[known < k], known[known > k]
        if before.size and after.size:
            a, b = before[-1], after[0]
            how = f"interpolated from frames {a} and {b}"
        elif after.size >= 2:
            a, b = after[0], after[1]
            how = f"extrapolated from frames {a}-{b}" if b == a + 1 else f"extrapolated from frames {a} and {b}"
        else:
            a, b = before[-2], before[-1]
            how = f"extrapolated from frames {a}-{b}" if b == a + 1 else f"extrapolated from frames {a} and {b}"
        t[k] = t[a] + (k - a) * (t[b] - t[a]) / (b - a)
        notes.append((int(k), how))
    return t, notes


def _frames(images, by_pos, pos_order, candidates, temporal_label, where, frame_interval_s):
    """(frames: per frame the images in slice order, frame times in s or None, their description)."""
    n_frames = len(by_pos[pos_order[0]])
    given = frame_interval_s is not None and frame_interval_s > 0
    for key in _TM_KEYS:
        _unwrap_midnight(images, key)

    def varies(get):
        return any(len({get(im) for im in by_pos[p] if get(im) is not None}) > 1 for p in pos_order)

    temporal = (all(im.temporal is not None for im in images) and varies(lambda im: im.temporal)
                and all(len({im.temporal for im in by_pos[p]}) == n_frames for p in pos_order))
    best = None                                           # (key, label, images with it)
    for key, label in candidates:
        n = sum(im.times.get(key) is not None for im in images)
        if n and varies(lambda im: im.times.get(key)) and (best is None or n > best[2]):
            best = (key, label, n)
    key, label = (best[0], best[1]) if best else (None, None)
    lacking = [im for im in images if key is not None and im.times.get(key) is None]
    if key is not None and len(lacking) > MAX_MISSING_TIME_FRACTION * len(images):
        if not given:
            raise _Refused(f"{where}: {len(lacking)} of {len(images)} images have no {label} (e.g. "
                           f"{', '.join(im.label for im in lacking[:3])}) - too many to fill in; give the frame "
                           "interval in seconds (--frame-interval)")
        key, lacking = None, []
    if key is None and not given:
        names = ", ".join(lab.split(" (")[0] for _, lab in candidates)
        raise _Refused(f"{where}: no timing tag varies between frames ({names}) - give the frame interval in seconds "
                       "(--frame-interval)")

    placed_by = None
    if temporal:
        order_label, order_of = temporal_label, (lambda im: (im.temporal,))
    elif key is not None and not lacking:
        order_label, order_of = label, (lambda im: (im.times[key],))
    else:
        order_label = order_of = None
        for name in images[0].order:
            if any(im.order.get(name) is None for im in images):
                continue
            if any(len({im.order[name] for im in by_pos[p]}) != n_frames for p in pos_order):
                continue
            if key is not None:                       # must agree with the times of the images that have them
                agree = True
                for p in pos_order:
                    t = [im.times[key] for im in sorted(by_pos[p], key=lambda im: im.order[name])
                         if im.times.get(key) is not None]
                    agree = agree and all(b > a for a, b in zip(t, t[1:]))
                if not agree:
                    continue
            order_label, order_of = name, (lambda im, name=name: im.order[name])
            break
        if order_of is None:
            if key is not None:
                others = " or ".join(images[0].order)
                raise _Refused(f"{where}: {_some(lacking)} without {label}, and their place in time cannot be told "
                               f"(no {others} that orders the frames as the others' times do) - remove those "
                               "frames from the folder")
            raise _Refused(f"{where}: the order of the frames cannot be told (no {temporal_label} or Instance Number "
                           "that is distinct at every slice position) - export the series with its timing tags")
        placed_by = order_label if key is not None else None

    frames = [[] for _ in range(n_frames)]
    for p in pos_order:
        ranked = sorted(by_pos[p], key=order_of)
        keys = [order_of(im) for im in ranked]
        dup = [im for im, a, b in zip(ranked[1:], keys, keys[1:]) if a == b]
        if dup:
            raise _Refused(f"{where}: {_some(dup)} share a slice position and a {order_label} with another image - the "
                           "series holds more than one image per slice and time point (several echoes, or magnitude "
                           "and phase?); export one kind only")
        for k, im in enumerate(ranked):
            frames[k].append(im)
    if key is None:
        return frames, None, ""
    t = np.array([[im.times.get(key, None) if im.times.get(key) is not None else np.nan for im in f]
                  for f in frames], dtype=float)                 # (frames, slices)
    source = f"DICOM {label}" + (f" (order by {temporal_label})" if temporal else "")
    if lacking:
        notes = {}                                              # frame -> (slices lacking, how)
        usable = np.sum(np.isfinite(t), axis=0) >= 2            # slices with times enough to fill from
        for s in np.flatnonzero(usable):
            t[:, s], filled = _fill(t[:, s])
            for k, how in filled:
                notes.setdefault(k, [0, how])[0] += 1
        t = t[:, usable]                                        # the others are timed by these
        if t.shape[1] == 0:
            raise _Refused(f"{where}: {_some(lacking)} without {label}, too many to fill in - give the frame interval "
                           "in seconds (--frame-interval)")
        parts = [f"{int(np.sum(~usable))} slice(s) without times, timed by the others"] if not usable.all() else []
        for k in sorted(notes)[:3]:
            count, how = notes[k]
            part = f"frame {k}" + (f" ({count} of {t.shape[1]} slices)" if count < t.shape[1] else "")
            parts.append(f"{part} had none, {how}")
        if len(notes) > 3:
            parts.append(f"{len(notes) - 3} more frames filled the same way")
        note = "; ".join(parts) + (f" (placed by {placed_by})" if placed_by else "")
        log.warning("%s: %s without %s: %s", where, _some(lacking), label, note)
        source = f"{source}; {note}"
    return frames, t.mean(axis=1), source


# ------------------------------------------------------------------------------------------- pixels
def _read_pixels(path, forced, enhanced, fmt):
    """The stored pixel values of a file, (frames, rows, cols), and whether they are already rescaled;
    ``fmt`` from :func:`_check_pixel_format`."""
    import pydicom
    try:
        ds = pydicom.dcmread(path, force=forced)
    except Exception as exc:
        raise _Refused(f"{path}: cannot be read as DICOM ({_why(exc)}) - is the file complete? Copy it again from "
                       "the scanner or PACS") from None
    ts = _transfer_syntax(ds)
    if "PixelData" not in ds:
        raise _Refused(f"{path}: has no Pixel Data (7FE0,0010) - the file is incomplete, or not an image; copy it "
                       "again from the scanner or PACS")
    if not ts or ts in _UNCOMPRESSED:
        return _decode_uncompressed(path, ds.PixelData, ts == _BIG_ENDIAN, fmt), False
    try:
        from pydicom.uid import UID
        name = UID(ts).name if UID(ts).is_transfer_syntax else ""
    except Exception:
        name = ""
    if not name:
        raise _Refused(f"{path}: unknown transfer syntax {_show(ts, 64)!r} - the file is damaged, or re-export the "
                       "series as uncompressed DICOM")
    try:
        arr = np.asarray(ds.pixel_array)
        rescaled = False
    except Exception as exc:
        text = str(exc)
        no_decoder = isinstance(exc, NotImplementedError) or "missing dependencies" in text or "handlers" in text
        why = _why(exc)
        arr = None
        if not enhanced:
            arr = _gdcm_pixels(path)
            rescaled = True
        if arr is None and no_decoder:
            raise _Refused(f"{path}: pixel data compressed as {name}, for which no decoder is installed - {_CONVERT}; "
                           "or install one (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)") from None
        if arr is None:
            raise _Refused(f"{path}: pixel data compressed as {name} cannot be decoded ({why}) - the file may be "
                           f"damaged; {_CONVERT}") from None
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape != (fmt["frames"], fmt["rows"], fmt["cols"]):
        raise _Refused(f"{path}: decoded pixel data of shape {arr.shape} for {fmt['frames']} frame(s) of "
                       f"{fmt['rows']}x{fmt['cols']} - the file is damaged; {_CONVERT}")
    return arr, rescaled


def _gdcm_pixels(path):
    """A classic file's (rescaled) pixels through SimpleITK/GDCM, which decodes more compressions; or None."""
    import SimpleITK as sitk
    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(path))
    except Exception:
        return None
    return arr if arr.ndim in (2, 3) else None


def _decode_uncompressed(path, data, big_endian, fmt):
    """Native (uncompressed) pixel data as integers (frames, rows, cols), the stored bits only."""
    n_frames, rows, cols, bits, stored = (fmt[k] for k in ("frames", "rows", "cols", "bits", "stored"))
    signed = fmt["signed"]
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused(f"{path}: Pixel Data is not a byte string - the file is damaged; copy it again from the scanner "
                       "or PACS")
    n = n_frames * rows * cols
    need = n * bits // 8
    if len(data) < need:
        raise _Refused(f"{path}: {len(data)} bytes of pixel data for {n_frames} frame(s) of {rows}x{cols} pixels at "
                       f"{bits} bits ({need} bytes) - the file is incomplete or its Bits Allocated is wrong; copy it "
                       "again from the scanner or PACS")
    dtype = np.dtype(f"{'>' if big_endian else '<'}{'i' if signed else 'u'}{bits // 8}")
    arr = np.frombuffer(data, dtype, count=n).astype(dtype.newbyteorder("="))
    if stored < bits:                                      # keep the stored bits, sign-extended if signed
        shift = bits - stored
        arr = (arr << shift) >> shift if signed else arr & ((1 << stored) - 1)
    return arr.reshape(n_frames, rows, cols)


# ------------------------------------------------------------------------------------------ the read
def read_dicom_series(folder: str, frame_interval_s: float | None = None, override: bool = False) -> Series4D:
    """A dynamic series from a DICOM folder: classic files in any order, or enhanced multi-frame files (see
    the module doc). ``frame_interval_s`` (s) is used when the files have no frame times; one that
    contradicts them is refused unless ``override`` (:func:`core.series.resolve_frame_times`). The series'
    ``dicom`` is its :class:`~.dicomref.DicomSource` (the study, series and first frame's headers)."""
    where = f"DICOM folder {folder!r}"
    if not os.path.isdir(folder):
        raise ValueError(f"{where}: is not a folder - give the folder holding the DCE series' DICOM files")
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise ValueError(f"{where}: cannot be listed ({exc.strerror}) - check its permissions") from None
    paths = [os.path.join(folder, name) for name in names if os.path.isfile(os.path.join(folder, name))]
    scan = scan_series(paths, where, frame_interval_s)
    t_s, source = resolve_frame_times(scan.t, scan.time_source, len(scan.frames), where, frame_interval_s, override)
    signal = _read_signal(scan, where)
    tr_s, flip, field = _acquisition(scan.headers[0][1], scan.enhanced)
    from .dicomref import source_of_scan                    # (dicomref reads values with this module's rules)
    return Series4D(signal, t_s, scan.matrix, tr_s, flip, source, folder, field_strength_t=field,
                    dicom=source_of_scan(scan, where))


@dataclasses.dataclass
class SeriesScan:
    """What the headers of one series tell (no pixels read): ``headers`` (path, dataset, forced) of its
    images; ``files`` (path, forced, enhanced, pixel format); ``frames``: per time frame its images in
    slice (K) order; frame times ``t`` (s, any origin, or None) and their description; the IJK->RAS
    ``matrix``; image ``rows``, ``cols``; ``enhanced``."""

    headers: list
    files: list
    frames: list
    t: object
    time_source: str
    matrix: np.ndarray
    rows: int
    cols: int
    enhanced: bool


def scan_series(paths: list, where: str, frame_interval_s: float | None = None) -> SeriesScan:
    """Read the headers of ``paths`` (files that are not DICOM images are skipped with a log line) and lay
    the one series they hold out in slices and frames (the module doc's rules); ValueError naming ``where``
    and the fix."""
    headers, ignored = [], []
    for path in paths:
        name = os.path.basename(path)
        got = _read_header(path)
        if got is None or not _is_image(got[0], path):
            ignored.append(name)
            continue
        headers.append((path,) + got)
    if ignored:
        log.info("%s: %d file(s) that are not DICOM images ignored (%s%s)", where, len(ignored),
                 ", ".join(ignored[:5]), ", ..." if len(ignored) > 5 else "")
    if not headers:
        raise ValueError(f"{where}: no DICOM images found ({len(ignored)} other file(s)) - give the folder holding the "
                         "DCE series' DICOM files")
    by_series = {}
    for h in headers:
        by_series.setdefault(_text(_get(h[1], "SeriesInstanceUID")), []).append(h)
    if len(by_series) > 1:
        desc = "; ".join(f"{_show(uid, 64) or 'no UID'}: {len(v)} file(s) {_show(_get(v[0][1], 'SeriesDescription'))!r}"
                         for uid, v in list(by_series.items())[:4])
        raise ValueError(f"{where}: has {len(by_series)} series ({desc}{'; ...' if len(by_series) > 4 else ''}); put "
                         "the DCE series in a folder of its own")

    images, files = [], []                                   # files: (path, forced, enhanced, pixel format)
    for path, ds, forced in headers:
        try:
            fmt = _check_pixel_format(ds, path)
            n = fmt["frames"]
            enhanced = _get(ds, "PerFrameFunctionalGroupsSequence") is not None
            if n > 1 and not enhanced:
                raise _Refused(f"{path}: a multi-frame file without per-frame functional groups - not an enhanced MR "
                               "file; convert it to one file per image")
            images.extend(_enhanced_images(path, ds, n) if enhanced else _classic_images(path, ds))
        except _Refused:
            raise
        except Exception as exc:                           # a damaged value pydicom cannot convert
            raise ValueError(f"{path}: unreadable DICOM header ({_why(exc)}) - the file is damaged; copy it again "
                             "from the scanner or PACS") from None
        files.append((path, forced, enhanced, fmt))
    kinds = {f[2] for f in files}
    if len(kinds) > 1:
        raise ValueError(f"{where}: mixes enhanced multi-frame and single-image files - put each kind in a folder of "
                         "its own")
    enhanced = kinds.pop()
    sizes = {(f[3]["rows"], f[3]["cols"]) for f in files}
    if len(sizes) > 1:
        raise ValueError(f"{where}: files of different image sizes ({sorted(sizes)}) - the series mixes acquisitions; "
                         "put the DCE series in a folder of its own")
    rows, cols = sizes.pop()

    row, col, spacing = _check_geometry(images, where)
    normal = np.cross(row, col)
    by_pos = {}
    for im in images:
        by_pos.setdefault(tuple(np.round(im.position, 3)), []).append(im)
    counts = {len(v) for v in by_pos.values()}
    if len(counts) != 1:
        others = (f"; {len(ignored)} file(s) were not read as DICOM images ({', '.join(ignored[:3])}"
                  f"{', ...' if len(ignored) > 3 else ''}) - are they complete?" if ignored else "")
        raise ValueError(f"{where}: positions have different numbers of frames ({sorted(counts)}) - the series is "
                         f"incomplete or mixes acquisitions (export it complete, in a folder of its own){others}")
    n_frames = counts.pop()
    if n_frames < 3:
        raise ValueError(f"{where}: {n_frames} frame(s) per slice position - not a dynamic series; give the folder of "
                         "the DCE series")
    pos_order = sorted(by_pos, key=lambda p: float(np.dot(p, normal)))
    matrix = _ijk_to_ras([by_pos[p][0].position for p in pos_order], row, col, spacing,
                         by_pos[pos_order[0]][0].single_spacing, where)

    candidates = _ENHANCED_TIMES if enhanced else _CLASSIC_TIMES
    temporal_label = ("Temporal Position Index (0020,9128)" if enhanced else
                      "Temporal Position Identifier (0020,0100)")
    frames, t, source = _frames(images, by_pos, pos_order, candidates, temporal_label, where, frame_interval_s)
    return SeriesScan(headers, files, frames, t, source, matrix, rows, cols, enhanced)


def _read_signal(scan: SeriesScan, where: str) -> np.ndarray:
    """The (K, J, I, T) float32 signal of a scanned series, rescaled."""
    place = {}                                               # (path, frame) -> (slice, frame)
    for k, f in enumerate(scan.frames):
        for s, im in enumerate(f):
            place[(im.path, im.frame or 0)] = (s, k, im)
    signal = np.empty((len(scan.frames[0]), scan.rows, scan.cols, len(scan.frames)), dtype=np.float32)
    for path, forced, multi, fmt in scan.files:
        try:
            arr, rescaled = _read_pixels(path, forced, multi, fmt)
        except _Refused:
            raise
        except Exception as exc:
            raise ValueError(f"{path}: pixel data cannot be read ({_why(exc)}) - the file is damaged; copy it again "
                             "from the scanner or PACS") from None
        for f in range(fmt["frames"]):
            s, k, im = place[(path, f)]
            v = arr[f].astype(np.float32)
            signal[s, :, :, k] = v if rescaled else v * np.float32(im.slope) + np.float32(im.intercept)
    if not np.all(np.isfinite(signal)):
        raise ValueError(f"{where}: pixel values are not finite after rescaling - a Rescale Slope or Intercept is "
                         "damaged")
    return signal
