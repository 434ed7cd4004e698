"""A long fuzzing run of every file loader (minutes; ``Testing/test_fuzz.py`` is the short one in CI).

Each loader of ``Testing/fuzzing.py`` (read_dce on 4D NRRD and NIfTI + JSON sidecar, read_segmentation
on .seg.nrrd and labelmaps, read_volume, read_aif_csv, read_manifest, read_cohort_csv and the exam
summary) is called on mutated copies of its seed files, each case in a worker process with a timeout.
Printed per loader: inputs tried, read / refused, uncaught exceptions by place (type, file:line, an
example case and its mutations), hangs, crashes, ValueError messages that are not one line naming the
input, inputs changed, and the time; the most frequent refusals with ``--refusals``. Cases whose
findings are kept stay in ``--tmp`` for a look.

    python benchmarks/fuzz_loaders.py --cases 20000 --seed 1
    python benchmarks/fuzz_loaders.py --minutes 5              (cases spread over the loaders until then)
    python benchmarks/fuzz_loaders.py --loaders read_volume read_aif_csv --cases 5000

Exit code 1 when anything was found.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Testing"))

import fuzzing  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=5000, help="cases per loader (default 5000)")
    p.add_argument("--minutes", type=float, default=None,
                   help="run rounds of --cases per loader (new seeds each round) until this many minutes have passed")
    p.add_argument("--seed", type=int, default=1, help="seed of the first round (default 1)")
    p.add_argument("--loaders", nargs="*", default=list(fuzzing.LOADERS), choices=list(fuzzing.LOADERS))
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang")
    p.add_argument("--tmp", default=None, help="folder for the cases (default: a new temporary folder)")
    p.add_argument("--refusals", type=int, default=0, help="print the N most frequent refusal messages per loader")
    args = p.parse_args(argv)
    tmp = args.tmp or tempfile.mkdtemp(prefix="dceperfusion-fuzz-")
    t0 = time.perf_counter()
    totals = {}
    seed = args.seed
    while True:
        for name in args.loaders:
            rep = fuzzing.run(fuzzing.LOADERS[name], fuzzing.seeds_for(name), args.cases, seed,
                              os.path.join(tmp, f"{name}-{seed}"), timeout_s=args.timeout, name=f"{name} (seed {seed})")
            print("\n".join(rep.lines()), flush=True)
            for message, n in rep.refusals.most_common(args.refusals):
                print(f"  refused {n:5d} x {message}")
            t = totals.setdefault(name, {"cases": 0, "findings": 0, "uncaught": 0, "hangs": 0, "seconds": 0.0})
            t["cases"] += rep.cases
            t["findings"] += len(rep.findings) + len(rep.seed_failures)
            t["uncaught"] += len(rep.uncaught)
            t["hangs"] += len(rep.hangs)
            t["seconds"] += rep.seconds
        seed += 1
        if args.minutes is None or time.perf_counter() - t0 > 60 * args.minutes:
            break
    print(f"\ntotal after {(time.perf_counter() - t0) / 60:.1f} min (cases in {tmp}):")
    for name, t in totals.items():
        print(f"  {name:18s} {t['cases']:7d} inputs  {t['uncaught']:4d} uncaught  {t['hangs']:3d} hangs  "
              f"{t['findings']:4d} findings in all  {t['seconds']:7.1f} s")
    return 1 if any(t["findings"] for t in totals.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
