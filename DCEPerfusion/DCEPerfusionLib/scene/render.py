"""Pictures of a scene as Slicer shows them, drawn by Slicer's own ``vtkMRMLSliceLogic`` (no OpenGL, no
window): :func:`render_slice` (one slice, a map over the anatomy, an optional lesion outline),
:func:`render_mask` (a mask on that slice's pixel grid, for outlines drawn by the figures) and
:func:`lesion_pair_images` (a lesion at baseline and follow-up).
"""

from __future__ import annotations

import os

import numpy as np
import slicer
import vtk
from slicer import util
from vtk.util import numpy_support

from .output import find_output, scratch_nodes, set_ijk_to_ras
from .response import exam_maps


def render_slice(scene, app_logic, background, foreground=None, path: str | None = None, *,
                 opacity: float = 0.6, ras_point=None, orientation: str = "Axial", size=(512, 512),
                 label=None, fit_to=None) -> np.ndarray:
    """Render one slice as Slicer shows it and return it as an RGB array (H, W, 3) (and write a PNG).

    background: anatomy volume; foreground: a map (with its display/threshold); label: an optional
    labelmap volume drawn as outline (e.g. the lesion). ``ras_point`` (mm) picks the slice (default:
    the centre of the background); ``orientation`` is Axial, Sagittal or Coronal; ``fit_to``: the volume
    whose extent the field of view fits (default the background; give the same one to compare pictures).
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
        logic.FitSliceToVolume(fit_to if fit_to is not None else background, int(size[0]), int(size[1]))
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


def render_mask(scene, app_logic, background, mask, **slice_args) -> np.ndarray:
    """``mask`` (K, J, I), on the grid of ``background``, on the pixel grid of
    ``render_slice(scene, app_logic, background, ..., **slice_args)`` (same ``ras_point``, ``orientation``,
    ``size``): bool (H, W), resampled by Slicer's slice logic as it shows a labelmap (nearest voxel).
    ``figures.outline_rgb`` draws its outline on that rendering."""
    mask = np.asarray(mask)
    shape = util.arrayFromVolume(background).shape
    if mask.shape != shape:
        raise ValueError(f"mask {mask.shape} is not on the grid of {background.GetName()} {shape}")
    with scratch_nodes(scene):
        label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DCEPerfusion temporary mask")
        util.updateVolumeFromArray(label, (mask != 0).astype(np.uint8))
        label.CopyOrientation(background)
        label.CreateDefaultDisplayNodes()
        # the label volume as the background: the view fits it as it fits the anatomy (same grid); label 0
        # is transparent, so drawn pixels are the mask
        return render_slice(scene, app_logic, label, None, **slice_args).any(axis=-1)


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


def lesion_pair_images(scene, app_logic, baseline_exam: str, followup_exam: str, lesion: str, base_mask,
                       follow_mask, baseline_anatomy=None, followup_anatomy=None, map_name: str = "vp",
                       size=(360, 360)) -> list:
    """Baseline and follow-up ``map_name`` over each exam's anatomy, through the lesion's centre, with the
    lesion outlined - rendered by Slicer's slice logic. Returns the two RGB images (H, W, 3)
    (``figures.image_pair`` puts them side by side)."""
    images = []
    for exam, mask, anatomy in ((baseline_exam, base_mask, baseline_anatomy),
                                (followup_exam, follow_mask, followup_anatomy)):
        em = exam_maps(scene, exam)
        node = find_output(scene, f"map:{map_name}", exam)
        if node is None:
            raise ValueError(f"exam {exam!r} has no {map_name} map")
        with scratch_nodes(scene):
            label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{lesion} outline")
            util.updateVolumeFromArray(label, np.asarray(mask, dtype=np.uint8))
            set_ijk_to_ras(label, em.matrix)
            label.CreateDefaultDisplayNodes()
            kji = np.argwhere(mask).mean(axis=0) if np.any(mask) else (np.array(mask.shape) - 1) / 2
            centre = (em.matrix @ np.r_[kji[::-1], 1.0])[:3]
            background = anatomy if anatomy is not None else node
            images.append(render_slice(scene, app_logic, background, node if anatomy is not None else None,
                                       ras_point=centre, size=size, label=label, opacity=0.75))
    return images
