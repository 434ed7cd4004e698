"""The one options record of an analysis: every choice a user makes, with one set of names (units in
the names), one set of defaults, and the checks that need no data. The Slicer module's parameter node,
the command line and :meth:`DCEPerfusionLogic.process` only fill it in; the chain
(:func:`pipeline.analyse`) reads it; ``summary.json`` stores it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import aif, motion, rician
from ._checks import check_flip_angle_deg, check_positive
from .concentration import relaxivity
from .fitting import check_model_method
from .plausibility import check_flip_angle_deg as plausibility_flip
from .plausibility import check_t1_s, check_tr_s
from .registry import DEFAULT_OPTIONS, FIELD_STRENGTHS_T

#: A header field strength this close to a preset's field (T) uses that preset (scanners write their
#: exact field: 2.89 T for Siemens' 3 T, 1.494 T for 1.5 T).
FIELD_PRESET_TOLERANCE_T = 0.25

_D = DEFAULT_OPTIONS


@dataclass
class AnalysisOptions:
    """How to analyse one exam.

    n_baseline        pre-contrast frames before the bolus arrives (the first frames); None: detected from
                      the signal (:mod:`bolus`).
    tr_s              repetition time, s; None: from the series header (DICOM, MultiVolume, BIDS).
    flip_angle_deg    flip angle, degrees; None: from the series header.
    frame_interval_s  time between frames, s, for series without frame times; one that contradicts the
                      series' own frame times is refused ...
    override_frame_times  ... unless this is set: then it replaces them.
    t10_s             constant pre-contrast T1, s, used where no T1 map is given.
    t1_map_unit       unit of a T1 map: "s", "ms" or "auto" (median above 10 means ms).
    blood_t10_s       pre-contrast T1 of blood, s, used inside the AIF segment (about 1.5 s at 1.5 T,
                      1.6-1.9 s at 3 T); None: the tissue T10 there.
    contrast_agent, field_strength_t
                      the relaxivity preset (Rohrer et al. 2005); field None: the series header's
                      MagneticFieldStrength, else ``registry.DEFAULT_OPTIONS`` (3 T) ...
    r1_per_mM_s       ... or the relaxivity itself, 1/(mM s), which then wins.
    aif_source        one of ``aif.SOURCES``: a population curve (starting after the baseline), "segment"
                      (mean of the artery segment) or "automatic".
    hct               hematocrit, fraction.
    model, method     a ``registry.MODELS`` key and "nlls" or "lls".
    fit_delay         also fit the arterial delay (s).
    fit_lesions_only  fit only the voxels of the lesion segments (faster; maps empty elsewhere).
    noise_sigma       Rician noise of the magnitude series, sigma of one sample in signal units, or "auto"
                      (estimated from the baseline frames); None: no correction (:mod:`rician`).
    uncertainty       also the standard-error maps ``<map>_se`` (same unit as the map; :mod:`fitting`).
    motion_correction one of ``motion.MOTION_CORRECTIONS``: "none", "rigid", "affine" or "model" (model-driven
                      rigid) - every frame registered to the reference before the concentration (:mod:`motion`).
    motion_reference_frames  the reference is the mean of this many last frames (enhancement plateau).
    """

    n_baseline: int | None = None
    tr_s: float | None = None
    flip_angle_deg: float | None = None
    frame_interval_s: float | None = None
    override_frame_times: bool = False
    t10_s: float = _D["t10_s"]
    t1_map_unit: str = _D["t1_map_unit"]
    blood_t10_s: float | None = None
    contrast_agent: str = _D["contrast_agent"]
    field_strength_t: float | None = None
    r1_per_mM_s: float | None = None
    aif_source: str = _D["aif_source"]
    hct: float = _D["hct"]
    model: str = _D["model"]
    method: str = _D["method"]
    fit_delay: bool = False
    fit_lesions_only: bool = False
    noise_sigma: float | str | None = None
    uncertainty: bool = True
    motion_correction: str = _D["motion_correction"]
    motion_reference_frames: int = _D["motion_reference_frames"]

    def field(self, header_field_t: float | None = None) -> tuple:
        """(field strength in T for the relaxivity preset, where it came from): the given field, else the
        series header's (``header_field_t``), else the default."""
        if self.field_strength_t is not None:
            return float(self.field_strength_t), "given"
        if header_field_t:
            field = float(header_field_t)
            preset = min(FIELD_STRENGTHS_T, key=lambda f: abs(f - field))
            if field == preset:
                return preset, "series header (MagneticFieldStrength)"
            if abs(preset - field) <= FIELD_PRESET_TOLERANCE_T:          # a 3 T Siemens writes 2.89362
                return preset, f"series header (MagneticFieldStrength {field:g} T: the {preset:g} T preset)"
            return field, "series header (MagneticFieldStrength)"
        return float(_D["field_strength_t"]), "default"

    def relaxivity(self, header_field_t: float | None = None) -> tuple:
        """(r1 in 1/(mM s), where it came from): the given r1, or the agent's preset at :meth:`field`."""
        if self.r1_per_mM_s is not None:
            return check_positive(self.r1_per_mM_s, "relaxivity r1", unit="1/(mM s)"), "given"
        field, field_source = self.field(header_field_t)
        r1 = relaxivity(self.contrast_agent, field)
        return r1, f"{self.contrast_agent} at {field:g} T (field: {field_source}; Rohrer et al., Invest Radiol 2005)"

    def checked(self) -> "AnalysisOptions":
        """A copy with the model name resolved, after every check that needs no data; ValueError naming
        the option and the fix otherwise."""
        if self.aif_source not in aif.SOURCES:
            raise ValueError(f"AIF source {self.aif_source!r}: use one of {', '.join(aif.SOURCES)}")
        model = check_model_method(self.model, self.method)
        n_baseline = None
        if self.n_baseline is not None:
            try:
                n_baseline = int(self.n_baseline)
            except (TypeError, ValueError):
                raise ValueError(f"number of baseline frames = {self.n_baseline!r}: give a whole number") from None
            if n_baseline < 1 or n_baseline != float(self.n_baseline):
                raise ValueError(f"number of baseline frames = {self.n_baseline}: must be a whole number of at least 1 "
                                 "(pre-contrast frames before the bolus arrives; leave it out to detect it)")
        if self.tr_s is not None:
            check_tr_s(check_positive(self.tr_s, "TR", unit="s"), "given")
        if self.flip_angle_deg is not None:
            check_flip_angle_deg(self.flip_angle_deg, "flip angle")
            plausibility_flip(float(self.flip_angle_deg), "given")
        if self.frame_interval_s is not None:
            check_positive(self.frame_interval_s, "frame interval", unit="s")
        check_t1_s(check_positive(self.t10_s, "T10 (constant pre-contrast T1)", unit="s"),
                   "T10 (constant pre-contrast T1)")
        if self.t1_map_unit not in ("s", "ms", "auto"):
            raise ValueError(f"T1 map unit {self.t1_map_unit!r}: use 's', 'ms' or 'auto'")
        if self.blood_t10_s is not None:
            check_t1_s(check_positive(self.blood_t10_s, "blood T10 (pre-contrast T1 in the AIF segment)", unit="s"),
                       "blood T10 (pre-contrast T1 in the AIF segment)")
        if self.field_strength_t is not None:
            check_positive(self.field_strength_t, "field strength", unit="T")
        self.relaxivity()
        if not 0 <= float(self.hct) < 1:
            raise ValueError(f"hematocrit = {self.hct}: must be a fraction in [0, 1), typically 0.42")
        noise_sigma = rician.check_sigma(self.noise_sigma, "noise sigma")
        if noise_sigma is not None and not isinstance(noise_sigma, (str, float)):
            raise ValueError(f"noise sigma = {self.noise_sigma!r}: give one number (signal units) or 'auto'")
        return dataclasses.replace(self, n_baseline=n_baseline, model=model, noise_sigma=noise_sigma,
                                   motion_correction=motion.check_choice(self.motion_correction),
                                   motion_reference_frames=motion.check_reference_frames(self.motion_reference_frames))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
