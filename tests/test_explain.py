"""Explanations: location words, regions, ranking by similarity, sentences built from facts, catalogue, JSON."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import clad
from clad.explain import (
    Catalogue,
    Example,
    Explainer,
    Explanation,
    NormalMatch,
    Region,
    TypeScore,
    defect_descriptions,
    defect_phrase,
    explain,
    extract_regions,
    gradcam_maps,
    location_words,
)
from clad.explain.explanation import fmt_percent, fmt_similarity, fmt_value
from clad.explain.quality import naming_accuracy, split_catalogue
from clad.types import AnomalyResult, Sample
from conftest import plant_square, texture

SHAPE = (90, 120)  # (H, W)


@pytest.mark.parametrize("bbox, words", [
    ((10, 10, 20, 20), "upper left"),
    ((55, 10, 65, 20), "upper centre"),
    ((100, 10, 110, 20), "upper right"),
    ((10, 40, 20, 50), "centre left"),
    ((55, 40, 65, 50), "centre"),
    ((100, 40, 110, 50), "centre right"),
    ((10, 70, 20, 80), "lower left"),
    ((55, 70, 65, 80), "lower centre"),
    ((100, 70, 110, 80), "lower right"),
    ((55, 0, 65, 10), "along the top edge"),
    ((10, 0, 20, 10), "along the top edge, left part"),
    ((100, 80, 110, 90), "along the bottom edge, right part"),
    ((0, 40, 10, 50), "along the left edge"),
    ((110, 5, 120, 15), "along the right edge, upper part"),
    ((110, 75, 120, 85), "along the right edge, lower part"),
    ((0, 0, 10, 10), "in the upper left corner"),
    ((110, 0, 120, 10), "in the upper right corner"),
    ((0, 80, 10, 90), "in the lower left corner"),
    ((110, 80, 120, 90), "in the lower right corner"),
    ((0, 40, 120, 50), "across the full width"),
    ((0, 5, 120, 15), "across the full width, upper part"),
    ((55, 0, 65, 90), "across the full height"),
    ((100, 0, 110, 90), "across the full height, right part"),
    ((0, 0, 120, 20), "across the full width along the top edge"),
    ((0, 70, 120, 90), "across the full width along the bottom edge"),
    ((0, 0, 20, 90), "across the full height along the left edge"),
    ((100, 0, 120, 90), "across the full height along the right edge"),
    ((0, 0, 120, 90), "across the whole image"),
])
def test_location_words(bbox, words):
    assert location_words(bbox, SHAPE) == words


def test_two_blobs_give_two_regions_with_their_boxes_and_areas():
    amap = np.zeros((100, 100), np.float32)
    amap[10:20, 5:25] = 0.8  # 200 px
    amap[60:90, 70:80] = 0.9  # 300 px, higher peak: listed first
    amap[50, 50] = 1.0  # one pixel: below min_area (0.1 % = 10 px)
    regions = extract_regions(amap, 0.5)
    assert len(regions) == 2
    assert regions[0].bbox == (70, 60, 80, 90) and regions[0].area == pytest.approx(0.03)
    assert regions[1].bbox == (5, 10, 25, 20) and regions[1].area == pytest.approx(0.02)
    assert regions[0].peak == pytest.approx(0.9) and regions[0].mask.sum() == 300
    assert extract_regions(amap, 0.95) == []


class FakeShared:
    """A detector with hand-set embeddings: patches inside the square carry ``inside``, the rest ``normal``."""

    name = "fake"

    def __init__(self, inside: torch.Tensor, grid: int = 8):
        self.vectors = {"crack": torch.tensor([1.0, 0, 0, 0]), "scratch": torch.tensor([0, 1.0, 0, 0]),
                        "hole": torch.tensor([0, 0, 1.0, 0])}
        self.normal = torch.tensor([0, 0, 0, 1.0])
        self.inside, self.grid = inside, grid
        self.threshold_ = None

    def embed_texts(self, texts):
        return torch.stack([next((v for k, v in self.vectors.items() if k in t), self.normal) for t in texts])

    def embed_patches(self, images):
        z = self.normal[:, None, None].repeat(1, self.grid, self.grid)
        z[:, 0:2, 6:8] = self.inside[:, None, None]  # upper right corner cells
        return z[None].repeat(len(images), 1, 1, 1)

    def trained_descriptions(self):
        return []


def _corner_map() -> np.ndarray:
    amap = np.zeros((64, 64), np.float32)
    amap[0:16, 48:64] = 1.0
    return amap


@pytest.mark.parametrize("kind", ["crack", "scratch", "hole"])
def test_types_are_ranked_by_similarity(kind):
    det = FakeShared(FakeShared(None).vectors[kind])
    result = AnomalyResult(np.array([0.9], np.float32), [_corner_map()], threshold=0.5)
    (e,) = explain(det, [np.zeros((64, 64, 3), np.uint8)], result, pixel_threshold=0.5,
                   defect_types=["crack", "scratch", "hole"])
    (r,) = e.regions
    assert r.bbox == (48, 0, 64, 16) and r.location == "in the upper right corner"
    assert r.types[0].name == kind and r.types[0].similarity == pytest.approx(1.0)
    assert all(t.similarity == pytest.approx(0.0) for t in r.types[1:])
    assert e.anomalous is True and defect_phrase(kind) in e.sentence


def test_catalogue_moves_the_ranking_towards_its_examples():
    # the region is closest to "crack" in text, but the catalogue's "scratch" example has exactly its embedding
    inside = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 0.0, 2.0]), dim=0)
    det = FakeShared(inside)
    img = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[0:16, 48:64] = True
    crack_det = FakeShared(det.vectors["crack"])  # its example: the pure crack embedding
    types = ["crack", "scratch"]
    result = AnomalyResult(np.array([0.9], np.float32), [_corner_map()])
    text_only = explain(det, [img], result, pixel_threshold=0.5, defect_types=types)[0]
    assert text_only.named_type == "crack"
    cat = Catalogue([Example("scratch", img, mask), Example("crack", img + 1, mask)])
    real = det.embed_patches

    def patches(images):  # the crack example (img + 1) gets the crack embedding
        return torch.cat([crack_det.embed_patches([im]) if im.max() == 1 else real([im]) for im in images])

    det.embed_patches = patches
    cos = float(inside[0])  # cosine of the region to the crack text and to the crack example
    options = dict(catalogue=cat, defect_types=types, pixel_threshold=0.5, catalogue_weight=0.8)
    e = Explainer(det, rule="prototype", **options).fit().explain([img], result)[0]
    assert e.named_type == "scratch"
    # by hand, s = (1 - w) * text + w * catalogue: scratch 0.2 * 0 + 0.8 * 1; crack 0.2 * cos + 0.8 * cos
    sims = {t.name: t.similarity for t in e.regions[0].types}
    assert sims["scratch"] == pytest.approx(0.8) and sims["crack"] == pytest.approx(cos)
    # "patches": catalogue term = cosine to the type's defect patches - cosine to the normal patches
    e = Explainer(det, rule="patches", **options).fit().explain([img], result)[0]
    to_normal = float(inside[3])  # the examples' unmasked cells carry the normal embedding
    sims = {t.name: t.similarity for t in e.regions[0].types}
    assert e.named_type == "scratch"
    assert sims["scratch"] == pytest.approx(0.8 * (1 - to_normal)) and sims["crack"] == pytest.approx(0.2 * cos + 0.8 * (cos - to_normal))


def _hand_made() -> list[Explanation]:
    crack, scratch = TypeScore("crack", "a crack", 0.6213), TypeScore("scratch", "a scratch", 0.2087)
    region = Region((3, 4, 30, 22), 3.14159, "upper left", 0.93, [crack, scratch], NormalMatch(2, (0, 8, 8, 16), 0.97))
    other = Region((90, 40, 100, 70), 0.4, "along the right edge", 0.71, [scratch], None)
    return [
        Explanation(0.912, 0.5, True, 0.45, "argument", (100, 100), [region], [crack], "a.png"),
        Explanation(0.912, 0.5, True, 0.45, "argument", (100, 100), [region, other, other], [], "b.png"),
        Explanation(0.1234, 0.5, False, 0.45, "argument", (100, 100), [], [], "c.png"),
        Explanation(12.5, None, None, 30.25, "batch", (100, 100), [], [scratch], "d.png"),
        Explanation(12.5, None, None, 3.0, "batch", (100, 100), [Region((0, 0, 100, 100), 100.0, "across the whole image", 20.0)]),
    ]


def _numbers(d) -> set[str]:
    """Every way a sentence may print the numbers of a structure."""
    out = set()
    if isinstance(d, dict):
        for v in d.values():
            out |= _numbers(v)
    elif isinstance(d, (list, tuple)):
        for v in d:
            out |= _numbers(v)
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out |= {fmt_value(d), fmt_similarity(d), fmt_percent(d), str(d)}
    return out


def _check_sentence_facts(e: Explanation) -> None:
    d = e.to_dict()
    found = re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", e.sentence)
    missing = [n for n in found if n not in _numbers({k: v for k, v in d.items() if k != "sentence"})]
    assert not missing, f"{missing} of {e.sentence!r} are not in the structure"
    for r in e.regions[:1]:
        assert r.location in e.sentence
        for t in r.types[:2]:
            assert t.phrase in e.sentence


def test_sentences_say_only_what_the_structure_holds():
    a, b, c, d, e = _hand_made()
    assert a.sentence == ("Anomalous (score 0.912 > 0.5): one region, about 3.1% of the image, upper left; "
                          "most likely a crack (0.62), else a scratch (0.21).")
    assert b.sentence.startswith("Anomalous (score 0.912 > 0.5): three regions; the strongest, about 3.1% of the image, upper left:")
    assert b.sentence.endswith("others along the right edge, along the right edge.")
    assert c.sentence == "Normal (score 0.123 <= 0.5)."
    assert d.sentence == "Score 12.5 (no decision threshold): no region above the pixel threshold 30.2; for the whole image, most likely a scratch (0.21)."
    assert e.sentence.endswith("about 100% of the image, across the whole image; type unknown.")
    for x in (a, b, c, d, e):
        _check_sentence_facts(x)
    assert a.sentence == _hand_made()[0].sentence  # deterministic


def test_json_round_trip():
    for e in _hand_made():
        text = json.dumps(e.to_dict())
        back = Explanation.from_dict(json.loads(text))
        assert back == e and back.sentence == json.loads(text)["sentence"]


def test_defect_phrases_and_descriptions():
    assert defect_phrase("broken_large") == "a large break"
    assert defect_phrase("crack") == "a crack"
    assert defect_phrase("some_new_type") == "some new type"
    d = defect_descriptions("uneven", "magnetic tile", [("texture", "a photo of a tile with an irregular texture."), ("crack", "x")])
    assert "a photo of a magnetic tile with an uneven surface." in d
    assert "a photo of a tile with an irregular texture." in d and "x" not in d
    assert len(d) == len(set(d))


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_catalogue_from_folder_reads_both_mask_layouts(tmp_path):
    img, mask = plant_square(texture((40, 50), 0), 5, 5, 8)
    m8 = mask.astype(np.uint8) * 255
    _save(tmp_path / "crack" / "a.png", img)
    _save(tmp_path / "crack" / "masks" / "a.png", m8)
    _save(tmp_path / "crack" / "b.png", img)
    _save(tmp_path / "crack" / "masks" / "b_mask.png", m8)
    _save(tmp_path / "hole" / "c.jpg", img)
    _save(tmp_path / "hole" / "c_mask.png", m8)
    cat = Catalogue.from_folder(tmp_path)
    assert cat.defect_types == ["crack", "hole"] and len(cat.of_type("crack")) == 2 and len(cat) == 3
    assert all(e.mask.shape == (40, 50) and e.mask.sum() == 64 for e in cat.examples)
    _save(tmp_path / "hole" / "d.png", img)
    with pytest.raises(ValueError, match="d.png: no mask"):
        Catalogue.from_folder(tmp_path)


def test_catalogue_split_and_naming_accuracy():
    def sample(i, kind):
        return Sample(np.zeros((8, 8, 3), np.uint8), int(kind != "good"), np.ones((8, 8), bool), f"{kind}/{i}.png", kind)

    samples = [sample(i, k) for k in ("good", "crack", "hole") for i in range(4)]
    cat, rest = split_catalogue(samples, 2, seed=0)
    assert len(cat) == 4 and cat.defect_types == ["crack", "hole"]
    assert len(rest) == 8 and not {samples[i].path for i in rest} & {e.path for e in cat.examples}
    assert split_catalogue(samples, 2, seed=0)[1] == rest
    e = _hand_made()
    acc = naming_accuracy([e[0], e[3], e[4]], ["crack", "crack", "crack"], n_types=4)
    assert acc["top1"] == pytest.approx(1 / 3) and acc["top3"] == pytest.approx(1 / 3)
    assert acc["chance_top1"] == 0.25 and acc["chance_top3"] == 0.75


@pytest.fixture(scope="module")
def tiny_clad(tiny_clip_dir):
    refs = [texture((64, 64), s) for s in range(3)]
    det = clad.create_detector("clad", backbone="tiny_cnn", image_size=64, text_encoder=f"clip:{tiny_clip_dir}", epochs=2, n_train_images=8)
    return det.fit(refs), refs


def test_explain_a_clad_detector_end_to_end(tiny_clad):
    det, refs = tiny_clad
    images = [plant_square(texture((64, 80), 9), 5, 50, 14)[0], texture((64, 80), 10)]
    result = det.predict(images)
    out = explain(det, images, result, references=refs, defect_types=["crack", "broken_large", "contamination"])
    assert len(out) == 2
    for e in out:
        _check_sentence_facts(e)
        assert e.pixel_threshold_source == "normal images"  # clad's pooled score is not on the map's scale
        assert e.image_size == (64, 80)
        for r in e.regions:
            assert [t.name for t in r.types] and {t.name for t in r.types} <= {"crack", "broken_large", "contamination"}
            sims = [t.similarity for t in r.types]
            assert sims == sorted(sims, reverse=True)
            x0, y0, x1, y1 = r.nearest_normal.box
            assert 0 <= r.nearest_normal.reference < len(refs) and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert Explanation.from_dict(json.loads(json.dumps(e.to_dict()))) == e
    # without defect_types the detector's own trained kinds are ranked
    e = explain(det, images[:1], result=None, pixel_threshold=float(result.anomaly_maps[0].min()))[0]
    assert e.regions and {t.name for t in e.regions[0].types} <= {k for k, _ in det.trained_descriptions()} - {"normal"}


def test_gradcam_maps_for_clad_and_a_clear_error_otherwise(tiny_clad):
    det, refs = tiny_clad
    images = [texture((48, 70), 11), texture((64, 64), 12)]
    maps = gradcam_maps(det, images)
    assert [m.shape for m in maps] == [(48, 70), (64, 64)] and all(np.isfinite(m).all() and (m >= 0).all() for m in maps)
    assert det.config.localization == "dense"  # the detector itself is unchanged
    other = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(refs)
    with pytest.raises(TypeError, match="Grad-CAM"):
        gradcam_maps(other, images)


def test_detector_without_shared_space_says_type_unknown_unless_a_catalogue_names_it(normal_images):
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal_images)
    image, mask = plant_square(texture((64, 64), 7), 20, 20, 14, value=0)
    result = det.predict([image])
    e = explain(det, [image], result, pixel_threshold=0.5 * float(result.scores[0]))[0]
    assert e.regions and e.regions[0].types == [] and "type unknown" in e.sentence
    cat = Catalogue([Example("dark spot", *plant_square(texture((64, 64), 8), 30, 10, 14, value=0))])
    e = explain(det, [image], result, pixel_threshold=0.5 * float(result.scores[0]), catalogue=cat)[0]
    assert e.named_type == "dark spot" and "most likely dark spot" in e.sentence
    _check_sentence_facts(e)


def test_gradcam_maps_for_patchcore():
    """PatchCore's score (largest patch distance to the memory) is differentiable through the backbone."""
    refs = [texture((128, 128), s) for s in range(3)]
    det = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=128).fit(refs)
    bad, mask = plant_square(texture((128, 128), 20), 40, 50, 28, value=0)
    maps = gradcam_maps(det, [texture((48, 70), 11), bad])
    assert [m.shape for m in maps] == [(48, 70), (128, 128)]
    assert all(np.isfinite(m).all() and (m >= 0).all() for m in maps)
    assert mask[np.unravel_index(maps[1].argmax(), mask.shape)]  # the evidence peaks on the planted defect
    assert maps[1][mask].mean() > 2 * maps[1][~mask].mean()
