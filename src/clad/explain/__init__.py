"""Explanations a line operator can act on: where the anomaly is, what defect it resembles, in one sentence.

``explain(detector, images, result)`` -> one ``Explanation`` per image (regions with boxes, location words, peak,
ranked defect types, nearest normal patch; ``.sentence``; ``.to_dict()``). ``Catalogue`` holds annotated examples
per defect type; ``gradcam_maps`` gives Eq. 5 maps of detectors that have them; ``clad.explain.quality`` measures
how often the named type is right. What a detector offers is read from its declarations
(``clad.detectors.capabilities``), never from its name.
"""
from clad.explain.catalogue import Catalogue, Example
from clad.explain.explainer import Explainer, FeatureSpace, explain, gradcam_maps
from clad.explain.explanation import Explanation, NormalMatch, Region, TypeScore
from clad.explain.phrases import DEFECT_PHRASES, defect_descriptions, defect_phrase
from clad.explain.regions import extract_regions, location_words

__all__ = [
    "Catalogue",
    "DEFECT_PHRASES",
    "Example",
    "Explainer",
    "Explanation",
    "FeatureSpace",
    "NormalMatch",
    "Region",
    "TypeScore",
    "defect_descriptions",
    "defect_phrase",
    "explain",
    "extract_regions",
    "gradcam_maps",
    "location_words",
]
