"""CLAD specifics: Eq. 3 by hand, synthetic anomalies, Grad-CAM, ablations, CLIP encoders."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clad
from clad.ops.coreset import KCenterIndex
from clad.ops.gradcam import grad_cam
from clad.ops.losses import contrastive_loss, supervised_loss
from clad.synthesis import KINDS, make_anomaly
from conftest import plant_square, texture


def test_contrastive_loss_matches_hand_computation():
    z_v = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    z_t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    alpha, beta = 0.5, 3.0
    # squared distances: item0 -> (0, 2); item1 -> (1, 1); item2 -> (4, 2)
    pos = [max(0, 0 - alpha), max(0, 1 - alpha), max(0, 2 - alpha)]  # own description
    neg = [max(0, beta - 2), max(0, beta - 1), max(0, beta - 4)]  # the other one
    expected = np.mean(pos) + np.mean(neg)
    got = contrastive_loss(z_v, z_t, y, alpha, beta)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    w = torch.tensor([1.0, 0.0, 1.0])
    expected_w = (pos[0] + neg[0] + pos[2] + neg[2]) / 2
    assert contrastive_loss(z_v, z_t, y, alpha, beta, weights=w).item() == pytest.approx(expected_w, abs=1e-6)


def test_supervised_loss_prefers_the_right_description():
    z_t = torch.eye(3)
    good = supervised_loss(torch.eye(3), z_t, torch.arange(3))
    bad = supervised_loss(torch.eye(3), z_t, torch.tensor([1, 2, 0]))
    assert good < bad


@pytest.mark.parametrize("kind", KINDS)
def test_every_synthetic_kind_changes_the_masked_pixels(kind):
    img = texture((96, 96), 0)
    a = make_anomaly(img, np.random.default_rng(3), kinds=[kind])
    assert a.kind == kind and a.mask.shape == img.shape[:2] and a.mask.any()
    changed = np.abs(a.image.astype(int) - img.astype(int)).max(-1) > 0
    assert changed[a.mask].mean() > 0.5  # the defect is where its mask says
    b = make_anomaly(img, np.random.default_rng(3), kinds=[kind])
    np.testing.assert_array_equal(a.image, b.image)


def test_grad_cam_weights_activations_by_mean_gradient():
    a = torch.rand(1, 2, 3, 3, requires_grad=True)
    score = (a[:, 0] * 2.0).sum(dim=(1, 2)) - (a[:, 1] * 1.0).sum(dim=(1, 2))
    cam = grad_cam(score, a)
    expected = torch.relu(2.0 * a[0, 0] - 1.0 * a[0, 1]).detach()
    torch.testing.assert_close(cam[0], expected)


def _tiny(tiny_clip_dir, **kw):
    params = dict(backbone="tiny_cnn", image_size=64, text_encoder=f"clip:{tiny_clip_dir}", epochs=3, n_train_images=24)
    params.update(kw)
    return params


def test_clad_plus_finds_a_planted_defect(tiny_clip_dir):
    refs = [texture((64, 64), s) for s in range(2)]
    # A random tiny CNN trained for a few steps gives an uninformed language map; weight the memory up.
    det = clad.create_detector("clad_plus", **_tiny(tiny_clip_dir, memory_weight=0.9)).fit(refs)
    bad, mask = plant_square(texture((64, 64), 11), 20, 30, 12)
    res = det.predict([texture((64, 64), 10), bad])
    assert res.scores[1] > res.scores[0]
    peak = np.unravel_index(res.anomaly_maps[1].argmax(), mask.shape)
    assert mask[peak]


@pytest.mark.parametrize("params", [{"loss": "supervised"}, {"finetune_stages": 0, "finetune_text_layers": 0},
                                    {"localization": "gradcam"}, {"image_score": "max"}])
def test_ablations_and_options_run(tiny_clip_dir, params):
    refs = [texture((64, 64), s) for s in range(2)]
    det = clad.create_detector("clad", **_tiny(tiny_clip_dir, **params)).fit(refs)
    res = det.predict([texture((64, 64), 5), texture((40, 72), 6)])
    assert [m.shape for m in res.anomaly_maps] == [(64, 64), (40, 72)]
    assert np.isfinite(res.scores).all()
    if params.get("localization") == "gradcam":
        assert all((m >= 0).all() for m in res.anomaly_maps)


def test_frozen_parts_stay_frozen(tiny_clip_dir):
    refs = [texture((64, 64), s) for s in range(2)]
    det = clad.create_detector("clad", **_tiny(tiny_clip_dir))
    before = {k: v.clone() for k, v in clad.create_backbone("tiny_cnn").state_dict().items()}
    det.fit(refs)
    after = det.model_.backbone.state_dict()
    for k, v in before.items():  # the original backbone (used by the memory) never changes
        torch.testing.assert_close(after[k], v)
    tuned = dict(det.model_.tail.named_parameters())
    orig = dict(torch.nn.ModuleList(det.model_.backbone.blocks_of_stage("stage3")).named_parameters())
    assert any(not torch.equal(tuned[k], orig[k]) for k in tuned)  # the fine-tuned copy did move


def test_clip_image_tower_as_visual_encoder(tiny_clip_dir):
    """With a CLIP backbone (frozen ViT), the text side defaults to the same model's text tower."""
    refs = [texture((32, 32), s) for s in range(2)]
    det = clad.create_detector("clad", backbone=f"clip:{tiny_clip_dir}", layers=("block1", "last"), epochs=2, n_train_images=8)
    det.fit(refs)
    assert det.model_.tail is None and type(det.model_.text).__name__ == "CLIPText"
    res = det.predict([texture((32, 32), 4)])
    assert res.anomaly_maps[0].shape == (32, 32)


