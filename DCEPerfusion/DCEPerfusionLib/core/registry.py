"""The one registry of models and maps, and of the other choices a user makes: per model its parameters
(in fit order), the maps it makes and whether a linear fit exists; per map its title, unit, display
window, fit bounds and whether 0 means "not fitted"; the AIF sources, fit methods, motion corrections,
contrast agents with their relaxivities, and the colours of the calls. ``fitting``, ``regionstats``, the scene output, the
Slicer module's choices and the report read from here, so a model or a map is added in one place.

Plain Python (no numpy), so the Slicer module can build its choices from it at import time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MapInfo:
    """One map. ``unit``: "1/min", "1" (a fraction), "ml/100ml/min", "s" or "code"; ``window``: the
    display range (min, max) in that unit, the ranges a radiologist compares across exams; ``bounds``:
    the default fit bounds of a fitted parameter (None for derived and diagnostic maps);
    ``zero_is_unfitted``: non-negative by its bounds, shown transparent at 0 (voxels not fitted);
    ``statistics``: summarised per region (statistics.csv, the scene's table) - not the status and model
    codes, the AICc or the standard-error maps (a voxel's SE, not the spread of a region)."""

    key: str
    title: str
    unit: str
    window: tuple
    bounds: tuple | None = None
    zero_is_unfitted: bool = False
    description: str = ""
    statistics: bool = True


@dataclass(frozen=True)
class ModelInfo:
    """One tracer-kinetic model. ``parameters`` are fitted in this order; ``maps`` are what a fit writes
    (the parameters and derived maps such as kep; r2, status and - with uncertainty - the ``<map>_se``
    maps of :func:`uncertainty_maps` always come too); ``linear``: a linear (Murase) fit exists;
    ``ident``: the name of its member in the Slicer module's enum. ``auto`` is no model of its own: per
    voxel the best of ``AUTO_CANDIDATES`` by AICc (``fitting`` documents the rule and the codes)."""

    key: str
    title: str
    ident: str
    parameters: tuple
    maps: tuple
    linear: bool
    reference: str = ""


MAPS = {m.key: m for m in (
    MapInfo("ktrans", "Ktrans", "1/min", (0.0, 0.5), (0.0, 5.0), True, "volume transfer constant"),
    MapInfo("ve", "ve", "1", (0.0, 0.8), (0.0, 1.0), True, "extravascular extracellular volume fraction"),
    MapInfo("vp", "vp", "1", (0.0, 0.2), (0.0, 1.0), True, "plasma volume fraction"),
    MapInfo("kep", "kep", "1/min", (0.0, 2.0), None, True, "rate constant Ktrans/ve"),
    MapInfo("fp", "Fp", "ml/100ml/min", (0.0, 100.0), (0.0, 200.0), True, "plasma flow"),
    MapInfo("ps", "PS", "1/min", (0.0, 0.5), (0.0, 5.0), True, "permeability-surface area product"),
    MapInfo("r2", "fit R2", "1", (0.0, 1.0), None, False, "coefficient of determination of the fit"),
    MapInfo("delay_s", "delay", "s", (0.0, 20.0), (-10.0, 10.0), False, "arterial delay"),
    MapInfo("status", "fit status", "code", (0.0, 6.0), None, False, "fit status code (0 = ok)", False),
    # per voxel model choice (model="auto")
    MapInfo("model_choice", "model (AICc)", "code", (0.0, 3.0), None, True,
            "model chosen by AICc: 1 Patlak, 2 Tofts, 3 Extended Tofts (0 = not fitted)", False),
    MapInfo("aicc", "AICc", "1", (-1000.0, 0.0), None, False,
            "corrected Akaike information criterion of the chosen model (Burnham & Anderson 2002), from the "
            "residual sum of squares in mM^2", False),
    # standard errors (fitting.fit(uncertainty=True)): the parameter's unit
    MapInfo("ktrans_se", "Ktrans SE", "1/min", (0.0, 0.1), None, True, "standard error of Ktrans", False),
    MapInfo("ve_se", "ve SE", "1", (0.0, 0.2), None, True, "standard error of ve", False),
    MapInfo("vp_se", "vp SE", "1", (0.0, 0.05), None, True, "standard error of vp", False),
    MapInfo("kep_se", "kep SE", "1/min", (0.0, 0.5), None, True, "standard error of kep (delta method)", False),
    MapInfo("fp_se", "Fp SE", "ml/100ml/min", (0.0, 25.0), None, True, "standard error of Fp", False),
    MapInfo("ps_se", "PS SE", "1/min", (0.0, 0.1), None, True, "standard error of PS", False),
)}

MODELS = {m.key: m for m in (
    ModelInfo("extended_tofts", "Extended Tofts", "EXTENDED_TOFTS", ("ktrans", "ve", "vp"),
              ("ktrans", "ve", "vp", "kep"), True, "Tofts et al., JMRI 1999;10:223"),
    ModelInfo("tofts", "Tofts", "TOFTS", ("ktrans", "ve"), ("ktrans", "ve", "kep"), True,
              "Tofts et al., JMRI 1999;10:223"),
    ModelInfo("patlak", "Patlak", "PATLAK", ("ktrans", "vp"), ("ktrans", "vp"), True,
              "Patlak et al., J Cereb Blood Flow Metab 1983;3:1"),
    ModelInfo("2cxm", "Two-compartment exchange", "TWO_COMPARTMENT_EXCHANGE", ("fp", "ps", "ve", "vp"),
              ("fp", "ps", "ve", "vp"), False, "Brix et al., MRM 2004;52:420"),
    ModelInfo("auto", "Best by AICc (Patlak/Tofts/Extended Tofts)", "BEST_BY_AICC", ("ktrans", "ve", "vp"),
              ("ktrans", "ve", "vp", "kep", "model_choice", "aicc"), True,
              "Burnham & Anderson, Model Selection and Multimodel Inference, 2nd ed. 2002"),
)}
MODEL_ALIASES = {"etm": "extended_tofts", "extended-tofts": "extended_tofts", "two_compartment_exchange": "2cxm",
                 "aicc": "auto"}
#: The models ``auto`` chooses from, in the order of their ``model_choice`` codes (1, 2, 3).
AUTO_CANDIDATES = ("patlak", "tofts", "extended_tofts")

#: Arterial input sources: key -> title. Population curves start at the first frame after the baseline.
AIF_SOURCES = {"parker": "Population: Parker", "georgiou": "Population: Georgiou", "weinmann": "Population: Weinmann",
               "fritz_hansen": "Population: Fritz-Hansen", "segment": "Artery segment (image-derived)",
               "automatic": "Automatic detection", "prescribed": "Prescribed curve (a table of times and mM)"}
#: AIF sources that need a curve from outside the DCE series (a file or a table).
PRESCRIBED_AIF_SOURCES = ("prescribed",)

#: Longitudinal relaxivities in plasma at 37 C, 1/(mM s), keyed by (agent, field strength in T).
#: Source: Rohrer M, Bauer H, Mintorovitch J, Requardt M, Weinmann HJ. Comparison of magnetic
#: properties of MRI contrast media solutions at different magnetic field strengths.
#: Invest Radiol 2005;40:715-724 (Table 1, plasma) - the values the QIBA DCE profile quotes.
RELAXIVITY_PER_MM_S = {
    ("gadobutrol", 1.5): 5.2,
    ("gadobutrol", 3.0): 5.0,
    ("gadoterate", 1.5): 3.6,
    ("gadoterate", 3.0): 3.5,
    ("gadopentetate", 1.5): 4.1,
    ("gadopentetate", 3.0): 3.7,
}

#: Trade and common names accepted by :func:`relaxivity`.
AGENT_ALIASES = {
    "gadavist": "gadobutrol", "gadovist": "gadobutrol", "gd-bt-do3a": "gadobutrol",
    "dotarem": "gadoterate", "clariscan": "gadoterate", "gd-dota": "gadoterate",
    "gadoterate meglumine": "gadoterate",
    "magnevist": "gadopentetate", "gd-dtpa": "gadopentetate",
    "gadopentetate dimeglumine": "gadopentetate",
}

#: Defaults of the analysis options (:class:`options.AnalysisOptions`) - here, so that the Slicer module's
#: parameter node can take the same values at import time.
DEFAULT_OPTIONS = {"t10_s": 1.4, "t1_map_unit": "auto", "contrast_agent": "gadobutrol", "field_strength_t": 3.0,
                   "aif_source": "parker", "hct": 0.42, "model": "extended_tofts", "method": "nlls",
                   "motion_correction": "none", "motion_reference_frames": 5}

#: The motion corrections a user can choose (:mod:`motion`): key -> title (the command line's choices, the
#: module's list).
MOTION_CORRECTIONS = {"none": "None", "rigid": "Rigid (6 degrees of freedom)",
                      "affine": "Affine (12 degrees of freedom)",
                      "model": "Model-driven rigid (registered to the fitted model's frames)"}

#: The response call: "suspected failure" when ΔVp (%) is above this cut-off (Kumar et al., Technol Cancer
#: Res Treat 2017; AJNR 2023;44:1451), the size call "progression" at this growth of the longest
#: diameter (%, RECIST 1.1), and the lesion statistics that can be compared (the first is the default).
VP_CUTOFF_PCT = -20.0
SIZE_PROGRESSION_PCT = 20.0
RESPONSE_STATISTICS = ("mean", "median", "percentile_90", "hotspot_peak", "top10_mean")
#: The maps whose percent changes a response reports (vp makes the call).
RESPONSE_MAPS = ("vp", "ktrans", "ve", "kep")

#: Fit methods: key -> title.
METHODS = {"nlls": "Nonlinear least squares", "lls": "Linear least squares (fast)"}

#: Colours of the response calls and outcomes (figures, report, tables, the module's result text).
CALL_COLOURS = {"success": "#1b9e77", "suspected failure": "#d95f02", "indeterminate": "#777777"}
OUTCOME_COLOURS = {"success": "#1b9e77", "failure": "#d95f02", "size": "#7570b3", "vp": "#d95f02"}

#: Contrast agents with relaxivity presets (the default first) and the field strengths (T) they have.
CONTRAST_AGENTS = tuple(sorted({agent for agent, _ in RELAXIVITY_PER_MM_S}, key=lambda a: (a != "gadobutrol", a)))
FIELD_STRENGTHS_T = tuple(sorted({field for _, field in RELAXIVITY_PER_MM_S}))


def model(name: str) -> ModelInfo:
    """The model called ``name`` (aliases such as "etm" accepted); ValueError naming the choices."""
    key = MODEL_ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in MODELS:
        raise ValueError(f"model={name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[key]


def default_bounds() -> dict:
    """{parameter: (lower, upper)} fit bounds of every fitted parameter and of the delay (s)."""
    return {k: m.bounds for k, m in MAPS.items() if m.bounds is not None}


def se_key(name: str) -> str:
    """The key of the standard-error map of the map ``name`` (e.g. "ktrans" -> "ktrans_se")."""
    return f"{name}_se"


def uncertainty_maps(model_key: str) -> tuple:
    """The standard-error maps a fit of ``model_key`` makes with uncertainty: one per map of the model
    that has one (the fitted parameters and kep)."""
    return tuple(se_key(m) for m in MODELS[model_key].maps if se_key(m) in MAPS)


def statistics_maps(names) -> list:
    """Those of the map names ``names`` that region statistics summarise (``MapInfo.statistics``; names
    not in :data:`MAPS` are kept)."""
    return [k for k in names if k not in MAPS or MAPS[k].statistics]


def overlay_choices() -> list:
    """Maps a user may show over the anatomy: every map that has a quantity to colour."""
    return [k for k, m in MAPS.items() if m.key != "status"]
