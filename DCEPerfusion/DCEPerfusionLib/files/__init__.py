"""Files (SimpleITK): ``series`` (4D DCE from DICOM, NRRD, NIfTI), ``images`` (3D volumes, segmentations,
geometry), ``registration`` (rigid, lesion propagation), ``results`` (JSON/CSV rows and files) and ``exam``
(the files adapter: files -> arrays -> the chain -> files)."""
