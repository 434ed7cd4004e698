"""3D images in and out with SimpleITK, in Slicer's conventions: arrays (K, J, I) with a 4x4 IJK->RAS
matrix (mm). Volumes (anatomy, T1 maps, parameter maps) as NRRD or NIfTI, Slicer ``.seg.nrrd``
segmentations and labelmaps, and the conversion to and from SimpleITK images (LPS physical space).
Files are written under a temporary name and renamed, so no half-written file carries the final name.
"""

from __future__ import annotations

import bz2
import logging
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from . import atomic

log = logging.getLogger(__name__)

#: RAS <-> LPS (Slicer's RAS, ITK's and DICOM's LPS).
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_sitk(array_kji, matrix, dtype=np.float32):
    """A SimpleITK image (LPS physical space) from a (K, J, I) array and its IJK->RAS matrix."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array_kji, dtype=dtype))
    m = LPS @ np.asarray(matrix, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(x) for x in (m[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(x) for x in m[:3, 3]])
    return img


def affine_of(matrix_lps):
    """A SimpleITK ``AffineTransform`` of a 4x4 matrix in LPS (mm): x -> A x + b."""
    import SimpleITK as sitk

    m = np.asarray(matrix_lps, dtype=float)
    tf = sitk.AffineTransform(3)
    tf.SetMatrix([float(x) for x in m[:3, :3].ravel()])
    tf.SetTranslation([float(x) for x in m[:3, 3]])
    return tf


def matrix_of_transform(tf) -> np.ndarray:
    """The 4x4 (LPS, mm) of a SimpleITK Euler3D or affine transform about its centre (x -> A (x - c) + c + t)."""
    a = np.array(tf.GetMatrix(), dtype=float).reshape(3, 3)
    c = np.array(tf.GetCenter(), dtype=float)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = np.array(tf.GetTranslation(), dtype=float) + c - a @ c
    return m


def matrix_of(img) -> np.ndarray:
    """The IJK->RAS matrix of a 3D SimpleITK image (the first three axes of a 4D one)."""
    d = img.GetDimension()
    direction = np.array(img.GetDirection()).reshape(d, d)[:3, :3]
    m = np.eye(4)
    m[:3, :3] = direction * np.array(img.GetSpacing()[:3])
    m[:3, 3] = img.GetOrigin()[:3]
    return LPS @ m


def resample_mask(mask_kji, matrix, shape_kji, target_matrix) -> np.ndarray:
    """A mask moved onto another grid (nearest neighbour, physical positions kept)."""
    import SimpleITK as sitk

    src = to_sitk(np.asarray(mask_kji, dtype=np.uint8), matrix, np.uint8)
    ref = to_sitk(np.zeros(tuple(shape_kji), np.uint8), target_matrix, np.uint8)
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out) > 0


# ============================================================================================ reading
#: Bytes read at a time when checking a file's data (and the most a decompressor returns at once).
CHUNK = 2**20
#: Longest NRRD header read (bytes); Slicer segmentations with many segments have some 100 kB.
MAX_NRRD_HEADER_BYTES = 64 * 2**20
#: Most distinct labels of a labelmap: more are an image given as a segmentation. Fewer labels covering
#: most of the volume (more than IMAGE_LABELS over more than half the voxels) are an image too: an
#: anatomy image of few grey levels, not a segmentation (whose labels cover structures, not everything).
MAX_LABELS = 1000
IMAGE_LABELS = 20
#: Longest NRRD header field line (characters; comments, key/value pairs and ``content`` may be longer):
#: SimpleITK's NRRD reader (teem) crashes on field lines of about 1000 characters.
MAX_NRRD_FIELD_LINE = 512
#: Plausible grids (mm): spacings within these bounds, origins within this distance.
SPACING_RANGE_MM = (1e-6, 1e6)
MAX_ORIGIN_MM = 1e9

_NRRD_TYPES = {}
for _names, _size in ((("signed char", "int8", "int8_t"), 1), (("uchar", "unsigned char", "uint8", "uint8_t"), 1),
                      (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), 2),
                      (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
                      (("int", "signed int", "int32", "int32_t"), 4),
                      (("uint", "unsigned int", "uint32", "uint32_t"), 4),
                      (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                        "int64_t"), 8),
                      (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), 8),
                      (("float",), 4), (("double",), 8)):
    for _name in _names:
        _NRRD_TYPES[_name] = _size
#: NIfTI datatype code -> bytes per voxel.
_NIFTI_TYPES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 1536: 16,
                1792: 16, 2048: 32, 2304: 4}
_COMPLETE = "is the file complete?"


#: The key under which the NRRD field ``units`` (one quoted unit per axis) is kept with the header keys.
NRRD_UNITS = "NRRD units"


class HeaderKeys(dict):
    """A file's key/value pairs (text). Keys that are not UTF-8 text are left out; a key whose value is
    not UTF-8 text is listed in ``unreadable``, and reading it (``get``, ``[]``) is a ValueError naming
    the file, the key and the fix."""

    def __init__(self, items=(), unreadable=(), path: str = ""):
        super().__init__(items)
        self.unreadable = set(unreadable)
        self.path = path

    def _refuse(self, key):
        raise ValueError(f"{self.path}: its header value {key} is not UTF-8 text - set it again (e.g. in Slicer) "
                         "and save the file")

    def get(self, key, default=None):
        if key in self.unreadable:
            self._refuse(key)
        return super().get(key, default)

    def __getitem__(self, key):
        if key in self.unreadable:
            self._refuse(key)
        return super().__getitem__(key)


@dataclass
class _Layout:
    """What a file's header says its data is: the number of values (voxels x components), the header's
    key/value pairs (NRRD) and the lengths of its space directions (NRRD, mm)."""

    n_values: int
    keys: HeaderKeys | None = None
    spacings: list | None = None          # NRRD: the lengths of the space directions of the domain axes (mm)


class _Damaged(Exception):
    """Compressed data that cannot be decompressed (a message for the ValueError)."""


def _inflate(f, codec: str):
    """Decompressed chunks (at most :data:`CHUNK` bytes each) of the rest of ``f``: ``codec`` "gzip"
    (gzip or zlib streams, several members allowed) or "bzip2". :class:`_Damaged` when the data is not
    of that kind or ends before its end-of-stream marker. Bytes after the last stream are ignored."""
    new = (lambda: zlib.decompressobj(47)) if codec == "gzip" else bz2.BZ2Decompressor
    magic = b"\x1f\x8b" if codec == "gzip" else b"BZh"
    d, data, started = new(), b"", False
    try:
        while True:
            if not data:
                data = f.read(CHUNK)
                if not data:
                    break
            started = True
            if codec == "gzip":
                out = d.decompress(data, CHUNK)
                data = d.unconsumed_tail
                if out:
                    yield out
                while not data and not d.eof and len(out) == CHUNK:       # output still pending
                    out = d.decompress(b"", CHUNK)
                    if out:
                        yield out
            else:
                out = d.decompress(data, CHUNK)
                data = b""
                if out:
                    yield out
                while not d.eof and not d.needs_input:
                    out = d.decompress(b"", CHUNK)
                    if out:
                        yield out
            if d.eof:
                rest = d.unused_data + data
                if rest[: len(magic)] == magic:                          # another member follows
                    d, data = new(), rest
                    continue
                pos = f.seek(0, os.SEEK_CUR)
                tail = len(rest) + f.seek(0, os.SEEK_END) - pos
                if tail:
                    log.warning("%s: %d bytes after the compressed data ignored", getattr(f, "name", "file"), tail)
                return
        if codec == "gzip":
            out = d.flush()
            if out:
                yield out
        if not started:
            raise _Damaged("no compressed data")
        if not d.eof:
            raise _Damaged("the compressed data ends early")
    except (zlib.error, OSError, EOFError) as exc:
        raise _Damaged(f"the {codec} data is damaged: {exc}") from None


def _count(chunks, limit: int) -> int:
    """Bytes in ``chunks``, counted up to just past ``limit``."""
    total = 0
    for c in chunks:
        total += len(c)
        if total > limit:
            break
    return total


def _size_message(path: str, have: int, need: int, what: str) -> str:
    if have < need:
        return (f"{path}: cannot be read (its data has {have} bytes, {what} need {need}) - {_COMPLETE}")
    return (f"{path}: holds more data than its header says ({what} need {need} bytes, the file has more) - the header "
            "is wrong or the file damaged; save it again")


def _unescape(value: str) -> str:
    """A NRRD key/value string as teem reads it: backslash-n is a line break, two backslashes one."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1) if m.group(1) == "\\" else m.group(0),
                  value)


