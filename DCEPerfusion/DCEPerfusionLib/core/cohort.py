"""Cohort statistics of the response call: how well ΔVp (and, side by side, the size change)
separates treatment successes from failures.

Input: one row per lesion with ``lesion_id``, ``patient_id``, ``outcome`` (success / failure) and the
measured changes (``delta_vp_pct``; optionally ``delta_size_pct`` and others), from a CSV file or rows.
Failure is the positive class: a call of "suspected failure" is a positive test.

- group summaries and the two-sided Mann-Whitney U test (scipy; exact for small groups without ties);
- sensitivity, specificity, PPV, NPV and accuracy at a cut-off with 95 % confidence intervals, Wilson
  and Clopper-Pearson ("exact"), from ``scipy.stats.binomtest(...).proportion_ci``;
- the ROC curve, its AUC (= Mann-Whitney U / (n1 n0)) with the DeLong et al. (Biometrics 1988) 95 %
  confidence interval, and the Youden-optimal cut-off;
- McNemar's exact test of the vp call against the size call on the same lesions (discordant pairs).

numpy/scipy only. Reference: the AJNR 2023;44:1451 cohort (38 successes, 11 failures): vp
sensitivity 10/11 = 91 %, specificity 33/38 = 87 %; size 9/11 = 82 % and 18/38 = 47 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from .registry import SIZE_PROGRESSION_PCT, VP_CUTOFF_PCT

REQUIRED_COLUMNS = ("lesion_id", "patient_id", "outcome", "delta_vp_pct")
OUTCOMES = {"success": False, "failure": True}   # failure is the positive class
CI_METHODS = {"wilson": "wilson", "clopper-pearson": "exact"}


@dataclass
class Cohort:
    """Validated lesion rows: ids, patients, failure (bool) and {measure: float array} (NaN = missing)."""

    lesion_ids: list
    patient_ids: list
    failure: np.ndarray
    measures: dict

    @property
    def n_failure(self) -> int:
        return int(self.failure.sum())

    @property
    def n_success(self) -> int:
        return int((~self.failure).sum())


def cohort_from_rows(rows, measures=None, source: str = "cohort") -> Cohort:
    """Check and convert lesion rows (dicts of strings or numbers).

    Every problem is a ValueError naming the row (1 = first data row, as a spreadsheet shows it
    below the header) and the fix: missing columns, unknown outcomes, duplicate lesion ids, values that
    are not numbers, and a group without lesions."""
    rows = list(rows)
    if not rows:
        raise ValueError(f"{source}: has no lesion rows")
    columns = set(rows[0].keys())
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {', '.join(missing)}; the columns are "
                         f"{', '.join(sorted(columns))} (required: {', '.join(REQUIRED_COLUMNS)})")
    if measures is None:
        measures = [c for c in rows[0] if c.startswith("delta_")]
    ids, patients, failure = [], [], []
    values = {m: [] for m in measures}
    seen = {}
    for n, row in enumerate(rows, start=1):
        lesion = str(row.get("lesion_id", "")).strip()
        if not lesion:
            raise ValueError(f"{source} row {n}: lesion_id is empty")
        if lesion in seen:
            raise ValueError(f"{source} row {n}: duplicate lesion_id {lesion!r} (first in row {seen[lesion]}) - "
                             "give every lesion its own id")
        seen[lesion] = n
        outcome = str(row.get("outcome", "")).strip().lower()
        if outcome not in OUTCOMES:
            raise ValueError(f"{source} row {n} ({lesion}): outcome {row.get('outcome')!r} is not one of "
                             f"{', '.join(OUTCOMES)}")
        for m in measures:
            raw = row.get(m, "")
            if raw is None or (isinstance(raw, str) and raw.strip() in ("", "NA", "nan", "NaN")):
                values[m].append(float("nan"))
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"{source} row {n} ({lesion}): {m} = {raw!r} is not a number (percent change, "
                                 "e.g. -35.2; leave empty when missing)") from None
            if math.isinf(value):
                raise ValueError(f"{source} row {n} ({lesion}): {m} is infinite")
            values[m].append(value)
        ids.append(lesion)
        patients.append(str(row.get("patient_id", "")).strip())
        failure.append(OUTCOMES[outcome])
    cohort = Cohort(ids, patients, np.array(failure, dtype=bool), {m: np.array(v) for m, v in values.items()})
    for label, count in (("success", cohort.n_success), ("failure", cohort.n_failure)):
        if count == 0:
            raise ValueError(f"{source}: no lesion has outcome {label!r}; the statistics compare the two groups")
    return cohort


def read_cohort_csv(path: str, measures=None) -> Cohort:
    """A cohort from a CSV file read by :func:`tables.read_table` (UTF-8, comma/semicolon/tab, a header
    row, one row per lesion; ValueError naming the file, the row and the fix), then the checks of
    :func:`cohort_from_rows`."""
    from .tables import read_table
    table = read_table(path, "cohort table", ",".join(REQUIRED_COLUMNS))
    table.require(REQUIRED_COLUMNS)
    return cohort_from_rows(table.rows, measures, source=str(path))


# ============================================================================================ summaries
@dataclass
class GroupSummary:
    n: int
    mean: float
    sd: float
    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float


def summarize(values) -> GroupSummary:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return GroupSummary(0, *([float("nan")] * 7))
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return GroupSummary(int(v.size), float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, float(med),
                        float(q1), float(q3), float(v.min()), float(v.max()))


@dataclass
class MannWhitney:
    u_failure: float        # U statistic of the failure group
    p_value: float
    method: str             # "exact" or "asymptotic", as scipy chose


def mann_whitney(values, failure, exact_max_n: int = 50) -> MannWhitney:
    """Two-sided Mann-Whitney U test of failures against successes (scipy). Exact distribution when
    there are no ties and both groups have at most ``exact_max_n`` lesions (cohorts like the paper's
    38 + 11); otherwise the normal approximation with tie and continuity correction."""
    v, f = _finite(values, failure)
    x, y = v[f], v[~f]
    if x.size == 0 or y.size == 0:
        raise ValueError("Mann-Whitney: needs at least one failure and one success with a value")
    no_ties = np.unique(v).size == v.size
    method = "exact" if no_ties and max(x.size, y.size) <= exact_max_n else "asymptotic"
    res = stats.mannwhitneyu(x, y, alternative="two-sided", method=method)
    return MannWhitney(float(res.statistic), float(res.pvalue), method)


def _finite(values, failure):
    v = np.asarray(values, dtype=float)
    f = np.asarray(failure, dtype=bool)
    keep = np.isfinite(v)
    return v[keep], f[keep]


# ============================================================================================ 2x2 tables
@dataclass
class Proportion:
    """k of n with its estimate and 95 % CIs: {"wilson": (lo, hi), "clopper-pearson": (lo, hi)}."""

    k: int
    n: int
    estimate: float
    ci: dict


def proportion(k: int, n: int, confidence: float = 0.95) -> Proportion:
    if n == 0:
        return Proportion(0, 0, float("nan"), {m: (float("nan"), float("nan")) for m in CI_METHODS})
    res = stats.binomtest(int(k), int(n))
    ci = {name: tuple(float(x) for x in res.proportion_ci(confidence_level=confidence, method=method))
          for name, method in CI_METHODS.items()}
    return Proportion(int(k), int(n), k / n, ci)


@dataclass
class Performance:
    """A binary call against the outcome (failure = positive): the 2x2 counts and the proportions."""

    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Proportion
    specificity: Proportion
    ppv: Proportion
    npv: Proportion
    accuracy: Proportion


def performance(predicted_failure, failure) -> Performance:
    p = np.asarray(predicted_failure, dtype=bool)
    f = np.asarray(failure, dtype=bool)
    if p.shape != f.shape:
        raise ValueError(f"predicted_failure has shape {p.shape}, failure {f.shape}: one call per lesion")
    tp, fp = int(np.sum(p & f)), int(np.sum(p & ~f))
    tn, fn = int(np.sum(~p & ~f)), int(np.sum(~p & f))
    return Performance(tp, fp, tn, fn, proportion(tp, tp + fn), proportion(tn, tn + fp), proportion(tp, tp + fp),
                       proportion(tn, tn + fn), proportion(tp + tn, tp + tn + fp + fn))


# ============================================================================================ ROC
@dataclass
class ROC:
    """ROC of "failure when value > threshold": false/true positive rates for decreasing thresholds,
    AUC with its DeLong standard error and 95 % CI, and the Youden-optimal cut-off."""

    thresholds: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    auc_se: float
    auc_ci: tuple
    youden_cutoff: float
    youden_sensitivity: float
    youden_specificity: float
    n_failure: int = 0
    n_success: int = 0
    extra: dict = field(default_factory=dict)


def roc(values, failure, confidence: float = 0.95) -> ROC:
    """ROC curve, AUC with the DeLong (1988) CI, and the Youden cut-off of a measure where larger
    values mean failure. Lesions with a missing value are left out."""
    v, f = _finite(values, failure)
    pos, neg = v[f], v[~f]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("roc: needs at least one failure and one success with a value")
    # thresholds between the distinct values, decreasing (the curve runs from (0, 0) to (1, 1)):
    # "failure if value > t"
    u = np.unique(v)[::-1]
    cuts = np.concatenate([[u[0] + 1.0], (u[1:] + u[:-1]) / 2.0, [u[-1] - 1.0]])
    tpr = np.array([(pos > t).mean() for t in cuts])
    fpr = np.array([(neg > t).mean() for t in cuts])
    # AUC and DeLong's variance from the placement values (structural components)
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = float(psi.mean())
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = (v10.var(ddof=1) / pos.size if pos.size > 1 else 0.0) + (v01.var(ddof=1) / neg.size if neg.size > 1 else 0.0)
    se = float(math.sqrt(var))
    z = stats.norm.ppf(0.5 + confidence / 2)
    ci = (float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se)))
    j = tpr - fpr
    best = int(np.flatnonzero(j == j.max())[-1])   # of tied cut-offs the lowest (the most sensitive)
    return ROC(thresholds=cuts, fpr=fpr, tpr=tpr, auc=auc, auc_se=se, auc_ci=ci, youden_cutoff=float(cuts[best]),
               youden_sensitivity=float(tpr[best]), youden_specificity=float(1 - fpr[best]),
               n_failure=int(pos.size), n_success=int(neg.size))


# ============================================================================================ McNemar
@dataclass
class McNemar:
    """Paired comparison of two calls' correctness on the same lesions: b = only the first correct,
    c = only the second correct; exact two-sided binomial p on the discordant pairs."""

    b: int
    c: int
    p_value: float


def mcnemar(correct_a, correct_b) -> McNemar:
    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    return McNemar(b, c, p)


# ============================================================================================ the report
@dataclass
class MeasureReport:
    """Everything for one measure (vp or size): summaries, Mann-Whitney, performance at the cut-off, ROC."""

    measure: str
    cutoff_pct: float
    success: GroupSummary
    failure: GroupSummary
    mann_whitney: MannWhitney
    performance: Performance
    roc: ROC
    n_missing: int


@dataclass
class CohortReport:
    n_lesions: int
    n_patients: int
    n_success: int
    n_failure: int
    measures: dict
    mcnemar: McNemar | None


def measure_report(cohort: Cohort, measure: str, cutoff_pct: float) -> MeasureReport:
    if measure not in cohort.measures:
        raise ValueError(f"measure {measure!r}: the cohort has {', '.join(cohort.measures) or 'no measures'}")
    v = cohort.measures[measure]
    ok = np.isfinite(v)
    if ok.sum() == 0:
        raise ValueError(f"measure {measure!r}: no lesion has a value")
    f = cohort.failure
    return MeasureReport(measure=measure, cutoff_pct=float(cutoff_pct), success=summarize(v[~f]),
                         failure=summarize(v[f]), mann_whitney=mann_whitney(v, f),
                         performance=performance(v[ok] > cutoff_pct, f[ok]), roc=roc(v, f),
                         n_missing=int((~ok).sum()))


def cohort_report(cohort: Cohort, vp_cutoff_pct: float = VP_CUTOFF_PCT, size_cutoff_pct: float = SIZE_PROGRESSION_PCT,
                  vp_measure: str = "delta_vp_pct", size_measure: str = "delta_size_pct") -> CohortReport:
    """vp and (when the cohort has it) size side by side, and McNemar's test between their calls.

    The vp call is "failure" when ΔVp > ``vp_cutoff_pct``; the size call when the size change is
    >= ``size_cutoff_pct`` (progression). Size is left out when one outcome group has no size at all."""
    reports = {"vp": measure_report(cohort, vp_measure, vp_cutoff_pct)}
    test = None
    known = np.isfinite(cohort.measures[size_measure]) if size_measure in cohort.measures else np.zeros(0, bool)
    if known.size and known[cohort.failure].any() and known[~cohort.failure].any():   # both groups have a size
        size = cohort.measures[size_measure]
        rep = measure_report(cohort, size_measure, size_cutoff_pct)
        rep.performance = performance(size[np.isfinite(size)] >= size_cutoff_pct, cohort.failure[np.isfinite(size)])
        reports["size"] = rep
        both = np.isfinite(size) & np.isfinite(cohort.measures[vp_measure])
        f = cohort.failure[both]
        vp_call = cohort.measures[vp_measure][both] > vp_cutoff_pct
        size_call = size[both] >= size_cutoff_pct
        test = mcnemar(vp_call == f, size_call == f)
    return CohortReport(n_lesions=len(cohort.lesion_ids), n_patients=len(set(cohort.patient_ids)),
                        n_success=cohort.n_success, n_failure=cohort.n_failure, measures=reports, mcnemar=test)


def synthetic_cohort(n_success: int = 38, n_failure: int = 11, mean_success: float = -57.3,
                     mean_failure: float = 88.2, sd_success: float = 30.0, sd_failure: float = 90.0,
                     seed: int = 0) -> list[dict]:
    """Lesion rows drawn to match the AJNR 2023 cohort's group sizes and mean ΔVp (the SDs are
    assumptions); the size change is drawn weakly related to the outcome. For demos and tests."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_success + n_failure):
        fail = i >= n_success
        mean, sd = (mean_failure, sd_failure) if fail else (mean_success, sd_success)
        dvp = rng.normal(mean, sd)
        dsize = rng.normal(25.0 if fail else 10.0, 20.0)
        rows.append({"lesion_id": f"L{i + 1:03d}", "patient_id": f"P{i + 1:03d}",
                     "outcome": "failure" if fail else "success", "delta_vp_pct": f"{dvp:.1f}",
                     "delta_size_pct": f"{dsize:.1f}"})
    return rows
