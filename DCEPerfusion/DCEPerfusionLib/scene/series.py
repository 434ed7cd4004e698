"""A DCE volume sequence in a Slicer scene -> the core's series record (:class:`Series4D`): signal float32
(K, J, I, T) in time order, frame times in s, the frames' IJK->RAS, TR and flip angle from the
MultiVolume attributes Slicer's DICOM importer leaves on the sequence node. slicer/vtk, never qt/ctk.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import slicer
from slicer import util

from ..core import multivolume as mv
from ..core._checks import check_times
from ..core.geometry import SAME_GRID_TOL_MM
from ..core.series import Series4D, resolve_frame_times
from .output import ijk_to_ras, set_ijk_to_ras

#: MultiVolumeExplorer's node class: a scalar volume whose voxels hold one component per frame
MULTIVOLUME_CLASS = "vtkMRMLMultiVolumeNode"
#: attribute of a sequence made by :func:`sequence_from_multivolume`: the MultiVolume node's ID
CONVERTED_FROM_ATTRIBUTE = "DCEPerfusion.ConvertedFrom"


def frame_times_s(sequence_node, frame_interval_s: float | None = None, override: bool = False):
    """Frame times (s) of a sequence and where they came from.

    The node's times: ``MultiVolume.FrameLabels`` (in ``MultiVolume.FrameIdentifyingDICOMTagUnits``), else
    numeric index values with a time unit (s, ms or min). A given ``frame_interval_s`` is used when the
    node has none, or replaces them with ``override``; one that contradicts them is refused
    (:func:`core.series.resolve_frame_times`). Returns (times in item order, source text)."""
    n = sequence_node.GetNumberOfDataNodes()
    name = sequence_node.GetName()
    given = frame_interval_s is not None and frame_interval_s > 0
    try:
        t, source = _node_times(sequence_node)
    except ValueError:
        if not given:
            raise
        t, source = None, ""                                 # unusable times: the given interval replaces them
    if t is None and not given:
        raise ValueError(
            f"sequence '{name}': no frame times - it has no {mv.FRAME_LABELS} attribute and its index "
            f"('{sequence_node.GetIndexName()}', unit '{sequence_node.GetIndexUnit()}') is not a time in s or ms; "
            "give the frame interval in seconds")
    if t is not None and given and not override:
        order = np.argsort(t, kind="stable")
        resolve_frame_times(t[order], source, n, f"sequence '{name}'", frame_interval_s)  # refuses a contradiction
        return t, f"{source}; the given interval {frame_interval_s:g} s agrees"
    if given:
        return resolve_frame_times(t, source, n, f"sequence '{name}'", frame_interval_s, override)
    return t, source


def _node_times(sequence_node):
    """(times in item order, source) the node itself holds, or (None, "")."""
    n = sequence_node.GetNumberOfDataNodes()
    t, source = mv.frame_labels_s(sequence_node.GetAttribute, n, f"sequence '{sequence_node.GetName()}'")
    if t is not None:
        return t, source
    unit = (sequence_node.GetIndexUnit() or "").strip().lower()
    if sequence_node.GetIndexType() == sequence_node.NumericIndex and unit in mv.UNIT_SCALE_TO_S:
        values = np.array([float(sequence_node.GetNthIndexValue(i)) for i in range(n)])
        return values * mv.UNIT_SCALE_TO_S[unit], f"sequence index values ({unit})"
    return None, ""


def time_order(t_s) -> np.ndarray:
    """The item numbers of a sequence in time order (stable: equal times keep their item order), from
    the items' times (s, item order) - the order of the frames of :func:`read_sequence`'s series."""
    return np.argsort(np.asarray(t_s, dtype=float), kind="stable")


def index_values_in_time_order(sequence_node, frame_interval_s: float | None = None,
                               override_frame_times: bool = False) -> list:
    """The index values (strings) of the sequence's items in the order of :func:`read_sequence`'s frames
    (the same frame times and options), so that frame f of a result is the item at the f-th value."""
    t, _ = frame_times_s(sequence_node, frame_interval_s, override_frame_times)
    return [sequence_node.GetNthIndexValue(int(i)) for i in time_order(t)]


def read_sequence(sequence_node, frame_interval_s: float | None = None, override_frame_times: bool = False) \
        -> Series4D:
    """Read a ``vtkMRMLSequenceNode`` of 3D scalar volumes into a float32 ``(K, J, I, T)`` array.

    Frames are put in time order. Every frame must have the geometry of the first (dimensions and
    IJK->RAS within 1e-4 mm); 2D frames, vector volumes and missing times are refused with a message."""
    if sequence_node is None or not sequence_node.IsA("vtkMRMLSequenceNode"):
        raise ValueError("DCE sequence: select a volume sequence (vtkMRMLSequenceNode) - load the DCE series "
                         "from DICOM or a 4D NRRD first")
    name = sequence_node.GetName()
    n = sequence_node.GetNumberOfDataNodes()
    if n < 3:
        raise ValueError(f"DCE sequence '{name}': has {n} frames; a DCE series needs at least 3")
    t, source = frame_times_s(sequence_node, frame_interval_s, override_frame_times)
    order = time_order(t)
    t = check_times(t[order] - t[order][0], f"frame times of '{name}'", min_frames=3)
    frames = [sequence_node.GetNthDataNode(int(i)) for i in order]
    first = frames[0]
    if not first.IsA("vtkMRMLScalarVolumeNode") or first.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"DCE sequence '{name}': frames are {first.GetClassName()}, expected scalar volumes")
    matrix = ijk_to_ras(first)
    dims = first.GetImageData().GetDimensions() if first.GetImageData() is not None else (0, 0, 0)
    if min(dims) < 1:
        raise ValueError(f"DCE sequence '{name}': the first frame has no image data")
    if dims[2] == 1:
        raise ValueError(f"DCE sequence '{name}': frames are 2D images ({dims[0]}x{dims[1]}x1); DCE Perfusion "
                         "needs 3D frames - load the series so that each time point is one 3D volume")
    shape = (dims[2], dims[1], dims[0])
    for k, frame in enumerate(frames):
        img = frame.GetImageData()
        if img is not None and img.GetNumberOfScalarComponents() != 1:
            raise ValueError(f"DCE sequence '{name}': frame {int(order[k])} has {img.GetNumberOfScalarComponents()} "
                             "components per voxel; DCE Perfusion needs scalar (single-component) frames")
        if img is None or img.GetDimensions() != dims:
            got = img.GetDimensions() if img is not None else "no image"
            raise ValueError(f"DCE sequence '{name}': frame {int(order[k])} has dimensions {got}, the first frame "
                             f"{dims} - every frame must have the same grid (resample the series)")
        if np.max(np.abs(ijk_to_ras(frame) - matrix)) > SAME_GRID_TOL_MM:
            raise ValueError(f"DCE sequence '{name}': frame {int(order[k])} has a different position or "
                             "orientation from the first frame - every frame must have the same geometry")
    signal = np.empty(shape + (len(frames),), dtype=np.float32)
    views = [util.arrayFromVolume(f) for f in frames]

    def copy_slices(zs):  # slice by slice: the (T, J, I) -> (J, I, T) transpose stays in cache
        buf = np.empty((len(frames), shape[1], shape[2]), dtype=np.float32)
        for z in zs:
            for k, v in enumerate(views):
                buf[k] = v[z]
            signal[z] = buf.transpose(1, 2, 0)

    n_threads = min(4, os.cpu_count() or 1, shape[0])
    with ThreadPoolExecutor(max_workers=n_threads) as pool:  # numpy copies release the GIL
        list(pool.map(copy_slices, [range(i, shape[0], n_threads) for i in range(n_threads)]))
    acq = mv.acquisition_parameters(sequence_node.GetAttribute)
    return Series4D(signal=signal, t_s=t, ijk_to_ras=matrix, tr_s=acq["tr_s"], flip_angle_deg=acq["flip_angle_deg"],
                     time_source=source, source=name)


def add_volume_sequence(scene, name: str, signal, matrix, index_values, index_name: str = "time",
                        index_unit: str = "s", attributes: dict | None = None, browser: bool = True):
    """A ``vtkMRMLSequenceNode`` of scalar volumes, frame k = ``signal[..., k]`` (K, J, I, T) on the grid of
    ``matrix`` (IJK->RAS), at the numeric ``index_values``; ``attributes`` set on the sequence node; with a
    browser node (when the Sequences logic is in the scene) so that it can be browsed and shown.
    Returns (sequence node, browser node or None)."""
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    seq.SetIndexName(index_name)
    seq.SetIndexUnit(index_unit)
    seq.SetIndexType(seq.NumericIndex)
    frame = slicer.vtkMRMLScalarVolumeNode()
    for k, value in enumerate(index_values):
        util.updateVolumeFromArray(frame, np.ascontiguousarray(signal[..., k]))
        set_ijk_to_ras(frame, matrix)
        seq.SetDataNodeAtValue(frame, str(value))
    for key, value in (attributes or {}).items():
        seq.SetAttribute(key, value)
    br = None
    if browser and scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):
        br = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
        br.SetAndObserveMasterSequenceNodeID(seq.GetID())
    return seq, br


def is_multivolume(node) -> bool:
    """Whether ``node`` is a MultiVolume: MultiVolumeExplorer's ``vtkMRMLMultiVolumeNode`` (what Slicer's DICOM
    import makes when its preferred multi-volume format is "multi-volume"; MultiVolumeImporterPlugin.py:91-99,
    :332-347, :686-700), or another multi-component volume carrying its ``MultiVolume.FrameLabels``."""
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        return False
    image = node.GetImageData()
    many = image is not None and image.GetNumberOfScalarComponents() > 1
    return node.IsA(MULTIVOLUME_CLASS) or (many and node.GetAttribute(mv.FRAME_LABELS) is not None)


def is_time_multivolume(node) -> bool:
    """A MultiVolume of at least 3 frames over time (a DCE series can be made of it; not a flip-angle, echo or
    b-value series, :data:`core.multivolume.NOT_TIME_TAGS`)."""
    if not is_multivolume(node):
        return False
    image = node.GetImageData()
    return image is not None and image.GetNumberOfScalarComponents() >= 3 and mv.is_time_series(node.GetAttribute)


def sequence_from_multivolume(scene, node):
    """A volume sequence with the frames of the MultiVolume ``node`` (one scalar volume per component, on its
    grid) and all its attributes - frame labels and units, TR, flip angle - as the importer gives them to the
    sequences it makes (MultiVolumeImporterPlugin.py:603-611); indexed by time in s when the labels are
    times, by frame number otherwise. The MultiVolume itself is not changed. Returns the sequence node;
    ValueError naming the node when it holds no frames to convert."""
    name = node.GetName()
    image = node.GetImageData()
    n = image.GetNumberOfScalarComponents() if image is not None else 0
    if n < 3:
        raise ValueError(f"MultiVolume '{name}': has {n} frame(s); a DCE series needs at least 3")
    try:
        times, _ = mv.frame_labels_s(node.GetAttribute, n, f"MultiVolume '{name}'")
    except ValueError:
        times = None                                  # labels that are not times: the frame number indexes it
    values = [f"{t:.10g}" for t in times] if times is not None else []
    index = ("time", "s")
    if len(set(values)) != n:                         # no times, or repeated ones: frame numbers
        values, index = [str(k) for k in range(n)], ("frame", "")
    attributes = {key: node.GetAttribute(key) for key in node.GetAttributeNames()}
    attributes[CONVERTED_FROM_ATTRIBUTE] = node.GetID()
    seq, _ = add_volume_sequence(scene, scene.GenerateUniqueName(f"{name} sequence"), util.arrayFromVolume(node),
                                 ijk_to_ras(node), values, *index, attributes=attributes)
    return seq
