"""Stand-ins for the Qt-only parts of 3D Slicer that DCEPerfusion.py's widget uses, so the widget itself runs
on a real slicer-core MRML scene. They reproduce, from Slicer 5.8.1's sources, the behaviour the widget
depends on - not a look-alike API:

* Signals are delivered synchronously, to every connected slot in connection order, also when a value
  is changed by code (Qt's direct connections); ``blockSignals`` suppresses them; a slot that takes fewer
  arguments than the signal carries gets the first ones (PythonQt).
* ``qMRMLNodeComboBox``: ``setCurrentNode`` changes the combobox index, whose ``currentIndexChanged``
  emits ``currentNodeChanged(vtkMRMLNode*)``, then ``(bool)``, then ``currentNodeIDChanged``, only when the
  node changes (Libs/MRML/Widgets/qMRMLNodeComboBox.cxx:752-771, :896-961, :1215-1216). Without a
  "None" item the first node of its type is made current when one appears (QComboBox selects row 0
  of a filled model).
* ``qMRMLSegmentSelectorWidget``: a new segmentation repopulates the segment list, keeping the stored
  selection where its IDs exist in the new segmentation (silently), otherwise selecting the first segment
  and emitting; ``setSelectedSegmentIDs`` / ``setCurrentSegmentID`` emit when the selection changes
  (Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.cxx:86-97, :132-150, :181-283, :285-329, :374-452).
* ``parameterNodeWrapper``: every parameter is cached and re-read on the node's ModifiedEvent; a write
  goes to the node inside StartModify/EndModify, so one ModifiedEvent follows; ``connectGui`` writes
  every bound widget from the node, connects the widget's change signal to a write of the parameter
  (skipped while the GUI is being refreshed), and adds a ModifiedEvent observer that synchronously
  rewrites *every* bound widget from the node; ``disconnectGui`` disconnects the widgets but leaves that
  observer (Base/Python/slicer/parameterNodeWrapper/wrapper.py:84-120, :130-143, :172-213, :241-262;
  the connectors' signals and read/write in guiConnectors.py:156-187, :225-353, :355-450, :452-481,
  :605-639, :677-711; the stored forms in serializers.py:382-417, :1003-1011).
* ``slicer.util`` dialogs and pip: ``confirmOkCancelDisplay`` answers OK without a dialog in testing mode
  (util.py:3035-3066), ``pip_install`` raises subprocess.CalledProcessError when pip fails (util.py:3830-3862,
  :3899-3942); ``qt.QSettings`` values read back as strings, as after a restart (:class:`QSettings`).
* ``qt.QFileDialog.getExistingDirectory`` returns the folder the user picks, "" when cancelled (Qt); the DICOM
  database (``slicer.dicomDatabase``, closed until a test opens it), its indexer and ``DICOMUtils.importDicom``
  are the stand-ins of ``slicerdicom``.
* VTK calls observers of one event in its own order (the first added last); the stand-ins add theirs
  with the real ``AddObserver`` of the real parameter node, so that order is the real one.
"""

from __future__ import annotations

import enum
import inspect
import pathlib
import types
import typing
import weakref
import xml.etree.ElementTree as ET

import vtk

import slicerdicom

SLICER_PARAMETER_NAME = "SlicerParameterName"


# ============================================================================================= signals
class _Signal:
    def __init__(self, owner, signature):
        self.owner, self.signature, self.slots = owner, signature, []

    def connect(self, slot):
        self.slots.append(slot)

    def disconnect(self, slot):
        self.slots.remove(slot)

    def emit(self, *args):
        """An exception in a slot does not reach the emitter: PythonQt prints it to the Python console (kept
        in :data:`SLOT_ERRORS` here) and the remaining slots still run."""
        if self.owner.signalsBlocked():
            return
        for slot in list(self.slots):
            try:
                slot(*args[:_arity(slot, len(args))])
            except Exception as e:  # noqa: BLE001 - what PythonQt does with it
                SLOT_ERRORS.append(e)


#: exceptions raised in slots (PythonQt prints them; tests look at them)
SLOT_ERRORS = []


def _arity(slot, n):
    try:
        params = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return n
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return n
    return min(n, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                      for p in params))


class QObject:
    #: signal signatures; attribute access ``w.name`` gives the first one of that name (PythonQt)
    SIGNALS = ()

    def __init__(self, name=""):
        self.name = name
        self._blocked = False
        self._signals = {sig: _Signal(self, sig) for sig in self.SIGNALS}
        self._properties = {}

    def __getattr__(self, item):
        signals = self.__dict__.get("_signals", {})
        for sig, signal in signals.items():
            if sig.split("(")[0] == item:
                return signal
        raise AttributeError(f"{type(self).__name__} has no attribute {item!r}")

    def connect(self, signature, slot):
        self._signals[signature].connect(slot)

    def emit(self, signature, *args):
        self._signals[signature].emit(*args)

    def blockSignals(self, block):
        was, self._blocked = self._blocked, bool(block)
        return was

    def signalsBlocked(self):
        return self._blocked

    def property(self, name):
        return self._properties.get(name)

    def setProperty(self, name, value):
        self._properties[name] = value


