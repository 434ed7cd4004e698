"""Static checks of the Slicer module that need no Slicer application: the widget only uses widgets the
.ui file has, every parameter is bound to a widget that can represent it, the CMake lists are complete,
and the imports keep the architecture's arrows pointing one way."""

import ast
import os
import re
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = os.path.join(ROOT, "DCEPerfusion")
LIB = os.path.join(MODULE, "DCEPerfusionLib")
UI = os.path.join(MODULE, "Resources", "UI", "DCEPerfusion.ui")

# the widget classes slicer.parameterNodeWrapper's GUI connectors accept for each parameter type
WIDGETS_FOR_TYPE = {"bool": {"QCheckBox", "QPushButton"}, "int": {"QSpinBox", "QSlider", "QComboBox"},
                    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
                    "str": {"QLineEdit", "QTextEdit", "QComboBox"}, "enum": {"QComboBox"},
                    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
                    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"}}
NUMERIC_MODULES = ("aif", "concentration", "fitting", "models", "phantom", "regionstats", "_checks", "multivolume",
                   "response", "cohort")


@pytest.fixture(scope="module")
def module_ast():
    with open(os.path.join(MODULE, "DCEPerfusion.py"), encoding="utf-8") as f:
        return ast.parse(f.read())


@pytest.fixture(scope="module")
def ui_widgets():
    """{widget name: (class, SlicerParameterName or None, {property: text})} from the .ui file."""
    tree = ET.parse(UI)
    out = {}
    for w in tree.iter("widget"):
        props = {p.get("name"): "".join(p.itertext()).strip() for p in w.findall("property")}
        out[w.get("name")] = (w.get("class"), props.get("SlicerParameterName"), props)
    return out, tree


def _parameters(module_ast):
    """{name: type kind} of the @parameterNodeWrapper class."""
    enums = {n.name for n in module_ast.body if isinstance(n, ast.ClassDef)
             and any(getattr(b, "attr", getattr(b, "id", "")) == "Enum" for b in n.bases)}
    for node in module_ast.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", "") == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            params = {}
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign):
                    ann = stmt.annotation
                    if isinstance(ann, ast.Subscript):  # Annotated[T, ...]
                        ann = ann.slice.elts[0]
                    name = ann.id if isinstance(ann, ast.Name) else ast.unparse(ann)
                    name = name.split(".")[-1]  # pathlib.Path -> Path
                    kind = ("enum" if name in enums else "node" if name.startswith("vtkMRML") else name)
                    params[stmt.target.id] = (kind, name, ast.unparse(stmt.annotation))
            return params
    raise AssertionError("no @parameterNodeWrapper class in DCEPerfusion.py")


def test_every_ui_attribute_used_exists_in_the_ui_file(module_ast, ui_widgets):
    widgets, _ = ui_widgets
    used = {n.attr for n in ast.walk(module_ast) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"
            and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    assert used, "the widget uses no self.ui.X - the check would be empty"
    missing = sorted(used - set(widgets))
    assert not missing, f"self.ui.X used in DCEPerfusion.py but not in the .ui file: {missing}"


def test_every_parameter_is_bound_to_a_widget_that_can_show_it(module_ast, ui_widgets):
    widgets, _ = ui_widgets
    params = _parameters(module_ast)
    bound = {param: (name, cls, props) for name, (cls, param, props) in widgets.items() if param}
    assert set(params) == set(bound), (f"parameters without a widget: {sorted(set(params) - set(bound))}; "
                                       f"widgets bound to unknown parameters: {sorted(set(bound) - set(params))}")
    for param, (kind, type_name, annotation) in params.items():
        widget_name, cls, props = bound[param]
        assert cls in WIDGETS_FOR_TYPE[kind], f"{param} ({type_name}) is bound to {widget_name}, a {cls}"
        if cls == "QComboBox" and kind != "enum":  # the connector needs the Choice annotation
            assert "Choice(" in annotation, f"{param}: a QComboBox needs Annotated[..., Choice([...])]"
        if cls in ("ctkSliderWidget", "QSlider"):  # the connector needs a bounded range
            assert "WithinRange(" in annotation, f"{param}: a slider needs Annotated[..., WithinRange(lo, hi)]"
        if kind == "node":
            offered = props.get("nodeTypes")
            assert offered == type_name, f"{widget_name} offers {offered}, not {type_name}"


def test_mrml_widgets_receive_the_scene(ui_widgets):
    widgets, tree = ui_widgets
    mrml = {n for n, (cls, _, _) in widgets.items() if cls.startswith("qMRML") and cls != "qMRMLWidget"}
    connected = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml and mrml <= connected, f"MRML widgets without setMRMLScene: {sorted(mrml - connected)}"


def test_cmake_lists_every_python_file_and_resource():
    with open(os.path.join(MODULE, "CMakeLists.txt"), encoding="utf-8") as f:
        text = f.read().replace("${MODULE_NAME}", "DCEPerfusion")
    cmake = "\n".join(line.split("#")[0] for line in text.splitlines())  # without comments
    listed = set(re.findall(r"(\S+\.(?:py|png|ui))\b", cmake))
    on_disk = {"DCEPerfusion.py"} | {f"DCEPerfusionLib/{f}" for f in os.listdir(LIB) if f.endswith(".py")}
    on_disk |= {"Resources/Icons/DCEPerfusion.png", "Resources/UI/DCEPerfusion.ui"}
    assert listed == on_disk, f"not listed: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"
    with open(os.path.join(MODULE, "Testing", "Python", "CMakeLists.txt"), encoding="utf-8") as f:
        assert "slicer_add_python_unittest(SCRIPT" in f.read()


def _imports(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0:
            names.add(n.module.split(".")[0])
    return names, tree


def test_imports_keep_the_layers_apart(module_ast):
    stdlib = {"__future__", "logging", "dataclasses", "os", "math", "time", "concurrent", "contextlib", "typing", "csv"}
    for name in NUMERIC_MODULES:
        names, _ = _imports(os.path.join(LIB, f"{name}.py"))
        extra = names - stdlib - {"numpy", "scipy", "threadpoolctl"} - ({"SimpleITK"} if name == "response" else set())
        assert not extra, f"numeric module {name}.py imports {sorted(extra)}"
    for f in os.listdir(LIB):
        if f.startswith("scene"):
            names, _ = _imports(os.path.join(LIB, f))
            assert not names & {"qt", "ctk"}, f"{f} imports Qt; the MRML adapter must run without a GUI"
    # the module file imports the Lib only inside functions (after scipy has been installed)
    top = {a.module for a in module_ast.body if isinstance(a, ast.ImportFrom)}
    top |= {a.names[0].name for a in module_ast.body if isinstance(a, ast.Import)}
    assert not any(str(m).startswith("DCEPerfusionLib") for m in top)


def test_extension_metadata_is_complete():
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        cmake = f.read()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', cmake), f"EXTENSION_{key} missing"
    assert os.path.exists(os.path.join(ROOT, "Resources", "Screenshots", "DCEPerfusion.png"))
    import json
    with open(os.path.join(ROOT, "DCEPerfusion.json"), encoding="utf-8") as f:
        entry = json.load(f)
    assert entry["category"] == "Quantification" and entry["scm_url"].startswith("https://")
