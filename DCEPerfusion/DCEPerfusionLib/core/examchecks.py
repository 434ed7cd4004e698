"""What the response chain checks between two exams: the normal-marrow reference and the warnings.

Normal-marrow reference: a normal-appearing vertebral body segmented in each exam. The lesion/reference
vp ratio (lesion vp / reference vp, both fractions) and its change (%) between the exams take out what
moves the whole marrow's vp at once (a different AIF scaling, the T10 of irradiated, fatty marrow); the
call may rest on the change of that ratio instead of ΔVp (``normalise_to_reference``). Radiation turns
marrow fatty and shortens its T1 (Chen et al., Radiology 2021; Kumar et al., Technol Cancer Res Treat
2017 call on ΔVp with a constant T10), which biases the concentration and so ΔVp.

Warnings between exams (kept with the call, :attr:`response.LesionResponse.warnings`), tolerances below:
both exams with a constant T10; lesion or reference T10 from T1 maps differing by more than
:data:`T10_TOLERANCE`; TR, flip angle, frame interval or duration differing by more than
:data:`ACQUISITION_TOLERANCE`; the AIF peak (plasma, mM) differing by more than :data:`AIF_PEAK_TOLERANCE`.
A baseline vp too small for a percent change is not warned about here: :func:`response.assess_lesion`
makes that call "indeterminate" (one place).

numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .units import MS_PER_S

#: Relative difference of the lesion (or reference) median T10 from T1 maps between exams that is warned about.
T10_TOLERANCE = 0.20
#: Relative difference of TR, flip angle, frame interval and duration between exams that is warned about: 5 %
#: (a rounding of the header is < 1 %; another protocol is more).
ACQUISITION_TOLERANCE = 0.05
#: Relative difference of the AIF peak (plasma, mM) between exams that is warned about.
AIF_PEAK_TOLERANCE = 0.50
#: What the call can rest on: the lesion's ΔVp, or the change of its lesion/reference vp ratio.
CALL_ON = ("vp", "reference-normalised")


@dataclass
class ExamConditions:
    """How one exam was acquired and analysed, as the checks between exams need it.

    tr_s: repetition time (s); flip_angle_deg: degrees; frame_interval_s: median time between frames (s);
    duration_s: last minus first frame time (s); aif_peak_mM: peak of the plasma AIF (mM); t10_constant:
    True when a constant T10 was used (no T1 map); region_t10_s: {region name: median T10 (s)} from the
    T1 map (empty with a constant T10)."""

    tr_s: float
    flip_angle_deg: float
    frame_interval_s: float
    duration_s: float
    aif_peak_mM: float
    t10_constant: bool
    region_t10_s: dict = field(default_factory=dict)


def region_t10_s(t10_s, regions: dict) -> dict:
    """{name: median of the finite, positive T10 (s) inside the region} (regions with none left out)."""
    t10 = np.asarray(t10_s, dtype=float)
    out = {}
    for name, mask in regions.items():
        values = t10[mask] if t10.ndim else np.full(int(np.count_nonzero(mask)), float(t10))
        values = values[np.isfinite(values) & (values > 0)]
        if values.size:
            out[str(name)] = float(np.median(values))
    return out


def conditions(values_used: dict, t_s, cp_mM) -> ExamConditions:
    """The :class:`ExamConditions` of an exam from its provenance (``ExamResult.provenance`` or
    summary.json's ``values_used``), frame times (s) and plasma AIF (mM)."""
    t = np.asarray(t_s, dtype=float)
    cp = np.asarray(cp_mM, dtype=float)
    t10 = values_used.get("t10", {})
    return ExamConditions(
        tr_s=float(values_used["tr_s"]["value"]), flip_angle_deg=float(values_used["flip_angle_deg"]["value"]),
        frame_interval_s=float(np.median(np.diff(t))) if t.size > 1 else float("nan"),
        duration_s=float(t[-1] - t[0]) if t.size else float("nan"),
        aif_peak_mM=float(np.nanmax(cp)) if cp.size and np.isfinite(cp).any() else float("nan"),
        t10_constant=t10.get("source") == "constant", region_t10_s=dict(t10.get("region_median_s") or {}))


def _differs(a: float, b: float, tolerance: float) -> bool:
    """|a - b| > tolerance * |a| (False when either is not finite)."""
    return bool(np.isfinite(a) and np.isfinite(b) and abs(b - a) > tolerance * abs(a))


def exam_warnings(baseline: ExamConditions | None, followup: ExamConditions | None, regions=()) -> list:
    """The warnings between two exams for one lesion (``regions``: the lesion's name and the reference's,
    whose T10 from T1 maps are compared). Empty when either exam's conditions are unknown."""
    if baseline is None or followup is None:
        return []
    out = []
    if baseline.t10_constant and followup.t10_constant:
        out.append("constant T10 on both exams: radiation turns marrow fatty and shortens its T1, which biases ΔVp "
                   "- give T1 maps (--t1) or call on the reference-normalised ΔVp")
    for name in regions:
        before, after = baseline.region_t10_s.get(name), followup.region_t10_s.get(name)
        if before is not None and after is not None and _differs(before, after, T10_TOLERANCE):
            out.append(f"T10 of {name!r} from the T1 maps changed by {100 * (after - before) / before:+.0f} % "
                       f"({MS_PER_S * before:.0f} -> {MS_PER_S * after:.0f} ms; more than "
                       f"{100 * T10_TOLERANCE:.0f} %)")
    for label, key, shown in (("TR", "tr_s", lambda v: f"{MS_PER_S * v:g} ms"),
                              ("flip angle", "flip_angle_deg", lambda v: f"{v:g} deg"),
                              ("frame interval", "frame_interval_s", lambda v: f"{v:.3g} s"),
                              ("duration", "duration_s", lambda v: f"{v:.4g} s")):
        before, after = getattr(baseline, key), getattr(followup, key)
        if _differs(before, after, ACQUISITION_TOLERANCE):
            out.append(f"{label} differs between the exams ({shown(before)} -> {shown(after)}; more than "
                       f"{100 * ACQUISITION_TOLERANCE:.0f} %)")
    if _differs(baseline.aif_peak_mM, followup.aif_peak_mM, AIF_PEAK_TOLERANCE):
        out.append(f"AIF peak differs between the exams ({baseline.aif_peak_mM:.2f} -> {followup.aif_peak_mM:.2f} "
                   f"mM; more than {100 * AIF_PEAK_TOLERANCE:.0f} %) - check the AIF segment or the injection")
    return out


def vp_ratio(lesion_vp: float | None, reference_vp: float | None) -> float:
    """Lesion vp / reference vp (both fractions); NaN when either is missing or not finite, or the
    reference vp is not > 0."""
    if lesion_vp is None or reference_vp is None or not (np.isfinite(lesion_vp) and np.isfinite(reference_vp)):
        return float("nan")
    return float(lesion_vp / reference_vp) if reference_vp > 0 else float("nan")


def check_call_on(call_on: str) -> bool:
    """True for the reference-normalised call; ValueError naming the value otherwise unknown."""
    if call_on not in CALL_ON:
        raise ValueError(f"call on {call_on!r}: use one of {', '.join(CALL_ON)}")
    return call_on == CALL_ON[1]


def with_reference(resp, baseline_reference, followup_reference, reference: str, normalise: bool,
                   call_options: dict):
    """``resp`` (a :class:`response.LesionResponse`) with its ``reference`` filled in - the reference's vp
    at both exams, the lesion/reference vp ratios and their change (%) - and, with ``normalise``, the call
    made on the change of that ratio (by :func:`response.assess_lesion`, so with the same cut-off and
    voxel checks, applied to the reference; an indeterminate vp call stays indeterminate). ``*_reference``: the reference's
    :class:`response.ExamValues` at each exam (None when missing)."""
    from . import response
    ref_b = baseline_reference.values.get("vp") if baseline_reference else None
    ref_f = followup_reference.values.get("vp") if followup_reference else None
    ratio_b, ratio_f = vp_ratio(resp.baseline.get("vp"), ref_b), vp_ratio(resp.followup.get("vp"), ref_f)
    resp.reference = {"segment": reference, "vp_baseline": ref_b, "vp_followup": ref_f, "vp_ratio_baseline": ratio_b,
                      "vp_ratio_followup": ratio_f, "delta_vp_ratio_pct": response.percent_change(ratio_b, ratio_f)}
    if not normalise:
        return resp
    prefix = "reference-normalised call: "
    if resp.call.call == response.INDETERMINATE:
        resp.call.reason = prefix + resp.call.reason
        return resp
    missing = [label for label, vp in (("baseline", ref_b), ("follow-up", ref_f)) if vp is None or not np.isfinite(vp)]
    min_vp = call_options.get("min_baseline_vp", 0.005)
    if missing or not ref_b >= min_vp:
        why = (f"the reference {reference!r} has no vp at the {' and '.join(missing)} exam" if missing else
               f"the reference {reference!r} has baseline vp {ref_b:.4f} below {min_vp:g}")
        resp.call = response.ResponseCall(response.INDETERMINATE, prefix + why, resp.call.delta_vp_pct,
                                          resp.call.cutoff_pct)
        return resp
    b, f = baseline_reference, followup_reference
    normalised = response.assess_lesion(
        response.ExamValues({"vp": ratio_b}, b.voxel_count, b.excluded_voxel_count),   # the lesion passed: now the
        response.ExamValues({"vp": ratio_f}, f.voxel_count, f.excluded_voxel_count),   # reference's voxel checks
        resp.lesion, statistic=resp.statistic, cutoff_pct=resp.call.cutoff_pct,
        **{**call_options, "min_baseline_vp": 0.0})
    resp.call = normalised.call
    resp.call.reason = prefix + resp.call.reason.replace("ΔVp", "Δ(lesion/reference vp)")
    return resp