class QWidget(QObject):
    def __init__(self, name=""):
        super().__init__(name)
        self.enabled, self.visible, self.toolTip, self.text, self.children = True, True, "", "", []

    def findChildren(self, _cls=None):
        out = []
        for child in self.children:
            out += [child] + child.findChildren()
        return out

    def setEnabled(self, value):
        self.enabled = bool(value)

    def setVisible(self, value):
        self.visible = bool(value)

    def isWidgetType(self):
        return True


class QLabel(QWidget):
    pass


class ctkCollapsibleButton(QWidget):
    collapsed = False


class QPushButton(QWidget):
    SIGNALS = ("clicked(bool)",)

    def click(self):
        """A user's click: nothing happens on a disabled button."""
        if self.enabled:
            self.emit("clicked(bool)", False)


class _ValueWidget(QWidget):
    """A widget holding one value; setting it to a different value emits the change signals."""

    VALUE = "value"
    CHANGED = ()

    def __init__(self, name="", initial=None):
        object.__setattr__(self, "_value", initial)
        super().__init__(name)

    def _coerce(self, value):
        return value

    def __setattr__(self, key, value):
        if key != self.VALUE:
            return object.__setattr__(self, key, value)
        value = self._coerce(value)
        if value == self._value:
            return None
        object.__setattr__(self, "_value", value)
        for sig in self.CHANGED:
            self.emit(sig, self._signal_arg(sig, value))
        return None

    def __getattr__(self, item):
        if item == self.VALUE:
            return self.__dict__["_value"]
        return super().__getattr__(item)

    def _signal_arg(self, sig, value):
        return value


class QCheckBox(_ValueWidget):
    VALUE, SIGNALS = "checked", ("stateChanged(int)", "toggled(bool)")
    CHANGED = SIGNALS

    def __init__(self, name=""):
        super().__init__(name, False)

    def _coerce(self, value):
        return bool(value)

    def _signal_arg(self, sig, value):
        return (2 if value else 0) if sig.startswith("state") else value


class QLineEdit(_ValueWidget):
    VALUE, SIGNALS = "text", ("textChanged(QString)",)
    CHANGED = SIGNALS

    def __init__(self, name=""):
        super().__init__(name, "")

    def _coerce(self, value):
        return str(value)


class ctkPathLineEdit(_ValueWidget):
    VALUE, SIGNALS = "currentPath", ("currentPathChanged(QString)",)
    CHANGED = SIGNALS

    def __init__(self, name=""):
        super().__init__(name, "")


class QDoubleSpinBox(_ValueWidget):
    """Values are clamped to [minimum, maximum] and rounded to ``decimals``, as Qt does."""

    SIGNALS = ("valueChanged(double)",)
    CHANGED = SIGNALS

    def __init__(self, name=""):
        super().__init__(name, 0.0)
        self.minimum, self.maximum, self.decimals, self.specialValueText, self.suffix = 0.0, 99.99, 2, "", ""

    def _coerce(self, value):
        return round(min(max(float(value), self.minimum), self.maximum), int(self.decimals))

    def setRange(self, lo, hi):
        self.minimum, self.maximum = lo, hi

    def displayText(self):
        """What the box shows: the special text at the minimum (QAbstractSpinBox), else value and suffix."""
        if self.specialValueText and self._value == self.minimum:
            return self.specialValueText
        return f"{self._value:.{int(self.decimals)}f} {self.suffix}".strip()


class ctkSliderWidget(QDoubleSpinBox):
    pass


class QSpinBox(QDoubleSpinBox):
    SIGNALS = ("valueChanged(int)",)
    CHANGED = SIGNALS

    def __init__(self, name=""):
        super().__init__(name)
        self.decimals, self.maximum = 0, 99
        object.__setattr__(self, "_value", 0)

    def _coerce(self, value):
        return int(min(max(int(value), self.minimum), self.maximum))


