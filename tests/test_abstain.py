"""Explanations that know when they do not know: the peak region of a flagged image, the confidence of the type
ranking, the threshold learnt from the catalogue's leave-one-out, accuracy by coverage."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import clad
from clad.explain import Catalogue, Example, Explainer, Explanation, Region, TypeScore
from clad.explain.explainer import confidence_threshold, type_confidence
from clad.explain.quality import abstention, coverage_curve
from clad.explain.regions import peak_component
from clad.types import AnomalyResult
from conftest import plant_square, texture


def _faint_map() -> np.ndarray:
    """A map whose bump (peak 0.4 at (20, 40)) stays below a pixel threshold of 0.5."""
    yy, xx = np.mgrid[:64, :64]
    return (0.4 * np.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / 30.0)).astype(np.float32)


def test_peak_component_holds_the_maximum():
    amap = _faint_map()
    c = peak_component(amap)
    assert c.mask[20, 40] and c.peak == pytest.approx(0.4, abs=1e-6)
    assert (amap[c.mask] >= 0.2 - 1e-6).all()  # half-way from the median (about 0) to the peak
    x0, y0, x1, y1 = c.bbox
    assert x0 < 40 < x1 and y0 < 20 < y1 and c.area < 0.1
    assert peak_component(np.ones((8, 8), np.float32)).area == 1.0  # a flat map: the whole image


@pytest.mark.parametrize("score,threshold,expected", [(0.9, 0.5, True), (0.9, None, True), (0.3, 0.5, False)])
def test_a_flagged_image_always_gets_its_peak_region(normal_images, score, threshold, expected):
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal_images)
    result = AnomalyResult(np.array([score], np.float32), [_faint_map()], threshold=threshold)
    (e,) = Explainer(det, pixel_threshold=0.5).fit().explain([normal_images[0]], result)
    if not expected:  # an image judged normal gets no region
        assert e.regions == [] and e.anomalous is False
        return
    (r,) = e.regions
    assert r.peak_only and r.peak == pytest.approx(0.4, abs=1e-6) and r.location == "upper centre"
    assert "around the map's peak" in e.sentence and "0.5" in e.sentence
    assert Explanation.from_dict(json.loads(json.dumps(e.to_dict()))) == e


def test_regions_above_the_threshold_are_not_peak_only(normal_images):
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal_images)
    result = AnomalyResult(np.array([0.9], np.float32), [_faint_map()], threshold=0.5)
    (e,) = Explainer(det, pixel_threshold=0.1).fit().explain([normal_images[0]], result)
    assert e.regions and not any(r.peak_only for r in e.regions)


def test_confidence_threshold_rule_by_hand():
    # three types, chance 1/3, target 1/3 + 0.2; with one pseudo-example at chance:
    # k=1 (1 + 1/3) / 2 = 0.67 ok; k=2 (2 + 1/3) / 3 = 0.78 ok; k=3 (2 + 1/3) / 4 = 0.58 ok; k=4 (2 + 1/3) / 5 = 0.47
    pairs = [(0.9, True), (0.8, True), (0.5, False), (0.3, False)]
    assert confidence_threshold(pairs, 3) == pytest.approx(0.4)  # half-way between the 3rd and the 4th
    assert confidence_threshold([(0.9, True), (0.1, True)], 3) is None  # all kept: never abstain
    assert confidence_threshold([(0.9, False), (0.1, False)], 3) == math.nextafter(0.9, math.inf)  # none kept
    assert confidence_threshold([(0.9, True)], 3) is None  # too few examples to learn from
    assert confidence_threshold(pairs, 1) is None  # one type: nothing to be uncertain about


def _scores(**sims) -> list[TypeScore]:
    return sorted((TypeScore(n, n, s) for n, s in sims.items()), key=lambda t: -t.similarity)


def test_type_confidence_by_hand():
    region = _scores(hole=0.6, crack=0.4, spot=0.1)  # margin 0.2
    # the whole image agrees: the smaller margin of the two views
    assert type_confidence(region, _scores(hole=0.5, crack=0.45, spot=0.0)) == pytest.approx(0.05)
    assert type_confidence(region, _scores(hole=0.9, crack=0.1, spot=0.0)) == pytest.approx(0.2)
    # the whole image prefers another type: the named type's lead there is negative
    assert type_confidence(region, _scores(crack=0.5, hole=0.45, spot=0.0)) == pytest.approx(-0.05)
    assert type_confidence(region, _scores(spot=0.9, crack=0.5, hole=0.1)) == pytest.approx(-0.8)
    # the same ranking for both views (no region): its margin
    assert type_confidence(region, region) == pytest.approx(0.2)
    # nothing to compare on the whole image: the region's margin; one type: no confidence
    assert type_confidence(region, []) == pytest.approx(0.2)
    assert type_confidence(region, _scores(hole=0.3)) == pytest.approx(0.2)
    assert type_confidence(_scores(hole=0.6), region) is None


def _hole_and_spot(hole: int, spot: int) -> tuple[np.ndarray, np.ndarray]:
    """A texture with a dark square of side ``hole`` in the upper left (where the returned map peaks) and, when
    ``spot``, a bright square of that side in the lower right."""
    image, _ = plant_square(texture((64, 64), 300), 4, 4, hole, value=0)
    if spot:
        image, _ = plant_square(image, 30, 30, spot, value=250)
    amap = np.zeros((64, 64), np.float32)
    amap[4 : 4 + hole, 4 : 4 + hole] = 1.0
    return image, amap


def test_the_whole_image_disagreeing_lowers_the_confidence_below_agreement(normal_images):
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal_images)
    cat = Catalogue([Example(k, *_defect(s, k)) for s, k in enumerate(["hole", "spot", "hole", "spot"])])
    ex = Explainer(det, catalogue=cat).fit(normal_images)
    pairs = [_hole_and_spot(8, 0), _hole_and_spot(8, 30)]  # a small hole alone; the same beside a large spot
    result = AnomalyResult(np.array([0.9, 0.9], np.float32), [m for _, m in pairs], threshold=0.5)
    alone, beside = ex.explain([i for i, _ in pairs], result)
    for e in (alone, beside):  # the map puts the region on the hole: the region is named a hole
        assert e.ranked_types()[0] == "hole"
        region, whole = e.ranking, e.image_types
        assert e.type_confidence == pytest.approx(type_confidence(region, whole))
    # alone, both views name the hole: the smaller of their two margins, positive
    assert alone.ranked_types(whole_image=True)[0] == "hole"
    margins = [r[0].similarity - r[1].similarity for r in (alone.ranking, alone.image_types)]
    assert alone.type_confidence == pytest.approx(min(margins)) and alone.type_confidence > 0
    # beside a large spot the whole image is named a spot: the hole's lead there is negative, whatever the region's
    assert beside.ranked_types(whole_image=True)[0] == "spot"
    assert beside.ranking[0].similarity - beside.ranking[1].similarity > 0.5
    assert beside.type_confidence < 0 < alone.type_confidence
    # a threshold between the two: the disagreeing explanation abstains, the agreeing one names its type
    ex.confidence_threshold_ = beside.type_confidence / 2
    alone, beside = ex.explain([i for i, _ in pairs], result)
    assert beside.type_uncertain and beside.named_type is None and "type uncertain" in beside.sentence
    assert not alone.type_uncertain and alone.named_type == "hole"
    # the confidence reads every type, however few the explanation keeps (one image per batch: float noise)
    single = AnomalyResult(np.array([0.9], np.float32), [pairs[1][1]], threshold=0.5)
    (one,) = Explainer(det, catalogue=cat, n_types=1).fit(normal_images).explain([pairs[1][0]], single)
    assert len(one.ranking) == 1 and one.type_confidence == pytest.approx(beside.type_confidence, abs=1e-6)


def _ranked(names, sims, uncertain=False):
    types = [TypeScore(n, n, s) for n, s in zip(names, sims)]
    e = Explanation(0.9, 0.5, True, 0.5, "argument", (64, 64),
                    regions=[Region((0, 0, 8, 8), 1.6, "upper left", 0.9, types)], image_types=types)
    e.type_confidence, e.confidence_threshold, e.type_uncertain = sims[0] - sims[1], 0.2, uncertain
    return e


def test_an_uncertain_explanation_names_no_type_but_keeps_the_ranking():
    e = _ranked(["hole", "crack"], [0.5, 0.45], uncertain=True)
    assert e.named_type is None and e.ranked_types() == ["hole", "crack"]
    assert "type uncertain (closest: hole (0.50) or crack (0.45))" in e.sentence and "most likely" not in e.sentence
    back = Explanation.from_dict(json.loads(json.dumps(e.to_dict())))
    assert back == e and back.to_dict()["type_uncertain"] is True
    sure = _ranked(["hole", "crack"], [0.9, 0.1])
    assert sure.named_type == "hole" and "most likely hole (0.90), else crack (0.10)" in sure.sentence


def test_coverage_curve_sorts_by_confidence():
    # confidences 0.9 .. 0.0; the three most confident are right, the rest wrong
    explanations = [_ranked(["a", "b"], [c, 0.0]) for c in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)]
    truth = ["a"] * 3 + ["b"] * 7
    curve = {p["coverage"]: p["top1"] for p in coverage_curve(explanations[::-1], truth[::-1])}
    assert curve[0.1] == 1.0 and curve[0.3] == 1.0 and curve[0.5] == pytest.approx(0.6) and curve[1.0] == pytest.approx(0.3)
    for e in explanations[3:]:
        e.type_uncertain = True
    at = abstention(explanations, truth)["at_threshold"]
    assert at["coverage"] == pytest.approx(0.3) and at["top1"] == 1.0 and at["threshold"] == 0.2


def _defect(seed: int, kind: str):
    """A texture with a dark square ("hole") or a bright one ("spot") in a seeded place."""
    rng = np.random.default_rng(seed)
    top, left = (int(v) for v in rng.integers(4, 40, 2))
    return plant_square(texture((64, 64), 100 + seed), top, left, 16, value=0 if kind == "hole" else 250)


def test_threshold_is_learnt_from_the_catalogue_alone(normal_images):
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal_images)
    kinds = ["hole", "spot", "hole", "spot"]
    cat = Catalogue([Example(k, *_defect(s, k)) for s, k in enumerate(kinds)])
    ex = Explainer(det, catalogue=cat).fit(normal_images)
    assert len(ex.calibration_) == 4  # each example explained with the catalogue less itself
    assert all(isinstance(c, float) for c, _ in ex.calibration_)
    assert ex.confidence_threshold_ == confidence_threshold(ex.calibration_, 2)
    tests = [_defect(10 + s, k) for s, k in enumerate(["hole", "spot"] * 3)]
    out = ex.explain([t[0] for t in tests])
    for e in out:
        assert e.regions and e.type_confidence is not None and e.confidence_threshold == ex.confidence_threshold_
        assert e.type_uncertain == (ex.confidence_threshold_ is not None and e.type_confidence < ex.confidence_threshold_)
    truth = ["hole", "spot"] * 3
    assert sum(e.ranked_types()[0] == t for e, t in zip(out, truth)) >= 4  # chance: 3 of 6 (a tiny random-initialised backbone)
    # a catalogue with one example per type cannot check itself: no threshold, never uncertain
    one = Explainer(det, catalogue=Catalogue(cat.examples[:2])).fit(normal_images)
    assert one.calibration_ == [] and one.confidence_threshold_ is None
    assert not any(e.type_uncertain for e in one.explain([t[0] for t in tests]))
    # abstain=False: no leave-one-out
    assert Explainer(det, catalogue=cat, abstain=False).fit(normal_images).confidence_threshold_ is None


def test_eval_explain_reports_accuracy_by_coverage_and_a_curve(tmp_path, capsys):
    from PIL import Image

    from clad.cli import main
    from clad.data import make_synthetic_mvtec

    root = make_synthetic_mvtec(tmp_path / "data", category="tile", n_train=3, n_test_good=1, n_test_defect=12, size=64)
    out = tmp_path / "r.json"
    args = ["eval", "--data", f"mvtec:{root}", "--category", "tile", "--shots", "2", "--detector", "patch_knn",
            "--backbone", "tiny_cnn", "--param", "image_size=64", "--explain", "--catalogue-shots", "2", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "top-1 by coverage: 10% " in text and "100% " in text
    cat = json.loads(out.read_text())["explain"]["catalogue"]
    curve = cat["coverage_curve"]
    assert [c["coverage"] for c in curve] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert curve[-1]["top1"] == pytest.approx(cat["top1"]) and curve[-1]["n_images"] == cat["n_images"] == 6
    assert len(cat["calibration"]) == 6  # 3 types x 2 catalogue examples, each explained by the other three
    at = cat["at_threshold"]
    assert 0.0 <= at["coverage"] <= 1.0 and at["n_images"] == round(at["coverage"] * 6)
    png = tmp_path / "r.coverage.png"
    assert json.loads(out.read_text())["explain"]["coverage_plot"] == str(png)
    assert Image.open(png).size[0] > 100


def test_report_draws_the_naming_curve(tmp_path, normal_images):
    from clad.report import write_report

    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal_images)
    kinds = ["hole", "spot"] * 3
    tests = [_defect(20 + s, k) for s, k in enumerate(kinds)]
    from clad.types import Sample

    samples = [Sample(img, 1, mask, f"{k}/{i}.png", k) for i, ((img, mask), k) in enumerate(zip(tests, kinds))]
    result = det.predict([s.image for s in samples])
    cat = Catalogue([Example(k, *_defect(s, k)) for s, k in enumerate(["hole", "spot", "hole", "spot"])])
    said = Explainer(det, catalogue=cat).fit(normal_images).explain([s.image for s in samples], result)
    write_report(tmp_path / "rep", samples, result, explanations=said)
    assert (tmp_path / "rep" / "naming.png").is_file() and 'src="naming.png"' in (tmp_path / "rep" / "index.html").read_text()
    write_report(tmp_path / "plain", samples, result)  # no explanations: no curve
    assert not (tmp_path / "plain" / "naming.png").exists()
