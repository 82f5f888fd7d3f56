"""What a detector can do beyond ``fit`` / ``predict``, declared rather than guessed from its name.

Class attributes on ``Detector`` (``clad.detectors.base``):
- ``score_is_map_max``: the image score is the largest value of the anomaly map, so an image threshold is also a
  map threshold. A detector whose answer depends on its settings declares ``from_config(rule)``.
- ``can_add_references``: ``add_references(images)`` (``AddsReferences``) adds normal references without a refit.
  Every ``Detector`` has the method; on one that does not declare the capability it raises ``TeachingError``.
- ``fits_without_references``: zero-shot, ``fit([])`` prepares it (no references, so no threshold is set): what
  ``--shots 0`` needs (WinCLIP with ``few_shot=False``).

Protocols (``isinstance(detector, Protocol)`` checks that the methods exist):
- ``ImageTextSpace``: texts and image patches embedded in one space (explanations rank defect types by it);
- ``GradCAM``: Grad-CAM maps of the detector's score, the detector left unchanged;
- ``PatchFeatures``: frozen patch features, for the explainer's catalogue and nearest normal patch
  (``BackbonePatchFeatures`` gives them from a detector's ``backbone`` / ``layers`` / ``image_size`` settings).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from clad.data.io import load_batch
from clad.ops.features import patch_embeddings
from clad.types import ImageLike

if TYPE_CHECKING:
    from clad.detectors.base import Detector


class from_config:
    """A capability that depends on the settings: on a detector, ``rule(detector.config)``; on its class, ``rule``
    of the default settings (``cls.Config()``)."""

    def __init__(self, rule: Callable[[object], bool]):
        self.rule = rule

    def __get__(self, detector, owner) -> bool:
        return bool(self.rule(owner.Config() if detector is None else detector.config))


@runtime_checkable
class ImageTextSpace(Protocol):
    """Texts and image patches in one shared, L2-normalised space."""

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> (N, D)."""

    def embed_patches(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """B images -> (B, D, h, w) on the detector's working grid."""

    def trained_descriptions(self) -> list[tuple[str, str]]:
        """The (kind, description) pairs the space was trained with ("normal" among the kinds); may be empty."""


@runtime_checkable
class GradCAM(Protocol):
    """Grad-CAM (CLAD's Eq. 5) of the detector's score w.r.t. its backbone's activations."""

    def gradcam(self, images: Sequence[ImageLike], batch_size: int = 16) -> list[np.ndarray]:
        """One non-negative (H_i, W_i) map per image, at its own size."""


@runtime_checkable
class PatchFeatures(Protocol):
    """Frozen patch features of images."""

    def patch_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """B images -> (B, C, h, w)."""


@runtime_checkable
class AddsReferences(Protocol):
    """Normal references added to a fitted detector without a refit (working where ``can_add_references``)."""

    def add_references(self, images: Sequence[ImageLike]) -> "Detector":
        """Teach the images as normal; returns the detector."""


class BackbonePatchFeatures:
    """Mixin for a ``Detector`` with ``backbone``, ``layers`` and ``image_size`` settings: ``patch_features`` are
    its backbone's first two ``layers``, 3x3-aggregated on the first one's grid."""

    def patch_features(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """B images -> (B, C, h, w) frozen backbone features."""
        bb, cfg = self._backbone(), self.config
        arrays, _ = load_batch(images)
        return patch_embeddings(bb, bb.preprocess(arrays, cfg.image_size), tuple(cfg.layers)[:2])
