"""Results as rows and the JSON/CSV files they go into - one module for the command line, the batch and
the demo. Rows are flat dicts of numbers and strings; the files are strict JSON (NaN and infinities are
written as null) and CSV, written under a temporary name and renamed.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from ..core.regionstats import ADDED_STAT_NAMES, CI_STAT_NAMES, STAT_NAMES, RegionStats
from .atomic import replacing


def check_free(path: str, overwrite: bool) -> None:
    """FileExistsError naming ``path`` when it exists and ``overwrite`` is not set."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists - choose another output folder or pass --overwrite")


def _strict(value):
    """``value`` with numpy scalars and arrays as Python numbers and lists, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return _strict(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str, data, overwrite: bool = False) -> str:
    """Strict JSON (no NaN literals) through a temporary name (:func:`atomic.replacing`)."""
    check_free(path, overwrite)
    text = json.dumps(_strict(data), indent=2, allow_nan=False)       # fails before anything is written
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_csv(path: str, rows: list, overwrite: bool = False) -> str:
    """Rows (dicts with the same keys) as CSV through a temporary name (:func:`atomic.replacing`)."""
    check_free(path, overwrite)
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


#: What :func:`read_json` tells to do when a file of this package is not as written.
REFIT = "give the output folder of 'dceperfusion fit'"


def _json_kind(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    return "a list" if isinstance(value, list) else "an object"


def _check_statistics(data, label: str) -> None:
    """ValueError unless ``data["statistics"]`` (when there) is a list of rows as :func:`statistics_rows`
    writes them: text segment, map and unit, whole voxel counts, numbers (or null) for the rest."""
    rows = data.get("statistics", [])
    fix = "fit the exam again"
    if not isinstance(rows, list):
        raise ValueError(f"{label}: its statistics are {_json_kind(rows)}, not a list of rows as 'dceperfusion fit' "
                         f"writes them - {fix}")
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{label}: its statistics are not as 'dceperfusion fit' writes them (row {n} is "
                             f"{_json_kind(row)}) - {fix}")
        for key in ("segment", "map", "unit", "voxel_count", "volume_cm3", "excluded_voxel_count", *STAT_NAMES):
            value = row.get(key, None if key in ADDED_STAT_NAMES else ...)
            if key in ("segment", "map", "unit"):
                ok = isinstance(value, str)
            elif key in ("voxel_count", "excluded_voxel_count"):
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            else:
                ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
            if not ok:
                what = "missing" if value is ... else _json_kind(value)
                raise ValueError(f"{label}: its statistics are not as 'dceperfusion fit' writes them (row {n}: "
                                 f"{key} is {what}) - {fix}")


#: Checks of the files :func:`read_json` knows, by their ``what``.
JSON_CHECKS = {"exam summary": _check_statistics}


#: Longest integer read from JSON (digits): Python's own limit since 3.11 and 3.9.14+, kept on every version.
MAX_INT_DIGITS = 4300


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def read_json(path: str, what: str, fix: str = REFIT, kind: type = dict, check=None):
    """A JSON file (UTF-8) whose top level is a ``kind`` (an object by default). ValueError starting with
    '<what> <path>' and ending with ``fix`` when it is missing, a folder, binary, not UTF-8, not valid
    JSON or nested too deeply, or not a ``kind``; then ``check(data, label)`` (default: the check
    :data:`JSON_CHECKS` has for ``what``, e.g. the statistics rows of an exam summary)."""
    from ..core.tables import read_text
    label = f"{what} {path}"
    text = read_text(path, label, fix)
    try:
        data = json.loads(text, parse_int=_int)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{label}: not valid JSON ({exc.msg}, line {exc.lineno}) - {fix}") from None
    except RecursionError:
        raise ValueError(f"{label}: nested too deeply to be a JSON file of this package - {fix}") from None
    except ValueError:                               # an integer of more than MAX_INT_DIGITS digits
        raise ValueError(f"{label}: not valid JSON (a number too long to read) - {fix}") from None
    if not isinstance(data, kind):
        want = "an object" if kind is dict else "a list" if kind is list else kind.__name__
        raise ValueError(f"{label}: is {_json_kind(data)}, not {want} - {fix}")
    (check or JSON_CHECKS.get(what, lambda d, lab: None))(data, label)
    return data


# ============================================================================================ rows
def statistics_rows(stats) -> list:
    """Region statistics as flat rows: segment, map, unit, counts, the statistics and their 95 % CIs
    (``<statistic>_ci_lower`` / ``_ci_upper``, map unit; None where the map has none)."""
    return [{"segment": r.segment, "map": r.map, "unit": r.unit, "voxel_count": r.voxel_count,
             "volume_cm3": r.volume_cm3, "excluded_voxel_count": r.excluded_voxel_count,
             **{k: r.values[k] for k in STAT_NAMES},
             **{f"{k}_ci_{side}": r.ci[k][i] if k in r.ci else None
                for k in CI_STAT_NAMES for i, side in enumerate(("lower", "upper"))}} for r in stats]


def bootstrap_rows(stats) -> dict:
    """{segment: {map: {statistic: [draws]}}} of the statistics that have bootstrap draws (summary.json's
    ``bootstrap``, read back by :func:`attach_draws` for the percent-change intervals of 'assess')."""
    out = {}
    for r in stats:
        if r.draws:
            out.setdefault(r.segment, {})[r.map] = {k: [float(f"{x:.6g}") for x in d] for k, d in r.draws.items()}
    return out


def attach_draws(stats, bootstrap) -> list:
    """Put summary.json's ``bootstrap`` draws back on the statistics rows (NaN for null); returns ``stats``."""
    if not isinstance(bootstrap, dict):
        return stats
    for r in stats:
        mine = (bootstrap.get(r.segment) or {}).get(r.map)
        if isinstance(mine, dict):
            r.draws = {k: np.array([np.nan if x is None else x for x in d], dtype=float) for k, d in mine.items()
                       if isinstance(d, list)}
    return stats


