"""Static checks of the Slicer module that need no Slicer application: the widget only uses widgets the
.ui file has, every parameter is bound to a widget that can represent it, the CMake lists are complete,
and the imports keep the architecture's arrows pointing one way."""

import ast
import os
import re
import sys
import xml.etree.ElementTree as ET

import pytest

from DCEPerfusionLib import _PUBLIC

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
#: Which layers (subpackages of the Lib) each layer may import: the arrows of ../shared/ARCHITECTURE.md.
#: scene may use files: the imaging layer's registration carries a lesion to the follow-up (SimpleITK is
#: bundled with Slicer); files never uses scene.
LAYERS = {"core": {"core"}, "files": {"core", "files"}, "scene": {"core", "files", "scene"},
          "reporting": {"core", "files", "scene", "reporting"},
          "apps": {"core", "files", "scene", "reporting", "apps"}}
#: Third-party packages each layer may import (the standard library is always allowed); numba only in
#: core/_compiled.py (test_only_the_compiled_kernels_import_numba).
PACKAGES = {"core": {"numpy", "scipy", "threadpoolctl", "numba"}, "files": {"SimpleITK", "pydicom", "highdicom"},
            "scene": {"slicer", "vtk", "matplotlib"},   # matplotlib: Viridis for scenes without Slicer's colour files
            "reporting": {"matplotlib"}, "apps": {"dask", "tqdm"}}


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
    # enums built from the Lib's registry: Name = _choices(...) (a function returning enum.Enum(...))
    enums |= {t.id for n in module_ast.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
              and getattr(n.value.func, "id", "") == "_choices" for t in n.targets}
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
    on_disk = {"DCEPerfusion.py"} | {os.path.relpath(os.path.join(d, f), MODULE).replace(os.sep, "/")
                                     for d, _, files in os.walk(LIB) for f in files if f.endswith(".py")}
    on_disk |= {"Resources/Icons/DCEPerfusion.png", "Resources/UI/DCEPerfusion.ui"}
    assert listed == on_disk, f"not listed: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"
    with open(os.path.join(MODULE, "Testing", "Python", "CMakeLists.txt"), encoding="utf-8") as f:
        assert "slicer_add_python_unittest(SCRIPT" in f.read()


def _layer_of(rel_path):
    """The layer of a Lib file from its path inside the Lib ("core/aif.py" -> "core"; top-level files -> "")."""
    parts = rel_path.replace(os.sep, "/").split("/")
    return parts[0] if len(parts) > 1 else ""


def _imported(tree, rel_path):
    """(line, Lib layer or None, top-level package) of every import of a file, relative ones resolved
    against the file's own package (``from ..scene import x`` in core/a.py is the Lib's scene layer)."""
    package = ["DCEPerfusionLib", *rel_path.replace(os.sep, "/").split("/")[:-1]]
    public = _PUBLIC                                  # the names the Lib's __init__ resolves lazily, and their layer
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            targets = [(a.name.split("."), []) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = package[: len(package) - n.level + 1] if n.level else []
            targets = [(base + (n.module.split(".") if n.module else []), [a.name for a in n.names])]
        else:
            continue
        for dotted, names in targets:
            if dotted[0] != "DCEPerfusionLib":
                yield n.lineno, None, dotted[0]
            elif len(dotted) > 1:
                yield n.lineno, dotted[1], "DCEPerfusionLib"
            else:                                   # from DCEPerfusionLib import aif, scene, __version__
                for name in names:
                    if name in LAYERS or name in public:
                        yield n.lineno, name if name in LAYERS else public[name], "DCEPerfusionLib"
                    elif name != "__version__":
                        yield n.lineno, "top", "DCEPerfusionLib"


#: sys.stdlib_module_names is Python 3.10+: under Slicer 5.8's Python 3.9 (run.py's slicer5.8 stack) the import
#: checks skip - they read the source, so their result does not depend on the Python running them.
needs_stdlib_names = pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"),
                                        reason="sys.stdlib_module_names is Python 3.10+; the main run checks this")


