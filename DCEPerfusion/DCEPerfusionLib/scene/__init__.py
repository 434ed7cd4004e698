"""The MRML scene adapter (slicer/vtk, never qt/ctk; the scene is passed in): ``series`` (sequence node ->
series record), ``analysis`` (nodes -> the chain -> nodes), ``output`` (map, table, plot and segmentation
nodes), ``motion`` (a motion correction's per-frame transforms, a sequence browsed with the DCE),
``response`` (two exams and a cohort in a scene), ``dicom`` (the DICOM images a sequence was loaded from), ``headless`` (a scene without the application,
.mrb/.mrml), ``render`` (slice pictures) and ``phantom`` (the synthetic study as nodes). The MultiVolume
attributes Slicer's DICOM importer writes are parsed in ``core.multivolume``."""
