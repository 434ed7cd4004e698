"""The plasma-volume response call of one lesion between a baseline and a follow-up DCE exam.

:func:`assess_lesion` gives the percent change of vp, Ktrans, ve and kep (a chosen lesion statistic) and
the call. A drop of vp after radiation means success; a smaller drop or a rise suggests failure:
"suspected failure" when ΔVp > cut-off (default -20 %, Kumar et al., Technol Cancer Res Treat 2017;
AJNR 2023;44:1451 found mean ΔVp -57.3 % in successes vs +88.2 % in failures). "indeterminate" (with
the reason) when the call cannot be trusted - by default also when the 95 % confidence interval of ΔVp
(bootstrapped from both exams' independent draws, :mod:`lesionci`) straddles the cut-off. The size
comparator is in :mod:`size`, the pairing of two exams lesion by lesion in :func:`pipeline.compare_exams`. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import lesionci
from .registry import RESPONSE_MAPS
from .registry import RESPONSE_STATISTICS as STATISTICS
from .registry import VP_CUTOFF_PCT

if TYPE_CHECKING:  # size imports this module
    from .size import SizeChange

SUCCESS, FAILURE, INDETERMINATE = "success", "suspected failure", "indeterminate"


@dataclass
class ExamValues:
    """One lesion in one exam: ``values`` {map: statistic}, the voxels the statistics used, the
    segment voxels left out because the fit failed there, and ``draws`` {map: (n_boot,) bootstrap draws
    of the statistic} for the maps that have them."""

    values: dict
    voxel_count: int
    excluded_voxel_count: int
    draws: dict = field(default_factory=dict)

    @property
    def fitted_fraction(self) -> float:
        total = self.voxel_count + self.excluded_voxel_count
        return self.voxel_count / total if total else 0.0


def exam_values(rows, lesion: str, statistic: str = STATISTICS[0]) -> ExamValues | None:
    """Pick ``lesion``'s ``statistic`` of every map from region statistics rows (:mod:`regionstats`);
    None when the exam has no row for the lesion."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r}: use one of {', '.join(STATISTICS)}")
    mine = [r for r in rows if r.segment == lesion]
    if not mine:
        return None
    vp_row = next((r for r in mine if r.map == "vp"), mine[0])
    return ExamValues(values={r.map: float(r.values[statistic]) for r in mine},
                      voxel_count=int(vp_row.voxel_count), excluded_voxel_count=int(vp_row.excluded_voxel_count),
                      draws={r.map: np.asarray(r.draws[statistic], dtype=float) for r in mine
                             if statistic in getattr(r, "draws", {})})


def percent_change(before: float, after: float) -> float:
    """100 (after - before) / before; NaN when before is 0 or either value is not finite."""
    if not (np.isfinite(before) and np.isfinite(after)) or before == 0:
        return float("nan")
    return 100.0 * (after - before) / before


@dataclass
class ResponseCall:
    """The vp-based call and what it rests on. call: SUCCESS, FAILURE or INDETERMINATE; the 95 % CI
    of ΔVp (%, NaN when an exam has no bootstrap draws)."""

    call: str
    reason: str
    delta_vp_pct: float
    cutoff_pct: float
    delta_vp_ci_lower_pct: float = float("nan")
    delta_vp_ci_upper_pct: float = float("nan")


@dataclass
class LesionResponse:
    """A lesion's response: the chosen statistic of each map at both exams, their percent changes,
    the voxel counts behind them, the vp call, (optionally) the size comparison, and ``change_ci``
    {map: (lower, upper) 95 % CI of the percent change} for the maps both exams have draws of; warnings: what
    differs between the exams (:func:`examchecks.exam_warnings`); reference: the normal-marrow reference's vp
    and the lesion/reference vp ratios (:func:`examchecks.with_reference`), None without a reference."""

    lesion: str
    statistic: str
    baseline: dict
    followup: dict
    change_pct: dict
    voxel_counts: tuple
    call: ResponseCall
    size: "SizeChange | None" = None
    change_ci: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    reference: dict | None = None