class QComboBox(QWidget):
    """Items (text, data); setting ``currentIndex`` to another index emits ``currentIndexChanged``; the first
    item added to an empty box becomes current (QComboBox selects row 0 of a filled model)."""

    SIGNALS = ("currentIndexChanged(int)", "currentTextChanged(QString)")

    def __init__(self, name=""):
        object.__setattr__(self, "_index", -1)
        super().__init__(name)
        self.items = []

    def __setattr__(self, key, value):
        if key == "currentIndex":
            return self.setCurrentIndex(value)
        return object.__setattr__(self, key, value)

    def __getattr__(self, item):
        if item == "currentIndex":
            return self.__dict__["_index"]
        if item == "currentText":
            return self.items[self._index][0] if self._index >= 0 else ""
        return super().__getattr__(item)

    def setCurrentIndex(self, index):
        index = int(index) if -1 <= int(index) < len(self.items) else -1
        if index != self._index:
            object.__setattr__(self, "_index", index)
            self.emit("currentIndexChanged(int)", index)
            self.emit("currentTextChanged(QString)", self.currentText)

    def addItem(self, text, data=None):
        self.items.append((str(text), data))
        if self._index == -1:
            self.setCurrentIndex(0)

    def clear(self):
        self.items = []
        self.setCurrentIndex(-1)

    def count(self):
        return len(self.items)

    def itemText(self, i):
        return self.items[i][0]

    def itemData(self, i):
        return self.items[i][1]

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)


# ======================================================================================= MRML widgets
class qMRMLWidget(QWidget):
    SIGNALS = ("mrmlSceneChanged(vtkMRMLScene*)",)

    def __init__(self, name=""):
        super().__init__(name)
        self.scene = None

    def setMRMLScene(self, scene):
        self.scene = scene
        self.emit("mrmlSceneChanged(vtkMRMLScene*)", scene)

    def mrmlScene(self):
        return self.scene


class qMRMLNodeComboBox(qMRMLWidget):
    """The list is a scene model's rows: a node added to the scene is appended - except while a scene is
    imported, when adds are ignored and the whole list is rebuilt at EndImportEvent, every node row removed
    then re-inserted (qMRMLSceneModel.cxx:1203-1219, :1499-1507, :707-781). Removing the current row makes
    the next row current (QComboBox), a "None" item or not; rows inserted into an empty box make the first
    one current (QComboBox). So an import loses the box's choice (Slicer issues #4570, #7492)."""

    SIGNALS = ("currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "currentNodeIDChanged(QString)",
               "mrmlSceneChanged(vtkMRMLScene*)")

    def __init__(self, name=""):
        super().__init__(name)
        self.nodeTypes, self.noneEnabled, self._current, self._tags, self._rows = [], False, None, [], []

    def _offers(self, node):
        return node is not None and any(node.IsA(t) for t in self.nodeTypes) and not node.GetHideFromEditors()

    def _scene_nodes(self):
        nodes = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())] if self.scene else []
        return [n for n in nodes if self._offers(n)]

    def nodes(self):
        """The nodes the list shows now."""
        return list(self._rows)

    def _items(self):
        return ([None] if self.noneEnabled else []) + self._rows

    def setMRMLScene(self, scene):
        self.detach()
        self.scene, self._current, self._rows = scene, None, []
        me = weakref.ref(self)                       # the scene outlives a test's widgets
        self._tags = [scene.AddObserver(event, lambda c, e, f=f: me() and getattr(me(), f)())
                      for event, f in ((scene.NodeAddedEvent, "_node_added"), (scene.NodeRemovedEvent, "_node_removed"),
                                       (scene.EndImportEvent, "_rebuild"))]
        self._insert(self._scene_nodes())
        self.emit("mrmlSceneChanged(vtkMRMLScene*)", scene)

    def detach(self):
        """Remove the scene observers (the widget is destroyed; a scene must not call into it afterwards)."""
        for tag in self._tags:
            self.scene.RemoveObserver(tag)
        self._tags = []

    def _insert(self, nodes):
        for node in nodes:
            was_empty = not self._items()
            self._rows.append(node)
            if was_empty:
                self._set(node)

    def _node_added(self):
        if self.scene.IsImporting():
            return
        self._insert([n for n in self._scene_nodes() if n not in self._rows])

    def _node_removed(self):
        gone = [n for n in self._rows if not self.scene.IsNodePresent(n)]
        if not gone:
            return
        items = self._items()
        index = items.index(self._current) if self._current in items else -1
        self._rows = [n for n in self._rows if n not in gone]
        if self._current in gone:
            left = self._items()
            self._set(left[min(len(left) - 1, max(index, 0))] if left else None)

    def _rebuild(self):
        """qMRMLSceneModel::updateScene: every node row removed, then the scene's nodes inserted again."""
        self._rows = []
        self._set(None)
        self._insert(self._scene_nodes())

    def _set(self, node):
        if node is self._current:
            return
        self._current = node
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)
        self.emit("currentNodeChanged(bool)", node is not None)
        self.emit("currentNodeIDChanged(QString)", node.GetID() if node is not None else "")

    def setCurrentNode(self, node):
        """A node the list does not show selects "None" (or nothing without it), as setCurrentNodeID does
        (qMRMLNodeComboBox.cxx:915-947)."""
        self._set(node if node in self._rows else None)

    def currentNode(self):
        return self._current

    def choose(self, node):
        """The user picks ``node`` from the list (the same index change as setCurrentNode)."""
        assert node in self._items(), f"{node.GetName() if node else None} is not offered by {self.name}"
        self._set(node)


