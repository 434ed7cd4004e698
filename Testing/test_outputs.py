"""Outputs that are complete or absent (files.atomic): temporary names unique per process, folders swapped
in as a whole, nothing left on an exception or Ctrl-C, every image write read back, no output onto an
input. The command-line side (exit codes, messages) is in test_bad_inputs.py."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from DCEPerfusionLib.files import atomic


def _ours(name):
    return name in ("summary.json", "vp.nrrd")


def _leftovers(root):
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if atomic.PARTIAL in n]


def test_temporary_names_are_unique_and_keep_the_extension(tmp_path):
    names = {atomic.temp_path(str(tmp_path / "vp.nii.gz")) for _ in range(50)}
    assert len(names) == 50 and all(n.endswith(".partial.nii.gz") and f".{os.getpid()}-" in n for n in names)
    assert atomic.temp_path(str(tmp_path / "lesions.seg.nrrd")).endswith(".partial.seg.nrrd")


@pytest.mark.parametrize("exc", [RuntimeError("disk"), KeyboardInterrupt()])
def test_a_file_is_replaced_only_when_complete(tmp_path, exc):
    path = tmp_path / "summary.json"
    path.write_text("old")
    with pytest.raises(type(exc)):
        with atomic.replacing(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise exc
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_a_folder_is_swapped_in_as_a_whole(tmp_path):
    out = tmp_path / "exam"
    with atomic.result_folder(str(out), False, _ours, "summary.json") as tmp:
        for name in ("vp.nrrd", "summary.json"):
            open(os.path.join(tmp, name), "w").write("1")
        assert not out.exists()                                   # nothing under the final name meanwhile
    assert sorted(os.listdir(out)) == ["summary.json", "vp.nrrd"] and not _leftovers(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a result .*--overwrite"):
        with atomic.result_folder(str(out), False, _ours, "summary.json"):
            raise AssertionError("the refusal comes before the work")
    with pytest.raises(KeyboardInterrupt):
        with atomic.result_folder(str(out), True, _ours, "summary.json") as tmp:
            open(os.path.join(tmp, "summary.json"), "w").write("2")
            raise KeyboardInterrupt
    assert open(out / "summary.json").read() == "1" and not _leftovers(tmp_path)
    with atomic.result_folder(str(out), True, _ours, "summary.json") as tmp:
        open(os.path.join(tmp, "summary.json"), "w").write("3")
    assert os.listdir(out) == ["summary.json"] and open(out / "summary.json").read() == "3"


def test_a_folder_with_other_files_is_never_replaced(tmp_path):
    mine = tmp_path / "data"
    mine.mkdir()
    (mine / "dce.nrrd").write_text("scan")
    with pytest.raises(ValueError, match=r"output folder .*data: holds other files \(dce.nrrd\) - give a new or empty"):
        with atomic.result_folder(str(mine), True, _ours, "summary.json"):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic.result_folder(str(empty), False, _ours, "summary.json") as tmp:
        open(os.path.join(tmp, "summary.json"), "w").write("1")
    assert os.listdir(empty) == ["summary.json"]


def test_outputs_onto_inputs_are_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"output .*out would replace the input .*t1.nrrd - write the results"):
        atomic.check_not_inputs([str(out)], [str(out / "t1.nrrd"), None])
    with pytest.raises(ValueError, match="would replace the input"):
        atomic.check_not_inputs([str(tmp_path / "a.csv")], [str(tmp_path / "a.csv")])
    atomic.check_not_inputs([str(out)], [str(tmp_path / "outside.nrrd"), str(tmp_path / "out2" / "x")])


def test_leftovers_of_killed_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".exam.{pid}-deadbeef.partial"
    stale.mkdir()
    (stale / "vp.nrrd").write_text("half")
    alive = tmp_path / f".exam.{os.getppid()}-cafecafe.partial"       # a running process's: kept
    alive.mkdir()
    with atomic.result_folder(str(tmp_path / "exam"), False, _ours, "summary.json") as tmp:
        open(os.path.join(tmp, "summary.json"), "w").write("1")
    assert not stale.exists() and alive.exists()


def test_an_image_that_did_not_fit_on_disk_is_an_error_not_a_file(tmp_path):
    """A file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with EFBIG) makes
    SimpleITK write a cut file without saying so; the read-back turns that into an OSError."""
    script = textwrap.dedent(f"""
        import resource, sys
        import numpy as np, SimpleITK as sitk
        from DCEPerfusionLib.files import atomic
        img = sitk.GetImageFromArray(np.random.default_rng(0).random((20, 64, 64)).astype(np.float32))
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            atomic.write_image(img, {str(tmp_path / 'vp.nrrd')!r})
        except OSError as exc:
            import errno
            print("OSError", exc.filename, exc.strerror, errno.errorcode[exc.errno])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == f"OSError {tmp_path / 'vp.nrrd'} could not be written completely EFBIG", run.stderr
    assert os.listdir(tmp_path) == []


