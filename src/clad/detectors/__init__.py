"""Detectors. ``clad.registry`` lists and builds them by name."""
from clad.detectors.base import Detector, load_detector

__all__ = ["Detector", "load_detector"]