def statistics_from_rows(rows) -> list:
    """The inverse of :func:`statistics_rows` (rows read back from summary.json; null is NaN)."""
    nan = float("nan")
    def number(v):
        return nan if v is None else v
    return [RegionStats(r["segment"], r["map"], r["unit"], r["voxel_count"], r["volume_cm3"],
                        r["excluded_voxel_count"], {k: number(r.get(k)) for k in STAT_NAMES},
                        ci={k: (number(r.get(f"{k}_ci_lower")), number(r.get(f"{k}_ci_upper"))) for k in CI_STAT_NAMES
                            if r.get(f"{k}_ci_lower") is not None or r.get(f"{k}_ci_upper") is not None})
            for r in rows]


def response_rows(responses) -> list:
    """One row per lesion response: vp (and Ktrans, ve, kep: the same statistic) at both exams, the percent
    changes, the call, the size, the
    normal-marrow reference (its vp, the lesion/reference vp ratios and their change; None without one) and
    the warnings between the exams (joined by " | ")."""
    rows = []
    for r in responses:
        ref = getattr(r, "reference", None) or {}
        rows.append({"lesion": r.lesion, "statistic": r.statistic,
                     "vp_baseline": r.baseline.get("vp"), "vp_followup": r.followup.get("vp"),
                     **{f"{m}_{when}": values.get(m) for m in ("ktrans", "ve", "kep")
                        for when, values in (("baseline", r.baseline), ("followup", r.followup))},
                     "delta_vp_pct": r.change_pct.get("vp"), "delta_ktrans_pct": r.change_pct.get("ktrans"),
                     "delta_ve_pct": r.change_pct.get("ve"), "delta_kep_pct": r.change_pct.get("kep"),
                     "call": r.call.call, "reason": r.call.reason,
                     "longest_diameter_baseline_mm": r.size.baseline.longest_diameter_mm if r.size else None,
                     "longest_diameter_followup_mm": r.size.followup.longest_diameter_mm if r.size else None,
                     "delta_longest_diameter_pct": r.size.change_pct["longest_diameter"] if r.size else None,
                     "size_call": r.size.call if r.size else None,
                     "delta_vp_ci_lower_pct": _finite(r.call.delta_vp_ci_lower_pct),
                     "delta_vp_ci_upper_pct": _finite(r.call.delta_vp_ci_upper_pct),
                     "reference_segment": ref.get("segment"), "vp_reference_baseline": ref.get("vp_baseline"),
                     "vp_reference_followup": ref.get("vp_followup"), "vp_ratio_baseline": ref.get("vp_ratio_baseline"),
                     "vp_ratio_followup": ref.get("vp_ratio_followup"),
                     "delta_vp_ratio_pct": ref.get("delta_vp_ratio_pct"),
                     "warnings": " | ".join(getattr(r, "warnings", []))})
    return rows


def _finite(value):
    """A float, or None when not finite (a CSV/JSON cell)."""
    return float(value) if value is not None and np.isfinite(value) else None


def cohort_report_dict(rep) -> dict:
    """A :class:`cohort.CohortReport` as nested dicts (cohort_statistics.json)."""
    out = {"n_lesions": rep.n_lesions, "n_success": rep.n_success, "n_failure": rep.n_failure, "measures": {}}
    for name, m in rep.measures.items():
        p = m.performance
        out["measures"][name] = {
            "cutoff_pct": m.cutoff_pct, "mann_whitney_p": m.mann_whitney.p_value, "mann_whitney_method":
            m.mann_whitney.method, "auc": m.roc.auc, "auc_ci_delong": m.roc.auc_ci,
            "youden_cutoff": m.roc.youden_cutoff,
            **{k: {"estimate": getattr(p, k).estimate, "k": getattr(p, k).k, "n": getattr(p, k).n,
                   "ci": getattr(p, k).ci} for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy")}}
    if rep.mcnemar is not None:
        out["mcnemar"] = {"only_vp_correct": rep.mcnemar.b, "only_size_correct": rep.mcnemar.c,
                          "p": rep.mcnemar.p_value}
    return out


def curves_rows(t_s, curves: dict) -> list:
    """The curves of an exam (:attr:`pipeline.ExamResult.curves`) as rows: time_s and one column each (mM)."""
    names = list(curves)
    return [{"time_s": float(t), **{n: float(curves[n][0][i]) for n in names}} for i, t in enumerate(t_s)]