def assess_lesion(baseline: ExamValues | None, followup: ExamValues | None, lesion: str = "lesion", *,
                  statistic: str = STATISTICS[0], cutoff_pct: float = VP_CUTOFF_PCT, min_baseline_vp: float = 0.005,
                  min_voxels: int = 10, min_fitted_fraction: float = 0.5, size=None,
                  indeterminate_when_ci_straddles: bool = True) -> LesionResponse:
    """Percent changes and the vp call for one lesion.

    cutoff_pct : ΔVp (%) above which the call is "suspected failure" (default -20 %).
    min_baseline_vp : baseline vp (fraction) below which a percent change is not meaningful.
    min_voxels, min_fitted_fraction : each exam needs this many voxels with a good fit, and this
        fraction of the lesion's voxels fitted, for the call to be trusted.
    indeterminate_when_ci_straddles : call "indeterminate" when the 95 % CI of ΔVp (percentile interval of
        the ratio of the two exams' independent bootstrap draws) has the cut-off strictly inside it.
    """
    if not np.isfinite(cutoff_pct):
        raise ValueError(f"cutoff_pct={cutoff_pct}: give the ΔVp cut-off in percent, e.g. -20")
    base = baseline.values if baseline else {}
    follow = followup.values if followup else {}
    change = {m: percent_change(base.get(m, np.nan), follow.get(m, np.nan)) for m in RESPONSE_MAPS
              if m in base or m in follow}
    dvp = change.get("vp", float("nan"))
    b_draws = baseline.draws if baseline else {}
    f_draws = followup.draws if followup else {}
    change_ci = {m: lesionci.percentile_ci(lesionci.percent_change_draws(b_draws[m], f_draws[m]))
                 for m in change if m in b_draws and m in f_draws}
    lo, hi = change_ci.get("vp", (float("nan"), float("nan")))
    ci_text = f" (95 % CI {lo:+.1f} to {hi:+.1f} %)" if np.isfinite(lo) and np.isfinite(hi) else ""
    reasons = []
    for label, exam in (("baseline", baseline), ("follow-up", followup)):
        if exam is None:
            reasons.append(f"the {label} exam has no statistics for lesion {lesion!r}")
        elif "vp" not in exam.values:
            reasons.append(f"the {label} exam has no vp map (use a model with vp: Extended Tofts, Patlak, 2CXM)")
        elif exam.voxel_count < min_voxels or exam.fitted_fraction < min_fitted_fraction:
            reasons.append(f"{label}: {exam.voxel_count} voxels with a good fit ({100 * exam.fitted_fraction:.0f} % "
                           f"of the lesion); need >= {min_voxels} and >= {100 * min_fitted_fraction:.0f} %")
    if not reasons and not base["vp"] >= min_baseline_vp:
        reasons.append(f"baseline vp {base['vp']:.4f} is below {min_baseline_vp:g}: a percent change of so small a "
                       "plasma volume is not meaningful")
    cut = f"{cutoff_pct:+.0f} %"
    if reasons:
        verdict, reason = INDETERMINATE, "; ".join(reasons)
    elif indeterminate_when_ci_straddles and ci_text and lo < cutoff_pct < hi:
        verdict, reason = INDETERMINATE, f"ΔVp {dvp:+.1f} %{ci_text} straddles the cut-off {cut}"
    elif dvp > cutoff_pct:
        verdict, reason = FAILURE, f"ΔVp {dvp:+.1f} %{ci_text} is above the cut-off {cut}"
    else:
        verdict, reason = SUCCESS, f"ΔVp {dvp:+.1f} %{ci_text} is at or below the cut-off {cut}"
    call = ResponseCall(verdict, reason, dvp, float(cutoff_pct), lo, hi)
    counts = (baseline.voxel_count if baseline else 0, followup.voxel_count if followup else 0)
    return LesionResponse(lesion=lesion, statistic=statistic, baseline=dict(base), followup=dict(follow),
                          change_pct=change, voxel_counts=counts, call=call, size=size, change_ci=change_ci)
