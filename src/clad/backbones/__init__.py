"""Visual and text backbones behind one contract. Importing this package registers them."""
from clad.backbones import efficientnet, tiny  # noqa: F401
from clad.backbones import clip  # noqa: F401
from clad.backbones.base import Backbone, FeatureInfo

__all__ = ["Backbone", "FeatureInfo"]