def _nrrd_layout(path: str) -> _Layout:
    """Check a NRRD file's data against its header: the header's sizes x type against the raw bytes,
    the decompressed gzip/bzip2 bytes (decompressed to the end), or the ascii/hex values; a detached
    data file (``data file:``) must exist. ValueError naming the file and the fix when they disagree."""
    bad = f"{path}: cannot be read"
    with open(path, "rb") as f:
        buf = f.read(CHUNK)
        if not buf.startswith(b"NRRD000"):
            raise ValueError(f"{path}: is not a NRRD file (it does not begin with NRRD000) - give a .nrrd "
                             "written by Slicer or ITK")
        end = None
        while True:
            m = re.search(rb"\n\r?\n", buf)
            if m:
                end = m.end()
                break
            more = f.read(CHUNK)
            if not more:
                break
            buf += more
            if len(buf) > MAX_NRRD_HEADER_BYTES:
                raise ValueError(f"{bad} (no end of its header within {MAX_NRRD_HEADER_BYTES // 2**20} MB) - "
                                 f"{_COMPLETE}")
    fields, keys, unreadable = {}, {}, set()
    for raw in buf[: end if end is not None else len(buf)].split(b"\n")[1:]:
        raw = raw.rstrip(b"\r")
        if not raw:
            break
        if raw.startswith(b"#"):
            continue
        if b":=" in raw:
            k, v = raw.split(b":=", 1)
            try:
                key = k.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("%s: header key %r is not UTF-8 text - skipped", path, k[:60])
                continue
            try:
                keys[key] = _unescape(v.decode("utf-8"))
                unreadable.discard(key)
            except UnicodeDecodeError:
                keys.pop(key, None)
                unreadable.add(key)
        else:
            k, sep, v = raw.partition(b": ")
            name = " ".join(k.decode("latin-1").lower().split())
            if len(raw) > MAX_NRRD_FIELD_LINE and name != "content":
                raise ValueError(f"{path}: cannot be read (its header has a line of {len(raw)} characters: "
                                 f"{raw[:30].decode('latin-1')!r}...) - is the file damaged? save it again")
            if sep:
                fields[name] = v.decode("latin-1").strip()
    header_keys = HeaderKeys(keys, unreadable, path)
    if "units" in fields:                   # per-axis units (Slicer's sequence NRRDs: the unit of the index)
        header_keys[NRRD_UNITS] = fields["units"]
    try:
        sizes = [int(x) for x in fields["sizes"].split()]
        dimension = int(fields["dimension"])
        type_name = " ".join(fields["type"].lower().split())
        encoding = fields["encoding"].lower()
    except KeyError as exc:
        raise ValueError(f"{bad} (its header has no '{exc.args[0]}' field) - {_COMPLETE}") from None
    except ValueError:
        raise ValueError(f"{bad} (its header's sizes {fields.get('sizes', '')[:60]!r} or dimension "
                         f"{fields.get('dimension', '')[:20]!r} are not whole numbers) - {_COMPLETE}") from None
    if len(sizes) != dimension or not sizes or min(sizes) < 1:
        raise ValueError(f"{bad} (its header's sizes {fields['sizes'][:60]!r} do not fit its dimension {dimension}) "
                         f"- {_COMPLETE}")
    n_values = math.prod(sizes)
    if type_name == "block":
        try:
            type_size = int(fields.get("block size", fields.get("blocksize", "")))
        except ValueError:
            raise ValueError(f"{bad} (its block size is not a whole number) - {_COMPLETE}") from None
    elif type_name in _NRRD_TYPES:
        type_size = _NRRD_TYPES[type_name]
    else:
        raise ValueError(f"{bad} (its header's type {type_name[:40]!r} is not a NRRD type) - {_COMPLETE}")
    need = n_values * type_size
    what = f"its sizes {' '.join(map(str, sizes))} of {type_name}"
    try:
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
    except ValueError:
        raise ValueError(f"{bad} (its byte skip or line skip is not a whole number) - {_COMPLETE}") from None
    spacings = None
    if "space directions" in fields:
        spacings = []
        for vector in re.findall(r"\(([^)]*)\)", fields["space directions"]):
            try:
                spacings.append(math.hypot(*[float(x) for x in vector.split(",")]))
            except (ValueError, OverflowError):
                raise ValueError(f"{bad} (its space directions {fields['space directions'][:80]!r} are not numbers) - "
                                 f"{_COMPLETE}") from None
    data_file = fields.get("data file", fields.get("datafile"))
    if data_file:
        if data_file.startswith("LIST") or len(data_file.split()) > 1:
            return _Layout(n_values, header_keys, spacings)        # several data files: SimpleITK checks them
        data_path = data_file if os.path.isabs(data_file) else os.path.join(os.path.dirname(path), data_file)
        if not os.path.isfile(data_path):
            raise ValueError(f"{path}: its data file {data_file!r} does not exist next to it - copy it along")
        start = 0
    else:
        if end is None:
            raise ValueError(f"{bad} (no blank line after its header: no data) - {_COMPLETE}")
        data_path, start = path, end
    with open(data_path, "rb") as f:
        f.seek(start)
        for _ in range(max(line_skip, 0)):
            if not f.readline():
                break
        start = f.tell()
        size = os.fstat(f.fileno()).st_size
        if encoding == "raw":
            if byte_skip == -1:                                    # the data is at the end of the file
                if size - start < need:
                    raise ValueError(_size_message(path, size - start, need, what))
            elif size - start - max(byte_skip, 0) != need:
                raise ValueError(_size_message(path, size - start - max(byte_skip, 0), need, what))
        elif encoding in ("gzip", "gz", "bzip2", "bz2"):
            codec = "gzip" if encoding.startswith("g") else "bzip2"
            limit = need + max(byte_skip, 0)
            try:
                have = _count(_inflate(f, codec), limit)
            except _Damaged as exc:
                raise ValueError(f"{bad} ({exc}) - {_COMPLETE}") from None
            if have != limit:
                raise ValueError(_size_message(path, have - max(byte_skip, 0), need, what))
        elif encoding in ("ascii", "text", "txt", "hex"):
            text = f.read().decode("latin-1")
            if encoding == "hex":
                digits = len(re.findall(r"[0-9a-fA-F]", text))
                if digits != 2 * need:
                    raise ValueError(_size_message(path, digits // 2, need, what))
            else:
                count = len(text.replace(",", " ").split())
                if count < n_values:
                    raise ValueError(f"{bad} (its data has {count} values, {what} need {n_values}) - {_COMPLETE}")
                if count > n_values:
                    raise ValueError(f"{path}: holds more data than its header says ({what} need {n_values} values, "
                                     "the file has more) - the header is wrong or the file damaged; save it again")
    return _Layout(n_values, header_keys, spacings)


def _nifti_layout(path: str) -> _Layout | None:
    """Check a NIfTI-1/-2 file (.nii, .nii.gz; gzip decompressed to the end) against its header: the
    voxels its dims and datatype say against the bytes after vox_offset. None when it is no single-file
    NIfTI (SimpleITK decides). ValueError naming the file and the fix when they disagree."""
    bad = f"{path}: cannot be read"
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
        f.seek(0)
        chunks = _inflate(f, "gzip") if gz else iter(lambda: f.read(CHUNK), b"")
        head = b""
        try:
            for c in chunks:
                head += c
                if len(head) >= 544:
                    break
            if len(head) < 348:
                raise ValueError(f"{bad} (its NIfTI header is incomplete: {len(head)} bytes) - {_COMPLETE}")
            lengths = {struct.unpack(e + "i", head[:4])[0]: e for e in "<>"}
            if 348 in lengths:
                dim_fmt, dim_at, type_at, off_fmt, off_at, magic_at, hdr = "8h", 40, 70, "f", 108, 344, 348
            elif 540 in lengths:
                dim_fmt, dim_at, type_at, off_fmt, off_at, magic_at, hdr = "8q", 16, 12, "q", 168, 4, 540
                if len(head) < 540:
                    raise ValueError(f"{bad} (its NIfTI-2 header is incomplete) - {_COMPLETE}")
            else:
                return None
            magic = head[magic_at: magic_at + 4]
            if magic not in (b"n+1\x00", b"n+2\x00"):
                return None                                        # header + image pair or Analyze
            dim_size = struct.calcsize(dim_fmt) // 8
            endian = None
            for e in "<>":
                d0 = struct.unpack(e + dim_fmt[1], head[dim_at: dim_at + dim_size])[0]
                if 1 <= d0 <= 7:
                    endian = e
                    break
            if endian is None:
                raise ValueError(f"{bad} (its NIfTI header's dim[0] is not 1-7) - {_COMPLETE}")
            dims = struct.unpack(endian + dim_fmt, head[dim_at: dim_at + 8 * dim_size])
            datatype = struct.unpack(endian + "h", head[type_at: type_at + 2])[0]
            offset = struct.unpack(endian + off_fmt, head[off_at: off_at + struct.calcsize(off_fmt)])[0]
            shown = dims[1: dims[0] + 1]
            if min(shown) < 1:
                raise ValueError(f"{bad} (its NIfTI dims {' '.join(map(str, shown))} are not all positive) - "
                                 f"{_COMPLETE}")
            if datatype not in _NIFTI_TYPES:
                raise ValueError(f"{bad} (its NIfTI datatype {datatype} is not one SimpleITK reads) - {_COMPLETE}")
            if not math.isfinite(offset) or offset > 2**62:
                raise ValueError(f"{bad} (its NIfTI vox_offset {offset} is not a byte offset) - {_COMPLETE}")
            offset = max(int(offset), hdr)                          # as niftilib reads it
            n_values = math.prod(shown)
            need = n_values * _NIFTI_TYPES[datatype]
            what = f"its dims {' '.join(map(str, shown))} of datatype {datatype}"
            have = len(head) + _count(chunks, offset + need - len(head))
        except _Damaged as exc:
            raise ValueError(f"{bad} ({exc}) - {_COMPLETE}") from None
    if have - offset != need:
        raise ValueError(_size_message(path, max(have - offset, 0), need, what))
    return _Layout(n_values)


def _image_keys(img, path: str) -> HeaderKeys:
    """The metadata of a SimpleITK image as :class:`HeaderKeys` (keys or values SimpleITK cannot give as
    UTF-8 text left out or listed as unreadable)."""
    items, unreadable = {}, set()
    try:
        names = img.GetMetaDataKeys()
    except (TypeError, UnicodeError, SystemError, RuntimeError):
        log.warning("%s: its metadata keys cannot be read as text - ignored", path)
        names = ()
    for k in names:
        try:
            k.encode("utf-8")
        except UnicodeError:
            log.warning("%s: header key %r is not UTF-8 text - skipped", path, k[:60])
            continue
        try:
            v = img.GetMetaData(k)
            v.encode("utf-8")
            items[k] = v
        except (TypeError, UnicodeError, SystemError, RuntimeError):
            unreadable.add(k)
    return HeaderKeys(items, unreadable, path)


def _check_geometry(img, path: str, layout: _Layout | None) -> None:
    """ValueError unless the grid is plausible: finite, spacings within :data:`SPACING_RANGE_MM` (and, for
    a NRRD, the lengths of its space directions), the origin within :data:`MAX_ORIGIN_MM`, directions not
    degenerate."""
    d = img.GetDimension()
    spacing = np.array(img.GetSpacing(), dtype=float)
    origin = np.array(img.GetOrigin(), dtype=float)
    direction = np.array(img.GetDirection(), dtype=float).reshape(d, d)
    lo, hi = SPACING_RANGE_MM
    given = layout.spacings if layout is not None and layout.spacings is not None else None
    if given is not None and len(given) == d and not np.allclose(given, spacing, rtol=1e-3, atol=0):
        raise ValueError(f"{path}: its space directions give spacings {', '.join(f'{x:.4g}' for x in given)} mm, "
                         f"SimpleITK read {', '.join(f'{x:.4g}' for x in spacing)} - save the file again")
    if not (np.all(np.isfinite(spacing)) and np.all((spacing > lo) & (spacing < hi)) and np.all(np.isfinite(origin))
            and np.all(np.abs(origin) < MAX_ORIGIN_MM) and np.all(np.isfinite(direction))
            and abs(np.linalg.det(direction[: min(d, 3), : min(d, 3)])) > 1e-6):
        raise ValueError(f"{path}: its geometry (spacing, origin or directions) is not a valid grid - save it again "
                         "from Slicer or the scanner's export")


def read_image_with_keys(path: str):
    """A SimpleITK image and its header's key/value pairs (:class:`HeaderKeys`), checked: the path is a
    file; a NRRD's or single-file NIfTI's data is complete and as large as its header says (gzip and bzip2
    decompressed to the end); the image SimpleITK read holds as many values as the header says; the
    geometry is finite with positive spacing. ValueError naming the file and the fix otherwise."""
    import SimpleITK as sitk
    from ..core.tables import check_file
    check_file(path)
    low = path.lower()
    layout = None
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
        if magic.startswith(b"NRRD000") or low.endswith((".nrrd", ".nhdr")):
            layout = _nrrd_layout(path)
        elif low.endswith((".nii", ".nii.gz")):
            layout = _nifti_layout(path)
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc}) - check the file's permissions") from None
    try:
        img = sitk.ReadImage(path)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        first = "".join(ch if ch.isprintable() else "?" for ch in (lines[-1] if lines else "unreadable"))
        raise ValueError(f"{path}: cannot be read ({first[:160]}) - {_COMPLETE}") from None
    except MemoryError:
        raise ValueError(f"{path}: too large to read into memory - give a smaller image") from None
    if layout is not None:
        components = img.GetNumberOfComponentsPerPixel()
        n = math.prod(img.GetSize()) * components
        if n not in (layout.n_values, layout.n_values * components):      # NIfTI RGB: dims count voxels
            raise ValueError(f"{path}: SimpleITK read {n} values, its header says {layout.n_values} - save the file "
                             "again")
    _check_geometry(img, path, layout)
    keys = layout.keys if layout is not None and layout.keys is not None else _image_keys(img, path)
    return img, keys