class qMRMLSegmentSelectorWidget(qMRMLWidget):
    """Its segmentation is chosen in an inner qMRMLNodeComboBox without a "None" item (qMRMLSegmentSelectorWidget.ui),
    whose currentNodeChanged repopulates the segment list and is re-emitted (qMRMLSegmentSelectorWidget.cxx:86-89,
    :132-165); segment added, removed or modified repopulates it too (:140-145)."""

    SIGNALS = ("currentNodeChanged(vtkMRMLNode*)", "currentSegmentChanged(QString)",
               "segmentSelectionChanged(QStringList)", "mrmlSceneChanged(vtkMRMLScene*)")

    def __init__(self, name=""):
        super().__init__(name)
        self.multiSelection, self.noneEnabled, self.segmentationNodeSelectorVisible = False, False, True
        self._segmentation, self._current_id, self._selected, self._items, self._index, self._tags = \
            None, "", [], [], -1, []
        self._segment_list = QComboBox("comboBox_Segment")        # its segment list; activated() = a user's pick
        self._segment_list.SIGNALS = ()
        self._segment_list._signals["activated(int)"] = _Signal(self._segment_list, "activated(int)")
        self.children.append(self._segment_list)
        self._combo = qMRMLNodeComboBox(f"{name}.segmentation")
        self._combo.nodeTypes = ["vtkMRMLSegmentationNode"]
        self._combo.connect("currentNodeChanged(vtkMRMLNode*)", self._node_changed)
        self._combo.connect("currentNodeChanged(vtkMRMLNode*)",
                            lambda node: self.emit("currentNodeChanged(vtkMRMLNode*)", node))

    def setMRMLScene(self, scene):
        self._combo.setMRMLScene(scene)
        super().setMRMLScene(scene)

    def setCurrentNode(self, node):
        self._combo.setCurrentNode(node)

    def currentNode(self):
        return self._combo.currentNode()

    def _node_changed(self, node):
        if node is self._segmentation:
            return
        self.detach_segmentation()
        self._segmentation = node
        if node is not None:
            me = weakref.ref(self)
            seg = node.GetSegmentation()
            self._tags = [node.AddObserver(e, lambda *a: me() and me()._populate())
                          for e in (seg.SegmentAdded, seg.SegmentRemoved, seg.SegmentModified)]
        self._populate()

    def detach_segmentation(self):
        for tag in self._tags:
            self._segmentation.RemoveObserver(tag)
        self._tags = []

    def detach(self):
        self.detach_segmentation()
        self._combo.detach()

    def _segment_ids(self):
        seg = self._segmentation.GetSegmentation() if self._segmentation is not None else None
        return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())] if seg is not None else []

    def _populate(self):
        """populateSegmentCombobox (qMRMLSegmentSelectorWidget.cxx:181-283)."""
        ids = self._segment_ids()
        self._items, self._index = [], -1
        if not ids:
            return
        if self.multiSelection:
            self._items = ids
            self.setSelectedSegmentIDs(self._selected)
            return
        self._items = ([""] if self.noneEnabled else []) + ids
        if (self.noneEnabled and not self._current_id) or self._current_id in ids:
            self._index = self._items.index(self._current_id)          # restored with signals blocked
        else:
            self._set_index(1 if self.noneEnabled else 0)

    def _set_index(self, index):
        """The segment combobox's currentIndexChanged -> onCurrentSegmentChanged (:285-308)."""
        if index == self._index:
            return
        self._index = index
        if self._segmentation is None:
            return
        self._current_id = self._items[index]
        self.emit("currentSegmentChanged(QString)", self._current_id)

    def setCurrentSegmentID(self, segment_id):
        if segment_id == "" and self.noneEnabled:
            if self._items:
                self._set_index(0)
            return
        if segment_id in self._items and self._items.index(segment_id) != self._index:
            self._set_index(self._items.index(segment_id))

    def currentSegmentID(self):
        return "" if self.multiSelection else self._current_id

    def setSelectedSegmentIDs(self, ids):
        """Unknown IDs are dropped; a changed selection is emitted (:398-452)."""
        if self._segmentation is None:
            return
        seg = self._segmentation.GetSegmentation()
        ids = [i for i in ids if seg.GetSegment(i) is not None]
        changed = ids != self._selected
        self._selected = list(ids)
        if changed:
            self.emit("segmentSelectionChanged(QStringList)", list(ids))

    def selectedSegmentIDs(self):
        return list(self._selected) if self.multiSelection else []

    def segmentIDs(self):
        return list(self._items)

    # what a user does
    def choose(self, segment_id):
        """A pick in the list: the index changes (currentSegmentChanged), then QComboBox emits activated."""
        assert segment_id in self._items, f"{segment_id!r} is not offered by {self.name}"
        self._set_index(self._items.index(segment_id))
        self._segment_list.emit("activated(int)", self._items.index(segment_id))

    def check(self, ids):
        """The user ticks exactly ``ids`` in the multi-selection list."""
        self._selected = [i for i in self._items if i in ids]
        self.emit("segmentSelectionChanged(QStringList)", list(self._selected))


