"""The label-free decision threshold every detector sets at fit, and the normalised score built on it.

Views of the references, never test images: mildly jittered copies (normal), and as many further copies with a
synthetic anomaly (``clad.synthesis``). The fitted detector scores both groups; the threshold is the F1-best cut
between them, moved down to the middle of the gap below it (``cut``). The normalised score is a logistic of
(score - threshold) / scale, so the threshold maps to 0.5; the scale comes from the spread of the two groups'
scores (``spread_scale``). docs/method.md ("Thresholds") says why this rule.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from clad.metrics import f1_max
from clad.synthesis import make_anomaly

MIN_VIEWS, MAX_VIEWS = 8, 16  # normal views (and as many anomalous ones): one per reference, within these bounds
# The median normal view and the median anomalous view are 2 ln 9 scales apart: about 0.1 and 0.9 when the
# threshold lies midway between them.
_MEDIANS_APART = 2 * math.log(9)


def resized(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bilinear: the first step of every view (``jitter``), which leaves
    an image of that size as it is."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def jitter(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A mild, label-preserving view of a reference, (size, size, 3) uint8: a shift of up to 3 % and a rotation of
    up to 3 degrees with the borders reflected (a black fill would read as a defect), brightness and contrast
    within 8 %."""
    a = resized(image, size)
    dy, dx = np.round(rng.uniform(-0.03, 0.03, 2) * size).astype(int)
    angle = float(rng.uniform(-3, 3))
    pad = max(abs(dy), abs(dx)) + math.ceil(size * math.sin(math.radians(3))) + 1
    a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    a = np.asarray(Image.fromarray(a).rotate(angle, resample=Image.BILINEAR))
    a = a[pad + dy : pad + dy + size, pad + dx : pad + dx + size].astype(np.float32)
    a = (a - a.mean()) * rng.uniform(0.92, 1.08) + a.mean() * rng.uniform(0.92, 1.08)
    return np.clip(a, 0, 255).astype(np.uint8)


def views(references: Sequence[np.ndarray], size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(normal views, as many views with a synthetic anomaly) of the references (H, W, 3) uint8: one of each per
    reference, at least ``MIN_VIEWS`` and at most ``MAX_VIEWS``, the references taken in a seeded order."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(references))
    n = min(max(len(references), MIN_VIEWS), MAX_VIEWS)
    ref = [references[order[i % len(order)]] for i in range(n)]
    normal = [jitter(r, rng, size) for r in ref]
    anomalous = [make_anomaly(jitter(r, rng, size), rng).image for r in ref]
    return normal, anomalous


def keep_references(kept: list[np.ndarray], seen: int, new: Sequence[np.ndarray], size: int,
                    seed: int) -> list[np.ndarray]:
    """The references that a taught detector's views are drawn from: ``kept``, the sample of the ``seen``
    references so far, updated with the ``new`` ones. A uniform sample of at most ``MAX_VIEWS`` of all the
    references (reservoir sampling; the draw for the t-th is seeded by (seed, t), so the sample does not depend on
    how the references were split between fit and teaching), each at the working size (``resized``). Up to
    ``MAX_VIEWS`` references it holds them all, in order: then ``views`` of it are those of the references."""
    kept = list(kept)
    for t, image in enumerate(new, start=seen):
        slot = t if t < MAX_VIEWS else int(np.random.default_rng([seed, t]).integers(t + 1))
        if slot == len(kept):
            kept.append(resized(image, size))
        elif slot < MAX_VIEWS:
            kept[slot] = resized(image, size)
    return kept


def cut(normal_scores: np.ndarray, anomalous_scores: np.ndarray) -> float:
    """The F1-best cut between normal and anomalous scores, moved down to the middle of the gap below it."""
    scores = np.r_[normal_scores, anomalous_scores]
    best = float(f1_max(np.r_[np.zeros(len(normal_scores)), np.ones(len(anomalous_scores))], scores)[1])
    # f1_max gives the highest of the F1-best cuts, right at the lowest synthetic anomaly kept: the middle of the
    # gap below it makes the same decisions on these images, and misses fewer real defects milder than them.
    below = scores[scores < best]
    return best if below.size == 0 else float((best + below.max()) / 2)


def spread_scale(normal_scores: np.ndarray, anomalous_scores: np.ndarray) -> float:
    """The normalisation's scale: the distance between the two groups' median scores over 2 ln 9 (> 0; the range
    of all the scores, or 1, where the medians do not differ)."""
    spread = float(np.median(anomalous_scores) - np.median(normal_scores))
    if not spread > 0:
        spread = float(np.ptp(np.r_[normal_scores, anomalous_scores])) or 1.0
    return spread / _MEDIANS_APART


def normalize(scores: np.ndarray, threshold: float, scale: float) -> np.ndarray:
    """Scores (B,) -> (B,) float32 in [0, 1], monotone, the threshold at 0.5: the logistic of (score - threshold) /
    scale, written with tanh, which does not overflow."""
    z = (np.asarray(scores, np.float64) - threshold) / scale
    return (0.5 + 0.5 * np.tanh(z / 2)).astype(np.float32)
