"""clad: industrial visual anomaly detection and localization with vision-language models."""
from clad.detectors.base import Detector, load_detector
from clad.registry import create_backbone, create_detector, list_backbones, list_detectors
from clad.types import AnomalyResult, Sample

__version__ = "0.3.0"

__all__ = [
    "AnomalyResult",
    "Detector",
    "Sample",
    "create_backbone",
    "create_detector",
    "list_backbones",
    "list_detectors",
    "load_detector",
]
