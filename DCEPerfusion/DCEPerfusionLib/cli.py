"""The ``dceperfusion`` command line.

``dceperfusion demo``: build the synthetic phantom, convert its signal to concentration, detect the AIF,
fit the Extended Tofts model in every voxel and print the fitted parameters against the truth.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from . import __version__, aif, concentration, fitting, phantom


def _demo(args) -> int:
    shape_txt = " ".join(map(str, args.shape))
    if min(args.shape[:2]) < 8:
        raise ValueError(f"--shape {shape_txt}: X and Y must be at least 8 voxels "
                         "(the phantom needs room for a lesion and an artery)")
    if args.shape[2] < 1:
        raise ValueError(f"--shape {shape_txt}: Z must be at least 1 slice")
    if not args.snr > 0:
        raise ValueError(f"--snr {args.snr}: the signal-to-noise ratio must be > 0")
    t0 = time.perf_counter()
    ph = phantom.make_phantom(shape=tuple(args.shape), seed=args.seed, snr=args.snr)
    acq = ph.acquisition
    n_vox = int(np.prod(ph.labels.shape))
    print(f"Synthetic DCE study: {ph.labels.shape} voxels x {ph.t_s.size} frames of "
          f"{ph.t_s[1] - ph.t_s[0]:.0f} s, SNR {args.snr:g}, TR {acq['tr_s'] * 1e3:.1f} ms, "
          f"flip angle {acq['flip_angle_deg']:g} deg")
    conc, flags = concentration.signal_to_concentration(
        ph.signal, tr_s=acq["tr_s"], flip_angle_deg=acq["flip_angle_deg"], t10_s=ph.t10_s,
        r1_per_mM_s=acq["r1_per_mM_s"], n_baseline=acq["n_baseline"], return_flags=True)
    print(f"Signal -> concentration: {flags.n_saturated} samples above the SPGR ceiling")

    found = aif.detect(conc, ph.t_s, n_voxels=10, hct=acq["hct"])
    in_artery = np.mean(ph.labels[found.mask] == phantom.LABELS["artery"])
    err = np.abs(found.cp - ph.cp).max() / ph.cp.max()
    print(f"Automatic AIF: {found.mask.sum()} voxels, {100 * in_artery:.0f} % inside the artery, "
          f"peak {found.cp.max():.2f} mM (truth {ph.cp.max():.2f} mM), max deviation {100 * err:.1f} % of peak")

    tissue = ph.labels != phantom.LABELS["artery"]
    t1 = time.perf_counter()
    res = fitting.fit(conc, ph.t_s, ph.cp, model=args.model, method=args.method, mask=tissue)
    fit_s = time.perf_counter() - t1
    print(f"Fit {args.model} ({args.method}) of {int(tissue.sum())} voxels with the Parker AIF: "
          f"{fit_s:.2f} s ({tissue.sum() / fit_s:,.0f} voxel fits/s); status {res.status_counts()}")
    print()
    keys = [k for k in ("ktrans", "ve", "vp", "kep") if k in res.maps]
    units = {"ktrans": "1/min", "ve": "", "vp": "", "kep": "1/min"}
    header = f"{'region':<8} {'parameter':<10} {'truth (mean)':>13} {'fit (median)':>13} {'fit IQR':>19} {'bias %':>8}"
    print(header)
    print("-" * len(header))
    for name in ("muscle", "lesion"):
        sel = ph.labels == phantom.LABELS[name]
        for k in keys:
            truth = float(np.mean(ph.truth[k][sel]))
            vals = res.maps[k][sel]
            vals = vals[np.isfinite(vals)]
            med = float(np.median(vals))
            q1, q3 = np.percentile(vals, [25, 75])
            label = f"{k} {units[k]}".strip()
            print(f"{name:<8} {label:<10} {truth:13.4f} {med:13.4f} {f'{q1:.4f}..{q3:.4f}':>19} "
                  f"{100 * (med - truth) / truth:8.1f}")
    print()
    print(f"Done in {time.perf_counter() - t0:.1f} s ({n_vox} voxels).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dceperfusion", description="Quantitative DCE-MRI perfusion (DCEPerfusion).")
    p.add_argument("--version", action="version", version=f"dceperfusion {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of the library")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="fit the synthetic phantom and compare with the truth",
                       description="Build a synthetic DCE study (SPGR signal with Rician noise, Parker AIF), "
                                   "convert it to concentration, detect the AIF, fit every voxel and print "
                                   "the fitted parameters against the truth.")
    d.add_argument("--shape", type=int, nargs=3, default=[64, 64, 8], metavar=("X", "Y", "Z"),
                   help="phantom size in voxels (default 64 64 8)")
    d.add_argument("--snr", type=float, default=40.0, help="baseline signal-to-noise ratio (default 40)")
    d.add_argument("--model", default="extended_tofts", choices=list(fitting.MODEL_PARAMETERS),
                   help="kinetic model (default extended_tofts)")
    d.add_argument("--method", default="nlls", choices=["lls", "nlls"],
                   help="lls: linear least squares (Murase); nlls: nonlinear least squares (default)")
    d.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    d.set_defaults(func=_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"dceperfusion: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
