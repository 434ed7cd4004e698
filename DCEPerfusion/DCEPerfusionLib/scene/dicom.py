"""Where a DCE sequence in a Slicer scene came from in DICOM: the instance UIDs Slicer's DICOM import leaves on
the nodes, the files a DICOM database holds for them, and the series' :class:`files.dicomref.DicomSource`
that DICOM results (Parametric Maps, SEG) reference. slicer/vtk, never qt/ctk: the database is passed in.

What Slicer 5.8.1 and MultiVolumeImporter leave on the nodes:

- DICOMScalarVolumePlugin.py:496-510 sets ``DICOM.instanceUIDs`` on every volume it loads: the SOP Instance
  UIDs of its files, space-separated, in slice (K) order ("Unknown" for a file without one), the order
  reversed with the slices when the volume was left-handed.
- MultiVolumeImporterPlugin.py:605-611 (fedorov/MultiVolumeImporter 144b2e4) copies the MultiVolume node's
  attributes onto a volume sequence *before* :617-624 add ``DICOM.instanceUIDs`` of all files to the
  MultiVolume node, so the sequence node has none; each frame is loaded by DICOMScalarVolumePlugin
  (:649) and copied into the sequence's data node with ``UpdateDataNodeAtValue`` (:664-676), whose
  ``CopyContent`` copies the attributes (vtkMRMLSequenceNode.cxx:362-380, vtkMRMLNode.cxx:132-139): every
  data node carries its frame's UIDs. DICOMImageSequencePlugin.py:303, :389 set them per frame too.
- A MultiVolume node (the "multi-volume" import format) has the UIDs of all frames; converting it to a
  sequence (:func:`.series.sequence_from_multivolume`) copies them onto the sequence node.
- ``MultiVolume.FrameFileList``: the paths of the files, comma-separated, frame by frame
  (MultiVolumeImporterPlugin.py:343, :457, :972), on the MultiVolume node and so on the sequence node
  (:611) - used when no database holds the instances (a scene opened without its DICOM database).

``ctkDICOMDatabase::fileForInstance(uid)`` returns the file's absolute path, "" for an unknown instance
(CTK 82cae57, Libs/DICOM/Core/ctkDICOMDatabase.cpp:2258-2275; the CTK Slicer 5.8.1 builds).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from .output import EXAM_ATTRIBUTE, find_output

#: the attribute DICOMScalarVolumePlugin writes on a loaded volume (SOP Instance UIDs, space-separated)
INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
#: the importer's list of the files (comma-separated paths)
FRAME_FILE_LIST_ATTRIBUTE = "MultiVolume.FrameFileList"
#: what DICOMScalarVolumePlugin.py:505-507 writes for a file without a SOP Instance UID
UNKNOWN_UID = "Unknown"
#: mm: the source images' positions must match the series' grid this closely (DICOM DS text keeps ~6 decimals)
POSITION_TOL_MM = 0.01
#: the status map node's attribute with the DICOM record of the exam's last export (JSON; files.dicomout's record)
RECORD_ATTRIBUTE = "DCEPerfusion.DICOMRecord"


def not_from_dicom(name: str) -> str:
    """The one line for a sequence without DICOM instance UIDs."""
    return (f"DICOM export: the DCE sequence '{name}' was not loaded from DICOM (its frames carry no "
            f"{INSTANCE_UIDS_ATTRIBUTE}) - DICOM objects belong to the source study; load the exam from the "
            "DICOM database and fit it again")


def instance_uids(sequence_node) -> list:
    """The SOP Instance UIDs of the DICOM images a volume sequence was loaded from: those of its data nodes
    (item order, each frame's in slice order), else the sequence node's own (a converted MultiVolume);
    "Unknown" entries left out, each UID once. [] when the sequence was not loaded from DICOM."""
    lists = [sequence_node.GetNthDataNode(i).GetAttribute(INSTANCE_UIDS_ATTRIBUTE)
             for i in range(sequence_node.GetNumberOfDataNodes())]
    if not any(lists):
        lists = [sequence_node.GetAttribute(INSTANCE_UIDS_ATTRIBUTE)]
    uids = []
    for text in lists:
        uids += [u for u in (text or "").split() if u != UNKNOWN_UID]
    return list(dict.fromkeys(uids))


def source_files(sequence_node, database) -> list:
    """The DICOM files of the sequence's instances: those ``database`` (a ctkDICOMDatabase, or anything with
    its ``fileForInstance``; may be None) holds for them, else - when every one it lists exists - the
    importer's ``MultiVolume.FrameFileList``. ValueError (one line) when the sequence was not loaded from
    DICOM, or when its files are found in neither."""
    name = sequence_node.GetName()
    uids = instance_uids(sequence_node)
    if not uids:
        raise ValueError(not_from_dicom(name))
    files = [database.fileForInstance(uid) for uid in uids] if database is not None else [""] * len(uids)
    missing = [uid for uid, path in zip(uids, files) if not path or not os.path.isfile(path)]
    if not missing:
        return files
    listed = [p for p in (sequence_node.GetAttribute(FRAME_FILE_LIST_ATTRIBUTE) or "").split(",") if p]
    if listed and all(os.path.isfile(p) for p in listed):
        return listed
    where = "the DICOM database" if database is not None else "a DICOM database (none is open)"
    raise ValueError(f"DICOM export: {len(missing)} of the {len(uids)} DICOM images sequence '{name}' was loaded "
                     f"from are not in {where} (e.g. {missing[0]}) - open the DICOM database it was loaded from "
                     "(DICOM module), or import the series into it again")


def check_source_geometry(source, series, name: str) -> None:
    """The source images (one per slice, :class:`files.dicomref.DicomSource`) lie where the series' slices do:
    as many as slices, each slice of the series' IJK->RAS (in either slice order: Slicer may have reversed
    them) within :data:`POSITION_TOL_MM` of one of their positions. A sequence cropped, resampled or
    reoriented after loading keeps the importer's attributes (they are copied with its content) but its
    results no longer belong to those images: ValueError. Enhanced multi-frame sources (positions per frame,
    not per file) are not checked here."""
    headers = source.headers
    positions = [h.get("ImagePositionPatient") for h in headers]
    if any(p is None for p in positions) or any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers):
        return
    from ..files.dicomout import slice_positions_lps
    n_slices = series.shape_kji[0]
    expected = slice_positions_lps(series.ijk_to_ras, n_slices)
    if len(positions) != n_slices:
        differs = f"{n_slices} slices, the source {len(positions)}"
    else:                                   # each slice at some source image's position (either slice order)
        given = np.asarray(positions, dtype=float)
        off = np.min(np.linalg.norm(expected[:, None, :] - given[None, :, :], axis=2), axis=1)
        if off.max() <= POSITION_TOL_MM:
            return
        differs = f"slice {int(np.argmax(off))} lies {off.max():.3g} mm from the nearest source image"
    raise ValueError(f"DICOM export: sequence '{name}' no longer has the geometry of the DICOM images it was loaded "
                     f"from ({differs}: cropped, resampled or moved after loading?) - fit the sequence as loaded "
                     "from DICOM")


def dicom_source(sequence_node, database, series):
    """The :class:`files.dicomref.DicomSource` of the DICOM series ``sequence_node`` was loaded from (its
    files found in ``database``), checked against the geometry of ``series`` (the
    :class:`core.series.Series4D` read from that sequence) and set as ``series.dicom``. ValueError (one line)
    naming the sequence and the fix."""
    from ..files import dicomref
    name = sequence_node.GetName()
    source = dicomref.source_of_files(source_files(sequence_node, database), f"DICOM export of '{name}'")
    if not {str(h.get("SOPInstanceUID", "")) for h in source.headers} <= set(instance_uids(sequence_node)):
        raise ValueError(f"DICOM export: the files listed for sequence '{name}' are not the images it was loaded from "
                         "(moved or replaced since) - open the DICOM database it was loaded from")
    check_source_geometry(source, series, name)
    series.dicom = source
    return source


def exam_label(outputs) -> str:
    """The exam label a fit's outputs (:class:`.analysis.SceneOutputs`) were written under ("" for none)."""
    return outputs.map_nodes["status"].GetAttribute(EXAM_ATTRIBUTE) or ""


def folder_name(label: str) -> str:
    """A folder name for an exam's DICOM objects: its label with the characters file systems refuse replaced
    ("exam" for no label)."""
    name = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", label).strip(" .")
    return name or "exam"


def keep_record(status_node, record: dict) -> None:
    """Keep the DICOM record of an exam's export (:func:`files.dicomout.write_dicom_exam`) on its status map
    node (saved with the scene), where the response SR finds the objects it references."""
    status_node.SetAttribute(RECORD_ATTRIBUTE, json.dumps(record))


def exam_record(scene, exam: str):
    """The DICOM record of the last export of the exam labelled ``exam`` (:func:`keep_record`), or None when it
    was not exported (or not fitted)."""
    node = find_output(scene, "map:status", exam)
    text = node.GetAttribute(RECORD_ATTRIBUTE) if node is not None else None
    return json.loads(text) if text else None
