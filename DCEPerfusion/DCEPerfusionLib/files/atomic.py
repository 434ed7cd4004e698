"""Outputs that are complete or absent: files written under a temporary name unique to the process and
renamed into place, folders built beside their final place and swapped in as a whole under a lock, every
image write read back (SimpleITK does not report a failed write), nothing left behind on any exception
or Ctrl-C, and no output allowed onto an input.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid

log = logging.getLogger(__name__)

#: Part of every temporary name, so that leftovers of a killed run are recognised.
PARTIAL = ".partial"


def temp_path(path: str, hidden: bool = True) -> str:
    """A temporary name beside ``path``, unique to this process and call, with the same extension
    (SimpleITK picks the writer from it); hidden (a leading dot) unless a writer cannot take that
    (Slicer's WriteToMRB takes a leading-dot name for an extension)."""
    folder, base = os.path.split(os.path.abspath(path))
    stem, ext = _split_ext(base)
    dot = "." if hidden else ""
    return os.path.join(folder, f"{dot}{stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL}{ext}")


def _split_ext(name: str):
    low = name.lower()
    for ext in (".seg.nrrd", ".nii.gz"):
        if low.endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    stem, ext = os.path.splitext(name)
    return stem, ext


@contextlib.contextmanager
def replacing(path: str, hidden: bool = True):
    """``with replacing(path) as tmp:`` write ``tmp``; on success it is renamed to ``path``, on any
    exception (Ctrl-C included) it is removed and ``path`` is untouched."""
    tmp = temp_path(path, hidden)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        if exc.filename == tmp:            # name the file as it would have been, not its temporary name
            exc.filename = path
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        log.warning("could not remove the temporary %s", path)


def write_image(img, path: str, compress: bool = True) -> str:
    """A SimpleITK image written to ``path`` through a temporary name and read back: OSError naming the
    path when what is on disk is not the image (a full disk or a file-size limit)."""
    import SimpleITK as sitk
    with replacing(path) as tmp:
        try:
            sitk.WriteImage(img, tmp, useCompression=compress)
            back = sitk.ReadImage(tmp)
        except RuntimeError:
            back = None
        if back is None or back.GetSize() != img.GetSize() or \
                back.GetNumberOfComponentsPerPixel() != img.GetNumberOfComponentsPerPixel() or \
                not _same_pixels(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img)):
            raise OSError(_write_failure(tmp), "could not be written completely", path)
    return path


def _write_failure(tmp: str) -> int:
    """Why a write SimpleITK did not report came out short: a file-size limit (EFBIG), a full disk
    (ENOSPC) or else EIO."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY and os.path.getsize(tmp) >= soft - 65536:
            return errno.EFBIG
    except (ImportError, OSError, ValueError):
        pass
    try:
        st = os.statvfs(os.path.dirname(tmp) or ".")
        if st.f_bavail * st.f_frsize < 2**20:
            return errno.ENOSPC
    except (AttributeError, OSError):
        pass
    return errno.EIO


def _same_pixels(back, written) -> bool:
    """Whether the pixels read ``back`` are those ``written``; a NaN written may read back as 0 (ITK's NIfTI
    reader turns the NaN the file holds into 0)."""
    import numpy as np
    if back.shape != written.shape:
        return False
    if written.dtype.kind != "f":
        return bool(np.array_equal(back, written))
    nan = np.isnan(written)
    if not nan.any():
        return bool(np.array_equal(back, written))
    b = np.asarray(back)[nan]
    return bool(np.array_equal(np.asarray(back)[~nan], np.asarray(written)[~nan]) and np.all(np.isnan(b) | (b == 0)))


# ============================================================================================ folders
def check_not_inputs(outputs, inputs) -> None:
    """ValueError when an output path (a file or a folder that will be replaced) is, or holds, an input."""
    ins = [(p, os.path.realpath(p)) for p in inputs if p]
    for out in outputs:
        real = os.path.realpath(out)
        for given, path in ins:
            if path == real or path.startswith(real.rstrip(os.sep) + os.sep):
                raise ValueError(f"output {out} would replace the input {given} - write the results elsewhere "
                                 "(another --out)")


@contextlib.contextmanager
def result_folder(out_dir: str, overwrite: bool, ours, marker: str):
    """``with result_folder(out, overwrite, ours, marker) as tmp:`` fill the folder ``tmp``; on success it
    replaces ``out_dir`` as a whole (under a lock, so two runs on one folder leave one complete set), on
    any exception it is removed and ``out_dir`` is untouched.

    A previous result - a folder holding the file ``marker`` and only names for which ``ours(name)`` is
    true - is replaced only with ``overwrite``; a folder with any other file never. An empty folder is
    filled. Checked before and after the work."""
    check_folder_free(out_dir, overwrite, ours, marker)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    _clean_leftovers(out_dir)
    tmp = temp_path(out_dir)
    os.mkdir(tmp)
    try:
        try:
            yield tmp
        except OSError as exc:            # name the file as it would have been, not its temporary place
            if exc.filename and str(exc.filename).startswith(tmp):
                exc.filename = os.path.join(out_dir, os.path.relpath(exc.filename, tmp))
            raise
        with _locked(parent):
            check_folder_free(out_dir, overwrite, ours, marker)     # another run may have finished meanwhile
            old = None
            if os.path.lexists(out_dir):
                old = temp_path(out_dir) + ".old"
                os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                if old:
                    os.rename(old, out_dir)
                raise
            if old:
                _remove(old)
    except BaseException:
        _remove(tmp)
        raise


def check_folder_free(out_dir: str, overwrite: bool, ours, marker: str) -> None:
    """FileExistsError when ``out_dir`` holds a result (see :func:`result_folder`) and not ``overwrite``;
    ValueError when it holds other files, or is below a file."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    while parent and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"output folder {out_dir}: {parent} is a file - give a folder for the results")
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ValueError(f"output folder {out_dir}: is a file - give a folder for the results")
    entries = [e for e in os.listdir(out_dir) if PARTIAL not in e]
    if not entries:
        return
    others = sorted(e for e in entries if not ours(e)) if marker in entries else sorted(entries)
    if others:
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise ValueError(f"output folder {out_dir}: holds other files ({shown}) - give a new or empty folder for "
                         "the results")
    if not overwrite:
        raise FileExistsError(f"{out_dir} already holds a result - choose another --out or pass --overwrite")


def _clean_leftovers(out_dir: str) -> None:
    """Remove temporary folders of ``out_dir`` left by runs that were killed (their process is gone)."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    stem = f".{_split_ext(os.path.basename(os.path.abspath(out_dir)))[0]}."
    for name in os.listdir(parent):
        if name.startswith(stem) and PARTIAL in name:
            pid = name[len(stem):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(os.path.join(parent, name))


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":        # (os.kill(pid, 0) would signal a process on Windows)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:              # e.g. another user's process, or no such call on this system
        return True
    return True


@contextlib.contextmanager
def _locked(folder: str):
    """An exclusive lock on ``folder`` (POSIX flock; where there is none, the rename itself refuses to
    replace a folder another run has just put in place)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
