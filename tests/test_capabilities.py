"""Capabilities are declared, and the explainer reads only the declarations: a new detector gets explanations by
declaring what it can do, never by being named."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clad
from clad.data.io import load_batch
from clad.detectors.base import Detector
from clad.detectors.capabilities import AddsReferences, GradCAM, ImageTextSpace, PatchFeatures
from clad.explain import Catalogue, Example, Explainer, explain, gradcam_maps
from conftest import plant_square

EXPLAIN = Path(clad.__file__).parent / "explain"


def test_builtin_declarations():
    cls = clad.registry.detector_class
    assert [n for n in clad.list_detectors() if cls(n).score_is_map_max] == ["clad_plus", "padim", "patch_knn", "patchcore"]
    teachable = [n for n in clad.list_detectors() if cls(n).can_add_references]
    assert teachable == ["clad_plus", "padim", "patch_knn", "patchcore"]
    assert clad.create_detector("clad", memory=True).can_add_references  # CLAD+'s memory is what learns
    # settings that change the answer: CLAD's image score, PatchCore's re-weighting (Eq. 7)
    assert clad.create_detector("clad", image_score="max").score_is_map_max
    assert not clad.create_detector("clad_plus", image_score="pooled").score_is_map_max
    assert not clad.create_detector("patchcore", reweight=True).score_is_map_max
    assert clad.create_detector("patchcore").score_is_map_max


@pytest.mark.parametrize("name", ["clad", "clad_plus", "patchcore", "padim", "patch_knn", "spade", "winclip"])
def test_builtin_protocols(name):
    det = clad.create_detector(name, **({"backbone": "clip:unused"} if name == "winclip" else {}))
    assert isinstance(det, ImageTextSpace) == (name in ("clad", "clad_plus"))
    assert isinstance(det, GradCAM) == (name in ("clad", "clad_plus", "patchcore"))
    assert isinstance(det, PatchFeatures) == (name != "winclip")
    assert isinstance(det, AddsReferences)  # every detector has the method; ``can_add_references`` says if it works


def test_patch_features_are_the_backbone_layers(normal_images):
    det = clad.create_detector("padim", backbone="tiny_cnn", image_size=64).fit(normal_images)
    f = det.patch_features(normal_images[:2])
    assert f.shape == (2, 8 + 16, 16, 16)  # the tiny CNN's stage1 + stage2 on stage1's grid (stride 4 at 64 px)


def test_explain_uses_no_private_attribute_copy_or_detector_name():
    names = set(clad.list_detectors())
    for path in sorted(EXPLAIN.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                on_detector = (isinstance(owner, ast.Name) and owner.id in ("det", "detector")) or (
                    isinstance(owner, ast.Attribute) and owner.attr == "detector")
                assert not on_detector, f"{path.name}:{node.lineno}: private detector attribute {node.attr}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in names, f"{path.name}:{node.lineno}: names the detector {node.value!r}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "copy" not in modules, f"{path.name}:{node.lineno}: copies"


# -- a detector defined here, not registered: declaring is all it takes ------------------------------------------
GRID = 8


@dataclass
class ToyConfig:
    seed: int = 0


class Toy(Detector):
    """Map: each pixel's grey-level distance to the references' mean grey; score: the map's maximum."""

    name = "toy"
    Config = ToyConfig

    def _fit(self, images):
        self.mean_ = float(np.mean([a.mean() for a in load_batch(images)[0]]))

    def _predict_batch(self, images):
        maps = [np.abs(a.mean(-1) - self.mean_) / 255.0 for a in load_batch(images)[0]]
        return np.array([m.max() for m in maps]), maps

    def _get_state(self):
        return {}, {"mean": self.mean_}

    def _set_state(self, tensors, meta):
        self.mean_ = meta["mean"]


class DeclaringToy(Toy):
    """Toy with every capability: a 3-d space (darker, brighter, normal) shared by patches and texts."""

    score_is_map_max = True

    def _cells(self, images) -> torch.Tensor:
        grey = torch.stack([torch.from_numpy(a.mean(-1)).float() for a in load_batch(images)[0]])[:, None]
        return F.adaptive_avg_pool2d(grey, GRID)[:, 0] - self.mean_  # (B, GRID, GRID)

    def embed_patches(self, images):
        d = self._cells(images) / 255.0
        z = torch.stack([(-d).clamp_min(0), d.clamp_min(0), torch.full_like(d, 0.02)], 1)  # (B, 3, GRID, GRID)
        return F.normalize(z, dim=1)

    def embed_texts(self, texts):
        axis = [0 if "dark" in t else 1 if "bright" in t else 2 for t in texts]
        return torch.eye(3)[axis]

    def trained_descriptions(self):
        return [("normal", "a photo of a flawless tile."), ("dark_spot", "a photo of a tile with a dark spot.")]

    def patch_features(self, images):
        return self._cells(images)[:, None]  # (B, 1, GRID, GRID)

    def gradcam(self, images, batch_size=16):
        return self.predict(images, batch_size=batch_size).anomaly_maps


def _data():
    refs = [np.full((64, 64, 3), 128, np.uint8) for _ in range(2)]
    bad, mask = plant_square(np.full((64, 64, 3), 128, np.uint8), 8, 40, 16, value=0)  # dark, upper right
    return refs, bad, mask


def test_a_declaring_detector_gets_full_explanations():
    refs, bad, mask = _data()
    det = DeclaringToy().fit(refs).set_threshold(0.25)
    types = ["dark_spot", "bright_spot"]
    (e,) = explain(det, [bad], defect_types=types)
    assert e.pixel_threshold_source == "detector" and e.pixel_threshold == 0.25  # score_is_map_max
    (r,) = e.regions
    assert r.bbox == (40, 8, 56, 24) and r.location == "upper right"
    assert r.types[0].name == "dark_spot" and r.types[0].similarity > 0.9  # ranked in the image-text space
    assert e.anomalous and "dark spot" in e.sentence
    # no defect types given: the kinds the space was trained with
    assert [t.name for t in explain(det, [bad])[0].regions[0].types] == ["dark_spot"]
    # references: the nearest normal patch
    (e,) = explain(det, [bad], defect_types=types, references=refs)
    assert e.regions[0].nearest_normal is not None and e.regions[0].nearest_normal.reference in (0, 1)
    # a catalogue is compared in the patch-feature space
    cat = Catalogue([Example("dark_spot", bad, mask)])
    ex = Explainer(det, catalogue=cat, defect_types=types).fit(references=refs)
    assert ex.space_ == "features" and ex.explain([bad])[0].named_type == "dark_spot"
    # Grad-CAM maps, and explanations of them
    assert [m.shape for m in gradcam_maps(det, [bad])] == [(64, 64)]
    assert Explainer(det, gradcam=True, defect_types=types).fit().explain([bad])[0].named_type == "dark_spot"


def test_a_detector_declaring_nothing_gets_regions_only():
    refs, bad, _ = _data()
    det = Toy().fit(refs).set_threshold(0.25)
    (e,) = explain(det, [bad], defect_types=["dark_spot"])
    assert e.pixel_threshold_source == "batch"  # a threshold on the score is not one on the map
    assert e.regions and e.regions[0].types == [] and e.regions[0].nearest_normal is None
    with pytest.raises(TypeError, match="Grad-CAM"):
        gradcam_maps(det, [bad])
    with pytest.raises(TypeError, match="image-text space"):
        Explainer(det, space="shared").fit()
