"""Writing results into an MRML scene: map volumes with colour, window and legend, the overlay on the
anatomy, segment masks on a grid, statistics and curve tables, plot charts, AIF segments.

Imports slicer/vtk (never qt/ctk); every function receives the scene or its nodes explicitly, so the
same code runs in the Slicer application and on a headless ``slicer-core`` scene.

Outputs carry two attributes, ``DCEPerfusion.Role`` and ``DCEPerfusion.Exam``; a re-run with the same
exam label finds and updates its own nodes instead of adding new ones, and never touches a node
without those attributes (the user's inputs).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import slicer
import vtk
from slicer import util

from ..core.registry import MAPS
from ..core.regionstats import CI_STAT_NAMES, STAT_NAMES, RegionStats

log = logging.getLogger(__name__)

ROLE_ATTRIBUTE = "DCEPerfusion.Role"
EXAM_ATTRIBUTE = "DCEPerfusion.Exam"
#: Slicer's own Viridis table (present in the application); built from matplotlib when absent.
SLICER_VIRIDIS_ID = "vtkMRMLColorTableNodeFileViridis.txt"
BUILT_VIRIDIS_NAME = "Viridis (DCE Perfusion)"


# ----------------------------------------------------------------------------------------- geometry
def ijk_to_ras(volume_node) -> np.ndarray:
    """The 4x4 IJK->RAS matrix of a volume node (mm)."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return util.arrayFromVTKMatrix(m)


def set_ijk_to_ras(volume_node, matrix) -> None:
    volume_node.SetIJKToRASMatrix(util.vtkMatrixFromArray(np.asarray(matrix, dtype=float)))


def reference_volume(shape_kji, matrix):
    """A scalar volume node (not added to any scene) with the given grid, as an export reference."""
    node = slicer.vtkMRMLScalarVolumeNode()
    img = vtk.vtkImageData()
    img.SetDimensions(int(shape_kji[2]), int(shape_kji[1]), int(shape_kji[0]))
    img.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    node.SetAndObserveImageData(img)
    set_ijk_to_ras(node, matrix)
    return node


