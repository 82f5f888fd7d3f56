"""Metrics against scikit-learn, a literal MVTec AD AUPRO reference, and values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score

from clad import metrics
from clad.metrics import _flatten


def _sklearn_f1_max(y, s) -> float:
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * p * r / (p + r))
    return float(f1[:-1].max())  # the last point (recall 0, precision 1) has no threshold


def _random_pixel_set(seed: int, shapes=((8, 8), (12, 10), (6, 9))):
    """Masks with a square defect or none, float32 maps rounded to 1 decimal so that ties abound."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i, (h, w) in enumerate(shapes):
        m = np.zeros((h, w), bool)
        if i % 2 == 0:
            t, l = rng.integers(0, h - 3), rng.integers(0, w - 3)
            m[t : t + 3, l : l + 3] = True
        masks.append(m)
        maps.append(np.round(rng.normal(size=(h, w)) + 1.5 * m, 1).astype(np.float32))
    return masks, maps


# ------------------------------------------------------------------------------------------- vs scikit-learn


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(int)
    s = np.round(rng.normal(size=300) + y, 1)  # ~60 distinct values over 300 scores: many ties
    assert len(np.unique(s)) < 100
    assert metrics.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-6)
    best, thr = metrics.f1_max(y, s)
    assert best == pytest.approx(_sklearn_f1_max(y, s), abs=1e-6)
    assert f1_score(y, s >= thr) == pytest.approx(best, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_sklearn_with_ties_and_mixed_sizes(seed):
    masks, maps = _random_pixel_set(seed)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert metrics.pixel_average_precision(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-6)
    best, thr = metrics.pixel_f1_max(masks, maps)
    assert best == pytest.approx(_sklearn_f1_max(y, s), abs=1e-6)
    assert f1_score(y, s >= np.float32(thr)) == pytest.approx(best, abs=1e-12)


def test_chunked_auroc_matches_sklearn(monkeypatch):
    masks, maps = _random_pixel_set(11)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    monkeypatch.setattr(metrics, "_BLOCK", 7)  # many chunks on a ~60-point curve
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_stacked_and_list_inputs_agree():
    masks, maps = _random_pixel_set(7, shapes=((8, 8),) * 4)
    stacked = metrics.evaluate([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], np.stack(masks), np.stack(maps))
    listed = metrics.evaluate([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], masks, maps)
    assert stacked == listed


# ------------------------------------------------------------------------------------------------- by hand


def test_auroc_by_hand():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered correctly.
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # A tie between a positive and a negative counts one half: (1 + 0.5 + 2) / 4.
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.8]) == 0.875
    assert metrics.image_auroc([True, False], [0.3, 0.3]) == 0.5


def test_f1_and_ap_by_hand():
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # F1 = 2TP / (TP + FP + P): t=0.8 -> 2/3, t=0.4 -> 2/4, t=0.35 -> 4/5, t=0.1 -> 4/6.
    best, thr = metrics.f1_max(y, s)
    assert best == pytest.approx(0.8) and thr == 0.35
    # Recall steps 1/2 at precision 1 (t=0.8) and 1/2 at precision 2/3 (t=0.35).
    assert metrics.average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_iou_and_mean_iou_by_hand():
    a_gt, a_map = np.zeros((4, 4), bool), np.zeros((4, 4), np.float32)
    a_gt[0:2, 0:2] = True
    a_map[0:2, 1:3] = 0.5  # == threshold counts as predicted; overlaps gt in 2 pixels, union 6
    b_gt, b_map = np.zeros((4, 4), bool), np.zeros((4, 4), np.float32)
    b_map[2, 2] = 0.9  # normal image, one false-positive pixel: union 1
    c_gt, c_map = np.zeros((4, 4), bool), np.zeros((4, 4), np.float32)
    c_gt[3, 3], c_map[3, 3] = True, 1.0  # exact: intersection 1, union 1
    masks, maps = [a_gt, b_gt, c_gt], [a_map, b_map, c_map]
    assert metrics.iou(masks, maps, 0.5) == pytest.approx((2 + 0 + 1) / (6 + 1 + 1))
    assert metrics.mean_iou(masks, maps, 0.5) == pytest.approx((2 / 6 + 1 / 1) / 2)  # normal image skipped
    assert math.isnan(metrics.mean_iou([b_gt], [b_map], 0.5))
    assert math.isnan(metrics.iou([b_gt], [b_map], 2.0))  # nothing predicted, nothing true


# ---------------------------------------------------------------------------------------------------- AUPRO


