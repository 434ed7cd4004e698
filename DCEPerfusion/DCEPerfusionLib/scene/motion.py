"""A motion correction (:class:`core.motion.MotionEstimate`) in an MRML scene: one linear transform per frame
in a sequence browsed with the DCE, and the table of motion.csv's rows.

Direction. ``transforms_lps[f]`` maps a point of the reference position (LPS, mm) to where that tissue is in
frame f - ITK's resampling transform of the frame (moving) registered to the reference (fixed). Slicer reads
such an ITK transform as the transform *from parent*, after converting LPS to RAS
(``vtkMRMLTransformStorageNode.cxx:465`` ``SetAndObserveTransformFromParentAutoInvert``; ``Tras = lps2ras *
Tlps * ras2lps``, ``vtkITKTransformConverter.h:257-268``). So frame f's transform node holds

    from parent (reference RAS -> frame RAS) = LPS @ transforms_lps[f] @ LPS,  LPS = diag(-1, -1, 1, 1)
    to parent   (frame RAS -> reference RAS) = its inverse,

and a frame placed under it (the DCE proxy volume under the transform proxy, :func:`show_corrected_frames`)
is shown in the reference position: the motion-corrected frames, as the fit saw them.

The transform sequence has the DCE sequence's index (name, unit, type, tolerance) and, for frame f, the index
value of the DCE item that is frame f of the series (:func:`series.index_values_in_time_order`), and is
synchronised with every browser of the DCE sequence, so its proxy follows the frame slider
(``vtkSlicerSequencesLogic.cxx:327,428`` in Slicer 5.8.1: a synchronised sequence shows its item at the master's index
value, nearest one if none is equal).

Imports slicer/vtk (never qt/ctk); the scene and nodes are passed in.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import slicer
from slicer import util

from ..core.motion import LPS, MotionEstimate
from .output import add_column, browsers_of, detach_from_browsers, output_name, output_node
from .series import index_values_in_time_order

log = logging.getLogger(__name__)

#: Roles (``DCEPerfusion.Role``) of the motion outputs.
TRANSFORMS_ROLE = "motion-transforms"
TABLE_ROLE = "motion-table"
#: Attributes of the transform sequence (and the table) with the summary values.
MAX_DISPLACEMENT_MM_ATTRIBUTE = "DCEPerfusion.MaxDisplacement_mm"
MAX_DISPLACEMENT_VOXELS_ATTRIBUTE = "DCEPerfusion.MaxDisplacement_voxels"
SUMMARY_ATTRIBUTE = "DCEPerfusion.Motion"
DIRECTION_ATTRIBUTE = "DCEPerfusion.TransformDirection"
DIRECTION = ("to parent: frame RAS -> reference RAS (from parent: reference -> frame, the ITK resampling "
             "transform); a frame under it is shown in the reference position")
_UNITS = {"_mm": "mm", "_deg": "deg", "_s": "s"}
_DESCRIPTIONS = {"frame": "frame number (time order)", "time_s": "frame time from the first frame",
                 "tx_mm": "translation along L (LPS x)", "ty_mm": "translation along P (LPS y)",
                 "tz_mm": "translation along S (LPS z)", "rx_deg": "rotation about LPS x",
                 "ry_deg": "rotation about LPS y", "rz_deg": "rotation about LPS z",
                 "displacement_mm": "largest displacement of the fit region's corners"}


def from_parent_ras(matrix_lps) -> np.ndarray:
    """The 4x4 reference RAS -> frame RAS of a frame's transform (reference LPS -> frame LPS): the Slicer
    transform node's matrix *from parent* (module doc)."""
    return LPS @ np.asarray(matrix_lps, dtype=float) @ LPS


