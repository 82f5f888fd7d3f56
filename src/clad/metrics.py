"""Anomaly detection metrics: pure functions on numpy arrays.

Image level: ``labels`` (B,) in {0, 1} (1 = anomalous) and ``scores`` (B,) float, higher is more anomalous.
Pixel level: ``masks`` and ``maps`` are stacked (B, H, W) arrays or sequences of (H_i, W_i) arrays whose sizes
may differ per image; a mask pixel is anomalous where it is nonzero. Pixel scores are compared in float32.

Every curve metric reads one exact curve (``_curve``): one stable argsort of the scores, then cumulative counts
taken at the end of each group of tied scores. Ties are therefore handled exactly, there is no threshold loop or
binning, and a VisA-sized pixel set (~65 M pixels) costs one float32 and one bool copy plus the index arrays.
A metric that is undefined for its input (e.g. only one class) is ``nan``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_BLOCK = 1 << 20  # curve points per chunk in _auroc, so that a 65 M-point curve needs no int64 copy of the whole


# ----------------------------------------------------------------------------------------------------- inputs


def _image_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(B,) labels in {0, 1} and (B,) scores -> bool (B,) and float64 (B,)."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"got {y.size} labels but {s.size} scores")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got values {np.unique(y)[:5].tolist()}")
        y = y == 1
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y, s


def _check_pairs(masks, maps) -> list[tuple[int, ...]]:
    """Shapes of the (mask, map) pairs; raises ValueError naming the first image whose shapes differ."""
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    shapes = []
    for i, (m, a) in enumerate(zip(masks, maps)):
        ms, sa = np.shape(m), np.shape(a)
        if ms != sa:
            raise ValueError(f"image {i}: mask shape {ms} != anomaly map shape {sa}")
        if len(ms) != 2:
            raise ValueError(f"image {i}: expected (H, W) mask and map, got shape {ms}")
        shapes.append(ms)
    return shapes


def _flatten(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate all pixels into one bool (N,) label array and one float32 (N,) score array.

    Each output is allocated once and filled image by image, so no float64 copy of the whole set is made.
    Raises ValueError naming the image index when a mask's shape differs from its map's.
    """
    sizes = [h * w for h, w in _check_pairs(masks, maps)]
    n = sum(sizes)
    y = np.empty(n, dtype=bool)
    s = np.empty(n, dtype=np.float32)
    start = 0
    for m, a, k in zip(masks, maps, sizes):
        y[start : start + k] = np.asarray(m).reshape(-1)  # nonzero -> True
        s[start : start + k] = np.asarray(a).reshape(-1)  # cast to float32 in place
        start += k
    if np.isnan(s).any():
        raise ValueError("anomaly maps contain NaN")
    return y, s


def _region_weights(masks) -> np.ndarray:
    """Weight 1 / (|r| * n_regions) of each anomalous pixel, in the row-major pixel order of ``_flatten``.

    Regions are the 8-connected components of each ground-truth mask. Returns (n_anomalous,) float64.
    """
    inv_sizes, n_regions = [], 0
    for m in masks:
        gt = np.asarray(m) != 0
        lab, n = ndimage.label(gt, structure=_EIGHT_CONNECTED)  # (H, W) region ids, 0 = normal
        if n:
            size = np.bincount(lab.reshape(-1), minlength=n + 1).astype(np.float64)
            inv_sizes.append(1.0 / size[lab[gt]])
        n_regions += n
    if not n_regions:
        return np.zeros(0)
    return np.concatenate(inv_sizes) / n_regions


# ------------------------------------------------------------------------------------------------ the curve


