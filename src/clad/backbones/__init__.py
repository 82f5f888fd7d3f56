"""Visual and text backbones behind one contract. ``clad.registry`` lists and builds them by name."""
from clad.backbones.base import Backbone, FeatureInfo

__all__ = ["Backbone", "FeatureInfo"]