def test_embed_texts_and_patches_live_in_one_space(tiny_clip_dir):
    refs = [texture((64, 64), s) for s in range(2)]
    det = clad.create_detector("clad", **_tiny(tiny_clip_dir)).fit(refs)
    t = det.embed_texts(["a scratch", "a hole"])
    p = det.embed_patches(refs[:1])
    assert t.shape[1] == p.shape[1] == det.config.embed_dim
    torch.testing.assert_close(t.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(p.norm(dim=1), torch.ones(p.shape[0], *p.shape[2:]))


def test_clad_plus_adopting_a_clad_fit_equals_fitting_it(tiny_clip_dir):
    """clad and clad_plus differ only in inference parameters: one fit serves both (the bench shares it)."""
    refs = [texture((64, 64), s) for s in range(2)]
    images = [texture((64, 64), 7), plant_square(texture((64, 64), 8), 20, 30, 12)[0]]
    tuned = dict(finetune_stages=1, finetune_text_layers=1)  # clad's defaults; clad_plus's own are frozen
    base = clad.create_detector("clad", **_tiny(tiny_clip_dir)).fit(refs)
    assert clad.create_detector("clad_plus", **_tiny(tiny_clip_dir)).fit_signature() != base.fit_signature()
    plus = clad.create_detector("clad_plus", **_tiny(tiny_clip_dir, **tuned))
    assert plus.fit_signature() == base.fit_signature()
    adopted = plus.adopt(base).predict(images)
    direct = clad.create_detector("clad_plus", **_tiny(tiny_clip_dir, **tuned)).fit(refs)
    np.testing.assert_allclose(adopted.scores, direct.predict(images).scores, rtol=1e-5, atol=1e-6)
    assert plus.threshold_ == pytest.approx(direct.threshold_)  # recalibrated for the fused score, not copied
    assert plus.threshold_ != pytest.approx(base.threshold_)
    other = clad.create_detector("clad_plus", **_tiny(tiny_clip_dir, loss="supervised", **tuned))
    with pytest.raises(ValueError, match="other settings"):
        other.adopt(base)


def test_memory_size_rule():
    from clad.detectors.clad import memory_size

    assert memory_size(1024, 0.25, 1024, 16384) == 1024  # one reference at 256 px: all of it
    assert memory_size(500, 0.25, 1024, 16384) == 500
    assert memory_size(4096, 0.25, 1024, 16384) == 1024  # four references: a quarter
    assert memory_size(8192, 0.25, 1024, 16384) == 2048
    assert memory_size(779_264, 0.25, 1024, 16384) == 16384  # full-shot magnetic tile: capped
    assert memory_size(4096, 1.0, 1024, 16384) == 4096
    with pytest.raises(ValueError, match="memory_ratio"):
        clad.create_detector("clad_plus", memory_ratio=0.0)
    with pytest.raises(ValueError, match="memory_min"):
        clad.create_detector("clad_plus", memory_min=20000)


def test_clad_plus_is_frozen_and_clad_fine_tunes(tiny_clip_dir):
    plus = clad.create_detector("clad_plus", **_tiny(tiny_clip_dir))
    assert plus.config.finetune_stages == 0 and plus.config.finetune_text_layers == 0
    paper = clad.create_detector("clad", **_tiny(tiny_clip_dir))
    assert paper.config.finetune_stages == 1 and paper.config.finetune_text_layers == 1


def test_many_references_keep_a_bounded_memory(tiny_clip_dir, monkeypatch):
    """Beyond memory_min patches the memory is a k-center coreset, searched by the pruned exact index."""
    monkeypatch.setattr(clad.detectors.clad.CLAD, "brute_force_max", 50)
    refs = [texture((64, 64), s) for s in range(6)]  # 6 images x 8x8 patches = 384
    params = _tiny(tiny_clip_dir, memory_ratio=0.25, memory_min=64, memory_max=200, memory_weight=0.9)
    det = clad.create_detector("clad_plus", **params).fit(refs)
    assert det.memory_bank_.shape[0] == 96  # a quarter of 384, between 64 and 200
    capped = clad.create_detector("clad_plus", **dict(params, memory_ratio=1.0)).fit(refs)
    assert capped.memory_bank_.shape[0] == 200
    flat = torch.randn(50, det.memory_bank_.shape[1])
    brute = torch.cdist(flat, det.memory_bank_).min(1).values
    torch.testing.assert_close(det._nearest_memory(flat), brute, rtol=1e-4, atol=1e-4)
    bad, mask = plant_square(texture((64, 64), 11), 20, 30, 12)
    res = det.predict([texture((64, 64), 10), bad])
    assert res.scores[1] > res.scores[0]


def test_aux_kind_maps_dataset_defect_names():
    from clad.vocabulary import KIND_DESCRIPTIONS, aux_kind

    classes = ["normal", *KIND_DESCRIPTIONS]
    assert aux_kind("broken_large", classes) == "missing_part"
    assert aux_kind("contamination", classes) == "stain"
    assert aux_kind("blowhole", classes) == "hole"
    assert aux_kind("fray", classes) == "crack"
    assert aux_kind("uneven", classes) == "texture"
    assert aux_kind("something_else", classes) == "texture"


def test_aux_defects_come_from_other_categories_only(tiny_clip_dir, tmp_path):
    from clad.data import load_image, make_synthetic_mvtec
    from clad.data.auxiliary import load_aux

    make_synthetic_mvtec(tmp_path, category="own", n_train=2, n_test_good=1, n_test_defect=3, size=48, seed=0)
    make_synthetic_mvtec(tmp_path, category="other", n_train=2, n_test_good=1, n_test_defect=6, size=48, seed=1)
    own = "own"
    images, masks, types = load_aux(f"mvtec:{tmp_path}", own, n=4, seed=0, size=32)
    assert len(images) == 4 and all(im.shape == (32, 32, 3) for im in images)
    assert all(m.shape == (32, 32) and m.dtype == bool and m.any() for m in masks)
    assert len(set(types)) > 1  # round-robin over defect types
    # Every image is one of the other category's test images, none of the evaluated category's.
    other = [np.asarray(Image.fromarray(load_image(p)).resize((32, 32), Image.BILINEAR))
             for p in sorted((tmp_path / "other" / "test").rglob("*.png"))]
    assert all(any(np.array_equal(im, o) for o in other) for im in images)
    with pytest.raises(ValueError, match="no category other than"):
        load_aux(f"mvtec:{_only(tmp_path, own)}", own, n=4, seed=0, size=32)
    with pytest.raises(ValueError, match="evaluated category"):
        load_aux(f"mvtec:{tmp_path}", None, n=4, seed=0, size=32)
    # A CLAD fit with aux trains on them and records their types (saved with the model).
    refs = [texture((64, 64), s) for s in range(2)]
    det = clad.create_detector("clad", **_tiny(tiny_clip_dir, category=own, aux=f"mvtec:{tmp_path}", aux_images=3)).fit(refs)
    assert len(det.aux_types_) == 3
    det.save(tmp_path / "model")
    assert clad.load_detector(tmp_path / "model").aux_types_ == det.aux_types_
    assert np.isfinite(det.predict([texture((64, 64), 9)]).scores).all()


def _only(root, category):
    """A dataset root holding just ``category`` (a symlink), to check the 'nothing else' error."""
    alone = root / "alone"
    alone.mkdir(exist_ok=True)
    link = alone / category
    if not link.exists():
        link.symlink_to(root / category, target_is_directory=True)
    return alone


def test_memory_search_keeps_the_faster_exact_search(tiny_clip_dir, monkeypatch):
    """Above brute_force_max, the index's first large search of test images (not the calibration at fit, on views
    of the references) times brute force against pruning; both give the same distances."""
    monkeypatch.setattr(clad.detectors.clad.CLAD, "brute_force_max", 100)
    monkeypatch.setattr(KCenterIndex, "decide_min", 64)
    refs = [texture((64, 64), s) for s in range(4)]  # 4 x 8x8 = 256 memory patches > 100
    det = clad.create_detector("clad_plus", **_tiny(tiny_clip_dir, memory_weight=0.9)).fit(refs)
    assert det.index_ is None  # calibration searched by brute force
    det.predict([texture((64, 64), 9)])  # 64 patches: decides
    assert det.index_.search in ("brute", "pruned")
    flat = torch.randn(300, det.memory_bank_.shape[1])
    want = torch.cdist(flat, det.memory_bank_).min(1).values
    for choice in ("brute", "pruned"):
        det.index_.search = choice
        torch.testing.assert_close(det._nearest_memory(flat), want, rtol=1e-4, atol=1e-4)


# -- the language half's score and the fit-time self-check (issue 23, part 4) ----------------------------------------
def test_contrast_score_is_one_minus_the_softmax_at_the_normal_description():
    from clad.detectors.clad.model import language_score

    classes = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)  # normal first
    z = F.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.2, 1.0, 0.1], [0.5, 0.0, 0.5]]), dim=-1)[..., None]  # (3, 3, 1)
    sigma = torch.tensor(0.5)
    d2 = ((z[:, None, :, 0] - classes[None]) ** 2).sum(-1)  # (3, C)
    expected = 1 - torch.softmax(-d2 / sigma, dim=1)[:, 0]
    got = language_score(z, classes, sigma, "contrast")[:, 0]
    torch.testing.assert_close(got, expected)
    assert got[1] > 0.5 > got[0]  # nearer a defect description than the normal one: anomalous
    torch.testing.assert_close(language_score(z, classes, sigma, "normal")[:, 0], 1 - torch.exp(-d2[:, 0] / sigma))