WIDGET_CLASSES = {cls.__name__: cls for cls in (
    qMRMLWidget, qMRMLNodeComboBox, qMRMLSegmentSelectorWidget, ctkCollapsibleButton, ctkSliderWidget,
    ctkPathLineEdit, QLabel, QPushButton, QCheckBox, QLineEdit, QDoubleSpinBox, QSpinBox, QComboBox)}


def _property_value(prop):
    child = prop[0]
    text = (child.text or "").strip()
    if child.tag == "bool":
        return text == "true"
    if child.tag == "number":
        return int(text)
    if child.tag == "double":
        return float(text)
    if child.tag == "stringlist":
        return [s.text for s in child]
    return text


def load_ui(path):
    """The widgets of a Qt Designer file as stand-ins, with their properties; the .ui's
    ``mrmlSceneChanged`` connections connect the root's signal to each MRML widget's setMRMLScene."""
    tree = ET.parse(path)
    widgets = {}

    def build(element, parent):
        cls = WIDGET_CLASSES.get(element.get("class"), QWidget)
        w = cls(element.get("name"))
        for prop in element.findall("property"):
            name, value = prop.get("name"), _property_value(prop)
            if name == SLICER_PARAMETER_NAME:
                w.setProperty(name, value)
            elif name == "nodeTypes":
                w.nodeTypes = list(value) if isinstance(value, list) else [value]
            elif name not in ("geometry", "sizePolicy"):
                setattr(w, name, value)
        widgets[w.name] = w
        if parent is not None:
            parent.children.append(w)
        for child in _child_widgets(element):
            build(child, w)
        return w

    root = build(tree.getroot().find("widget"), None)
    for c in tree.iter("connection"):
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)":
            receiver = widgets[c.findtext("receiver")]
            widgets[c.findtext("sender")].connect("mrmlSceneChanged(vtkMRMLScene*)", receiver.setMRMLScene)
    return root


def _child_widgets(element):
    """The <widget> elements directly inside ``element`` (through its layouts and items)."""
    for sub in element:
        if sub.tag == "widget":
            yield sub
        else:
            yield from _child_widgets(sub)


def detach(ui):
    """Disconnect every MRML stand-in of a ``child_widget_variables`` object from its scene and nodes."""
    for w in vars(ui).values():
        getattr(w, "detach", lambda: None)()


def child_widget_variables(root):
    """slicer.util.childWidgetVariables: an object with every named child as an attribute."""
    ui = type("", (), {})()
    for w in root.findChildren():
        setattr(ui, w.name, w)
    return ui


# ====================================================================================== the wrapper
class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def _split(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        return annotation.__origin__, list(annotation.__metadata__)
    return annotation, []


class _Param:
    """One parameter: serializer (serializers.py) and validators (validators.py) for the types used here."""

    def __init__(self, name, annotation, default):
        self.name = name
        self.type, self.annotations = _split(annotation)
        self.is_node = isinstance(self.type, type) and self.type.__name__.startswith("vtkMRML")
        self.default = default if default is not None or self.is_node else self._zero()

    def _zero(self):
        return pathlib.Path() if self.type is pathlib.Path else (self.type() if self.type in (int, float, str, bool)
                                                                  else None)

    def isIn(self, node):
        return node.HasParameter(self.name)

    def write(self, node, value):
        for a in self.annotations:
            if isinstance(a, WithinRange) and not a.minimum <= value <= a.maximum:
                raise ValueError(f"{self.name}: {value} is not within [{a.minimum}, {a.maximum}]")
            if isinstance(a, Choice) and value not in a.choices:
                raise ValueError(f"{self.name}: {value!r} is not one of {a.choices}")
        if self.is_node:
            if value is not None and not value.IsA(self.type.__name__):
                raise ValueError(f"{self.name}: {value.GetClassName()} is not a {self.type.__name__}")
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif isinstance(self.type, type) and issubclass(self.type, enum.Enum):
            node.SetParameter(self.name, value.name)
        else:
            node.SetParameter(self.name, str(value))

    def read(self, node):
        """wrapper.py:43-46: a parameter the node lacks (a cleared scene) is written with its default first."""
        if not self.isIn(node):
            self.write(node, self.default)
        if self.is_node:
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if isinstance(self.type, type) and issubclass(self.type, enum.Enum):
            return self.type[text]
        if self.type is bool:
            return text == "True"
        return self.type(text)


class _Cached:
    """wrapper.py:84-120: the value is cached, re-read on the node's ModifiedEvent unless this wrapper is
    writing; a write happens inside StartModify/EndModify."""

    def __init__(self, param, node):
        self.param, self.node = param, node
        self.value = param.read(node)
        self.writing = False
        me = weakref.ref(self)
        self.tag = node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda c, e: me() and me()._modified())

    def _modified(self):
        if not self.writing:
            self.value = self.param.read(self.node)

    def __del__(self):
        self.node.RemoveObserver(self.tag)

    def write(self, value):
        self.writing = True
        try:
            was = self.node.StartModify()
            try:
                self.param.write(self.node, value)
                self.value = self.param.read(self.node)
            finally:
                self.node.EndModify(was)
        finally:
            self.writing = False


