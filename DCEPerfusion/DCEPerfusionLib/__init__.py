"""DCEPerfusionLib: quantitative DCE-MRI perfusion - the library behind the DCEPerfusion Slicer extension
and the ``dceperfusion`` command line.

The subpackages are the layers; imports point one way (a layer uses only the ones above it here):

``core``       numpy/scipy only. The series record and geometry, units, the model/map registry, the
               numeric chain signal -> concentration -> AIF -> fit -> statistics written once
               (``core.pipeline.analyse``), the response call, size measures, cohort statistics and the
               synthetic phantoms.
``files``      SimpleITK: DCE series, volumes and segmentations from and to files, registration, the
               JSON/CSV result files, and the files adapter around the chain (``files.exam``).
``scene``      slicer/vtk (never qt/ctk), the scene passed in: sequence nodes -> series record -> the
               chain -> map, table and plot nodes (``scene.analysis``), response and cohort in a scene.
``reporting``  matplotlib figures and the self-contained HTML report.
``apps``       the command line (``apps.cli``), the Dask batch and the demo.

The public names of the architecture's API resolve lazily, so ``from DCEPerfusionLib import aif,
concentration, models, fitting, cohort, figures, cli`` loads only what it names.
Units: time in s, Ktrans/kep/PS in 1/min, Fp in ml/100 ml/min, ve/vp fractions, concentrations in mM.
"""

import importlib

__version__ = "0.1.0"

#: Public module name -> the subpackage that holds it.
_PUBLIC = {"aif": "core", "concentration": "core", "models": "core", "fitting": "core", "regionstats": "core",
           "response": "core", "size": "core", "cohort": "core", "phantom": "core", "pipeline": "core",
           "options": "core", "registry": "core", "figures": "reporting", "cli": "apps"}


def __getattr__(name):
    layer = _PUBLIC.get(name)
    if layer is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{layer}.{name}")
    globals()[name] = module
    return module


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