def _report(lang: float, fusion: dict) -> dict:
    return {"language": {"patch": lang, "image": lang}, "memory": {"patch": 0.9, "image": 0.9},
            "fusion": {f"{w:.1f}": v for w, v in fusion.items()}}


def test_the_language_weight_is_earned_on_the_self_check():
    from clad.detectors.clad.calibration import choose_language_weight, language_is_weak

    flat = {w / 10: 0.9 for w in range(6)}
    helps = {0.0: 0.90, 0.1: 0.93, 0.2: 0.95, 0.3: 0.952, 0.4: 0.94, 0.5: 0.93}
    assert choose_language_weight(_report(0.95, helps)) == 0.2  # the smallest within half a point of the best
    assert choose_language_weight(_report(0.95, flat)) == 0.0  # no gain over the memory alone: no weight
    assert choose_language_weight(_report(0.995, {**flat, 0.5: 0.905})) == 0.0  # half a point is not enough
    assert language_is_weak(_report(0.55, helps)) and choose_language_weight(_report(0.55, helps)) == 0.0
    assert not language_is_weak(_report(0.65, helps))


def test_self_check_is_stored_and_survives_save_and_load(tiny_clip_dir, tmp_path):
    refs = [texture((64, 64), s) for s in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny random model's language map may well be weak
        det = clad.create_detector("clad_plus", **_tiny(tiny_clip_dir)).fit(refs)
    check = det.self_check_
    assert set(check) == {"language", "memory", "fusion"} and len(check["fusion"]) == 6
    assert all(v is None or 0.0 <= v <= 1.0 for half in ("language", "memory") for v in check[half].values())
    assert det.memory_weight() == 1.0 - det.language_weight_
    det.save(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["meta"]["self_check"] == check and doc["meta"]["language_weight"] == det.language_weight_
    back = clad.load_detector(tmp_path / "m")
    assert back.self_check_ == check and back.language_weight_ == det.language_weight_
    tests = [texture((64, 64), 7), plant_square(texture((64, 64), 8), 20, 20, 12)[0]]
    np.testing.assert_allclose(back.predict(tests).scores, det.predict(tests).scores, rtol=1e-5)


def test_a_useless_language_map_warns_and_gets_no_weight(tiny_clip_dir, monkeypatch):
    """A language map of noise (forced) is caught at fit: a warning, and CLAD+ fuses the memory alone."""
    from clad.detectors.clad import detector as module

    noise = torch.Generator().manual_seed(0)
    monkeypatch.setattr(module, "language_score",
                        lambda z, *a: torch.rand(z.shape[:1] + z.shape[2:], generator=noise))
    refs = [texture((64, 64), s) for s in range(2)]
    with pytest.warns(UserWarning, match="language map is near or below chance"):
        det = clad.create_detector("clad_plus", **_tiny(tiny_clip_dir)).fit(refs)
    assert det.language_weight_ == 0.0 and det.memory_weight() == 1.0
    assert det.self_check_["language"]["patch"] < 0.6
    fixed = clad.create_detector("clad_plus", **_tiny(tiny_clip_dir, memory_weight=0.7))
    assert fixed.adopt(det).memory_weight() == 0.7  # a number given by the user is kept


def test_memory_weight_is_none_or_a_fraction():
    with pytest.raises(ValueError, match="memory_weight"):
        clad.create_detector("clad_plus", memory_weight=1.5)