class _Connector:
    """guiConnectors.py: the widget property a parameter is shown in and the signal that reports a change."""

    def __init__(self, widget, param):
        self.widget, self.param, self.callback = widget, param, None
        t = param.type
        if isinstance(widget, qMRMLNodeComboBox):
            self.signal = "currentNodeChanged(vtkMRMLNode*)"
            widget.nodeTypes = [t.__name__]
        elif isinstance(widget, QComboBox):
            self.signal = "currentIndexChanged(int)"
            if isinstance(t, type) and issubclass(t, enum.Enum):
                label = getattr(t, "label", lambda m: m.name)
                self.choices, labels = list(t), [label(m) for m in t]
            else:
                self.choices = next(a.choices for a in param.annotations if isinstance(a, Choice))
                labels = [str(c) for c in self.choices]
            widget.clear()
            for text in labels:
                widget.addItem(text)
        elif isinstance(widget, (QDoubleSpinBox,)):
            self.signal = widget.SIGNALS[0]
            for a in param.annotations:
                if isinstance(a, WithinRange):
                    widget.setRange(a.minimum, a.maximum)
        else:
            self.signal = widget.SIGNALS[0]

    def read(self):
        w = self.widget
        if isinstance(w, qMRMLNodeComboBox):
            return w.currentNode()
        if isinstance(w, QComboBox):
            return self.choices[w.currentIndex]
        if isinstance(w, ctkPathLineEdit):
            return pathlib.Path(w.currentPath)
        return getattr(w, w.VALUE)

    def write(self, value):
        w = self.widget
        if isinstance(w, qMRMLNodeComboBox):
            w.setCurrentNode(value)
        elif isinstance(w, QComboBox):
            w.currentIndex = self.choices.index(value)
        else:
            setattr(w, w.VALUE, str(value) if isinstance(w, ctkPathLineEdit) else value)

    def changed(self, *args):
        if self.callback:
            self.callback()

    def onChanged(self, callback):
        if callback is None:
            self.widget._signals[self.signal].disconnect(self.changed)
        else:
            self.widget._signals[self.signal].connect(self.changed)
        self.callback = callback


def parameterNodeWrapper(cls):
    """The decorator: typed properties on a parameter node, cached, bound to widgets by connectGui."""
    hints = typing.get_type_hints(cls, include_extras=True)
    params = {name: _Param(name, annotation, cls.__dict__.get(name)) for name, annotation in hints.items()}

    def __init__(self, node):
        self.parameterNode = node
        self._guis, self._next_tag, self._updating = {}, 0, False
        for p in params.values():
            if not p.isIn(node):
                p.write(node, p.default)
            setattr(self, f"_{p.name}_impl", _Cached(p, node))

    def refresh(self):
        """wrapper.py:181-191"""
        if self._updating:
            return
        self._updating = True
        was = self.parameterNode.StartModify()
        try:
            for mapping in list(self._guis.values()):
                for name, connector in mapping.items():
                    connector.write(getattr(self, name))
        finally:
            self.parameterNode.EndModify(was)
            self._updating = False

    def connectGui(self, gui):
        """wrapper.py:194-213, :241-253 (gui: the object of childWidgetVariables)"""
        mapping = {w.property(SLICER_PARAMETER_NAME): _Connector(w, params[w.property(SLICER_PARAMETER_NAME)])
                   for w in vars(gui).values() if w.property(SLICER_PARAMETER_NAME)}
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        self._guis[tag] = mapping
        for name, connector in mapping.items():
            connector.write(getattr(self, name))

            def to_param(name=name, connector=connector):
                was = self.parameterNode.StartModify()
                try:
                    if not self._updating:
                        setattr(self, name, connector.read())
                finally:
                    self.parameterNode.EndModify(was)
            connector.onChanged(to_param)
        self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda c, e: refresh(self))
        return tag

    def disconnectGui(self, tag):
        for connector in self._guis.pop(tag, {}).values():
            connector.onChanged(None)

    for name in params:
        setattr(cls, name, property(lambda self, n=name: getattr(self, f"_{n}_impl").value,
                                    lambda self, v, n=name: getattr(self, f"_{n}_impl").write(v)))
    cls.__init__, cls.connectGui, cls.disconnectGui, cls.allParameters = __init__, connectGui, disconnectGui, params
    cls.StartModify = lambda self: self.parameterNode.StartModify()
    cls.EndModify = lambda self, was: self.parameterNode.EndModify(was)
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(event, callback,
                                                                                                 priority)
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    return cls