@dataclass
class _Curve:
    """Cumulative counts at the end of each tie group, scores descending (no origin point).

    At index g, ``tp[g]`` anomalous and ``fp[g]`` normal samples score >= ``thresholds[g]``; these arrays are
    (G,), G = number of distinct scores. When region weights were given, ``pro_cum`` (n_pos + 1,) holds the
    per-region overlap once the k highest-scoring anomalous samples are found, so PRO at g is ``pro_cum[tp[g]]``.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_pos: int
    n_neg: int
    pro_cum: np.ndarray | None = None


def _curve(y: np.ndarray, s: np.ndarray, weights: np.ndarray | None = None) -> _Curve:
    """The exact curve of labels ``y`` (N,) bool and scores ``s`` (N,), from one O(N log N) argsort.

    ``weights`` (n_anomalous,), when given, holds one weight per anomalous sample in input order; ``pro_cum`` is
    then their cumulative sum in score order.
    """
    n, n_pos = y.size, int(np.count_nonzero(y))
    if n == 0:
        empty = np.zeros(0, np.int64)
        return _Curve(s[:0], empty, empty, 0, 0, np.zeros(1) if weights is not None else None)
    order = np.argsort(s, kind="stable")[::-1]  # (N,) descending; order inside a tie group never matters
    s_sorted = s[order]
    y_sorted = y[order]
    pro_cum = None
    if weights is not None:
        # Reorder the per-anomalous-sample weights to score order: rank of each anomalous sample in input order.
        rank = np.searchsorted(np.flatnonzero(y), order[y_sorted])  # (n_pos,)
        pro_cum = np.concatenate([[0.0], np.cumsum(weights[rank])])  # (n_pos + 1,)
        np.minimum(pro_cum, 1.0, out=pro_cum)  # rounding in the sum may overshoot 1, as the MVTec code also clips
        del rank
    del order
    last = np.empty(n, dtype=bool)  # True at the last sample of each tie group
    np.not_equal(s_sorted[1:], s_sorted[:-1], out=last[:-1])
    last[-1] = True
    ends = np.flatnonzero(last)  # (G,)
    del last
    thresholds = s_sorted[ends]
    del s_sorted
    count_dtype = np.int32 if n < 2**31 else np.int64
    tp = np.cumsum(y_sorted, dtype=count_dtype)[ends]
    del y_sorted
    ends += 1
    ends -= tp  # now the normal count at each group end
    return _Curve(thresholds, tp, ends, n_pos, n - n_pos, pro_cum)


def _auroc(c: _Curve) -> float:
    """Trapezoid area under the ROC curve over tie groups: equal to the Mann-Whitney U / (P * N)."""
    if c.n_pos == 0 or c.n_neg == 0:
        return math.nan
    # Twice the area in count units, an exact integer: sum over groups of d_fp * (tp + tp_previous).
    twice, tp_prev, fp_prev = 0, 0, 0
    for i in range(0, c.tp.size, _BLOCK):
        tp, fp = c.tp[i : i + _BLOCK].astype(np.int64), c.fp[i : i + _BLOCK]
        d_fp = np.diff(fp, prepend=fp_prev)
        twice += int(np.dot(d_fp, tp)) + int(d_fp[0]) * tp_prev + int(np.dot(d_fp[1:], tp[:-1]))
        tp_prev, fp_prev = int(tp[-1]), int(fp[-1])
    return twice / (2 * c.n_pos * c.n_neg)


def _recall_steps(c: _Curve) -> np.ndarray:
    """(K,) indices of the thresholds where TP rises, K <= P: the only points where AP and the F1 maximum move."""
    return np.flatnonzero(np.diff(c.tp, prepend=0) > 0)


def _average_precision(c: _Curve) -> float:
    """Sum over thresholds of (recall step) * precision, as scikit-learn's ``average_precision_score``."""
    if c.n_pos == 0:
        return math.nan
    g = _recall_steps(c)
    tp = c.tp[g].astype(np.float64)
    d_tp = np.diff(tp, prepend=0.0)
    return float(np.dot(d_tp, tp / (tp + c.fp[g])) / c.n_pos)


