"""The label-free threshold every detector sets at fit, the normalised score built on it, and where they show:
saved models, predictions.csv and ``clad eval``."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import clad
from clad.cli import main
from clad.detectors import thresholds
from clad.errors import ConfigError
from clad.pipeline.flow import Summary
from clad.pipeline.sinks import PredictionsCSV
from clad.types import Item, Prediction
from conftest import plant_square, texture

TINY = {"backbone": "tiny_cnn", "image_size": 64}


def test_views_are_seeded_and_one_per_reference_within_bounds():
    refs = [texture((48, 80), s) for s in range(3)]
    normal, anomalous = thresholds.views(refs, 64, seed=0)
    assert len(normal) == len(anomalous) == thresholds.MIN_VIEWS
    assert all(v.shape == (64, 64, 3) and v.dtype == np.uint8 for v in normal + anomalous)
    again, _ = thresholds.views(refs, 64, seed=0)
    assert all((a == b).all() for a, b in zip(normal, again))
    many = [texture((16, 16), s) for s in range(40)]
    assert len(thresholds.views(many, 16, seed=0)[0]) == thresholds.MAX_VIEWS


def test_jitter_keeps_the_borders():
    """Reflected, not black: a grey image stays grey to the corner (a black fill would read as a defect)."""
    grey = np.full((40, 40, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(8):
        view = thresholds.jitter(grey, rng, 64)
        assert view.min() > 100


def test_cut_lies_in_the_gap_between_the_groups():
    assert thresholds.cut(np.array([1.0, 2.0, 3.0]), np.array([7.0, 8.0, 9.0])) == 5.0  # mid-gap, not 7
    # overlapping groups: the F1-best cut (at 4, recall 1, one normal above), moved down halfway to 3
    assert thresholds.cut(np.array([1.0, 3.0, 5.0]), np.array([4.0, 8.0, 9.0])) == 3.5


def test_normalize_is_monotone_with_the_threshold_at_one_half():
    scores = np.array([-1e30, -3.0, 0.0, 1.99, 2.0, 2.01, 5.0, 40.0, 1e30])
    out = thresholds.normalize(scores, threshold=2.0, scale=0.5)
    assert out.dtype == np.float32 and np.isfinite(out).all() and (0 <= out).all() and (out <= 1).all()
    assert (np.diff(out) >= 0).all() and out[4] == 0.5 and out[3] < 0.5 < out[5]
    assert thresholds.spread_scale(np.array([1.0, 2.0]), np.array([1.5, 1.5])) > 0  # medians equal: still > 0


@pytest.mark.parametrize("name", ["patchcore", "padim", "patch_knn", "spade"])
def test_the_threshold_flags_planted_defects_and_few_normals(name):
    rng = np.random.default_rng(0)
    refs = [texture((64, 64), s) for s in range(4)]
    normals = [texture((64, 64), s) for s in range(100, 120)]
    defects = [plant_square(texture((64, 64), s), *rng.integers(4, 44, 2), 12, int(rng.choice([10, 250])))[0]
               for s in range(200, 220)]
    det = clad.create_detector(name, **TINY).fit(refs)
    assert det.threshold_source_ == "references"
    assert det.predict(defects).labels.mean() >= 0.8
    assert det.predict(normals).labels.mean() <= 0.1


def test_normalized_scores_follow_the_threshold_a_user_sets():
    refs = [texture((64, 64), s) for s in range(3)]
    odd, _ = plant_square(texture((64, 64), 9), 10, 30, 12)
    det = clad.create_detector("patch_knn", **TINY).fit(refs)
    res = det.predict([texture((64, 64), 7), odd, texture((64, 64), 8)])
    order = np.argsort(res.scores)
    assert (np.diff(res.normalized_scores[order]) >= 0).all()  # the same order as the raw scores
    assert ((res.normalized_scores > 0.5) == res.labels).all()
    det.set_threshold(float(res.scores[1]))
    moved = det.predict([odd])
    assert moved.normalized_scores[0] == pytest.approx(0.5) and det.threshold_source_ == "user"
    assert moved.scores[0] == res.scores[1]  # the raw score does not move


@pytest.fixture
def saved(tmp_path):
    det = clad.create_detector("patch_knn", **TINY).fit([texture((64, 64), s) for s in range(2)])
    return det.save(tmp_path / "m")


def _edit(saved, **changes):
    doc = json.loads((saved / "config.json").read_text())
    doc.update(changes)
    (saved / "config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("change, message", [
    ({"threshold_source": "oracle"}, "threshold_source must be one of"),
    ({"threshold_scale": 0}, "threshold_scale must be a finite number > 0"),
    ({"threshold_scale": "wide"}, "threshold_scale must be a finite number > 0"),
])
def test_bad_threshold_source_or_scale_is_refused(saved, change, message):
    _edit(saved, **change)
    with pytest.raises(ConfigError, match=f"config.json: {message}"):
        clad.load_detector(saved)


def test_a_model_saved_without_source_and_scale_still_decides(saved):
    doc = json.loads((saved / "config.json").read_text())
    del doc["threshold_source"], doc["threshold_scale"]
    (saved / "config.json").write_text(json.dumps(doc))
    res = clad.load_detector(saved).predict([texture((64, 64), 5)])
    assert res.labels is not None and res.normalized_scores is None


def test_predictions_csv_puts_the_normalized_score_beside_the_score(tmp_path):
    item = Item(np.zeros((4, 4, 3), np.uint8), "a.png", "a.png")
    sink = PredictionsCSV(tmp_path / "p.csv", labels=True)
    sink.open()
    sink.write([Prediction(item, 41.5, np.zeros((4, 4), np.float32), True, None, 0.93),
                Prediction(item, 2.0, np.zeros((4, 4), np.float32), False, None, None)])
    sink.close(Summary())
    rows = list(csv.reader(open(tmp_path / "p.csv")))
    assert rows == [["path", "score", "score_normalized", "label"], ["a.png", "41.5", "0.93", "anomalous"],
                    ["a.png", "2", "", "normal"]]


def test_eval_prints_the_saved_and_the_f1_max_threshold_with_precision_and_recall(tmp_path, capsys):
    from clad.data import make_synthetic_mvtec

    root = make_synthetic_mvtec(tmp_path / "data", category="tile", n_train=4, n_test_good=3, n_test_defect=3,
                                size=64, seed=0)
    out = tmp_path / "r.json"
    assert main(["eval", "--data", f"mvtec:{root}", "--category", "tile", "--shots", "2", "--detector", "patch_knn",
                 "--backbone", "tiny_cnn", "--param", "image_size=64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["threshold_source"] == "references"
    lines = text.splitlines()
    for label, key in (("label-free threshold", "threshold"), ("threshold (F1-max)", "image_f1")):
        at = next(i for i, line in enumerate(lines) if line.strip().startswith(label))
        threshold = res[key] if key == "threshold" else res["image_f1_threshold"]
        assert lines[at] == f"  {label:<22} {threshold:.4f}"
        assert lines[at + 1] == f"    {'precision':<20} {res[f'{key}_precision']:.4f}"
        assert lines[at + 2] == f"    {'recall':<20} {res[f'{key}_recall']:.4f}"


def test_threshold_figures_by_hand():
    from clad.evaluate import threshold_figures

    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.6, 0.5, 0.6, 0.9], np.float32)
    out = threshold_figures(labels, scores, threshold=0.5, f1_threshold=0.5)
    # saved: score > 0.5 flags 0.6 (normal), 0.6, 0.9; F1-max: score >= 0.5 flags 0.5 too
    assert out == {"threshold": 0.5, "threshold_precision": 2 / 3, "threshold_recall": 2 / 3,
                   "image_f1_precision": 3 / 4, "image_f1_recall": 1.0}
    none = threshold_figures(labels, scores, threshold=None, f1_threshold=5.0)  # nothing flagged: precision nan
    assert np.isnan(none["threshold_precision"]) and np.isnan(none["image_f1_precision"])
    assert none["image_f1_recall"] == 0.0


def test_zero_shot_winclip_takes_its_threshold_from_the_images_given_to_fit(tiny_clip_dir):
    det = clad.create_detector("winclip", backbone=f"clip:{tiny_clip_dir}", few_shot=False)
    det.fit([texture((64, 64), s) for s in range(2)])
    assert np.isfinite(det.threshold_) and det.threshold_source_ == "references" and det.threshold_scale_ > 0
