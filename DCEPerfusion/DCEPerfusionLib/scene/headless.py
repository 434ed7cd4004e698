"""Scenes outside the Slicer application and scene files.

- :func:`headless_scene`: a real MRML scene with the module logics this extension needs attached
  (Colors, Sequences, Segmentations, Volumes, Tables, Plots) - for the command line and tests on
  the ``slicer-core`` wheel. Inside Slicer use ``slicer.mrmlScene`` instead.
- :func:`save_bundle` / :func:`load_bundle`: ``.mrb`` (one zip Slicer opens) and ``.mrml`` + data files.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from dataclasses import dataclass, field

import slicer
import vtk

from ..files.atomic import replacing

log = logging.getLogger(__name__)

_LOGICS = (("Colors", "vtkSlicerColorLogic"), ("Sequences", "vtkSlicerSequencesLogic"),
           ("Segmentations", "vtkSlicerSegmentationsModuleLogic"), ("Volumes", "vtkSlicerVolumesLogic"),
           ("Tables", "vtkSlicerTablesLogic"), ("Plots", "vtkSlicerPlotsLogic"))


@dataclass
class HeadlessScene:
    """A scene plus the application and module logics that must stay alive with it."""

    scene: object
    app_logic: object
    logics: dict = field(default_factory=dict)
    _keep: list = field(default_factory=list)


def headless_scene(quiet: bool = True) -> HeadlessScene:
    """A new MRML scene with the module logics attached (the pattern Slicer's application uses).

    ``quiet`` hides VTK's complaint that the colour logic has no Slicer home directory (it only means
    Slicer's colour files are not there; :mod:`output` builds the tables it needs)."""
    previous = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    if quiet:
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    try:
        for name, cls in _LOGICS:
            logic = getattr(slicer, cls)()
            logic.SetMRMLApplicationLogic(app)
            logic.SetMRMLScene(scene)
            app.SetModuleLogic(name, logic)
            logics[name] = logic
    finally:
        vtk.vtkLogger.SetStderrVerbosity(previous)
    return HeadlessScene(scene=scene, app_logic=app, logics=logics)


def _storable_nodes(scene):
    """Nodes with data to save: the user's and ours (Slicer's built-in colour tables are hidden)."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [n for n in nodes if n.IsA("vtkMRMLStorableNode") and n.GetSaveWithScene() and not n.GetHideFromEditors()]


def _prepare_storage(scene, folder=None):
    """Give every storable node a storage node with a file name (NRRD for volumes)."""
    used = set()
    for node in _storable_nodes(scene):
        storage = node.GetStorageNode()
        if storage is None:
            if not node.AddDefaultStorageNode():
                log.warning("node '%s' (%s) cannot be stored and is left out", node.GetName(), node.GetClassName())
                continue
            storage = node.GetStorageNode()
        ext = storage.GetDefaultWriteFileExtension() or "nrrd"
        if node.IsA("vtkMRMLSegmentationNode"):
            ext = "seg.nrrd"
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in node.GetName()).strip("_") or "node"
        fname, k = f"{stem}.{ext}", 1
        while fname in used:
            k += 1
            fname = f"{stem}_{k}.{ext}"
        used.add(fname)
        storage.SetFileName(os.path.join(folder, fname) if folder else fname)


def save_bundle(scene, path: str) -> str:
    """Save the scene with all its data: ``.mrb`` (a zip Slicer opens with File > Load) or ``.mrml``
    (the data files are written beside it). Returns the path written.

    Meant for headless scenes (command line, tests): every storable node gets a file name in the
    bundle. Inside the Slicer application use File > Save, which keeps the nodes' own file names."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    if path.lower().endswith(".mrb"):
        _prepare_storage(scene)
        with replacing(path, hidden=False) as tmp:
            if not scene.WriteToMRB(tmp):
                raise OSError(errno.EIO, "could not write the scene bundle", path)
        return path
    if not path.lower().endswith(".mrml"):
        raise ValueError(f"scene file {path!r}: use a .mrb (one file) or .mrml (with data files) name")
    _prepare_storage(scene, folder)
    for node in _storable_nodes(scene):
        storage = node.GetStorageNode()
        if storage is not None and not storage.WriteData(node):
            raise OSError(f"could not write {storage.GetFileName()} for node '{node.GetName()}'")
    scene.SetRootDirectory(folder)
    scene.SetURL(path)
    if not scene.Commit(path):
        raise OSError(f"could not write the scene file {path}")
    return path


def load_bundle(path: str) -> HeadlessScene:
    """Open a ``.mrb`` or ``.mrml`` written by :func:`save_bundle` (or Slicer) into a new headless scene."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"scene file {path!r} does not exist")
    hs = headless_scene()
    io_logic = slicer.vtkDataIOManagerLogic()
    remote = slicer.vtkMRMLRemoteIOLogic()
    cache = tempfile.mkdtemp(prefix="dceperfusion-cache-")
    remote.GetCacheManager().SetRemoteCacheDirectory(cache)
    io_logic.SetMRMLApplicationLogic(hs.app_logic)
    io_logic.SetAndObserveDataIOManager(remote.GetDataIOManager())
    remote.SetMRMLScene(hs.scene)
    remote.AddDataIOToScene()
    hs._keep += [io_logic, remote]
    if path.lower().endswith(".mrb"):
        ok = hs.scene.ReadFromMRB(os.path.abspath(path))
    else:
        hs.scene.SetURL(os.path.abspath(path))
        ok = hs.scene.Import()
    if not ok:
        raise OSError(f"could not read the scene {path!r}")
    return hs