def read_image(path: str):
    """A SimpleITK image, checked as :func:`read_image_with_keys` checks it."""
    return read_image_with_keys(path)[0]


def read_volume(path: str):
    """A 3D scalar volume (anatomy, T1 map, labelmap): (array (K, J, I), IJK->RAS matrix in mm)."""
    import SimpleITK as sitk
    img = read_image(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a 3D scalar volume, got a {img.GetDimension()}D image with "
                         f"{img.GetNumberOfComponentsPerPixel()} component(s) - give one 3D volume")
    arr = sitk.GetArrayFromImage(img)
    if arr.dtype.kind == "c":
        raise ValueError(f"{path}: holds complex values - give a real-valued volume (magnitude)")
    return arr, matrix_of(img)


def _whole(keys: HeaderKeys, key: str, name: str, default: int, path: str) -> int:
    raw = keys.get(key)
    if raw is None or not str(raw).strip():
        return default
    try:
        value = float(raw)
        if not value.is_integer():
            raise ValueError
        return int(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{path}: segment {name!r}: {key} = {str(raw)[:40]!r} is not a whole number - save the "
                         "segmentation again from Slicer") from None


def read_segmentation(path: str, allow_empty: bool = False) -> tuple[dict, np.ndarray]:
    """Segments of a Slicer ``.seg.nrrd`` (shared or separate layers) or of a labelmap volume:
    ({name: bool mask (K, J, I)}, IJK->RAS matrix in mm). Labelmap labels are named "label <value>";
    a labelmap without any label gives ({}, matrix) when ``allow_empty`` (a mask file the caller checks).

    ValueError naming the file (and the segment) and the fix for: an image that is not 3D, non-integer
    values (an image, not a labelmap), a segment without a readable name, a Layer or LabelValue that is
    not a whole number or out of range, two segments of one name, more than :data:`MAX_LABELS` labels,
    and a labelmap without any label."""
    import SimpleITK as sitk
    img, keys = read_image_with_keys(path)
    if img.GetDimension() != 3:
        raise ValueError(f"{path}: is a {img.GetDimension()}D image - give a 3D labelmap or a .seg.nrrd")
    arr = sitk.GetArrayFromImage(img)
    matrix = matrix_of(img)
    n_layers = img.GetNumberOfComponentsPerPixel()
    if n_layers == 1:
        arr = arr[..., None]
    if arr.dtype.kind == "c" or (arr.dtype.kind == "f" and not (np.all(np.isfinite(arr))
                                                              and np.array_equal(arr, np.round(arr)))):
        raise ValueError(f"{path}: holds non-integer values - give a labelmap or .seg.nrrd, not an image")
    indices = sorted({int(m.group(1)) for k in keys if (m := re.match(r"Segment(\d{1,6})_", k))}
                     | {int(m.group(1)) for k in keys.unreadable if (m := re.match(r"Segment(\d{1,6})_", k))})
    masks = {}
    if indices:
        for position, i in enumerate(indices):
            name = keys.get(f"Segment{i}_Name")
            if name is None or not name.strip():
                raise ValueError(f"{path}: segment {i} ({keys.get(f'Segment{i}_ID') or 'no ID'}) has no name "
                                 f"(Segment{i}_Name) - name it in Slicer and save the segmentation again")
            default_layer = position if n_layers == len(indices) and n_layers > 1 else 0
            layer = _whole(keys, f"Segment{i}_Layer", name, default_layer, path)
            value = _whole(keys, f"Segment{i}_LabelValue", name, 1, path)
            if not 0 <= layer < n_layers:
                raise ValueError(f"{path}: segment {name!r}: layer {layer} does not exist (the file has {n_layers} "
                                 "layer(s)) - save the segmentation again from Slicer")
            top = np.iinfo(arr.dtype).max if arr.dtype.kind in "iu" else 2**53
            if not 1 <= value <= top:
                raise ValueError(f"{path}: segment {name!r}: label value {value} is not a label of its "
                                 f"{arr.dtype} layers (1-{top}) - save the segmentation again from Slicer")
            if name in masks:
                raise ValueError(f"{path}: two segments are named {name!r} - rename one in Slicer and save again")
            masks[name] = arr[..., layer] == value
        return masks, matrix
    if n_layers > 1:
        raise ValueError(f"{path}: has {n_layers} components but no segment keys - give a labelmap or .seg.nrrd")
    values = np.unique(arr[..., 0])
    values = values[values != 0]
    covered = np.count_nonzero(arr[..., 0]) / max(arr[..., 0].size, 1)
    if values.size > MAX_LABELS or (values.size > IMAGE_LABELS and covered > 0.5):
        raise ValueError(f"{path}: holds {values.size} distinct values over {covered:.0%} of its voxels - it looks "
                         "like an image; give a labelmap or .seg.nrrd")
    for value in values:
        masks[f"label {int(value)}"] = arr[..., 0] == value
    if not masks and not allow_empty:
        raise ValueError(f"{path}: contains no segment (all voxels are 0) - give the segmentation with the lesions")
    return masks, matrix


