"""Scenes outside the Slicer application, scene files and pictures.

- :func:`headless_scene`: a real MRML scene with the module logics this extension needs attached
  (Colors, Sequences, Segmentations, Volumes, Tables, Plots) - for the command line and tests on
  the ``slicer-core`` wheel. Inside Slicer use ``slicer.mrmlScene`` instead.
- :func:`save_bundle` / :func:`load_bundle`: ``.mrb`` (one zip Slicer opens) and ``.mrml`` + data files.
- :func:`render_slice`: a PNG of one slice with a map over the anatomy, drawn by Slicer's own
  ``vtkMRMLSliceLogic`` (no OpenGL, no window).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

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
    Slicer's colour files are not there; :mod:`scene_output` builds the tables it needs)."""
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
        tmp = path[:-4] + ".partial.mrb"
        if not scene.WriteToMRB(tmp):
            raise OSError(f"could not write the scene bundle {path}")
        os.replace(tmp, path)
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


def render_slice(scene, app_logic, background, foreground=None, path: str | None = None, *,
                 opacity: float = 0.6, ras_point=None, orientation: str = "Axial", size=(512, 512),
                 label=None) -> np.ndarray:
    """Render one slice as Slicer shows it and return it as an RGB array (H, W, 3) (and write a PNG).

    background: anatomy volume; foreground: a map (with its display/threshold); label: an optional
    labelmap volume drawn as outline (e.g. the lesion). ``ras_point`` (mm) picks the slice (default:
    the centre of the background); ``orientation`` is Axial, Sagittal or Coronal.
    """
    default = scene.GetDefaultNodeByClass("vtkMRMLSliceNode")
    if default is None or not default.HasSliceOrientationPreset(orientation):
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)  # what Slicer does at start-up
    slice_node = scene.CreateNodeByClass("vtkMRMLSliceNode")
    slice_node.SetLayoutName(f"DCEPerfusionRender{id(slice_node)}")
    slice_node.SetName("DCEPerfusion render")
    slice_node.SetHideFromEditors(True)
    slice_node.SetSaveWithScene(False)
    scene.AddNode(slice_node)
    logic = slicer.vtkMRMLSliceLogic()
    try:
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        logic.SetSliceNode(slice_node)
        comp = logic.GetSliceCompositeNode()
        comp.SetSaveWithScene(False)
        comp.SetHideFromEditors(True)
        slice_node.SetOrientation(orientation)
        slice_node.SetDimensions(int(size[0]), int(size[1]), 1)
        comp.SetBackgroundVolumeID(background.GetID())
        comp.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        comp.SetForegroundOpacity(float(opacity))
        if label is not None:
            comp.SetLabelVolumeID(label.GetID())
            slice_node.SetUseLabelOutline(True)
        logic.FitSliceToVolume(background, int(size[0]), int(size[1]))
        if ras_point is None:
            bounds = [0.0] * 6
            background.GetRASBounds(bounds)
            ras_point = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        slice_node.JumpSliceByCentering(*[float(v) for v in ras_point])
        logic.SnapSliceOffsetToIJK()
        port = logic.GetImageDataConnection()
        port.GetProducer().Update()
        img = port.GetProducer().GetOutputDataObject(port.GetIndex())
        dims = img.GetDimensions()
        rgba = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(dims[1], dims[0], -1)
        rgb = rgba[..., :3].astype(np.float32)
        if rgba.shape[-1] == 4:  # composite over black where nothing is drawn
            rgb *= rgba[..., 3:4] / 255.0
        out = np.ascontiguousarray(np.flipud(rgb.round().astype(np.uint8)))
        if path:
            _write_png(out, path)
        return out
    finally:
        logic.SetMRMLScene(None)
        scene.RemoveNode(comp)
        scene.RemoveNode(slice_node)


def _write_png(rgb: np.ndarray, path: str) -> None:
    h, w, _ = rgb.shape
    img = vtk.vtkImageData()
    img.SetDimensions(w, h, 1)
    img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.flipud(rgb).reshape(-1, 3), deep=True,
                                                             array_type=vtk.VTK_UNSIGNED_CHAR))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(path)
    writer.SetInputData(img)
    writer.Write()
