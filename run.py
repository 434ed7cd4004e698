#!/usr/bin/env python3
"""Set up a local virtual environment (.venv, pinned versions) and run the project.

    python3 run.py demo       the main job: the end-to-end demo on the synthetic spine phantom -> output/
    python3 run.py test       every test (pytest under Testing/), then the tests that need no slicer-core under
                              Slicer's own Python stacks (SLICER_STACKS below)
    python3 run.py bench      speed against peers and the scene overhead (benchmarks/);
                              `bench fit ...`, `bench scene ...`, `bench motion ...` or `bench dicom ...` runs one

Needs only python3 with venv and pip. The environment is created on first use and reused; it is
reinstalled when pyproject.toml changes. A Slicer stack whose Python is not on the machine is skipped with
a message; DCEPERFUSION_SLICER_STACKS=none (or a comma list of names) chooses which stacks run.

`test` runs pytest in parallel worker processes (pytest-xdist, one per core up to 4, a test file's tests in
one worker so its module fixtures are made once); DCEPERFUSION_TEST_WORKERS=N chooses N, 0 runs in one process
(as do pytest arguments that choose -n themselves).

What the Slicer stacks leave out, and why: they exist to prove the library on the numpy, scipy, SimpleITK,
pydicom and Python versions Slicer bundles, not to repeat the statistics. So they deselect the tests marked
`slow` (pytest -m "not slow"; the marker is registered in pyproject.toml): the long Monte-Carlo calibrations
- the ΔVp interval's coverage over 120 simulated lesion pairs in test_lesion_ci.py - whose code path a fast
test runs there too (the same chain on six of those pairs, with the width the calibration fixes) - and the
model-driven motion correction's two acceptance analyses in test_motion.py (about 35 s each; the rigid
cases, the registration and the fits they repeat run there). All of them run in the main environment. The
fuzz tests run 600 cases each there (STACK_FUZZ_CASES) instead of 2,500 and 1,400. Tests that need
slicer-core, matplotlib or Dask skip themselves
there (Slicer bundles none of them in its Python). numba, which Slicer does not bundle either but the
module offers to install, is in the stacks (the release pip picks for that Python and numpy), so that the
compiled fit kernels are tested on Slicer 5.8's Python 3.9 and on the newest Slicer's Python; so is
highdicom (the DICOM results; the module offers it on the first export): 0.22.0, the last release for Python
3.9 and pydicom 2.4, on 5.8, and 0.28.2 on 5.12.
"""

import glob
import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python.exe" if os.name == "nt" else "python")

#: The Python stacks of the Slicer releases the module supports: name, Python minor version, the packages
#: Slicer bundles that the Lib uses (exact versions) and numba (not bundled: the module offers to install
#: it; the newest numba for that Python and numpy, as pip picks it there), highdicom (likewise offered),
#: pytest and pytest-xdist (versions
#: that run on that Python; pytest-xdist 3.8 and execnet 2.1 support Python 3.9 to 3.14). The tests
#: run there without slicer-core, matplotlib, Dask, tqdm and threadpoolctl: Slicer bundles none of them.
#: From Slicer's SuperBuild (git show <tag>:<file>): CMakeLists.txt (Slicer_REQUIRED_PYTHON_VERSION),
#: SuperBuild/External_python-numpy.cmake, External_python-scipy.cmake, External_python-dicom-requirements.cmake
#: (pydicom) and, for SimpleITK, External_SimpleITK.cmake (5.8: built from Slicer/SimpleITK tag slicer-v2.3.1,
#: here PyPI's 2.3.1) or External_python-SimpleITK.cmake (5.12).
SLICER_STACKS = [
    ("slicer5.8", "3.9",     # v5.8.1: Python 3.9.10
     ["numpy==1.26.4", "scipy==1.13.1", "SimpleITK==2.3.1", "pydicom==2.4.4", "numba==0.60.0", "llvmlite==0.43.0",
      "highdicom==0.22.0"],
     ["pytest==8.4.2", "pytest-xdist==3.8.0", "execnet==2.1.2"]),
    ("slicer5.12", "3.12",   # v5.12.3 (newest release): Python 3.12.10
     ["numpy==2.4.6", "scipy==1.17.1", "SimpleITK==2.5.5", "pydicom==3.0.2", "numba==0.68.1", "llvmlite==0.50.0",
      "highdicom==0.28.2"],
     ["pytest==9.2.0", "pytest-xdist==3.8.0", "execnet==2.1.2"]),
]
#: What the Slicer stacks deselect (see the module doc): the long Monte-Carlo calibrations.
STACK_MARKERS = "not slow"
#: The fuzz cases per fuzz test the stacks run (DCEPERFUSION_FUZZ_CASES; the main environment runs the tests'
#: defaults, 2,500 per loader and 1,400 DICOM folders): enough to meet each reader on Slicer's pydicom,
#: SimpleITK and numpy, a quarter of the time.
STACK_FUZZ_CASES = "600"
#: The pytest-xdist options that choose the workers or their scheduling: given by the caller, we add none.
_XDIST_OPTIONS = ("-n", "--numprocesses", "--dist", "--tx")


