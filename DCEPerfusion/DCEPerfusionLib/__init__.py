"""DCEPerfusionLib: quantitative DCE-MRI perfusion (the numeric core of the DCEPerfusion Slicer extension).

Modules: ``concentration`` (signal <-> concentration, T1 mapping), ``aif`` (arterial input functions),
``models`` (forward tracer-kinetic models), ``fitting`` (vectorised voxel-wise fits),
``phantom`` (synthetic test data). Units: time in s, Ktrans/kep/PS in 1/min, ve/vp fractions, mM.
"""

__version__ = "0.1.0"
