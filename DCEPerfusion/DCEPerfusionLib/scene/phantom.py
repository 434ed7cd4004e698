"""Put the synthetic phantom (:mod:`phantom`) into an MRML scene the way Slicer's DICOM importer
leaves a DCE study: a volume sequence with ``MultiVolume.*`` attributes, an anatomy volume and a
segmentation with the lesion and the artery. Used by the in-Slicer self-test, the tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer
from slicer import util

from ..core import multivolume as mv
from ..core.phantom import LABELS, Phantom
from ..core.units import MS_PER_S
from .output import set_ijk_to_ras
from .series import add_volume_sequence


@dataclass
class PhantomNodes:
    """Nodes made by :func:`add_phantom`, and the phantom's truth and labels (K, J, I)."""

    sequence: object
    browser: object
    anatomy: object
    segmentation: object
    lesion_segment_id: str | None
    artery_segment_id: str | None
    ijk_to_ras: np.ndarray
    truth: dict
    labels: np.ndarray
    segment_ids: dict


def oblique_matrix(spacing_mm=(1.2, 1.2, 4.0), angles_deg=(12.0, -7.0, 5.0), origin_mm=(-20.0, 15.0, -30.0)):
    """An IJK->RAS matrix with an oblique orientation (rotations about R, A, S in degrees)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx @ np.diag(spacing_mm)
    m[:3, 3] = origin_mm
    return m


def add_phantom(scene, ph: Phantom, matrix=None, name: str = "DCE phantom", with_attributes: bool = True,
                browser: bool = True, segments: dict | None = None) -> PhantomNodes:
    """Add ``ph`` to ``scene``. ``with_attributes=False`` leaves out the MultiVolume timing and DICOM
    keys (frame times then come from the index values, in s). ``segments`` {segment name: label code
    of ``ph.labels``} (default: the block phantom's lesion and artery)."""
    segments = segments or {"lesion": LABELS["lesion"], "artery": LABELS["artery"]}
    matrix = oblique_matrix() if matrix is None else np.asarray(matrix, dtype=float)
    signal = np.asarray(ph.signal, dtype=np.float32)  # (K, J, I, T)
    attributes = {}
    if with_attributes:
        acq = ph.acquisition
        attributes = {mv.FRAME_LABELS: ",".join(f"{MS_PER_S * t:g}" for t in ph.t_s),
                      mv.TR_KEY: f"{MS_PER_S * acq['tr_s']:g}", mv.FLIP_KEY: f"{acq['flip_angle_deg']:g}"}
    seq, br = add_volume_sequence(scene, name, signal, matrix, [f"{t:g}" for t in ph.t_s], attributes=attributes,
                                  browser=browser)
    labels = ph.labels
    # anatomy: a T1-weighted look (the pre-contrast signal, lesion darker, artery bright)
    anatomy_arr = signal[..., : ph.acquisition["n_baseline"]].mean(axis=-1)
    anatomy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{name} anatomy")
    util.updateVolumeFromArray(anatomy, anatomy_arr.astype(np.float32))
    set_ijk_to_ras(anatomy, matrix)
    anatomy.CreateDefaultDisplayNodes()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(anatomy)
    ids = {}
    palette = [(0.95, 0.8, 0.1), (0.9, 0.1, 0.1), (0.2, 0.6, 0.9), (0.4, 0.8, 0.3)]
    for n, (tissue, code) in enumerate(segments.items()):
        colour = palette[n % len(palette)]
        label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "temporary")
        util.updateVolumeFromArray(label, (labels == code).astype(np.uint8))
        set_ijk_to_ras(label, matrix)
        before = seg.GetSegmentation().GetNumberOfSegments()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg)
        scene.RemoveNode(label)
        segment = seg.GetSegmentation().GetNthSegment(before)
        segment.SetName(tissue)
        segment.SetColor(*colour)
        ids[tissue] = seg.GetSegmentation().GetNthSegmentID(before)
    seg.CreateDefaultDisplayNodes()
    return PhantomNodes(sequence=seq, browser=br, anatomy=anatomy, segmentation=seg,
                        lesion_segment_id=ids.get("lesion"), artery_segment_id=ids.get("artery"), ijk_to_ras=matrix,
                        truth=ph.truth, labels=labels, segment_ids=ids)