def _f1_max(c: _Curve) -> tuple[float, float]:
    """Best F1 = 2 TP / (TP + FP + P) over thresholds, and the threshold (predict score >= threshold)."""
    if c.n_pos == 0:
        return math.nan, math.nan
    # At a fixed TP, F1 falls as FP grows, so the maximum lies where TP has just risen.
    g = _recall_steps(c)
    tp = c.tp[g].astype(np.float64)
    f1 = 2.0 * tp / (tp + c.fp[g] + c.n_pos)
    best = int(np.argmax(f1))  # the highest threshold among equal maxima
    return float(f1[best]), float(c.thresholds[g[best]])


def _aupro(c: _Curve, fpr_limit: float) -> float:
    """Trapezoid area under PRO(FPR) from FPR 0 to ``fpr_limit``, the last point interpolated, / ``fpr_limit``."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if c.n_pos == 0 or c.n_neg == 0:
        return math.nan
    # Only the prefix up to the first point past the limit matters (+1 guards against rounding of fp / n_neg).
    stop = int(np.searchsorted(c.fp, math.ceil(fpr_limit * c.n_neg) + 1, side="left")) + 1
    fpr = np.zeros(min(stop, c.fp.size) + 1)  # (K + 1,) from the origin; the full curve ends at exactly 1
    np.divide(c.fp[:stop], c.n_neg, out=fpr[1:])
    pro = np.zeros_like(fpr)
    pro[1:] = c.pro_cum[c.tp[:stop]]
    k = int(np.searchsorted(fpr, fpr_limit, side="left"))  # first point at or beyond the limit, k >= 1
    x, p = fpr[:k], pro[:k]
    area = float(np.dot(np.diff(x), p[1:] + p[:-1]) / 2.0)
    t = (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
    p_limit = pro[k - 1] + t * (pro[k] - pro[k - 1])
    area += (fpr_limit - fpr[k - 1]) * (pro[k - 1] + p_limit) / 2.0
    return float(area / fpr_limit)


# ------------------------------------------------------------------------------------------- public metrics


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores, exact with ties (equals scikit-learn's ``roc_auc_score``).

    labels: (B,) in {0, 1}; scores: (B,). Returns nan unless both classes are present.
    """
    return _auroc(_curve(*_image_arrays(labels, scores)))


def average_precision(labels, scores) -> float:
    """Average precision of image scores, as scikit-learn's ``average_precision_score``; nan without anomalies.

    labels: (B,) in {0, 1}; scores: (B,).
    """
    return _average_precision(_curve(*_image_arrays(labels, scores)))


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds and that threshold, predicting anomalous where score >= threshold.

    labels: (B,) in {0, 1}; scores: (B,). Among equal best F1 the highest threshold is returned; (nan, nan)
    without anomalies.
    """
    return _f1_max(_curve(*_image_arrays(labels, scores)))


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels of the set together; nan unless both normal and anomalous pixels exist.

    masks: (B, H, W) or B arrays (H_i, W_i), nonzero = anomalous; maps: the same shapes, float.
    """
    return _auroc(_curve(*_flatten(masks, maps)))


def pixel_average_precision(masks, maps) -> float:
    """Average precision over all pixels of the set together; nan without anomalous pixels.

    masks, maps: shapes as ``pixel_auroc``.
    """
    return _average_precision(_curve(*_flatten(masks, maps)))


