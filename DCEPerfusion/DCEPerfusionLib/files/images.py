"""3D images in and out with SimpleITK, in Slicer's conventions: arrays (K, J, I) with a 4x4 IJK->RAS
matrix (mm). Volumes (anatomy, T1 maps, parameter maps) as NRRD or NIfTI, Slicer ``.seg.nrrd``
segmentations and labelmaps, and the conversion to and from SimpleITK images (LPS physical space).
Files are written under a temporary name and renamed, so no half-written file carries the final name.
"""

from __future__ import annotations

import os
import re

import numpy as np

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


def read_image(path):
    import SimpleITK as sitk
    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise ValueError(f"{path}: cannot be read ({first[:160]}) - is the file complete?") from None


def read_volume(path: str):
    """A 3D scalar volume (anatomy, T1 map, labelmap): (array (K, J, I), IJK->RAS matrix)."""
    import SimpleITK as sitk
    img = read_image(path)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a 3D scalar volume")
    return sitk.GetArrayFromImage(img), matrix_of(img)


def write_volume(path: str, array_kji, matrix, attributes: dict | None = None) -> str:
    """Write a 3D volume as NRRD (.nrrd, keys kept) or NIfTI (.nii/.nii.gz) with the given geometry,
    first to a temporary name then renamed (no half-written files). Returns the path."""
    import SimpleITK as sitk
    low = path.lower()
    if not low.endswith((".nrrd", ".nii", ".nii.gz")):
        raise ValueError(f"{path}: write maps as .nrrd, .nii or .nii.gz")
    arr = np.asarray(array_kji)
    img = to_sitk(arr, matrix, arr.dtype if arr.dtype in (np.int8, np.int16, np.uint8) else np.float32)
    for k, v in (attributes or {}).items():
        img.SetMetaData(str(k), str(v))
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    ext = ".nii.gz" if low.endswith(".nii.gz") else os.path.splitext(path)[1]
    tmp = f"{path[: len(path) - len(ext)]}.partial{ext}"
    sitk.WriteImage(img, tmp, useCompression=True)
    os.replace(tmp, path)
    return path


def read_segmentation(path: str) -> tuple[dict, np.ndarray]:
    """Segments of a Slicer ``.seg.nrrd`` (shared or separate layers) or of a labelmap volume:
    ({name: bool mask (K, J, I)}, IJK->RAS matrix). Labelmap labels are named "label <value>"."""
    import SimpleITK as sitk
    img = read_image(path)
    keys = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
    arr = sitk.GetArrayFromImage(img)
    matrix = matrix_of(img)
    if img.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    masks = {}
    names = sorted({int(m.group(1)) for k in keys if (m := re.match(r"Segment(\d+)_Name$", k))})
    if names:
        for i in names:
            name = keys[f"Segment{i}_Name"]
            layer = int(keys.get(f"Segment{i}_Layer", 0) or 0)
            value = int(keys.get(f"Segment{i}_LabelValue", 1) or 1)
            masks[name] = arr[..., layer] == value
    else:
        for value in np.unique(arr[..., 0]):
            if value != 0:
                masks[f"label {int(value)}"] = arr[..., 0] == value
    if not masks:
        raise ValueError(f"{path}: contains no segment (all voxels are 0)")
    return masks, matrix


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
    tmp = path + ".partial.nrrd"
    sitk.WriteImage(img, tmp, useCompression=True)
    os.replace(tmp, path)
    return path