def write_motion(scene, motion: MotionEstimate, t_s, exam: str = "", dce_sequence=None,
                 frame_interval_s: float | None = None, override_frame_times: bool = False):
    """Write a motion correction into ``scene``: the transform sequence (one ``vtkMRMLLinearTransformNode``
    per frame, module doc) named "motion (<exam>)", synchronised with the browsers of ``dce_sequence``,
    and the table "motion parameters (<exam>)" with motion.csv's rows (``MotionEstimate.rows``). A re-run
    with the same ``exam`` replaces both. Without ``dce_sequence`` (a result computed from files) the
    sequence is indexed by the frame times (time, s). ``frame_interval_s`` / ``override_frame_times``: the
    options the series was read with (the frame order). Returns (sequence node, table node).

    ValueError when ``dce_sequence`` has another number of items than the correction has frames."""
    transforms = np.asarray(motion.transforms_lps, dtype=float)
    n = len(transforms)
    index = ("time", "s", slicer.vtkMRMLSequenceNode.NumericIndex, None)
    values = [f"{float(t):.10g}" for t in t_s]
    if dce_sequence is not None:
        if dce_sequence.GetNumberOfDataNodes() != n:
            raise ValueError(f"DCE sequence '{dce_sequence.GetName()}': has {dce_sequence.GetNumberOfDataNodes()} "
                             f"frames, the motion correction {n} - write the result with the sequence it came from")
        values = index_values_in_time_order(dce_sequence, frame_interval_s, override_frame_times)
        index = (dce_sequence.GetIndexName(), dce_sequence.GetIndexUnit(), dce_sequence.GetIndexType(),
                 dce_sequence.GetNumericIndexValueTolerance())
    seq = output_node(scene, "vtkMRMLSequenceNode", TRANSFORMS_ROLE, exam, output_name("motion", exam))
    modified = seq.StartModify()
    seq.RemoveAllDataNodes()
    seq.SetIndexName(index[0])
    seq.SetIndexUnit(index[1])
    seq.SetIndexType(index[2])
    if index[3] is not None:
        seq.SetNumericIndexValueTolerance(index[3])
    centre_ras = (LPS @ np.r_[np.asarray(motion.center_lps, dtype=float), 1.0])[:3]
    item = slicer.vtkMRMLLinearTransformNode()
    for f, value in enumerate(values):
        item.SetName(f"motion frame {f}")
        item.SetMatrixTransformToParent(util.vtkMatrixFromArray(np.linalg.inv(from_parent_ras(transforms[f]))))
        item.SetCenterOfTransformation(*centre_ras)
        seq.SetDataNodeAtValue(item, value)                     # a copy in the sequence's own scene
    summary = motion.summary()
    seq.SetAttribute(MAX_DISPLACEMENT_MM_ATTRIBUTE, f"{motion.max_displacement_mm:.6g}")
    seq.SetAttribute(MAX_DISPLACEMENT_VOXELS_ATTRIBUTE, f"{motion.max_displacement_voxels:.6g}")
    seq.SetAttribute(SUMMARY_ATTRIBUTE, json.dumps(summary, allow_nan=True))
    seq.SetAttribute(DIRECTION_ATTRIBUTE, DIRECTION)
    seq.EndModify(modified)
    _synchronise(scene, seq, dce_sequence)
    table = write_motion_table(scene, motion, t_s, exam)
    for key in (MAX_DISPLACEMENT_MM_ATTRIBUTE, MAX_DISPLACEMENT_VOXELS_ATTRIBUTE, SUMMARY_ATTRIBUTE):
        table.SetAttribute(key, seq.GetAttribute(key))
    return seq, table


def _synchronise(scene, seq, dce_sequence):
    """Add ``seq`` to every browser of ``dce_sequence`` (and take it out of any other: a re-run on another
    DCE sequence)."""
    targets = browsers_of(scene, dce_sequence) if dce_sequence is not None else []
    detach_from_browsers(scene, seq, keep=targets)
    for browser in targets:
        browser.AddSynchronizedSequenceNode(seq)                     # no-op when it is already there
    if dce_sequence is not None and not targets:
        log.info("DCE sequence '%s' has no browser: the motion transforms are not browsed with it",
                 dce_sequence.GetName())


def write_motion_table(scene, motion: MotionEstimate, t_s, exam: str = "", title: str = "motion parameters"):
    """The table of motion.csv's rows (frame, time_s, tx_mm ... rz_deg, displacement_mm), with units."""
    rows = motion.rows(t_s)
    table = output_node(scene, "vtkMRMLTableNode", TABLE_ROLE, exam, output_name(title, exam))
    table.RemoveAllColumns()
    for key in (rows[0] if rows else {}):
        unit = next((u for suffix, u in _UNITS.items() if key.endswith(suffix)), "")
        add_column(table, key, [r[key] for r in rows], unit, _DESCRIPTIONS.get(key, ""))
    table.Modified()
    return table


def transform_proxies(scene, transforms_sequence) -> list:
    """The transform proxy node of ``transforms_sequence`` in each of its browsers (the current frame's)."""
    proxies = [b.GetProxyNode(transforms_sequence) for b in browsers_of(scene, transforms_sequence)]
    return [p for p in proxies if p is not None]


def show_corrected_frames(scene, dce_sequence, transforms_sequence, corrected: bool = True) -> int:
    """Show the DCE's frames motion-corrected (its proxy volume under the transform proxy, so every frame
    the slider selects is shown in the reference position) or, with ``corrected=False``, as acquired.
    Changes only the browsers' proxy nodes, never the sequences. Returns the number of proxies changed."""
    changed = 0
    for browser in browsers_of(scene, dce_sequence):
        if not browser.IsSynchronizedSequenceNode(transforms_sequence, True):
            continue
        volume, transform = browser.GetProxyNode(dce_sequence), browser.GetProxyNode(transforms_sequence)
        if volume is None or transform is None:
            continue
        if corrected:
            volume.SetAndObserveTransformNodeID(transform.GetID())
        elif volume.GetTransformNodeID() == transform.GetID():   # another transform the user set stays
            volume.SetAndObserveTransformNodeID(None)
        else:
            continue
        changed += 1
    return changed
