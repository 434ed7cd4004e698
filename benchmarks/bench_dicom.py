"""What writing an exam's results as DICOM costs (``fit --dicom-out``), for a 256 x 256 x 20 study.

The exam: 12 float32 maps (Ktrans, ve, vp, kep, their standard errors, r2, status, the delay; a third of
the voxels not fitted, NaN) and a SEG of three segments (two lesions and the artery), on a 20-slice
classic MR series written as a scanner writes it (its first frame's 20 headers are what the objects
reference). Rows, each the median of the same number of repeats, interleaved:

  ours, DICOM     files.dicomout.write_dicom_exam: 12 Parametric Maps + the SEG + the record, atomically
  highdicom alone the same 12 Parametric Maps and SEG made by calling highdicom directly on the source
                  headers, as a competent user would (no copies of the headers, no checks, no atomic folder):
                  the cost of the library itself, which ours should be close to
  ours, NRRD      files.images.write_volume of the same 12 maps (what fit writes anyway)
  disk floor      the same bytes written with numpy.tofile: the machine's limit for this much data

    python3 run.py bench dicom        (or: python benchmarks/bench_dicom.py [--repeats N])
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Testing"))

import dicomdata  # noqa: E402  (the tests' scanner-like DICOM writer)
from DCEPerfusionLib.core.series import Series4D  # noqa: E402
from DCEPerfusionLib.files import dicomout, dicomref, images  # noqa: E402

MAPS = ("ktrans", "ve", "vp", "kep", "ktrans_se", "ve_se", "vp_se", "kep_se", "r2", "status", "delay_s", "fp")


def study(tmp, shape=(20, 256, 256), seed=0):
    """(a result of write_dicom_exam's shape, the source headers): the maps and masks, and a 3-frame classic
    series of ``shape`` as the source (the objects reference the first frame's headers only)."""
    rng = np.random.default_rng(seed)
    matrix = np.diag([0.9, 0.9, 4.0, 1.0])
    matrix[:3, 3] = [-115.0, -115.0, -40.0]
    signal = rng.integers(100, 400, size=(*shape, 3)).astype(np.float32)
    def complete(ds, k, t):                       # every Type 2 patient/study attribute, as a PACS export has
        ds.PatientBirthDate, ds.PatientSex, ds.StudyTime = "19600101", "F", "101500"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", "Doe^J"

    folder = dicomdata.classic_series(os.path.join(tmp, "dce"), signal, matrix, np.array([0.0, 5.0, 10.0]), "ge",
                                      edit=complete)
    source = dicomref.source_of_files([os.path.join(folder, f) for f in os.listdir(folder)], folder)
    unfitted = rng.random(shape) < 1 / 3
    maps = {}
    for name in MAPS:
        m = rng.random(shape, dtype=np.float32) * 0.3
        m[unfitted] = np.nan
        maps[name] = m
    lesions = {f"lesion {i}": np.zeros(shape, dtype=bool) for i in (1, 2)}
    lesions["lesion 1"][8:12, 100:130, 100:130] = True
    lesions["lesion 2"][4:9, 150:170, 60:90] = True
    aif = np.zeros(shape, dtype=bool)
    aif[:, 200:206, 128:134] = True
    series = Series4D(signal[..., :1], np.array([0.0]), matrix, 0.004, 15.0, "", folder, dicom=source)
    result = SimpleNamespace(series=series, maps=maps, fit=SimpleNamespace(model="extended_tofts"), lesions=lesions,
                             reference=None, aif_mask=aif, options=SimpleNamespace(aif_source="segment"))
    return result, source


def highdicom_alone(result, source, out):
    """The same objects made by calling highdicom directly (the peer row)."""
    import highdicom as hd
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ result.series.ijk_to_ras
    steps = np.linalg.norm(lps[:3, :3], axis=0)
    patient = hd.CoordinateSystemNames.PATIENT
    measures = hd.PixelMeasuresSequence(pixel_spacing=[steps[1], steps[0]], slice_thickness=steps[2],
                                        spacing_between_slices=steps[2])
    orientation = hd.PlaneOrientationSequence(patient, list(np.r_[lps[:3, 0] / steps[0], lps[:3, 1] / steps[1]]))
    positions = [hd.PlanePositionSequence(patient, list(lps[:3, :3] @ [0, 0, k] + lps[:3, 3]))
                 for k in range(result.series.shape_kji[0])]
    common = dict(series_number=1, instance_number=1, manufacturer="x", manufacturer_model_name="x",
                  software_versions="1", device_serial_number="1", pixel_measures=measures,
                  plane_orientation=orientation, plane_positions=positions)
    for i, (name, values) in enumerate(result.maps.items()):
        rw = hd.pm.RealWorldValueMapping(lut_label=name, lut_explanation=name,
                                         unit=hd.sr.CodedConcept("/min", "UCUM", "/min"),
                                         value_range=(0.0, 0.3), slope=1.0, intercept=0.0)
        pm = hd.pm.ParametricMap(source.headers, values, hd.UID(), sop_instance_uid=hd.UID(),
                                 contains_recognizable_visual_features=False, real_world_value_mappings=[rw],
                                 window_center=0.15, window_width=0.3, **common)
        pm.save_as(os.path.join(out, f"{name}.dcm"))
    masks = [*result.lesions.values(), result.aif_mask]
    descriptions = [hd.seg.SegmentDescription(n + 1, f"s{n}", hd.sr.CodedConcept("49755003", "SCT", "x"),
                                              hd.sr.CodedConcept("52988006", "SCT", "x"),
                                              hd.seg.SegmentAlgorithmTypeValues.MANUAL) for n in range(len(masks))]
    seg = hd.seg.Segmentation(source.headers, np.stack(masks, axis=-1).astype(np.uint8),
                              hd.seg.SegmentationTypeValues.BINARY, descriptions, hd.UID(),
                              sop_instance_uid=hd.UID(), omit_empty_frames=False, **common)
    seg.save_as(os.path.join(out, "segmentation.dcm"))


def ours_dicom(result, source, out):
    dicomout.write_dicom_exam(result, out)


def ours_nrrd(result, source, out):
    os.makedirs(out)
    for name, values in result.maps.items():
        images.write_volume(os.path.join(out, f"{name}.nrrd"), values, result.series.ijk_to_ras)


def disk_floor(result, source, out):
    os.makedirs(out)
    for name, values in result.maps.items():
        with open(os.path.join(out, f"{name}.raw"), "wb") as f:
            values.tofile(f)
            f.flush()
            os.fsync(f.fileno())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="repeats of every row (median reported)")
    args = ap.parse_args()
    import warnings
    warnings.filterwarnings("ignore", message=".*deprecated.*")        # the peer's window arguments on 0.28
    tmp = tempfile.mkdtemp(prefix="bench_dicom_")
    try:
        result, source = study(tmp)
        mb = sum(v.nbytes for v in result.maps.values()) / 1e6
        rows = {"ours, DICOM": ours_dicom, "highdicom alone": highdicom_alone, "ours, NRRD": ours_nrrd,
                "disk floor": disk_floor}
        times = {name: [] for name in rows}
        for r in range(args.repeats):
            for name, run in rows.items():                    # interleaved, the same repeats for every row
                out = os.path.join(tmp, f"out_{r}_{name.replace(' ', '_').replace(',', '')}")
                if name == "highdicom alone":
                    os.makedirs(out)
                t0 = time.perf_counter()
                run(result, source, out)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(out)
        shape = result.series.shape_kji
        print(f"exam: {len(result.maps)} float32 maps of {shape[2]} x {shape[1]} x {shape[0]} voxels ({mb:.0f} MB) "
              f"and a SEG of {len(result.lesions) + 1} segments; medians of {args.repeats} interleaved repeats")
        floor = float(np.median(times["disk floor"]))
        print(f"{'row':<18}{'s':>8}{'MB/s':>9}{'x floor':>9}")
        for name in rows:
            t = float(np.median(times[name]))
            print(f"{name:<18}{t:8.2f}{mb / t:9.0f}{t / floor:9.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