def parameter_node_wrapper_module():
    mod = types.ModuleType("slicer.parameterNodeWrapper")
    mod.parameterNodeWrapper, mod.Choice, mod.WithinRange = parameterNodeWrapper, Choice, WithinRange
    return mod


# ================================================================================= the application
class ProgressDialog(QWidget):
    """qt.QProgressDialog as slicer.util.createProgressDialog makes it (util.py:3113-3141 in 5.8.1: the keyword
    arguments are set as properties; it is modal only if ``windowModality`` is given)."""

    def __init__(self, **kwargs):
        super().__init__("progress")
        self.windowModality, self.wasCanceled, self.closed, self.value, self.labelText = 0, False, False, 0, ""
        for key, value in kwargs.items():
            setattr(self, key, value)

    def setCancelButtonText(self, text):
        self.cancelButtonText = text

    def close(self):
        self.closed = True


class QSettings:
    """qt.QSettings() as scripted modules use it (``value``, ``setValue``, ``contains``, ``remove``): one store
    for every instance (the application's settings file), keys normalised as Qt does ("/" separated; leading,
    trailing and repeated slashes dropped - QSettings' "Section and Key Syntax").
    A value reads back as the settings file gives it after a restart: the INI format writes a bool as
    "true"/"false" and a number as its text, and PythonQt returns that string - which is why Slicer's modules
    read with slicer.util.settingsValue(key, default, converter=slicer.util.toBool) (util.py:3323-3359 in
    Slicer 5.8.1; ScreenCapture.py:345 reads what :649 writes)."""

    def __init__(self, store):
        self._store = store

    @staticmethod
    def _key(key):
        return "/".join(part for part in str(key).split("/") if part)

    def setValue(self, key, value):
        self._store[self._key(key)] = ("true" if value else "false") if isinstance(value, bool) else str(value)

    def value(self, key, defaultValue=None):
        return self._store.get(self._key(key), defaultValue)

    def contains(self, key):
        return self._key(key) in self._store

    def remove(self, key):
        key = self._key(key)
        for k in [k for k in self._store if k == key or k.startswith(key + "/")]:
            del self._store[k]


class Application:
    """``slicer.app``, ``slicer.modules`` and the dialogs of ``slicer.util``, recording what the module asks.

    ``confirm``: the user's answer to an OK/Cancel question; ``online``: whether pip can reach PyPI;
    ``on_install``: called with the requirements after a successful install (what it makes importable);
    ``testing``: Slicer's testing mode (``--testing``); ``settings``: the store behind qt.QSettings;
    ``during_events``: called once from the next ``processEvents`` (what a user does while a fit runs);
    ``folder``: what the user picks in a folder dialog ("" = Cancel; the dialogs' captions go to ``folder_questions``);
    ``dicomDatabase``: ``slicer.dicomDatabase`` (:class:`slicerdicom.DICOMDatabase`, closed)."""

    ApplicationModal, WindowModal, WaitCursor = 2, 1, 3

    def __init__(self, hs):
        self.hs, self.confirm, self.online, self.during_events, self.pending = hs, True, False, None, []
        self.errors, self.questions, self.installs, self.dialogs, self.charts = [], [], [], [], []
        self.on_install, self.testing, self.settings, self.status_messages = None, False, {}, []
        self.folder, self.folder_questions, self.dicomDatabase = "", [], slicerdicom.DICOMDatabase()
        self.modules = types.SimpleNamespace(plots=types.SimpleNamespace(logic=lambda: types.SimpleNamespace(
            ShowChartInLayout=self.charts.append)))

    # slicer.app
    def processEvents(self):
        """The event loop runs: a user's action (``during_events``), then the calls queued by
        qt.QTimer.singleShot, in order."""
        action, self.during_events = self.during_events, None
        if action is not None:
            action()
        while self.pending:
            self.pending.pop(0)()

    def singleShot(self, msec, callback):
        self.pending.append(callback)

    def applicationLogic(self):
        return self.hs.app_logic

    def testingEnabled(self):
        return self.testing

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass

    # slicer.util
    def createProgressDialog(self, parent=None, value=0, maximum=100, labelText="", windowTitle="", **kwargs):
        dialog = ProgressDialog(value=value, maximum=maximum, labelText=labelText, windowTitle=windowTitle, **kwargs)
        self.dialogs.append(dialog)
        return dialog

    def confirmOkCancelDisplay(self, text, windowTitle=None, parent=None, **kwargs):
        """util.py:2992-3003, :3035-3066: in testing mode no dialog is shown and OK is returned."""
        if self.testing:
            return True
        self.questions.append(text)
        return self.confirm

    def pip_install(self, requirements):
        """util.py:3899-3942: ``PythonSlicer -m pip install <shlex.split(requirements)>``, pip's output printed
        to the console, and a non-zero exit raised as subprocess.CalledProcessError (logProcessOutput,
        util.py:3830-3862); offline pip exits with status 1 ("No matching distribution found")."""
        import shlex
        import subprocess
        self.installs.append(requirements)
        if not self.online:
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *shlex.split(requirements)])
        if self.on_install is not None:
            self.on_install(requirements)

    def getExistingDirectory(self, parent=None, caption="", directory="", *args):
        """qt.QFileDialog.getExistingDirectory: the chosen folder, "" on Cancel."""
        self.folder_questions.append(caption)
        return self.folder

    def showStatusMessage(self, message, duration=0):
        self.status_messages.append(message)
        return True

    def tryWithErrorDisplay(self, message=None, show=True, waitCursor=False):
        """util.py:3279-3320: an exception becomes an error dialog "message\\n\\nexception text" (recorded
        here as (message, text)) and is raised again."""
        import contextlib

        @contextlib.contextmanager
        def context():
            try:
                yield
            except Exception as e:
                self.errors.append((message, str(e)))
                raise
        return context()