def parallel_args(pytest_args):
    """The pytest-xdist options run.py adds: ["-n", N, "--dist", "loadfile"] with N = DCEPERFUSION_TEST_WORKERS
    or the cores (at most 4); [] for N < 2 or when pytest_args choose the workers themselves (or -p no:xdist)."""
    if any(a.startswith(_XDIST_OPTIONS) for a in pytest_args) or "no:xdist" in " ".join(pytest_args):
        return []
    workers = os.environ.get("DCEPERFUSION_TEST_WORKERS", "").strip()
    n = int(workers) if workers.isdigit() else min(os.cpu_count() or 1, 4)
    return ["-n", str(n), "--dist", "loadfile"] if n >= 2 else []


#: Byte-compiles every .py under the given folders in this Python (syntax newer than it fails, also in files
#: that no test imports); prints the count.
_COMPILE_ALL = """
import os, sys
n = 0
for top in sys.argv[1:]:
    for folder, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    compile(f.read(), path, "exec", dont_inherit=True)
                n += 1
print(f"byte-compiled {n} files")
"""


def _stamp(extras):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return hashlib.sha256(f.read() + extras.encode()).hexdigest()


def _python_in(venv_dir):
    return os.path.join(venv_dir, "Scripts" if os.name == "nt" else "bin",
                        "python.exe" if os.name == "nt" else "python")


def _ensure(venv_dir, key, what, installs, base_python=None):
    """Create venv_dir (from base_python; default: this Python) and run the pip installs, once per key and
    pyproject.toml. A venv of another Python is made afresh (--clear) so nothing of an older stack stays."""
    py = _python_in(venv_dir)
    stamp_name = key.replace(",", "-") if base_python is None else "stack"
    stamp_file = os.path.join(venv_dir, f".installed-{stamp_name}")
    want = _stamp(key)
    if os.path.exists(py) and os.path.exists(stamp_file) and open(stamp_file).read() == want:
        return py
    if base_python is not None:
        print(f"run.py: creating {venv_dir} with {base_python}", flush=True)
        subprocess.check_call([base_python, "-m", "venv", "--clear", venv_dir])
    elif not os.path.exists(py):
        print(f"run.py: creating {venv_dir}", flush=True)
        venv.create(venv_dir, with_pip=True)
    print(f"run.py: installing {what} into {os.path.basename(venv_dir)}", flush=True)
    for args in installs:
        subprocess.check_call([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args])
    with open(stamp_file, "w") as f:
        f.write(want)
    return py


def ensure_env(extras: str) -> None:
    _ensure(VENV, extras, f"dceperfusion[{extras}] (pinned)", [["-e", f"{ROOT}[{extras}]"]])