def write_volume(path: str, array_kji, matrix, attributes: dict | None = None) -> str:
    """Write a 3D volume as NRRD (.nrrd, keys kept) or NIfTI (.nii/.nii.gz) with the given geometry,
    through a temporary name and read back (:func:`atomic.write_image`: no half-written files; OSError
    naming the path when the disk is full). Returns the path."""
    import SimpleITK as sitk
    low = path.lower()
    if not low.endswith((".nrrd", ".nii", ".nii.gz")):
        raise ValueError(f"{path}: write maps as .nrrd, .nii or .nii.gz")
    arr = np.asarray(array_kji)
    img = to_sitk(arr, matrix, arr.dtype if arr.dtype in (np.int8, np.int16, np.uint8) else np.float32)
    for k, v in (attributes or {}).items():
        img.SetMetaData(str(k), str(v))
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    atomic.write_image(img, path)
    return path


def write_segmentation(path: str, masks: dict, matrix, colours: dict | None = None) -> str:
    """Named masks (K, J, I) as a Slicer ``.seg.nrrd``: one shared labelmap layer, and a further layer for
    each segment that overlaps those before it (the layout Slicer writes for overlapping segments)."""
    import SimpleITK as sitk
    names = list(masks)
    shape = np.shape(masks[names[0]])
    layers, where = [], {}
    for value, name in enumerate(names, start=1):
        m = np.asarray(masks[name], dtype=bool)
        layer = next((i for i, lab in enumerate(layers) if not np.any(lab[m])), None)
        if layer is None:
            layers.append(np.zeros(shape, dtype=np.uint8))
            layer = len(layers) - 1
        layers[layer][m] = value
        where[name] = layer
    img = to_sitk(layers[0], matrix, np.uint8)
    if len(layers) > 1:
        geometry = img
        img = sitk.GetImageFromArray(np.stack(layers, axis=-1), isVector=True)
        img.CopyInformation(geometry)
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    extent = " ".join(f"0 {n - 1}" for n in shape[::-1])
    palette = [(0.95, 0.8, 0.1), (0.9, 0.2, 0.2), (0.2, 0.6, 0.9), (0.4, 0.8, 0.3), (0.8, 0.4, 0.9)]
    for i, name in enumerate(names):
        colour = (colours or {}).get(name, palette[i % len(palette)])
        for key, value in (("ID", f"Segment_{i + 1}"), ("Name", name), ("LabelValue", i + 1), ("Layer", where[name]),
                           ("Color", " ".join(f"{c:g}" for c in colour)), ("Extent", extent),
                           ("Tags", "|")):
            img.SetMetaData(f"Segment{i}_{key}", str(value))
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    atomic.write_image(img, path)
    return path
