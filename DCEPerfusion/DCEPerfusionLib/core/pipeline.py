"""The one analysis chain, written once for every front end (the Slicer scene, the files, the demo):

    series -> [motion correction] -> T10 on the DCE grid -> concentration -> AIF -> fit -> lesion statistics

:func:`analyse` takes the series record (:class:`series.Series4D`), the masks on its grid and the options
(:class:`options.AnalysisOptions`) and returns an :class:`ExamResult` with the maps, statistics, curves
and the provenance of every value it used. The adapters only turn their inputs into those arrays and the
result into their outputs. :func:`compare_exams` is the response chain of two exams: lesions paired by
name, size measures where both masks are known, the vp call.

numpy/scipy only. Bad input raises ValueError naming the input and the fix before any output exists.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from . import aif, bolus, concentration, examchecks, fitting, motion, plausibility, response, rician, size
from .geometry import Volume, t1_on_grid, voxel_volume_mm3
from .options import AnalysisOptions
from .registry import MODELS, PRESCRIBED_AIF_SOURCES
from .regionstats import region_statistics
from .series import Series4D
from .units import MS_PER_S

log = logging.getLogger(__name__)

#: Fewer artery voxels than this make a noisy image-derived AIF (accepted, with a warning).
MIN_AIF_VOXELS = 3
#: Where the stages of :func:`analyse` report their progress (fractions of the whole).
_STAGES = {"concentration": 0.0, "aif": 0.1, "fit": 0.15, "statistics": 0.92}
#: The share of the progress the motion correction takes when it is on.
MOTION_SHARE = 0.6
#: Models that have a linear fit (the model-driven rounds use it: fast, and only a target is needed).
MODELS_WITH_LINEAR_FIT = {key: m.linear for key, m in MODELS.items()}


@dataclass
class ExamResult:
    """What :func:`analyse` computed for one exam.

    fit: the :class:`fitting.FitResult` (maps (K, J, I), NaN where not fitted; status); cp_mM: the plasma
    AIF used (T,); aif_mask: the artery voxels it came from (None for a population curve); lesions:
    {name: mask}; statistics: :class:`regionstats.RegionStats` rows per lesion and map; curves: {name:
    (values (T,), "line" | "points")} - the AIF, each lesion's mean concentration of its fitted voxels and
    the mean model curve; provenance: every value used and where it came from; warnings: what the user
    should know (also logged); timings_s: seconds per stage; reference: the name of the normal-marrow
    reference region (in ``lesions`` and ``statistics`` like a lesion), None without one."""

    series: Series4D
    options: AnalysisOptions
    fit: fitting.FitResult
    cp_mM: np.ndarray
    aif_description: str
    aif_mask: np.ndarray | None
    lesions: dict
    statistics: list
    curves: dict
    provenance: dict
    warnings: list = field(default_factory=list)
    timings_s: dict = field(default_factory=dict)
    reference: str | None = None
    motion: motion.MotionEstimate | None = None

    @property
    def t_s(self) -> np.ndarray:
        return self.series.t_s

    @property
    def maps(self) -> dict:
        return self.fit.maps

    def lesion_data(self) -> "ExamLesions":
        """The lesions as the response chain needs them (statistics and masks on the DCE grid)."""
        return ExamLesions(self.statistics, dict(self.lesions), self.series.ijk_to_ras, self.reference,
                           examchecks.conditions(self.provenance, self.t_s, self.cp_mM))


def analyse(series: Series4D, options: AnalysisOptions, *, lesions: dict | None = None, aif_mask=None,
            aif_name: str = "", t1_map: Volume | None = None, fit_mask=None, prescribed_aif=None,
            progress=None, reference_mask=None, reference_name: str = "reference",
            frame_registration=None) -> ExamResult:
    """Run the chain on one exam.

    series : the DCE series (signal (K, J, I, T), frame times s, geometry, header TR / flip angle).
    options : the analysis options (checked here).
    lesions : {name: bool mask (K, J, I)} on the series grid - statistics and curves, and the fit region
        with ``options.fit_lesions_only``.
    aif_mask, aif_name : the artery voxels (K, J, I) for ``aif_source="segment"`` and their name.
    t1_map : a pre-contrast T1 map (s or ms, any grid: resampled trilinearly); else ``options.t10_s``.
    fit_mask : the voxels (K, J, I) to fit (a region such as the spine; default all).
    prescribed_aif : (times s from the first frame, plasma mM, description) for ``aif_source="prescribed"``.
    progress : callable(fraction 0..1, message) -> bool | None; returning False cancels
        (:class:`fitting.FitCancelled`).
    reference_mask, reference_name : a normal-appearing vertebral body (K, J, I), reported like a lesion
        under ``reference_name`` and marked as the reference (:mod:`examchecks`); fitted with
        ``fit_lesions_only`` like a lesion.
    frame_registration : what registers and resamples frames for ``options.motion_correction`` (the
        files layer's ``files.motion.FRAME_REGISTRATION``: ``reference``, ``register``, ``resample``; the
        adapters pass it). The masks and the T1 map are taken to be in the reference position.
    """
    t_start = time.perf_counter()
    opts = options.checked()

    # with motion correction the registration takes the first MOTION_SHARE of the progress
    share = MOTION_SHARE if opts.motion_correction != "none" else 0.0

    def report(stage_or_fraction, message, registering=False):
        frac = _STAGES.get(stage_or_fraction, stage_or_fraction)
        frac = share * frac if registering else share + (1.0 - share) * frac
        log.info("%3.0f %% %s", 100 * frac, message)
        if progress is not None and progress(frac, message) is False:
            raise fitting.FitCancelled("cancelled by the user")

    shape = series.shape_kji
    n_frames = series.t_s.size
    warnings = []
    plausibility.check_frame_spacing(series.t_s, series.time_source, series.source)
    negative = plausibility.check_signal(series.signal, series.source)
    if negative:
        warnings.append(negative)
    lesions = {str(name): _mask_on_grid(m, shape, f"lesion {name!r}") for name, m in (lesions or {}).items()}
    reference = None
    if reference_mask is not None:
        reference = str(reference_name)
        if reference in lesions:
            raise ValueError(f"reference segment {reference!r}: is also a lesion - choose a normal-appearing vertebral "
                             "body that is not a lesion")
    if opts.fit_lesions_only and not lesions:
        raise ValueError("fit inside the lesions only: no lesion segment given - select at least one lesion segment")
    if fit_mask is not None:
        fit_mask = _mask_on_grid(fit_mask, shape, "fit region (mask)")
        if not fit_mask.any():
            raise ValueError("fit region (mask): has no voxel on the DCE grid - give a mask that overlaps the DCE volume")
    artery = _artery(opts, aif_mask, aif_name, shape, warnings)
    if artery is not None:
        shared = [name for name, m in lesions.items() if np.any(m & artery)]
        if shared:
            warnings.append(f"AIF segment: shares voxels with the lesion(s) {', '.join(shared)} - the AIF should hold "
                            "artery voxels only")
            log.warning(warnings[-1])
    signal, motion_estimate, t_motion, left = series.signal, None, time.perf_counter(), None
    if opts.motion_correction != "none":
        signal, motion_estimate, motion_reference = _first_motion_pass(series, opts, frame_registration, fit_mask,
                                                                       report)
        left = _outside_the_field_of_view(series.signal, signal, artery)
    if opts.n_baseline is None:
        seen = artery if left is None or artery is None else artery & ~left     # NaN curves would spoil the mean
        found = bolus.arrival(signal, series.t_s, seen, f"'{series.source}'")
        opts = dataclasses.replace(opts, n_baseline=found.n_baseline)
        baseline_source = found.describe()
        log.info("baseline frames %s", baseline_source)
    else:
        baseline_source = "given"
    if not opts.n_baseline < n_frames - 2:
        raise ValueError(f"number of baseline frames = {opts.n_baseline}: must be between 1 and {n_frames - 3} "
                         f"(pre-contrast frames before the bolus arrives; the series has {n_frames} frames)")
    tr_s, flip_deg, provenance = _acquisition(series, opts, warnings)
    provenance["n_baseline"] = {"value": opts.n_baseline, "source": baseline_source}
    r1, r1_source = opts.relaxivity(series.field_strength_t)
    provenance["r1_per_mM_s"] = {"value": r1, "source": r1_source}
    if opts.r1_per_mM_s is None:                       # the preset's inputs, only when the preset was used
        field_t, field_source = opts.field(series.field_strength_t)
        provenance["contrast_agent"] = opts.contrast_agent
        provenance["field_strength_t"] = {"value": field_t, "source": field_source}
    t10, provenance["t10"] = _t10(series, opts, t1_map, artery)
    if reference is not None:                                   # fitted with fit_lesions_only, like a lesion
        lesions[reference] = _mask_on_grid(reference_mask, shape, f"reference segment {reference!r}")
    if t1_map is not None:
        provenance["t10"]["region_median_s"] = examchecks.region_t10_s(t10, lesions)

    if opts.fit_lesions_only:
        in_lesions = np.logical_or.reduce(list(lesions.values()))
        fit_region = in_lesions if fit_mask is None else fit_mask & in_lesions
    else:
        fit_region = fit_mask
    if motion_estimate is not None:
        acquisition = dict(t10=t10, tr_s=tr_s, flip_deg=flip_deg, r1=r1)
        signal, motion_estimate = _model_rounds(series, opts, frame_registration, fit_mask, signal, motion_estimate,
                                                motion_reference, acquisition, artery, aif_name, prescribed_aif,
                                                report)
        motion_estimate = dataclasses.replace(motion_estimate, displacement_mm=motion.displacements_mm(
            motion_estimate.transforms_lps, motion.box_corners_lps(shape, series.ijk_to_ras, fit_region)))
        motion_estimate.timings_s["registration_s"] = time.perf_counter() - t_motion
        provenance["motion"] = motion_estimate.summary()
        left = _outside_the_field_of_view(series.signal, signal, artery)
        n_left = int(np.count_nonzero(left))
        if n_left:
            warnings.append(f"motion: {n_left} voxels at the edge of the volume were outside the field of view in "
                            "some frames and are not fitted")
            log.warning(warnings[-1])
        if motion_estimate.warning():
            warnings.append(motion_estimate.warning())
            log.warning(warnings[-1])

    report("concentration", "signal to concentration")
    t1 = time.perf_counter()
    noise_sigma, sigma_source = opts.noise_sigma, None
    if motion_estimate is not None and noise_sigma == "auto":
        # from the frames as acquired: the resampled ones are smoothed and no longer Rician
        n_frames_t = series.t_s.size
        noise_sigma, sigma_source = rician.estimate_sigma(series.signal.reshape(-1, n_frames_t)[:, :opts.n_baseline])
        sigma_source += " (the frames as acquired, before the motion correction)"
    conc, n_bad_t10, counts = concentration.series_to_concentration(
        signal, t10, tr_s=tr_s, flip_angle_deg=flip_deg, r1_per_mM_s=r1, n_baseline=opts.n_baseline,
        noise_sigma=noise_sigma)
    provenance["noise_sigma"] = {"value": counts["noise_sigma"], "source": sigma_source or counts["noise_sigma_source"]}
    if n_bad_t10:
        warnings.append(f"T1 map: {n_bad_t10} voxels have no valid T1 (<= 0, NaN or outside the map) and are not "
                        "fitted")
        log.warning(warnings[-1])
    if counts["saturated_voxels"] or counts["bad_baseline_voxels"]:  # (logged by series_to_concentration)
        warnings.append(f"concentration: {counts['saturated_voxels']} voxels have samples above the SPGR ceiling and "
                        f"{counts['bad_baseline_voxels']} a non-positive baseline; they are not fitted")
    report("aif", "arterial input function")
    cp, used_mask, aif_description = aif.select(opts.aif_source, conc, series.t_s, n_baseline=opts.n_baseline,
                                                hct=opts.hct, mask=artery, mask_name=aif_name,
                                                prescribed=prescribed_aif)
    if counts["noise_sigma"] is not None and used_mask is not None:
        cp, n_mean = _aif_from_mean_signal(signal, used_mask, t10, tr_s, flip_deg, r1, opts,
                                           counts["noise_sigma"])
        aif_description += f"; Rician-corrected mean signal of {n_mean} voxels"
    provenance["aif"] = {"source": opts.aif_source, "description": aif_description,
                         "voxels": int(used_mask.sum()) if used_mask is not None else 0,
                         "hct": None if opts.aif_source in PRESCRIBED_AIF_SOURCES else opts.hct}  # (plasma given)
    if artery is not None:
        n_invalid = int(artery.sum() - np.all(np.isfinite(conc[artery]), axis=-1).sum())
        n_invalid -= int(np.count_nonzero(left & artery)) if left is not None else 0   # (the motion warning says)
        if n_invalid:
            warnings.append(f"AIF segment: {n_invalid} of its {int(artery.sum())} voxels have no valid concentration "
                            "(the arterial peak is above the SPGR ceiling with this T10) and are left out - set the "
                            "blood T10 or a T1 map")
            log.warning(warnings[-1])
    t2 = time.perf_counter()

    lo, hi = _STAGES["fit"], _STAGES["statistics"]
    result = fitting.fit(conc, series.t_s, cp, model=opts.model, method=opts.method, fit_delay=opts.fit_delay,
                         mask=fit_region, uncertainty=opts.uncertainty,
                         progress=lambda done, total: report(lo + (hi - lo) * done / max(total, 1),
                                                             f"fitting {done}/{total} voxels"))
    t3 = time.perf_counter()
    provenance["fit_engine"] = result.engine
    if not np.any(result.maps["status"] <= fitting.AT_BOUND):
        raise ValueError(f"no voxel could be fitted (fit status {result.status_counts()}) - check TR, flip angle, "
                         "T10 or the T1 map, the number of baseline frames and the AIF; nothing was written")

    report("statistics", "lesion statistics and curves")
    stats = region_statistics(result.maps, lesions, voxel_volume_mm3(series.ijk_to_ras)) if lesions else []
    warnings += [f"lesion {name!r} has no voxel on the DCE grid - its statistics are empty"  # (logged there)
                 for name, m in lesions.items() if not m.any()]
    curves = lesion_curves(conc, result, series.t_s, cp, lesions)
    t4 = time.perf_counter()
    report(1.0, "analysis done")
    return ExamResult(series=series, options=opts, fit=result, cp_mM=cp, aif_description=aif_description,
                      aif_mask=used_mask, lesions=lesions, statistics=stats, curves=curves, provenance=provenance,
                      warnings=warnings, timings_s={"concentration_aif_s": t2 - t1, "fit_s": t3 - t2,
                                                    "statistics_s": t4 - t3, "analysis_s": t4 - t_start,
                                                    **({"motion_s": t1 - t_motion} if motion_estimate else {})},
                      reference=reference, motion=motion_estimate)


def _outside_the_field_of_view(given, corrected, artery):
    """(K, J, I) bool: the voxels whose samples the motion correction made NaN (they were outside the field
    of view in some frames); ValueError when they are most of the AIF segment."""
    left = np.all(np.isfinite(given), axis=-1) & ~np.all(np.isfinite(corrected), axis=-1)
    if artery is not None and 2 * np.count_nonzero(left & artery) > np.count_nonzero(artery):
        raise ValueError(f"AIF segment: {np.count_nonzero(left & artery)} of its {np.count_nonzero(artery)} voxels "
                         "were outside the field of view in some frames after the motion correction - draw the "
                         "artery where it stays inside the volume (away from its first and last slices), or use a "
                         "population AIF")
    return left


def _first_motion_pass(series, opts, registration, fit_mask, report):
    """(corrected signal, :class:`motion.MotionEstimate`, the reference image): every frame registered to
    the reference - the mean of the last ``opts.motion_reference_frames`` frames, aligned among themselves
    first - rigidly (also for "model", whose rounds start from here) or affinely."""
    if registration is None:
        raise ValueError("motion correction: needs the frame registration of the files layer (SimpleITK) - run it "
                         "through 'dceperfusion fit' or the Slicer module, or pass "
                         "frame_registration=files.motion.FRAME_REGISTRATION")
    kind = "affine" if opts.motion_correction == "affine" else "rigid"
    n_frames = series.t_s.size
    frames = motion.reference_frames(n_frames, opts.motion_reference_frames)
    passes = 1 + (motion.MODEL_ROUNDS if opts.motion_correction == "model" else 0)
    t0 = time.perf_counter()
    reference = registration.reference(
        series.signal, series.ijk_to_ras, frames, kind, mask=fit_mask,
        progress=lambda done, total: report(0.1 * done / max(total, 1) / passes,
                                            f"motion: the reference (frames {frames[0]}-{frames[-1]})",
                                            registering=True))
    transforms, metric = registration.register(
        series.signal, series.ijk_to_ras, reference, kind, mask=fit_mask,
        progress=lambda done, total: report((0.1 + 0.6 * done / max(total, 1)) / passes,
                                            f"motion: {kind} registration, frame {done}/{total}", registering=True))
    t1 = time.perf_counter()
    corrected = registration.resample(
        series.signal, series.ijk_to_ras, transforms,
        progress=lambda done, total: report((0.7 + 0.3 * done / max(total, 1)) / passes,
                                            f"motion: resampling frame {done}/{total}", registering=True))
    estimate = motion.estimate(opts.motion_correction, transforms, series.shape_kji, series.ijk_to_ras, frames,
                               fit_mask=fit_mask, metric=metric,
                               timings_s={"register_s": t1 - t0, "resample_s": time.perf_counter() - t1})
    log.info("motion (%s): largest displacement %.2f mm (%.2f voxels)", kind, estimate.max_displacement_mm,
             estimate.max_displacement_voxels)
    return corrected, estimate, reference


def _model_rounds(series, opts, registration, fit_mask, signal, estimate, reference, acq, artery, aif_name,
                  prescribed_aif, report):
    """The model-driven rounds (``motion_correction="model"``; :mod:`motion`): fit every voxel of the fit
    region of the corrected series (linear fit where the model has one), register each frame of the series
    as given to the frame the fitted model predicts for it (the reference image where no voxel was fitted:
    a frame's own corrected values would carry its own misregistration into its target), resample;
    :data:`motion.MODEL_ROUNDS` times. Other corrections: as they are."""
    if opts.motion_correction != "model":
        return signal, estimate
    passes = 1 + motion.MODEL_ROUNDS
    quick = "lls" if MODELS_WITH_LINEAR_FIT.get(opts.model) else opts.method
    for r in range(motion.MODEL_ROUNDS):
        conc, _, _ = concentration.series_to_concentration(
            signal, acq["t10"], tr_s=acq["tr_s"], flip_angle_deg=acq["flip_deg"], r1_per_mM_s=acq["r1"],
            n_baseline=opts.n_baseline)
        cp, _, _ = aif.select(opts.aif_source, conc, series.t_s, n_baseline=opts.n_baseline, hct=opts.hct,
                              mask=artery, mask_name=aif_name, prescribed=prescribed_aif)
        fit = fitting.fit(conc, series.t_s, cp, model=opts.model, method=quick, fit_delay=opts.fit_delay,
                          mask=fit_mask, uncertainty=False,
                          progress=lambda done, total, r=r: report((r + 1) / passes,
                                                                   f"motion: model-driven round {r + 1}, fitting "
                                                                   f"{done}/{total} voxels", registering=True))
        fitted = np.isfinite(fit.maps["r2"])
        sub = fitting.FitResult(maps={k: v[fitted] for k, v in fit.maps.items()}, model=fit.model, method=fit.method,
                                fit_delay=fit.fit_delay, bounds=fit.bounds)
        target = motion.predicted_signal(fitting.predict(sub, series.t_s, cp), acq["t10"], tr_s=acq["tr_s"],
                                         flip_angle_deg=acq["flip_deg"], r1_per_mM_s=acq["r1"], fitted=fitted,
                                         reference=reference, reference_frames=estimate.reference_frames)
        t0 = time.perf_counter()
        transforms, metric = registration.register(
            series.signal, series.ijk_to_ras, target, "rigid", mask=fit_mask, initial=estimate.transforms_lps,
            progress=lambda done, total, r=r: report((r + 1 + 0.7 * done / max(total, 1)) / passes,
                                                     f"motion: model-driven round {r + 1}, frame {done}/{total}",
                                                     registering=True))
        t1 = time.perf_counter()
        signal = registration.resample(
            series.signal, series.ijk_to_ras, transforms,
            progress=lambda done, total, r=r: report((r + 1.7 + 0.3 * done / max(total, 1)) / passes,
                                                     f"motion: model-driven round {r + 1}, resampling frame "
                                                     f"{done}/{total}", registering=True))
        timings = {k: estimate.timings_s.get(k, 0.0) + v for k, v in
                   (("register_s", t1 - t0), ("resample_s", time.perf_counter() - t1))}
        estimate = motion.estimate("model", transforms, series.shape_kji, series.ijk_to_ras,
                                   estimate.reference_frames, fit_mask=fit_mask, rounds=r + 2, metric=metric,
                                   timings_s=timings)
    return signal, estimate


def _aif_from_mean_signal(signal, used_mask, t10, tr_s, flip_deg, r1, opts, sigma):
    """(plasma AIF mM, voxels averaged) from the mean magnitude signal of the AIF voxels, the Rician mean
    inverted with the sigma of one voxel (:func:`rician.invert_mean`): a mean of N voxels estimates E[M]
    closely, while correcting each voxel first and then averaging keeps the residual bias of single voxels at
    low SNR. All voxels with a finite signal count: a voxel whose own noisy conversion fails (a sample above
    the SPGR ceiling of its noisy baseline) is not a biased voxel, and leaving it out would bias the mean."""
    voxels = used_mask & np.all(np.isfinite(signal), axis=-1)
    mean_signal = signal[voxels].mean(axis=0, dtype=np.float64)
    sigma_1 = float(np.mean(np.broadcast_to(sigma, voxels.shape)[voxels])) if np.ndim(sigma) else float(sigma)
    t10_aif = 1.0 / float(np.mean(1.0 / np.broadcast_to(t10, voxels.shape)[voxels]))   # the mean R10
    corrected = rician.invert_mean(mean_signal, sigma_1)[None, :]
    cb = concentration.signal_to_concentration(corrected, tr_s=tr_s, flip_angle_deg=flip_deg, t10_s=t10_aif,
                                               r1_per_mM_s=r1, n_baseline=opts.n_baseline)[0]
    return np.nan_to_num(cb) / (1.0 - opts.hct), int(voxels.sum())


def _mask_on_grid(mask, shape, what):
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"{what}: mask shape {m.shape} is not the DCE grid {tuple(shape)} - put it on the DCE grid")
    return m.astype(bool, copy=False)


def _artery(opts, aif_mask, aif_name, shape, warnings):
    """The artery mask for an image-derived AIF (None for the other sources); fewer than
    :data:`MIN_AIF_VOXELS` voxels are accepted with a warning (a one-voxel AIF is noisy, not wrong)."""
    if opts.aif_source != "segment":
        return None
    named = f" (segment '{aif_name}')" if aif_name else ""
    if aif_mask is None:
        raise ValueError("AIF source 'segment': no artery segment given - select the segment inside an artery "
                         "(e.g. the aorta)")
    artery = _mask_on_grid(aif_mask, shape, "AIF segment")
    n = int(artery.sum())
    if n == 0:
        raise ValueError(f"AIF segment{named}: has no voxel on the DCE grid - draw it inside the artery (e.g. the "
                         "aorta) within the DCE volume")
    if n < MIN_AIF_VOXELS:
        warnings.append(f"AIF segment{named}: only {n} voxel(s) on the DCE grid - the AIF is noisy; draw at least "
                        f"{MIN_AIF_VOXELS} voxels inside the artery (e.g. the aorta on several slices)")
        log.warning(warnings[-1])
    return artery


def _acquisition(series, opts, warnings):
    """TR (s) and flip angle (degrees): the options' values, else the series header's; a given value that
    differs from the header's by more than 1 % is warned about (a value entered for another series)."""
    provenance = {"series": series.source, "frame_times": {"source": series.time_source,
                                                           "spacing_s": float(np.median(np.diff(series.t_s)))}}
    values = []
    for key, given, header, label, fix in (
            ("tr_s", opts.tr_s, series.tr_s, "TR", "enter TR (ms; --tr-ms on the command line)"),
            ("flip_angle_deg", opts.flip_angle_deg, series.flip_angle_deg, "flip angle",
             "enter the flip angle (degrees; --flip-deg on the command line)")):
        if given:
            value, source = float(given), "given"
            if header and abs(value - float(header)) > 0.01 * float(header):
                shown = (lambda v: f"{MS_PER_S * v:g} ms") if key == "tr_s" else (lambda v: f"{v:g} deg")
                warnings.append(f"{label}: the given {shown(value)} replaces the {shown(float(header))} in the header "
                                f"of '{series.source}'")
                log.warning(warnings[-1])
        elif header:
            value, source = float(header), f"header of {series.source}"
            (plausibility.check_tr_s if key == "tr_s" else plausibility.check_flip_angle_deg)(value, source)
        else:
            raise ValueError(f"{label}: the series '{series.source}' has no {label} in its header - {fix}")
        values.append(value)
        provenance[key] = {"value": value, "source": source}
    return values[0], values[1], provenance


def _t10(series, opts, t1_map, artery):
    """Pre-contrast T1 (s): the map on the DCE grid or the constant; blood T10 inside the artery."""
    if t1_map is not None:
        t10, unit = t1_on_grid(t1_map, series.shape_kji, series.ijk_to_ras, opts.t1_map_unit)
        if not np.any(np.isfinite(t10) & (t10 > 0)):
            raise ValueError(f"{t1_map.name}: has no positive T1 inside the DCE volume (it does not overlap it, or is "
                             "empty there) - select the T1 map of this study or use a constant T10")
        source = {"source": t1_map.name, "unit": unit}
    else:
        t10, source = float(opts.t10_s), {"source": "constant", "value_s": float(opts.t10_s)}
    if opts.blood_t10_s is not None and artery is not None:
        t10 = np.where(artery, float(opts.blood_t10_s), t10)
        source["blood_t10_s"] = float(opts.blood_t10_s)
    return t10, source


def lesion_curves(conc, result: fitting.FitResult, t_s, cp, lesions: dict) -> dict:
    """{name: (values (T,), style)}: the AIF, and per lesion the mean concentration of its fitted voxels
    ("points") and the mean of their model curves ("line"), mM."""
    curves = {"AIF plasma": (np.asarray(cp, dtype=float), "line")}
    conc_2d = conc.reshape(-1, t_s.size)
    for name, m in lesions.items():
        fitted = m & np.isfinite(result.maps["r2"])  # fitted voxels have finite concentrations
        n_fitted = int(fitted.sum())
        if not n_fitted:
            continue
        sub = fitting.FitResult(maps={k: v[fitted] for k, v in result.maps.items()}, model=result.model,
                                method=result.method, fit_delay=result.fit_delay, bounds=result.bounds)
        # the fitted voxels only: a weighted sum over all voxels would carry the NaN of unfitted ones (0 * NaN)
        mean_c = conc_2d[np.flatnonzero(fitted)].mean(axis=0, dtype=np.float64)
        curves[f"{name} mean C"] = (mean_c, "points")
        curves[f"{name} fit"] = (fitting.predict(sub, t_s, cp).mean(axis=0), "line")
    return curves


# ============================================================================================ two exams
@dataclass
class ExamLesions:
    """One exam's lesions as the response chain needs them: region statistics rows and, for the size
    comparison, the lesion masks (K, J, I) with their IJK->RAS matrix (empty / None when not known);
    reference: the name of the normal-marrow reference region in ``statistics`` (None without one);
    conditions: the :class:`examchecks.ExamConditions` for the warnings between exams (None: unknown)."""

    statistics: list
    masks: dict = field(default_factory=dict)
    ijk_to_ras: np.ndarray | None = None
    reference: str | None = None
    conditions: examchecks.ExamConditions | None = None


def compare_exams(baseline: ExamLesions | None, followup: ExamLesions | None, lesions=None, *,
                  statistic: str = response.STATISTICS[0], cutoff_pct: float = response.VP_CUTOFF_PCT,
                  progression_pct: float = size.SIZE_PROGRESSION_PCT,
                  name_prefix: str = "", normalise_to_reference: bool = False, **call_options) -> list:
    """The response of every lesion between two exams: :func:`response.assess_lesion` on the lesion's
    ``statistic`` at both exams, with the size change (:mod:`size`) where both exams have its mask.

    lesions : names to assess (default: the baseline's lesions, else the follow-up's); a lesion one exam
        lacks gets an "indeterminate" call naming it. ``name_prefix`` is put before each name in the
        result (e.g. the patient). ``call_options`` go to :func:`response.assess_lesion`.
    With a normal-marrow reference (``ExamLesions.reference``) each response also has the lesion/reference
    vp ratios; ``normalise_to_reference`` makes the call on their change (:func:`examchecks.with_reference`).
    Each response has the warnings between the exams (:func:`examchecks.exam_warnings`).
    Returns a list of :class:`response.LesionResponse`.
    """
    base_rows = baseline.statistics if baseline else []
    follow_rows = followup.statistics if followup else []
    reference = (baseline.reference if baseline else None) or (followup.reference if followup else None)
    if normalise_to_reference and reference is None:
        raise ValueError("call on the reference-normalised ΔVp: the exams have no reference segment - fit them with "
                         "a normal-marrow reference (--reference-segment NAME) or call on vp")
    if lesions is None:
        lesions = list(dict.fromkeys(r.segment for r in (base_rows or follow_rows) if r.segment != reference))
    refs = [response.exam_values(rows, reference, statistic) if reference else None for rows in (base_rows,
                                                                                              follow_rows)]
    out = []
    for name in lesions:
        change = None
        if (baseline and followup and name in baseline.masks and name in followup.masks
                and baseline.ijk_to_ras is not None and followup.ijk_to_ras is not None):
            change = size.size_change(size.size_measures(baseline.masks[name], baseline.ijk_to_ras),
                                      size.size_measures(followup.masks[name], followup.ijk_to_ras), progression_pct)
        r = response.assess_lesion(
            response.exam_values(base_rows, name, statistic), response.exam_values(follow_rows, name, statistic),
            f"{name_prefix}{name}", statistic=statistic, cutoff_pct=cutoff_pct, size=change, **call_options)
        r.warnings = examchecks.exam_warnings(baseline.conditions if baseline else None,
                                              followup.conditions if followup else None,
                                              [name, *([reference] if reference else [])])
        if reference:
            r = examchecks.with_reference(r, refs[0], refs[1], reference, normalise_to_reference, call_options)
        out.append(r)
    return out
