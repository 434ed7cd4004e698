"""Writers of inputs as scanners, converters and people really leave them, for test_bad_inputs.py: NRRD
headers edited as text (frame labels in another unit, TR in s, sizes that do not fit the data), int16
data that wrapped negative, truncated files, 4D NIfTI with a BIDS sidecar (right or wrong), labelmaps
with label values, one-voxel masks and CSV files (AIF curves, manifests) in any encoding or shape.

Everything is written with plain Python/numpy/SimpleITK, not with the library's checked writers, except
where a file is exactly what the library itself writes (then the library's writer is used)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib

import numpy as np

from DCEPerfusionLib.files import images


# ============================================================================================ NRRD text
def split_nrrd(path):
    """(header lines as text, the data bytes after the blank line) of an attached-data NRRD."""
    raw = open(path, "rb").read()
    end = raw.index(b"\n\n")
    return raw[:end].decode("latin-1").split("\n"), raw[end + 2:]


def join_nrrd(path, lines, data: bytes):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write("\n".join(lines).encode("latin-1") + b"\n\n" + data)
    return str(path)


def edit_nrrd(src, dst, keys: dict | None = None, fields: dict | None = None, drop=()):
    """Copy the NRRD ``src`` to ``dst`` with its header edited as text: key/value pairs (``key:=value``)
    set or added from ``keys``, fields (``field: value``) replaced from ``fields``, keys in ``drop``
    removed. The data bytes are copied as they are."""
    keys, fields = dict(keys or {}), dict(fields or {})
    lines, data = split_nrrd(src)
    out, seen = [], set()
    for line in lines:
        if ":=" in line:
            k = line.split(":=", 1)[0]
            if k in drop:
                continue
            if k in keys:
                line = f"{k}:={keys[k]}"
                seen.add(k)
        elif ": " in line:
            k = line.split(": ", 1)[0]
            if k in fields:
                line = f"{k}: {fields[k]}"
        out.append(line)
    out += [f"{k}:={v}" for k, v in keys.items() if k not in seen]
    return join_nrrd(dst, out, data)


def nrrd_data(path, dtype=np.float32) -> np.ndarray:
    """The decompressed data of an attached-data gzip or raw NRRD, as a flat array of ``dtype``."""
    lines, data = split_nrrd(path)
    if any(line.strip() == "encoding: gzip" for line in lines):
        data = zlib.decompress(data, 47)
    return np.frombuffer(data, dtype=dtype)


def int16_wrapped_nrrd(src, dst, scale: float = 250.0):
    """The DCE NRRD ``src`` as an exporter that writes unsigned 12/16-bit magnitudes into a signed short
    leaves it: values above 32767 wrap to negative numbers (raw encoding, type short)."""
    values = np.clip(np.round(nrrd_data(src) * scale), 0, 65535).astype(np.uint16)
    lines, _ = split_nrrd(src)
    lines = ["type: short" if ln.startswith("type: ") else "encoding: raw" if ln.startswith("encoding: ") else ln
             for ln in lines]
    return join_nrrd(dst, lines, values.view(np.int16).tobytes())


def raw_nrrd(src, dst):
    """``src`` with its data decompressed (encoding raw), as some exporters write it."""
    values = nrrd_data(src)
    lines, _ = split_nrrd(src)
    lines = ["encoding: raw" if ln.startswith("encoding: ") else ln for ln in lines]
    return join_nrrd(dst, lines, values.tobytes())


def truncated(src, dst, fraction: float = 0.5):
    """The first ``fraction`` of the bytes of ``src`` (a copy interrupted half way)."""
    raw = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(raw[: int(len(raw) * fraction)])
    return str(dst)


def frame_labels(t_s, scale: float) -> str:
    return ",".join(f"{t * scale:.10g}" for t in t_s)


# ============================================================================================ NIfTI
def write_nifti_4d(path, signal_kjit, matrix, sidecar=None):
    """A 4D NIfTI (x, y, z, t) as dcm2niix writes it, and its JSON sidecar: a dict (written as JSON), a
    string (written as it is) or None (no sidecar)."""
    import SimpleITK as sitk
    frames = [images.to_sitk(np.asarray(signal_kjit[..., t], np.float32), matrix) for t in range(signal_kjit.shape[-1])]
    sitk.WriteImage(sitk.JoinSeries(frames), str(path), useCompression=True)
    if sidecar is not None:
        side = str(path)[: -len(".nii.gz")] + ".json"
        with open(side, "w", encoding="utf-8") as f:
            f.write(sidecar if isinstance(sidecar, str) else json.dumps(sidecar, indent=2))
    return str(path)


def sidecar_of(path) -> str:
    return str(path)[: -len(".nii.gz")] + ".json"


# ============================================================================================ labelmaps
def write_labelmap(path, labels_kji, matrix, dtype=np.uint8):
    """A labelmap volume (integer label values, no segment keys) as Slicer or ITK-SNAP save it."""
    import SimpleITK as sitk
    img = images.to_sitk(np.asarray(labels_kji), matrix, dtype)
    sitk.WriteImage(img, str(path), useCompression=True)
    return str(path)


def one_voxel_mask(mask_kji, n: int = 1):
    """A mask with only the first ``n`` voxels of ``mask_kji`` (PkModeling's one-voxel AIF)."""
    out = np.zeros(mask_kji.shape, np.uint8)
    idx = np.argwhere(mask_kji)[:n]
    out[tuple(idx.T)] = 1
    return out


# ============================================================================================ text
def write_text(path, text: str | bytes, encoding: str = "utf-8"):
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode(encoding))
    return str(path)


def aif_csv(t_s, c_mM, header=("time_s", "concentration_mM"), time_scale: float = 1.0, bad_cell=None) -> str:
    """A prescribed AIF as CSV text; ``bad_cell`` = (row, text) puts text into a concentration cell."""
    rows = [",".join(header)]
    for i, (t, c) in enumerate(zip(t_s, c_mM), start=1):
        cell = bad_cell[1] if bad_cell and bad_cell[0] == i else f"{c:.6g}"
        rows.append(f"{t * time_scale:g},{cell}")
    return "\n".join(rows) + "\n"


def gz_bytes(data: bytes) -> bytes:
    return gzip.compress(data)


# ============================================================================================ checks
def sha256_tree(*folders) -> dict:
    """{path: sha256} of every file below ``folders``."""
    out = {}
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for n in names:
                p = os.path.join(dirpath, n)
                if os.path.isfile(p) and not os.path.islink(p):
                    with open(p, "rb") as f:
                        out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def partial_names(*folders) -> list:
    """Names containing '.partial' (temporary files or folders left behind) below ``folders``."""
    found = []
    for folder in folders:
        for dirpath, dirs, names in os.walk(folder):
            found += [os.path.join(dirpath, n) for n in [*dirs, *names] if ".partial" in n]
    return found


def strict_json(path):
    """A JSON file read strictly: NaN/Infinity literals are an error (AssertionError)."""
    def refuse(name):
        raise AssertionError(f"{path}: holds the non-JSON literal {name}")
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read(), parse_constant=refuse)
