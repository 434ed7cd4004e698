"""DCEPerfusionLib: quantitative DCE-MRI perfusion - the library behind the DCEPerfusion Slicer extension
and the ``dceperfusion`` command line.

Numeric core (numpy/scipy): ``concentration`` (signal <-> concentration, T1 mapping), ``aif`` (arterial
input functions), ``models`` (tracer-kinetic models), ``fitting`` (vectorised voxel-wise fits),
``regionstats`` (lesion statistics), ``response`` (baseline vs follow-up call, size, registration),
``cohort`` (ROC, sensitivity/specificity with CIs), ``phantom`` (synthetic studies).
Slicer scene (slicer/vtk): ``scene``, ``scene_output``, ``scene_response``, ``scene_files``, ``scene_phantom``.
Files and tools: ``io``, ``exams``, ``figures``, ``report``, ``batch``, ``demo``, ``cli``.
Units: time in s, Ktrans/kep/PS in 1/min, ve/vp fractions, concentrations in mM. Nothing is imported
here, so each module loads only what it needs.
"""

__version__ = "0.1.0"
