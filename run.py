#!/usr/bin/env python3
"""Set up a local virtual environment (.venv, pinned versions) and run the project.

    python3 run.py demo       the main job: the end-to-end demo on the synthetic spine phantom -> output/
    python3 run.py test       every test (pytest under Testing/)
    python3 run.py bench      speed against peers and the scene overhead (benchmarks/);
                              `bench fit ...` or `bench scene ...` runs one with its options

Needs only python3 with venv and pip. The environment is created on first use and reused; it is
reinstalled when pyproject.toml changes.
"""

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python.exe" if os.name == "nt" else "python")


def _stamp(extras):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return hashlib.sha256(f.read() + extras.encode()).hexdigest()


def ensure_env(extras: str) -> None:
    stamp_file = os.path.join(VENV, f".installed-{extras.replace(',', '-')}")
    want = _stamp(extras)
    if os.path.exists(PY) and os.path.exists(stamp_file) and open(stamp_file).read() == want:
        return
    if not os.path.exists(PY):
        print(f"run.py: creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    print(f"run.py: installing dceperfusion[{extras}] (pinned) into .venv", flush=True)
    subprocess.check_call([PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "-e", f"{ROOT}[{extras}]"])
    with open(stamp_file, "w") as f:
        f.write(want)


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
        return subprocess.call([PY, "-m", "pytest", *rest], cwd=ROOT)
    ensure_env("test,bench")
    names = ["fit", "scene"]
    if rest and rest[0] in names:
        names, rest = [rest[0]], rest[1:]
    codes = [subprocess.call([PY, os.path.join(ROOT, "benchmarks", f"bench_{name}.py"), *rest], cwd=ROOT)
             for name in names]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
