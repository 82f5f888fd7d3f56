"""Core data types shared by datasets, detectors, metrics and the apps."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

# Anything a detector accepts as one image: an (H, W, 3) uint8 RGB array, a PIL image or a file path.
ImageLike = Union[np.ndarray, Image.Image, str, Path]


@dataclass
class Sample:
    """One labelled image of a dataset.

    image: (H, W, 3) uint8 RGB. mask: (H, W) bool, True where defective (all False for a good image).
    label: 0 for good, 1 for anomalous. defect_type: "good" or the defect folder name.
    """

    image: np.ndarray
    label: int
    mask: np.ndarray
    path: str
    defect_type: str = "good"


@dataclass
class Item:
    """One decoded image of a stream (``clad.pipeline``): a ``Sample`` whose ground truth may be unknown.

    image: (H, W, 3) uint8 RGB. path: its file. name: its path relative to the source's root (outputs mirror it).
    label (0 good / 1 anomalous), mask ((H, W) bool) and defect_type: from a labelled source, else None.
    """

    image: np.ndarray
    path: str
    name: str
    label: int | None = None
    mask: np.ndarray | None = None
    defect_type: str | None = None


@dataclass
class Prediction:
    """One image's prediction as a stream hands it to its sinks.

    item: the decoded input. score: image anomaly score. anomaly_map: (H, W) float32 at the image's resolution.
    label: the decision (True = anomalous) when a threshold is set, else None. explanation: when one was asked for.
    score_normalized: the score on the scale where the threshold is 0.5 (``AnomalyResult.normalized_scores``).
    """

    item: Item
    score: float
    anomaly_map: np.ndarray
    label: bool | None = None
    explanation: object | None = None
    score_normalized: float | None = None

    @property
    def path(self) -> str:
        return self.item.path


@dataclass
class AnomalyResult:
    """What every detector's ``predict`` returns.

    scores: (B,) float32 image anomaly scores, higher is more anomalous.
    anomaly_maps: B float32 maps, each (H_i, W_i) at its input image's own resolution.
    threshold: the decision threshold on ``scores`` when one is set, else None.
    labels: (B,) bool decisions (scores > threshold) when a threshold is set.
    explanations: one explanation per image when asked for.
    normalized_scores: (B,) float32 in [0, 1], a monotone map of ``scores`` that puts the threshold at 0.5, when
        the detector has a threshold and its scale (``clad.detectors.thresholds.normalize``); ``scores`` stay raw.
    """

    scores: np.ndarray
    anomaly_maps: list[np.ndarray]
    threshold: float | None = None
    labels: np.ndarray | None = None
    explanations: list | None = None
    extras: dict = field(default_factory=dict)
    normalized_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def stacked_maps(self) -> np.ndarray:
        """(B, H, W) array of the maps; all images must share one size."""
        shapes = {m.shape for m in self.anomaly_maps}
        if len(shapes) > 1:
            raise ValueError(f"anomaly maps differ in size ({sorted(shapes)}); use .anomaly_maps")
        return np.stack(self.anomaly_maps) if self.anomaly_maps else np.zeros((0, 0, 0), np.float32)

    @staticmethod
    def concat(parts: Sequence["AnomalyResult"]) -> "AnomalyResult":
        """Join results of consecutive batches into one."""
        if not parts:
            return AnomalyResult(np.zeros(0, np.float32), [])
        threshold = parts[0].threshold
        labels = None
        if threshold is not None:
            labels = np.concatenate([p.labels for p in parts])
        explanations = None
        if all(p.explanations is not None for p in parts):
            explanations = [e for p in parts for e in p.explanations]
        normalized = None
        if all(p.normalized_scores is not None for p in parts):
            normalized = np.concatenate([p.normalized_scores for p in parts]).astype(np.float32)
        return AnomalyResult(
            scores=np.concatenate([p.scores for p in parts]).astype(np.float32),
            anomaly_maps=[m for p in parts for m in p.anomaly_maps],
            threshold=threshold,
            labels=labels,
            explanations=explanations,
            normalized_scores=normalized,
        )