def layer_violations(lib_dir):
    """Every import of the Lib under ``lib_dir`` that points the wrong way: a layer importing a layer above
    it or beside it, or a third-party package its layer may not use. Returns "file:line: text" lines."""
    stdlib = set(sys.stdlib_module_names)
    found = []
    for root, _, files in os.walk(lib_dir):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, lib_dir)
            layer = _layer_of(rel)
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            allowed_layers = LAYERS.get(layer, set(LAYERS) if f == "__main__.py" else set())
            allowed_packages = set().union(*(PACKAGES[x] for x in allowed_layers)) if allowed_layers else set()
            for line, target_layer, top in _imported(tree, rel):
                if top == "DCEPerfusionLib":
                    if target_layer not in allowed_layers:
                        found.append(f"{rel}:{line}: layer '{layer or 'top'}' imports layer '{target_layer}'")
                elif top not in stdlib and top not in allowed_packages:
                    found.append(f"{rel}:{line}: layer '{layer or 'top'}' imports the package {top}")
    return sorted(found)


@needs_stdlib_names
def test_imports_keep_the_layers_apart():
    assert set(LAYERS) == {d for d in os.listdir(LIB) if os.path.isdir(os.path.join(LIB, d)) and d != "__pycache__"}
    assert layer_violations(LIB) == []


def test_only_the_compiled_kernels_import_numba():
    """numba is optional at run time (fitting imports core/_compiled.py only when numba can be imported, and
    fits with numpy otherwise): no other file of the Lib, nor the module, may import it."""
    importers = []
    for root, _, files in os.walk(os.path.dirname(LIB)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path, encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
                for n in ast.walk(tree):
                    names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                        [n.module or ""] if isinstance(n, ast.ImportFrom) else []
                    if any(name.split(".")[0] == "numba" for name in names):
                        importers.append(os.path.relpath(path, os.path.dirname(LIB)).replace(os.sep, "/"))
    assert sorted(set(importers)) == ["DCEPerfusionLib/core/_compiled.py"]


@needs_stdlib_names
def test_the_layer_check_finds_planted_imports(tmp_path):
    """The check sees relative, absolute and function-local imports, and packages, in any layer."""
    import shutil
    lib = tmp_path / "DCEPerfusionLib"
    shutil.copytree(LIB, lib, ignore=shutil.ignore_patterns("__pycache__"))
    plants = {"core/units.py": "from ..scene import analysis\n",                        # relative, upwards
              "files/results.py": "def f():\n    from DCEPerfusionLib.apps import cli\n",  # absolute, in a function
              "scene/output.py": "from ..reporting import figures\n",                  # upwards
              "files/images.py": "from ..scene.output import ijk_to_ras\n",           # sideways: files -> scene
              "core/size.py": "import SimpleITK\n",                                    # a package core may not use
              "core/geometry.py": "from .. import scene\n",                            # a layer by its package name
              "files/exam.py": "import DCEPerfusionLib.reporting.figures\n",           # absolute, upwards
              "scene/render.py": "import qt\n"}                                        # never Qt in the Lib
    for rel, line in plants.items():
        with open(lib / rel, "a", encoding="utf-8") as f:
            f.write("\n" + line)
    found = layer_violations(str(lib))
    for rel in plants:
        assert any(v.startswith(rel) for v in found), f"planted import in {rel} not found: {found}"
    assert len(found) == len(plants), found


@needs_stdlib_names
def test_the_module_loads_without_the_libs_dependencies(module_ast):
    """DCEPerfusion.py imports, at module level, only Lib modules that need nothing but the standard library
    (the registry of choices, the units), so Slicer loads the module before anything is installed."""
    top = [n for n in module_ast.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(
        "DCEPerfusionLib")]
    assert top, "the module reads its choices from the Lib's registry"
    stdlib = set(sys.stdlib_module_names)
    for node in top:
        for alias in node.names:
            rel = f"{node.module}.{alias.name}".split(".", 1)[1].replace(".", os.sep) + ".py"
            path = os.path.join(LIB, rel) if os.path.exists(os.path.join(LIB, rel)) else \
                os.path.join(LIB, node.module.split(".", 1)[1].replace(".", os.sep) + ".py")
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            rel_path = os.path.relpath(path, LIB)
            used = {top for _, layer, top in _imported(tree, rel_path) if layer is None}
            assert used <= stdlib, f"{rel_path} (imported by DCEPerfusion.py at load) imports {sorted(used - stdlib)}"
            lib_deps = {layer for _, layer, _ in _imported(tree, rel_path) if layer is not None}
            assert lib_deps <= {"core"}, rel_path
    body_imports = [n for n in ast.walk(module_ast) if isinstance(n, ast.ImportFrom)
                    and (n.module or "").startswith("DCEPerfusionLib") and n not in top]
    assert body_imports, "the rest of the Lib is imported inside functions"


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