def pixel_f1_max(masks, maps) -> tuple[float, float]:
    """Best pixel F1 over all pixels together and its threshold (score >= threshold); shapes as ``pixel_auroc``."""
    return _f1_max(_curve(*_flatten(masks, maps)))


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised by it (MVTec AD definition).

    Regions are the 8-connected components of every ground-truth mask. At a threshold t, PRO(t) is the mean over
    all regions of the fraction of the region's pixels scoring >= t, and FPR(t) the fraction of all normal pixels
    of the set scoring >= t. PRO is integrated over FPR in [0, fpr_limit] with the trapezoid rule (the last point
    interpolated linearly at fpr_limit) and divided by fpr_limit, so a perfect map scores 1.
    Computed exactly at every distinct score, without a threshold loop.

    masks: (B, H, W) or B arrays (H_i, W_i), nonzero = anomalous; maps: the same shapes, float.
    Returns nan when the set has no anomalous pixel (no region to overlap) or no normal pixel (FPR undefined).
    """
    y, s = _flatten(masks, maps)
    return _aupro(_curve(y, s, _region_weights(masks)), fpr_limit)


def iou(masks, maps, threshold: float) -> float:
    """IoU of the predicted masks (map >= threshold, in float32) with the ground truth over ALL pixels together.

    Sum over images of |pred & gt| divided by the sum of |pred | gt|, so large defects weigh more and false
    positives on normal images count. masks, maps: shapes as ``pixel_auroc``. nan when both are empty everywhere
    or the threshold is nan.
    """
    if math.isnan(threshold):
        return math.nan
    _check_pairs(masks, maps)
    t = np.float32(threshold)
    inter = union = 0
    for m, a in zip(masks, maps):
        gt, pred = np.asarray(m) != 0, np.asarray(a, dtype=np.float32) >= t
        inter += int(np.count_nonzero(gt & pred))
        union += int(np.count_nonzero(gt | pred))
    return inter / union if union else math.nan


def mean_iou(masks, maps, threshold: float) -> float:
    """Mean of the per-image IoU (map >= threshold, in float32) over the defective images only.

    Images with an empty ground-truth mask are skipped (their IoU is 0 or undefined); nan when there is no
    defective image or the threshold is nan. masks, maps: shapes as ``pixel_auroc``.
    """
    if math.isnan(threshold):
        return math.nan
    _check_pairs(masks, maps)
    t = np.float32(threshold)
    per_image = []
    for m, a in zip(masks, maps):
        gt = np.asarray(m) != 0
        if gt.any():
            pred = np.asarray(a, dtype=np.float32) >= t
            per_image.append(np.count_nonzero(gt & pred) / np.count_nonzero(gt | pred))
    return float(np.mean(per_image)) if per_image else math.nan


def evaluate(
    labels,
    scores,
    masks: np.ndarray | Sequence[np.ndarray],
    maps: np.ndarray | Sequence[np.ndarray],
    iou_threshold: float | None = None,
) -> dict:
    """Every image and pixel metric of a test set in one pass (one argsort per level).

    labels: (B,) in {0, 1}; scores: (B,); masks, maps: (B, H, W) or B arrays (H_i, W_i).
    Returns a dict of floats: image_auroc, image_ap, image_f1_max, image_f1_threshold, pixel_auroc, pixel_ap,
    aupro, pixel_f1_max, pixel_f1_threshold, iou, mean_iou, iou_threshold, plus iou_threshold_source: "given"
    when ``iou_threshold`` is set, else "pixel_f1_max" (IoU at the pixel F1-max threshold). Undefined -> nan.
    """
    y, s = _image_arrays(labels, scores)
    if len(masks) != y.size:
        raise ValueError(f"got {y.size} image labels but {len(masks)} masks")
    ic = _curve(y, s)
    image_f1, image_thr = _f1_max(ic)
    py, ps = _flatten(masks, maps)
    pc = _curve(py, ps, _region_weights(masks))
    del py, ps
    pixel_f1, pixel_thr = _f1_max(pc)
    thr = pixel_thr if iou_threshold is None else float(iou_threshold)
    return {
        "image_auroc": _auroc(ic),
        "image_ap": _average_precision(ic),
        "image_f1_max": image_f1,
        "image_f1_threshold": image_thr,
        "pixel_auroc": _auroc(pc),
        "pixel_ap": _average_precision(pc),
        "aupro": _aupro(pc, 0.3),
        "pixel_f1_max": pixel_f1,
        "pixel_f1_threshold": pixel_thr,
        "iou": iou(masks, maps, thr),
        "mean_iou": mean_iou(masks, maps, thr),
        "iou_threshold": thr,
        "iou_threshold_source": "pixel_f1_max" if iou_threshold is None else "given",
    }
