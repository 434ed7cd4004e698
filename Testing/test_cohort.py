"""Cohort statistics against independent textbook formulas, the paper's counts, a synthetic cohort like
the paper's, and bad input."""

import math

import numpy as np
import pytest
from scipy import stats

from DCEPerfusionLib import cohort


def _wilson(k, n, z=1.959963984540054):
    """Wilson score interval (Wilson 1927), written out."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _clopper_pearson(k, n, alpha=0.05):
    """Clopper-Pearson interval from beta quantiles."""
    lo = 0.0 if k == 0 else stats.beta.ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else stats.beta.ppf(1 - alpha / 2, k + 1, n - k)
    return lo, hi


def _paper_rows():
    """38 successes and 11 failures whose calls reproduce the paper's counts:
    vp 10/11 failures and 33/38 successes correct; size 9/11 and 18/38."""
    rows = []
    for i in range(49):
        fail = i >= 38
        j = i - 38 if fail else i
        vp_positive = j < 10 if fail else j >= 33
        size_positive = j < 9 if fail else j >= 18
        rows.append({"lesion_id": f"L{i}", "patient_id": f"P{i // 2}", "outcome": "failure" if fail else "success",
                     "delta_vp_pct": str((40.0 + i) if vp_positive else (-60.0 + i / 10)),
                     "delta_size_pct": str((30.0 + i / 7) if size_positive else (-5.0 + i / 9))})
    return rows


def test_the_papers_counts_give_its_percentages():
    rep = cohort.cohort_report(cohort.cohort_from_rows(_paper_rows()))
    vp, size = rep.measures["vp"].performance, rep.measures["size"].performance
    assert (vp.tp, vp.fn, vp.tn, vp.fp) == (10, 1, 33, 5)
    assert round(100 * vp.sensitivity.estimate) == 91 and round(100 * vp.specificity.estimate) == 87
    assert round(100 * size.sensitivity.estimate) == 82 and round(100 * size.specificity.estimate) == 47
    assert (rep.n_lesions, rep.n_patients, rep.n_failure, rep.n_success) == (49, 25, 11, 38)
    # McNemar: discordant correctness pairs counted by hand from the construction above
    f = np.array([r["outcome"] == "failure" for r in _paper_rows()])
    vp_ok = np.array([float(r["delta_vp_pct"]) > -20 for r in _paper_rows()]) == f
    size_ok = np.array([float(r["delta_size_pct"]) >= 20 for r in _paper_rows()]) == f
    b, c = int(np.sum(vp_ok & ~size_ok)), int(np.sum(~vp_ok & size_ok))
    assert (rep.mcnemar.b, rep.mcnemar.c) == (b, c)
    assert rep.mcnemar.p_value == pytest.approx(min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5)))


@pytest.mark.parametrize("k,n", [(10, 11), (33, 38), (9, 11), (18, 38), (0, 7), (7, 7)])
def test_confidence_intervals_match_the_textbook_formulas(k, n):
    p = cohort.proportion(k, n)
    assert p.estimate == pytest.approx(k / n)
    assert p.ci["wilson"] == pytest.approx(_wilson(k, n), abs=1e-9)
    assert p.ci["clopper-pearson"] == pytest.approx(_clopper_pearson(k, n), abs=1e-9)


def _delong_by_pairs(pos, neg):
    """DeLong et al. 1988 written out pair by pair (independent of the vectorised code)."""
    def psi(x, y):
        return 1.0 if x > y else 0.5 if x == y else 0.0
    m, n = len(pos), len(neg)
    auc = sum(psi(x, y) for x in pos for y in neg) / (m * n)
    v10 = [sum(psi(x, y) for y in neg) / n for x in pos]
    v01 = [sum(psi(x, y) for x in pos) / m for y in neg]
    s10 = sum((v - auc) ** 2 for v in v10) / (m - 1)
    s01 = sum((v - auc) ** 2 for v in v01) / (n - 1)
    return auc, math.sqrt(s10 / m + s01 / n)


def test_roc_auc_delong_and_youden():
    rows = cohort.synthetic_cohort(seed=3)
    c = cohort.cohort_from_rows(rows)
    v = c.measures["delta_vp_pct"]
    r = cohort.roc(v, c.failure)
    auc, se = _delong_by_pairs(list(v[c.failure]), list(v[~c.failure]))
    assert r.auc == pytest.approx(auc) and r.auc_se == pytest.approx(se)
    u = stats.mannwhitneyu(v[c.failure], v[~c.failure]).statistic
    assert r.auc == pytest.approx(u / (c.n_failure * c.n_success))      # AUC = U / (n1 n0)
    assert r.auc_ci == pytest.approx((r.auc - 1.959964 * se, min(1.0, r.auc + 1.959964 * se)), abs=1e-5)
    # Youden: no threshold of the curve does better, and the cut-off reproduces its sensitivity
    j = r.tpr - r.fpr
    assert r.youden_sensitivity - (1 - r.youden_specificity) == pytest.approx(j.max())
    assert np.mean(v[c.failure] > r.youden_cutoff) == pytest.approx(r.youden_sensitivity)
    assert r.tpr[0] == 0 and r.fpr[0] == 0 and r.tpr[-1] == 1 and r.fpr[-1] == 1
    # ordered by decreasing threshold, so the curve runs one way from (0, 0) to (1, 1)
    assert np.all(np.diff(r.thresholds) < 0) and np.all(np.diff(r.fpr) >= 0) and np.all(np.diff(r.tpr) >= 0)
    # ties count half
    tied = cohort.roc([1.0, 1.0, 0.0, 2.0], [True, False, False, True])
    assert tied.auc == pytest.approx(_delong_by_pairs([1.0, 2.0], [1.0, 0.0])[0])


def test_synthetic_cohort_like_the_paper():
    c = cohort.cohort_from_rows(cohort.synthetic_cohort(seed=0))
    rep = cohort.cohort_report(c)
    vp = rep.measures["vp"]
    assert (vp.success.n, vp.failure.n) == (38, 11)
    assert vp.success.mean == pytest.approx(-57.3, abs=15) and vp.failure.mean == pytest.approx(88.2, abs=45)
    assert vp.mann_whitney.p_value < 0.001 and vp.mann_whitney.method == "exact"
    u = stats.mannwhitneyu(c.measures["delta_vp_pct"][c.failure], c.measures["delta_vp_pct"][~c.failure],
                           method="exact")
    assert vp.mann_whitney.p_value == pytest.approx(u.pvalue) and vp.mann_whitney.u_failure == u.statistic
    assert vp.roc.auc > rep.measures["size"].roc.auc
    assert vp.performance.sensitivity.estimate >= 0.8 and vp.performance.specificity.estimate >= 0.8


def test_group_summary_and_missing_values():
    rows = cohort.synthetic_cohort(n_success=5, n_failure=4, seed=1)
    rows[0]["delta_size_pct"] = ""
    c = cohort.cohort_from_rows(rows)
    rep = cohort.cohort_report(c)
    assert rep.measures["size"].n_missing == 1 and rep.measures["vp"].n_missing == 0
    s = cohort.summarize([1.0, 2.0, 3.0, 4.0, np.nan])
    assert (s.n, s.mean, s.median, s.q1, s.q3) == (4, 2.5, 2.5, 1.75, 3.25)
    assert s.sd == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    # a group without any size (e.g. a batch whose failures have no segmentation): vp still reported
    for r in rows:
        if r["outcome"] == "failure":
            r["delta_size_pct"] = ""
    rep = cohort.cohort_report(cohort.cohort_from_rows(rows))
    assert set(rep.measures) == {"vp"} and rep.mcnemar is None


def test_csv_round_trip(tmp_path):
    rows = cohort.synthetic_cohort(n_success=6, n_failure=3)
    path = tmp_path / "cohort.csv"
    with open(path, "w", encoding="utf-8") as f:
        f.write(";".join(rows[0]) + "\n")
        for r in rows:
            f.write(";".join(r.values()) + "\n")
    c = cohort.read_cohort_csv(str(path))
    assert c.lesion_ids == [r["lesion_id"] for r in rows] and c.n_failure == 3
    np.testing.assert_allclose(c.measures["delta_vp_pct"], [float(r["delta_vp_pct"]) for r in rows])


@pytest.mark.parametrize("change,message", [
    (lambda rows: rows[2].update(outcome="partial"), "row 3 \\(L003\\): outcome 'partial' is not one of"),
    (lambda rows: [r.pop("patient_id") for r in rows], "missing column\\(s\\) patient_id"),
    (lambda rows: rows[4].update(lesion_id="L001"), "row 5: duplicate lesion_id 'L001' \\(first in row 1\\)"),
    (lambda rows: rows[1].update(delta_vp_pct="-35%"), "row 2 \\(L002\\): delta_vp_pct = '-35%' is not a number"),
    (lambda rows: [r.update(outcome="success") for r in rows], "no lesion has outcome 'failure'"),
])
def test_bad_cohorts_name_the_row(change, message):
    rows = cohort.synthetic_cohort(n_success=5, n_failure=3)
    change(rows)
    with pytest.raises(ValueError, match=message):
        cohort.cohort_from_rows(rows)
    with pytest.raises(ValueError, match="has no lesion rows"):
        cohort.cohort_from_rows([])


def test_figures_are_written_as_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib", reason="figures need matplotlib (Slicer does not bundle it)")
    from matplotlib.colors import to_hex

    from DCEPerfusionLib import figures
    c = cohort.cohort_from_rows(cohort.synthetic_cohort(seed=2))
    v = c.measures["delta_vp_pct"]
    wf = figures.waterfall(v, c.failure, cutoff_pct=-20)
    bars = wf.axes[0].patches
    assert len(bars) == 49
    heights = [b.get_height() for b in bars]
    assert heights == sorted(heights, reverse=True)                     # sorted from the largest rise
    n_fail_colour = sum(to_hex(b.get_facecolor()) == figures.COLOURS["failure"] for b in bars)
    assert n_fail_colour == c.n_failure
    legend = wf.axes[0].get_legend()                                   # the legend shows the bars' colours
    assert [to_hex(h.get_facecolor()) for h in legend.legend_handles] == [figures.COLOURS["failure"],
                                                                          figures.COLOURS["success"]]
    rep = cohort.cohort_report(c)
    roc_fig = figures.roc_curves({k: m.roc for k, m in rep.measures.items()})
    assert len(roc_fig.axes[0].get_legend().get_texts()) == 2
    for line in roc_fig.axes[0].get_lines()[:-1:2]:                   # each curve, not its dot or the diagonal
        x, y = line.get_data()
        assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0), "an ROC curve must not run backwards"
    box = figures.box_strip(v, c.failure)
    for name, fig in (("waterfall", wf), ("roc", roc_fig), ("box", box)):
        png, svg = figures.save(fig, str(tmp_path / name))
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and "<svg" in open(svg).read(2000)