def _python_variable(minor):
    """The environment variable that names the Python <minor> to use, e.g. DCEPERFUSION_PYTHON3_9."""
    return f"DCEPERFUSION_PYTHON{minor.replace('.', '_')}"


def find_python(minor):
    """A working Python <minor> ("3.9"): the one $DCEPERFUSION_PYTHON3_9 names, else python<minor> on PATH, else
    pyenv's newest ~/.pyenv/versions/<minor>.*; returns (path, None) or (None, why not)."""
    variable = _python_variable(minor)
    override = os.environ.get(variable)
    pyenv = os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")), "versions")
    found = sorted(glob.glob(os.path.join(pyenv, f"{minor}.*", "bin", "python")),
                   key=lambda p: [int(x) if x.isdigit() else -1 for x in p.split(os.sep)[-3].split(".")], reverse=True)
    candidates = [override] if override else [f"python{minor}", *found]
    for exe in candidates:
        try:
            out = subprocess.run([exe, "-c", "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == minor:
            return exe, None
    if override:
        return None, f"{variable}={override} is not a working Python {minor} with venv"
    return None, f"no Python {minor} found (python{minor} on PATH, {pyenv}/{minor}.*, or set {variable})"


def test_slicer_stacks(pytest_args):
    """The tests under each Slicer stack (those needing slicer-core or an optional package skip themselves);
    the exit code of the worst one. A stack without its Python is skipped with one line."""
    chosen = os.environ.get("DCEPERFUSION_SLICER_STACKS")
    codes = []
    for name, minor, pins, test_pins in SLICER_STACKS:
        if chosen is not None and name not in chosen.split(","):
            continue
        print(f"\n===== {name}: Python {minor}, {', '.join(pins)} =====", flush=True)
        base, why = find_python(minor)
        if base is None:
            print(f"run.py: {name} skipped: {why}", flush=True)
            codes.append(1 if os.environ.get(_python_variable(minor)) else 0)   # a Python named but broken fails
            continue
        py = _ensure(os.path.join(ROOT, f".venv-{name}"), "|".join([base, *pins, *test_pins]),
                     f"{', '.join(pins)}, {', '.join(test_pins)} and dceperfusion (--no-deps)",
                     [[*pins, *test_pins], ["--no-deps", "-e", ROOT]], base_python=base)
        compiled = subprocess.call([py, "-c", _COMPILE_ALL, "DCEPerfusion", "Testing"], cwd=ROOT)
        env = {**os.environ, "DCEPERFUSION_FUZZ_CASES": os.environ.get("DCEPERFUSION_FUZZ_CASES", STACK_FUZZ_CASES)}
        tested = subprocess.call([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", STACK_MARKERS,
                                  *parallel_args(pytest_args), *pytest_args], cwd=ROOT, env=env)
        print(f"===== {name}: byte-compile {'ok' if compiled == 0 else 'FAILED'}, "
              f"pytest {'ok' if tested == 0 else 'FAILED (exit %d)' % tested} =====", flush=True)
        codes.append(max(compiled, tested))
    return max(codes, default=0)


def main(argv):
    if not argv or argv[0] not in ("demo", "test", "bench"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        ensure_env("test")
        return subprocess.call([os.path.join(BIN, "dceperfusion"), "demo", "--out", os.path.join(ROOT, "output"),
                                "--overwrite", *rest])
    if cmd == "test":
        ensure_env("test")
        code = subprocess.call([PY, "-m", "pytest", *parallel_args(rest), *rest], cwd=ROOT)
        return max(code, test_slicer_stacks(rest))
    ensure_env("test,bench")
    names = ["fit", "scene", "motion", "dicom"]
    if rest and rest[0] in names:
        names, rest = [rest[0]], rest[1:]
    codes = [subprocess.call([PY, os.path.join(ROOT, "benchmarks", f"bench_{name}.py"), *rest], cwd=ROOT)
             for name in names]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