def install(monkeypatch, hs, module_name="DCEPerfusion"):
    """Put the stand-ins where the module imports them (``slicer.ScriptedLoadableModule``, ``slicer.i18n``,
    ``slicer.parameterNodeWrapper``, ``qt``, the GUI parts of ``slicer.util``, ``slicer.app``,
    ``slicer.modules``, ``slicer.mrmlScene``) and import the module afresh. Returns (module, Application)."""
    import importlib
    import os
    import sys
    import unittest

    import slicer
    from slicer import util

    app = Application(hs)
    SLOT_ERRORS.clear()
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        """ScriptedLoadableModule.py:89-140: ``parent`` (with ``isEntered``), ``layout``, ``resourcePath``."""

        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.layout = types.SimpleNamespace(addWidget=lambda w: None)
            self.moduleName = module_name

        def setup(self):
            pass

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(sys.modules[module_name].__file__), "Resources", filename)

    class ScriptedLoadableModuleLogic:
        """ScriptedLoadableModule.py:297-330: one singleton parameter node per module in the scene."""

        def __init__(self, parent=None):
            self.moduleName = module_name

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
                node.SetAttribute("ModuleName", self.moduleName)
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    qt = types.ModuleType("qt")
    qt.Qt = types.SimpleNamespace(ApplicationModal=app.ApplicationModal, WindowModal=app.WindowModal,
                                  WaitCursor=app.WaitCursor)
    qt.QTimer = types.SimpleNamespace(singleShot=app.singleShot)
    qt.QSettings = lambda *args: QSettings(app.settings)
    qt.QFileDialog = types.SimpleNamespace(getExistingDirectory=app.getExistingDirectory)
    for name, mod in {"slicer.ScriptedLoadableModule": slm, "slicer.i18n": i18n,
                      "slicer.parameterNodeWrapper": parameter_node_wrapper_module(), "qt": qt,
                      **slicerdicom.modules()}.items():
        monkeypatch.setitem(sys.modules, name, mod)
        if name.startswith("slicer."):
            monkeypatch.setattr(slicer, name.split(".")[1], mod, raising=False)
    for name in ("createProgressDialog", "confirmOkCancelDisplay", "pip_install", "tryWithErrorDisplay",
                 "showStatusMessage"):
        monkeypatch.setattr(util, name, getattr(app, name), raising=False)
    monkeypatch.setattr(util, "loadUI", load_ui, raising=False)
    monkeypatch.setattr(util, "childWidgetVariables", child_widget_variables, raising=False)
    monkeypatch.setattr(util, "mainWindow", lambda: None, raising=False)
    monkeypatch.setattr(util, "findChild", raising=False,
                        value=lambda widget, name: next(w for w in widget.findChildren() if w.name == name))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "modules", app.modules, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", hs.scene, raising=False)
    monkeypatch.setattr(slicer, "dicomDatabase", app.dicomDatabase, raising=False)
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    return importlib.import_module(module_name), app
