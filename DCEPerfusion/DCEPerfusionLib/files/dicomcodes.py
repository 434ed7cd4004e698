"""The codes DCEPerfusion's DICOM results use: units (UCUM), quantities (DCM CID 4107 Tracer Kinetic Model
Parameters where DICOM has one, else our private coding scheme :data:`SCHEME`), segment categories and
types (SNOMED CT, PS3.16 CID 7150 / 7151), as plain tuples (value, scheme, meaning) so that this module
needs no DICOM library; :func:`coded` turns one into a highdicom ``CodedConcept``.

Private codes (PS3.16 8.2 "private coding schemes"): designator "99DCEPERF", declared in each object's
Coding Scheme Identification Sequence by the writers.
"""

from __future__ import annotations

#: Our private coding scheme: designator, name, responsible organisation.
SCHEME = "99DCEPERF"
SCHEME_NAME = "DCEPerfusion codes"
SCHEME_ORGANISATION = "DCEPerfusion (3D Slicer extension)"

#: UCUM code and meaning per registry unit (registry.MapInfo.unit).
UNITS = {"1/min": ("/min", "UCUM", "/min"), "1": ("1", "UCUM", "no units"),
         "ml/100ml/min": ("mL/(100.mL)/min", "UCUM", "ml/100 ml/min"), "s": ("s", "UCUM", "second"),
         "code": ("{code}", "UCUM", "code")}
PERCENT = ("%", "UCUM", "percent")
MILLIMETRE = ("mm", "UCUM", "millimeter")

#: The quantity a map holds (Real World Value Mapping's Quantity Definition; the SR's concept names).
QUANTITIES = {
    "ktrans": ("126312", "DCM", "Ktrans"),
    "kep": ("126313", "DCM", "kep"),
    "ve": ("126314", "DCM", "ve"),
    "vp": ("126331", "DCM", "vp"),
    "fp": ("FP", SCHEME, "Plasma flow (Fp)"),
    "ps": ("PS", SCHEME, "Permeability-surface area product (PS)"),
    "r2": ("R2FIT", SCHEME, "Coefficient of determination of the fit"),
    "delay_s": ("DELAY", SCHEME, "Arterial delay"),
    "status": ("STATUS", SCHEME, "Fit status code (0 = ok)"),
    "model_choice": ("MODEL", SCHEME, "Model chosen by AICc"),
    "aicc": ("AICC", SCHEME, "Corrected Akaike information criterion"),
}
#: The standard error of a fitted parameter (maps "<parameter>_se").
SE_SUFFIX = "_se"


def quantity(name: str) -> tuple:
    """(value, scheme, meaning) of the quantity of the map ``name`` (a parameter or its standard error)."""
    if name.endswith(SE_SUFFIX):
        value, _, meaning = QUANTITIES[name[:-len(SE_SUFFIX)]]
        return (f"SE-{value}", SCHEME, f"Standard error of {meaning}")
    return QUANTITIES[name]


#: Segment (category, type) by role (PS3.16 CID 7150 Segmentation Property Categories, CID 7151 Types).
SEGMENT_CODES = {
    "lesion": (("49755003", "SCT", "Morphologically Abnormal Structure"), ("52988006", "SCT", "Lesion")),
    "reference": (("85756007", "SCT", "Tissue"), ("14016003", "SCT", "Bone Marrow")),
    "aif": (("91723000", "SCT", "Anatomical Structure"), ("51114001", "SCT", "Artery")),
}
#: The algorithm family of the automatic AIF detection (PS3.16 CID 7162 is extensible; none of its codes
#: names a ranking of curve shapes, core.aif.detect's method after Mouridsen et al. MRM 2006;55:524).
AIF_DETECTION_FAMILY = ("AIFRANK", SCHEME, "Curve-shape ranking of arterial voxels")


def coded(code: tuple):
    """A highdicom ``CodedConcept`` of (value, scheme, meaning)."""
    from highdicom.sr import CodedConcept
    return CodedConcept(*code)


def private_scheme_item():
    """The Coding Scheme Identification Sequence item declaring :data:`SCHEME` (PS3.3 C.12.1.1.5)."""
    from pydicom.dataset import Dataset
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = SCHEME_ORGANISATION
    return item