@contextmanager
def scratch_nodes(scene, keep=()):
    """Nodes added to ``scene`` inside the block (temporary labelmaps and the display and colour nodes
    Slicer adds for them) are removed at its end, also on error; nodes in ``keep`` stay."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
            if node.GetID() not in before and not any(node is k for k in keep):
                scene.RemoveNode(node)


# ----------------------------------------------------------------------------------------- outputs
def find_output(scene, role: str, exam: str):
    """The node this module wrote for ``role`` and ``exam`` in an earlier run, or None."""
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(ROLE_ATTRIBUTE) == role and (node.GetAttribute(EXAM_ATTRIBUTE) or "") == exam:
            return node
    return None


def output_node(scene, class_name: str, role: str, exam: str, name: str):
    """Find (re-run) or create the output node of ``role``; it is (re)named ``name``."""
    node = find_output(scene, role, exam)
    if node is not None and not node.IsA(class_name):
        scene.RemoveNode(node)
        node = None
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetAttribute(EXAM_ATTRIBUTE, exam)
    node.SetName(name)
    return node


#: Roles of the outputs a run may or may not write (the others it always writes).
OPTIONAL_ROLES = ("statistics", "aif-segmentation", "motion-transforms", "motion-table")


def remove_stale_outputs(scene, exam: str, keep) -> int:
    """Remove this exam's maps, statistics table, AIF segmentation and motion outputs that a re-run did not
    write (e.g. ``ve`` after switching to Patlak, the motion transforms after turning the correction off).
    Returns the number of nodes removed."""
    keep_ids = {n.GetID() for n in keep if n is not None}
    stale = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        role = node.GetAttribute(ROLE_ATTRIBUTE) or ""
        if ((role.startswith("map:") or role in OPTIONAL_ROLES)
                and (node.GetAttribute(EXAM_ATTRIBUTE) or "") == exam and node.GetID() not in keep_ids):
            stale.append(node)
    for node in stale:
        log.info("removing '%s': the new run of exam %r did not produce it", node.GetName(), exam)
        remove_output(scene, node)
    return len(stale)


def _browsers(scene) -> list:
    if not scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):
        return []
    return [scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode"))]


def browsers_of(scene, sequence) -> list:
    """The sequence browser nodes of ``scene`` that browse ``sequence`` (as master or synchronised)."""
    return [] if sequence is None else [b for b in _browsers(scene) if b.IsSynchronizedSequenceNode(sequence, True)]


def detach_from_browsers(scene, sequence, keep=()) -> int:
    """Take ``sequence`` out of every browser of ``scene`` but those in ``keep``, and remove the proxy node
    each of them showed it with. ``RemoveSynchronizedSequenceNode`` removes the proxy only when it still has
    the "proxyNodeCopy" attribute (vtkMRMLSequenceBrowserNode.cxx:902, :774, Slicer 5.8.1), which the first
    proxy update wipes: it copies the data node's attributes over the proxy's (vtkSlicerSequencesLogic.cxx:488,
    vtkMRMLNode.cxx:132-140) - so the proxy is removed here (it also stops the browser's playback, :895).
    Returns the number of browsers it was taken out of."""
    keep_ids = {b.GetID() for b in keep}
    browsers = [b for b in browsers_of(scene, sequence) if b.GetID() not in keep_ids]
    for browser in browsers:
        proxy = browser.GetProxyNode(sequence)
        browser.RemoveSynchronizedSequenceNode(sequence.GetID())
        if proxy is not None and not any(b.IsProxyNode(proxy.GetID()) for b in _browsers(scene)):
            scene.RemoveNode(proxy)
    return len(browsers)


def remove_output(scene, node) -> None:
    """Remove an output node; a sequence is first taken out of its browsers with its proxy node
    (:func:`detach_from_browsers`) - removing only the sequence would leave the proxy behind."""
    if node.IsA("vtkMRMLSequenceNode"):
        detach_from_browsers(scene, node)
    scene.RemoveNode(node)


def output_name(title: str, exam: str) -> str:
    return f"{title} ({exam})" if exam else title


def check_inputs_not_outputs(scene, inputs: dict, exam: str) -> None:
    """Refuse a run whose outputs would overwrite one of its inputs (an output of an earlier run
    selected as input with the same exam label)."""
    for label, node in inputs.items():
        if node is None:
            continue
        role = node.GetAttribute(ROLE_ATTRIBUTE)
        if role and (node.GetAttribute(EXAM_ATTRIBUTE) or "") == exam:
            raise ValueError(
                f"{label}: '{node.GetName()}' is an output of an earlier DCE Perfusion run with exam label "
                f"{exam!r} and would be overwritten - choose another exam label, or clone the node and use the clone")


# ----------------------------------------------------------------------------------------- maps
def map_colour_node(scene):
    """Viridis colour table: Slicer's own when the scene has it, else one built from matplotlib's."""
    node = scene.GetNodeByID(SLICER_VIRIDIS_ID)
    if node is not None:
        return node
    node = scene.GetFirstNodeByName(BUILT_VIRIDIS_NAME)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    try:
        from matplotlib import colormaps
    except ImportError as exc:  # pragma: no cover - Slicer always has its Viridis table
        raise RuntimeError("the scene has no Viridis colour table and matplotlib is not installed to build one - "
                           "pip install matplotlib") from exc
    rgba = colormaps["viridis"](np.linspace(0.0, 1.0, 256))
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", BUILT_VIRIDIS_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for i, (r, g, b, _) in enumerate(rgba):
        node.SetColor(i, float(r), float(g), float(b), 1.0)
    node.SetAttribute(ROLE_ATTRIBUTE, "colour-table")
    return node


def write_map(scene, name: str, values, matrix, exam: str, role_prefix: str = "map"):
    """Write one map ``(K, J, I)`` as a scalar volume with the DCE geometry and its display.

    NaN (voxels not fitted - see the status map) is stored as 0. Kinetic maps are shown transparent
    at 0 (display threshold), so the anatomy shows where nothing was fitted; a voxel fitted exactly on
    the lower bound 0 is hidden too (the status map marks it "at bound").
    """
    arr = np.asarray(values)
    info = MAPS[name]
    data = np.where(np.isfinite(arr), arr, 0).astype(np.int16 if info.unit == "code" else np.float32)
    node = output_node(scene, "vtkMRMLScalarVolumeNode", f"{role_prefix}:{name}", exam, output_name(info.title, exam))
    util.updateVolumeFromArray(node, data)
    set_ijk_to_ras(node, matrix)
    node.SetAttribute("DCEPerfusion.Unit", info.unit)
    _display_map(scene, node, info)
    return node


def _display_map(scene, node, info):
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    d = node.GetDisplayNode()
    lo, hi = info.window
    name, title, unit = info.key, info.title, info.unit
    d.SetAutoWindowLevel(False)
    d.SetWindowLevelMinMax(lo, hi)
    if name == "status":
        d.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        return
    d.SetAndObserveColorNodeID(map_colour_node(scene).GetID())
    if info.zero_is_unfitted:  # non-negative by their bounds: 0 means "not fitted" (or on the bound) -> transparent
        d.SetAutoThreshold(False)
        d.SetApplyThreshold(True)
        d.SetThreshold(1e-9 * max(hi, 1.0), 3.0e38)
    if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        log.info("no colour legend: the Colors module logic is not attached to this scene")
        return
    legend = None
    for i in range(node.GetNumberOfDisplayNodes()):
        if node.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode"):
            legend = node.GetNthDisplayNode(i)
    if legend is None:
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)
    legend.SetTitleText(f"{title} [{unit}]" if unit and unit != "1" else title)
    legend.SetLabelFormat("%.0f" if info.unit == "code" or hi > 5 else "%.3f" if hi <= 0.1 else "%.2f")
    legend.SetVisibility(True)


def show_overlay(scene, foreground, background=None, opacity: float = 0.6) -> int:
    """Show ``foreground`` (a map) over ``background`` (the anatomy) in every slice view of the scene.
    Returns the number of slice views changed (0 in a scene without views)."""
    n = scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(n):
        comp = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if background is not None:
            comp.SetBackgroundVolumeID(background.GetID())
        comp.SetForegroundVolumeID(foreground.GetID())
        comp.SetForegroundOpacity(float(opacity))
    # only the overlay map shows its legend, so views are not cluttered
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorLegendDisplayNode")):
        legend = scene.GetNthNodeByClass(i, "vtkMRMLColorLegendDisplayNode")
        owner = legend.GetDisplayableNode()
        if owner is not None and owner.GetAttribute(ROLE_ATTRIBUTE):
            legend.SetVisibility(owner is foreground)
    return n


# ----------------------------------------------------------------------------------------- segments
def segment_masks(segmentation_node, segment_ids, reference_node, what: str = "segment") -> dict:
    """{segment name: bool array (K, J, I)} on the grid of ``reference_node``.

    Each segment is exported separately (``ExportSegmentsToLabelmapNode`` with the reference), so
    overlapping segments each keep all their voxels and a segment drawn on another grid is resampled.
    """
    seg = segmentation_node.GetSegmentation()
    dims = reference_node.GetImageData().GetDimensions()
    shape = (dims[2], dims[1], dims[0])
    scene = segmentation_node.GetScene()
    masks = {}
    for sid in segment_ids:
        segment = seg.GetSegment(sid)
        if segment is None:
            names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
            raise ValueError(f"{what}: segmentation '{segmentation_node.GetName()}' has no segment with ID "
                             f"{sid!r} (segments: {', '.join(names) or 'none'}) - select one of its segments")
        with scratch_nodes(scene):
            label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DCEPerfusion temporary export")
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, label, reference_node)
            arr = util.arrayFromVolume(label) if ok and label.GetImageData() is not None else None
            if arr is None or arr.shape != shape:
                mask = np.zeros(shape, dtype=bool)  # empty segment: nothing exported
            else:
                mask = arr > 0
        name = segment.GetName()
        if name in masks:
            name = f"{name} [{sid}]"
        if not mask.any():
            log.warning("segment %r is empty on the DCE grid", name)
        masks[name] = mask
    return masks


def write_mask_segmentation(scene, mask, matrix, exam: str, role: str, title: str, segment_name: str,
                            colour=(0.9, 0.1, 0.1)):
    """Show a voxel mask (K, J, I) on the DCE grid as a one-segment segmentation node."""
    node = output_node(scene, "vtkMRMLSegmentationNode", role, exam, output_name(title, exam))
    node.GetSegmentation().RemoveAllSegments()
    with scratch_nodes(scene, keep=[node]):
        label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DCEPerfusion temporary import")
        util.updateVolumeFromArray(label, np.asarray(mask, dtype=np.uint8))
        set_ijk_to_ras(label, matrix)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, node):
            raise RuntimeError(f"could not import the {title} mask into a segmentation")
    seg = node.GetSegmentation()
    if seg.GetNumberOfSegments():
        s = seg.GetNthSegment(0)
        s.SetName(segment_name)
        s.SetColor(*colour)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


# ----------------------------------------------------------------------------------------- tables
def add_column(table, name: str, values, unit: str = "", description: str = ""):
    """Append a column to a table node: strings, ints or floats (NaN allowed), with unit and description."""
    if values and isinstance(values[0], str):
        arr = vtk.vtkStringArray()
        for v in values:
            arr.InsertNextValue(v)
    else:
        arr = vtk.vtkIntArray() if values and isinstance(values[0], (int, np.integer)) else vtk.vtkDoubleArray()
        arr.SetNumberOfTuples(len(values))
        for i, v in enumerate(values):
            arr.SetValue(i, v)
    arr.SetName(name)
    table.AddColumn(arr)  # a vtkMRMLTableNode
    if unit:
        table.SetColumnUnitLabel(name, unit)
    if description:
        table.SetColumnDescription(name, description)


def write_statistics_table(scene, rows: list[RegionStats], exam: str, title: str = "DCE statistics"):
    """One row per (segment, map), columns as Slicer's Segment Statistics names them."""
    node = output_node(scene, "vtkMRMLTableNode", "statistics", exam, output_name(title, exam))
    node.RemoveAllColumns()
    t = node
    add_column(t, "Segment", [r.segment for r in rows])
    add_column(t, "Map", [r.map for r in rows])
    add_column(t, "Unit", [r.unit for r in rows], description="unit of the value statistics of this row")
    add_column(t, "voxel_count", [r.voxel_count for r in rows], "voxels", "voxels with a valid fit")
    add_column(t, "volume_cm3", [r.volume_cm3 for r in rows], "cm3", "volume of the voxels used")
    add_column(t, "excluded_voxel_count", [r.excluded_voxel_count for r in rows], "voxels",
                  "segment voxels left out because the fit failed there (status 3-6)")
    for stat in STAT_NAMES:
        add_column(t, stat, [r.values[stat] for r in rows], description=f"{stat} of the map (unit: see Unit)")
    for stat in CI_STAT_NAMES:
        for i, side in enumerate(("lower", "upper")):
            add_column(t, f"{stat}_ci_{side}", [r.ci[stat][i] if stat in r.ci else np.nan for r in rows],
                       description=f"{side} end of the 95 % CI of {stat} (block bootstrap; unit: see Unit)")
    node.Modified()
    return node


def write_curves(scene, t_s, curves: dict, exam: str, title: str = "DCE curves"):
    """Curves table (time_s + one column per curve, mM) and a plot chart with one series per curve.

    ``curves``: {column name: (values (T,), style)} with style "points" (measured) or "line" (model/AIF).
    Returns (table node, chart node)."""
    table = output_node(scene, "vtkMRMLTableNode", "curves", exam, output_name(title, exam))
    table.RemoveAllColumns()
    t = table
    add_column(t, "time_s", [float(v) for v in t_s], "s", "frame time")
    for name, (values, _) in curves.items():
        add_column(t, name, [float(v) for v in values], "mM", "contrast-agent concentration")
    table.Modified()
    chart = output_node(scene, "vtkMRMLPlotChartNode", "chart", exam, output_name(title, exam))
    for i in reversed(range(chart.GetNumberOfPlotSeriesNodes())):
        old = chart.GetNthPlotSeriesNode(i)
        chart.RemoveNthPlotSeriesNodeID(i)
        if old is not None and old.GetAttribute(ROLE_ATTRIBUTE):
            scene.RemoveNode(old)
    palette = [(0.85, 0.1, 0.1), (0.1, 0.45, 0.85), (0.1, 0.6, 0.2), (0.6, 0.2, 0.7), (0.9, 0.55, 0.0)]
    for i, (name, (_, style)) in enumerate(curves.items()):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", output_name(name, exam))
        series.SetAttribute(ROLE_ATTRIBUTE, "curve")
        series.SetAttribute(EXAM_ATTRIBUTE, exam)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("time_s")
        series.SetYColumnName(name)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        if style == "points":
            series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        else:
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid if style == "line"
                                else slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
        series.SetColor(*palette[i % len(palette)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(output_name("Concentration curves", exam))
    chart.SetXAxisTitle("time (s)")
    chart.SetYAxisTitle("concentration (mM)")
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotViewNode")):
        scene.GetNthNodeByClass(i, "vtkMRMLPlotViewNode").SetPlotChartNodeID(chart.GetID())
    return table, chart
