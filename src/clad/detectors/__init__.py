"""Detectors. Importing this package registers every built-in detector."""
from clad.detectors import clad, patch_knn  # noqa: F401
from clad.detectors import winclip  # noqa: F401
from clad.detectors import padim, patchcore, spade  # noqa: F401
from clad.detectors.base import Detector, load_detector

__all__ = ["Detector", "load_detector"]