def _two_region_set(region_b_score: float):
    """Image 1 (8x8): region A, 2x2, score 3. Image 2 (10x12): region B, 6x6, score ``region_b_score``.

    Normal pixels: 6 of image 1 score 2, all others 0. 60 + 84 = 144 normal pixels in all.
    """
    m1, s1 = np.zeros((8, 8), bool), np.zeros((8, 8), np.float32)
    m1[1:3, 1:3], s1[1:3, 1:3] = True, 3.0
    s1[6, 0:6] = 2.0
    m2, s2 = np.zeros((10, 12), bool), np.zeros((10, 12), np.float32)
    m2[2:8, 3:9], s2[2:8, 3:9] = True, region_b_score
    return [m1, m2], [s1, s2]


def test_aupro_by_hand_step_curve():
    # Curve: (0, 0) -> (0, 1/2) A found -> (6/144, 1/2) -> (6/144, 1) B found -> (1, 1). Per region, not per pixel.
    masks, maps = _two_region_set(region_b_score=1.0)
    f = 6 / 144
    expected = (f * 0.5 + (0.3 - f) * 1.0) / 0.3
    assert metrics.aupro(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_aupro_by_hand_interpolated_at_limit():
    # B ties with the 138 normal zeros: (0, 0) -> (0, 1/2) -> (6/144, 1/2) -> (1, 1); 0.3 falls on the last slope.
    masks, maps = _two_region_set(region_b_score=0.0)
    f = 6 / 144
    p_limit = 0.5 + 0.5 * (0.3 - f) / (1 - f)
    expected = (f * 0.5 + (0.3 - f) * (0.5 + p_limit) / 2) / 0.3
    assert metrics.aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert metrics.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(f * 0.5 + (1 - f) * 0.75, abs=1e-12)


def test_aupro_regions_are_8_connected():
    # (0,0) touches (1,1) diagonally: one region of 3 pixels (4-connectivity would give 2 regions and PRO 1/2).
    m = np.zeros((4, 4), bool)
    m[0, 0] = m[1, 1] = m[1, 2] = True
    s = np.zeros((4, 4), np.float32)
    s[0, 0] = 1.0
    p0 = 1 / 3  # then (0, 1/3) -> (1, 1)
    p_limit = p0 + 0.3 * (1 - p0)
    assert metrics.aupro([m], [s]) == pytest.approx((p0 + p_limit) / 2, abs=1e-12)


def _official_trapezoid(x, y, x_max):
    """The MVTec AD evaluation code's trapezoid: cut at x_max, interpolating the last segment."""
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect.bisect
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _reference_aupro(masks, maps, thresholds, fpr_limit=0.3):
    """Literal MVTec AD AUPRO: for each threshold, the mean overlap over all 8-connected ground-truth regions
    and the FPR over all normal pixels; trapezoid to fpr_limit with interpolation, divided by fpr_limit."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3))) for m in masks]  # (region ids (H, W), n) per image
    n_normal = sum(int((~m).sum()) for m in masks)
    fprs, pros = [0.0], [0.0]
    for t in sorted(thresholds, reverse=True):
        overlaps, fp = [], 0
        for m, a, (lab, n) in zip(masks, maps, labelled):
            pred = a >= t
            hit = np.bincount(lab[pred], minlength=n + 1)[1:]  # predicted pixels in each region
            overlaps += list(hit / np.bincount(lab.ravel(), minlength=n + 1)[1:])
            fp += int((pred & ~m).sum())
        pros.append(np.mean(overlaps))
        fprs.append(fp / n_normal)
    fprs, pros = np.array(fprs + [1.0]), np.array(pros + [1.0])
    return _official_trapezoid(fprs, pros, fpr_limit) / fpr_limit


def _reference_case(seed: int, decimals: int | None = 2):
    """Two images of different sizes with a 2x2, a 6x6 and a 3x4 region; scores rounded (ties) unless decimals=None."""
    rng = np.random.default_rng(seed)
    m1, m2 = np.zeros((16, 16), bool), np.zeros((20, 18), bool)
    m1[2:4, 2:4] = True
    m1[8:14, 7:13] = True
    m2[5:8, 10:14] = True
    masks = [m1, m2]
    maps = [rng.normal(size=m.shape) + 2.0 * m * rng.random(m.shape) for m in masks]
    if decimals is not None:
        maps = [np.round(a, decimals) for a in maps]
    return masks, [a.astype(np.float32) for a in maps]


@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_literal_mvtec_reference_exactly(seed):
    # With every distinct score as a threshold the reference curve is exact, ties included.
    masks, maps = _reference_case(seed)
    thresholds = np.unique(np.concatenate([a.ravel() for a in maps]))
    for limit in (0.3, 0.05, 1.0):
        expected = _reference_aupro(masks, maps, thresholds, limit)
        assert metrics.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_aupro_matches_dense_threshold_loop(seed):
    # Continuous scores and a regular grid of thresholds, as a threshold-loop implementation would use.
    masks, maps = _reference_case(seed, decimals=None)
    lo, hi = min(a.min() for a in maps), max(a.max() for a in maps)
    expected = _reference_aupro(masks, maps, np.linspace(lo, hi, 5000))
    assert metrics.aupro(masks, maps) == pytest.approx(expected, abs=1e-3)


def test_aupro_perfect_and_inverted_maps():
    masks, _ = _reference_case(0)
    rng = np.random.default_rng(0)
    assert metrics.aupro(masks, [m.astype(np.float32) for m in masks]) == 1.0
    # Every anomalous pixel below every normal one: PRO stays 0 until FPR reaches 1.
    inverted = [-m.astype(np.float32) + 0.1 * rng.random(m.shape).astype(np.float32) for m in masks]
    assert metrics.aupro(masks, inverted) == pytest.approx(0.0, abs=1e-12)


def test_aupro_undefined_is_nan():
    normal = [np.zeros((4, 4), bool)]
    assert math.isnan(metrics.aupro(normal, [np.random.default_rng(0).random((4, 4))]))
    assert math.isnan(metrics.aupro([np.ones((4, 4), bool)], [np.zeros((4, 4))]))
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(*_two_region_set(1.0), fpr_limit=0.0)


# ------------------------------------------------------------------------------------------ inputs, evaluate


def test_shape_mismatch_names_the_image():
    masks = [np.zeros((4, 4), bool), np.zeros((4, 4), bool), np.zeros((5, 4), bool)]
    maps = [np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((4, 5))]
    with pytest.raises(ValueError, match="image 2"):
        metrics.pixel_auroc(masks, maps)
    with pytest.raises(ValueError, match="image 2"):
        metrics.iou(masks, maps, 0.5)
    with pytest.raises(ValueError, match="2 maps"):
        metrics.aupro(masks, maps[:2])


def test_flatten_dtypes_and_order():
    masks = [np.array([[0, 255], [0, 0]], np.uint8), np.ones((1, 3), bool)]
    maps = [np.array([[0.1, 0.2], [0.3, 0.4]]), np.array([[1.0, 2.0, 3.0]])]  # float64 in
    y, s = _flatten(masks, maps)
    assert y.dtype == bool and s.dtype == np.float32
    assert y.tolist() == [False, True, False, False, True, True, True]
    np.testing.assert_array_equal(s, np.float32([0.1, 0.2, 0.3, 0.4, 1.0, 2.0, 3.0]))


def test_bad_labels_and_nan_scores_raise():
    with pytest.raises(ValueError, match="labels"):
        metrics.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        metrics.pixel_auroc([np.eye(2, dtype=bool)], [np.array([[0.1, np.nan], [0.2, 0.3]])])


KEYS = {
    "image_auroc", "image_ap", "image_f1_max", "image_f1_threshold", "pixel_auroc", "pixel_ap", "aupro",
    "pixel_f1_max", "pixel_f1_threshold", "iou", "mean_iou", "iou_threshold", "iou_threshold_source",
}


def test_evaluate_keys_and_iou_threshold():
    masks, maps = _random_pixel_set(3)
    labels, scores = [1, 0, 1], [0.7, 0.2, 0.4]
    out = metrics.evaluate(labels, scores, masks, maps)
    assert set(out) == KEYS
    assert out["iou_threshold_source"] == "pixel_f1_max"
    assert out["iou_threshold"] == out["pixel_f1_threshold"]
    assert out["image_auroc"] == 1.0
    assert out["pixel_auroc"] == metrics.pixel_auroc(masks, maps)
    assert out["aupro"] == metrics.aupro(masks, maps)
    assert out["iou"] == metrics.iou(masks, maps, out["pixel_f1_threshold"])
    given = metrics.evaluate(labels, scores, masks, maps, iou_threshold=0.5)
    assert given["iou_threshold_source"] == "given"
    assert given["iou"] == metrics.iou(masks, maps, 0.5)
    assert given["mean_iou"] == metrics.mean_iou(masks, maps, 0.5)


def test_evaluate_one_class_gives_nan():
    masks = [np.zeros((4, 4), bool)] * 2
    maps = [np.random.default_rng(i).random((4, 4)) for i in range(2)]
    out = metrics.evaluate([0, 0], [0.1, 0.3], masks, maps)
    assert set(out) == KEYS
    for k in KEYS - {"iou_threshold_source"}:
        assert math.isnan(out[k]), k
    with pytest.raises(ValueError, match="masks"):
        metrics.evaluate([0, 0, 1], [0.1, 0.3, 0.5], masks, maps)