def test_an_image_is_read_back_equal(tmp_path):
    import SimpleITK as sitk
    arr = np.random.default_rng(1).random((3, 5, 7)).astype(np.float32)
    arr[0, 0, 0] = np.nan
    path = atomic.write_image(sitk.GetImageFromArray(arr), str(tmp_path / "ve.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(path)), arr)


@pytest.fixture(scope="module")
def small_exam(tmp_path_factory):
    from DCEPerfusionLib import phantom
    from DCEPerfusionLib.apps import demo
    root = tmp_path_factory.mktemp("exam")
    ph = phantom.make_spine_phantom(shape=(4, 48, 32), seed=1, snr=40.0)
    return demo.write_exam_inputs(str(root / "in"), ph, phantom.spine_matrix((3.0, 3.0, 4.0))), root


FAST = ["--baseline-frames", "6", "--r1", "4.5", "--blood-t10", "1.6", "--method", "lls", "--fit-lesions-only"]


def test_overwrite_never_deletes_a_file_the_user_put_into_a_result(small_exam, capsys):
    from DCEPerfusionLib.apps import cli
    files, root = small_exam
    out = root / "result"
    args = ["fit", files.dce, "--segmentation", files.segmentation, "--aif-segment", "aorta", "--out", str(out), *FAST]
    assert cli.main(args) == 0
    (out / "my_notes.txt").write_text("reading of 1 Dec")
    capsys.readouterr()
    assert cli.main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "holds other files (my_notes.txt" in err and err.count("\n") == 1
    assert (out / "my_notes.txt").read_text() == "reading of 1 Dec" and (out / "summary.json").exists()
    (out / "my_notes.txt").unlink()
    assert cli.main([*args, "--overwrite"]) == 0                          # only our files: replaced


def test_an_aif_mask_holding_several_segments_is_refused(small_exam, capsys):
    from DCEPerfusionLib.apps import cli
    files, root = small_exam
    args = ["fit", files.dce, "--segmentation", files.segmentation, "--aif-mask", files.segmentation,
            "--out", str(root / "several"), *FAST]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"AIF mask {files.segmentation}: holds 3 segments (" in err and "--aif-segment NAME" in err
    assert not (root / "several").exists()


def test_a_resumed_batch_exam_is_skipped_only_when_made_with_the_same_settings(small_exam):
    from DCEPerfusionLib.apps import batch
    from DCEPerfusionLib.core.options import AnalysisOptions
    files, root = small_exam
    job = batch.ExamJob("P1_baseline", "P1", "baseline", files.dce, files.segmentation, "", ["L2 metastasis"],
                        str(root / "batch" / "P1_baseline"), baseline_frames=6)
    opts = AnalysisOptions(r1_per_mM_s=4.5, blood_t10_s=1.6, method="lls", fit_lesions_only=True,
                           aif_source="segment")
    assert batch.run_exam(job, opts, aif_segment="aorta")["status"] == "ok"
    assert batch.run_exam(job, opts, aif_segment="aorta")["status"] == "skipped"
    changed = batch.run_exam(dataclasses.replace(job, baseline_frames=4), opts, aif_segment="aorta")
    assert changed["status"] == "failed" and "holds a result made with other n_baseline - pass --overwrite" in \
        changed["error"]
    assert batch.run_exam(dataclasses.replace(job, baseline_frames=4), opts, aif_segment="aorta",
                          overwrite=True)["status"] == "ok"
    masked = dataclasses.replace(job, aif_mask=files.segmentation)
    contradiction = batch.run_exam(masked, dataclasses.replace(opts, aif_source="parker"), aif_given=True)
    assert "manifest column aif_mask" in contradiction["error"] and "contradicts --aif parker" in contradiction["error"]
    assert batch._baseline_frames("6.0", "row 1") == 6
    with pytest.raises(ValueError, match=r"row 1: baseline_frames: number of baseline frames = 6.5: must be a whole"):
        batch._baseline_frames("6.5", "row 1")
