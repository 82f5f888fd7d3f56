"""Teaching (``add_references``): a fitted detector learns more normal images without a refit.

Fit on A then add B is compared with a fit on A + B: the same Gaussians for PaDiM and the same memory for
patch_knn and for PatchCore without subsampling; for PatchCore's coreset and CLAD+'s memory, close scores and a
defect separated at least as well. Then saving, the threshold, errors, and the search indexes that grow in place.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clad
from clad.detectors.base import _fit_digest
from clad.detectors.patchcore import coreset_size
from clad.errors import ConfigError, ImageLoadError, TeachingError
from clad.metrics import image_auroc as auroc
from clad.ops.coreset import KCenterIndex, _kcenter_plain, continue_coreset, coverage_radius, greedy_coreset
from clad.ops.ivf import ProjectedIVF
from clad.ops.knn import knn
from conftest import plant_square, texture

TINY = {"backbone": "tiny_cnn", "image_size": 64}
A = [texture((64, 64), s) for s in range(3)]
B = [texture((64, 64), s) for s in range(10, 14)]


def _tests() -> tuple[list[np.ndarray], np.ndarray]:
    """Normal images and images with a planted square, and their labels."""
    normal = [texture((64, 64), s) for s in (50, 51, 52, 53)]
    odd = [plant_square(texture((64, 64), s), 8 + 5 * i, 30 - 6 * i, 6, value=200)[0]
           for i, s in enumerate((60, 61, 62))]
    return normal + odd, np.r_[np.zeros(len(normal)), np.ones(len(odd))]


def _nearest(rows: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Distance of each row to its nearest bank row, computed directly (exactly 0 for a row of the bank)."""
    return torch.cdist(rows, bank, compute_mode="donot_use_mm_for_euclid_dist").min(1).values


def _make(name: str, **params):
    return clad.create_detector(name, **{**TINY, **params})


# -- the maths: the coreset continued, the indexes extended -------------------------------------------------------


def _clustered(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=gen) * 4 + shift
    return centres[torch.randint(12, (n,), generator=gen)] + torch.randn(n, dim, generator=gen) * 0.5


@pytest.mark.parametrize("n_new", [500, 6000])  # the textbook loop / the blocks (above 4,096 points)
def test_continued_coreset_is_the_greedy_choice_among_the_new_points(n_new):
    centres, new = _clustered(400, 16, 0), _clustered(n_new, 16, 1, shift=1.0)
    sel = continue_coreset(new, centres, 120, projection_dim=None)
    assert len(set(sel.tolist())) == 120
    if n_new > 4096:  # the blocks make the textbook loop's choices, from the same starting distances
        init = knn(new, centres, k=1, indices=False)[0][:, 0].square()
        assert torch.equal(sel, _kcenter_plain(new, 120, init=init))
    # each choice is (to float rounding) the new point farthest from the centres and the choices before it
    d = torch.cdist(new, centres).min(1).values
    for i in sel[:40].tolist():
        assert d[i] >= d.max() * (1 - 1e-5)
        d = torch.minimum(d, (new - new[i]).norm(dim=1))


def test_continued_coreset_covers_like_a_coreset_of_everything():
    old, new = _clustered(3000, 24, 2), _clustered(2000, 24, 3, shift=2.0)
    memory = old[greedy_coreset(old, 300, projection_dim=None)]
    grown = torch.cat([memory, new[continue_coreset(new, memory, 200, projection_dim=None)]])
    everything = torch.cat([old, new])
    scratch = everything[greedy_coreset(everything, 500, projection_dim=None)]
    assert coverage_radius(everything, grown) <= 1.2 * coverage_radius(everything, scratch)
    assert torch.equal(continue_coreset(new, memory, len(new)), torch.arange(len(new)))  # all: in order
    assert torch.equal(continue_coreset(new, memory[:0], 50, seed=4), greedy_coreset(new, 50, seed=4))


def test_extended_kcenter_index_is_exact_and_leaves_the_old_one():
    old, rows, query = _clustered(3000, 20, 4), _clustered(700, 20, 5, shift=3.0), _clustered(900, 20, 6, shift=1.5)
    index = KCenterIndex(old)
    grown = index.extended(rows)
    want_d, want_i = knn(query, torch.cat([old, rows]), k=1)
    d, i = grown._pruned(query, 0, workers=2)
    torch.testing.assert_close(d, want_d[:, 0], rtol=1e-5, atol=1e-4)
    assert torch.equal(i, want_i[:, 0])
    assert torch.equal(index.nearest(query)[1], knn(query, old, k=1)[1][:, 0])  # the old index is unchanged
    d, _ = grown._pruned(query, 1, workers=1)  # approximate: never below the exact distance
    assert bool((d >= want_d[:, 0] - 1e-4).all())


def test_extended_projected_ivf_stays_exact_with_bounds():
    old, rows, query = _clustered(3000, 40, 7), _clustered(800, 40, 8, shift=2.0), _clustered(400, 40, 9, shift=1.0)
    bank = torch.cat([old, rows])
    ivf = ProjectedIVF(old, dim=8).extended(rows)
    want_d, want_i = knn(query, bank, k=1)
    d, i = ivf.nearest(query, n_probe=1)
    torch.testing.assert_close(d, (query - bank[i]).norm(dim=1), rtol=1e-4, atol=1e-4)  # a true distance to row i
    assert bool((d >= want_d[:, 0] - 1e-4).all())
    d, i = ivf.exact(query, d)
    torch.testing.assert_close(d, want_d[:, 0], rtol=1e-4, atol=1e-4)
    assert torch.equal(i, want_i[:, 0])


# -- fit on A, add B against a fit on A + B ---------------------------------------------------------------------


def test_padim_teaching_equals_a_fit_on_all_references():
    taught = _make("padim").fit(A).add_references(B[:1]).add_references(B[1:])
    scratch = _make("padim").fit(A + B)
    torch.testing.assert_close(taught.mean_, scratch.mean_, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(taught.precision_, scratch.precision_, rtol=1e-4, atol=1e-5)
    images, _ = _tests()
    np.testing.assert_allclose(taught.predict(images).scores, scratch.predict(images).scores, rtol=1e-4)
    assert taught.threshold_ == pytest.approx(scratch.threshold_, rel=1e-4)  # views of the same 7 references
    assert taught.n_references_ == 7 and taught.moments_.n == 14  # each reference and its jittered copy


def test_patch_knn_teaching_appends_the_memory():
    taught = _make("patch_knn").fit(A).add_references(B)
    scratch = _make("patch_knn").fit(A + B)
    assert torch.equal(taught.memory_bank_, scratch.memory_bank_)
    assert taught.threshold_ == scratch.threshold_


def test_patch_knn_memory_stays_a_sample_past_max_bank():
    det = _make("patch_knn", max_bank=250).fit(A)  # 3 x 64 patches
    every = torch.cat([det._patches(A), det._patches(B)])
    det.add_references(B)
    assert det.memory_bank_.shape == (250, every.shape[1]) and det.bank_size_ == len(every)
    assert float(_nearest(det.memory_bank_, every).max()) == 0  # every memory row is one of the patches seen
    taught = (_nearest(det.memory_bank_, det._patches(B)) == 0).sum()
    assert 58 < int(taught) < 250  # B's patches took the 58 free slots and some others, not all


def test_patchcore_without_subsampling_equals_a_fit_on_all_references():
    # without jittered copies: with them the memory keeps as many rows as the references have patches, chosen
    # among theirs and the copies', by a greedy rule that a continued selection cannot repeat exactly
    taught = _make("patchcore", coreset_ratio=1.0, reference_jitter=0).fit(A).add_references(B)
    scratch = _make("patchcore", coreset_ratio=1.0, reference_jitter=0).fit(A + B)
    assert torch.equal(taught.memory_bank_, scratch.memory_bank_)
    images, _ = _tests()
    np.testing.assert_allclose(taught.predict(images).scores, scratch.predict(images).scores, rtol=1e-5)


def test_patchcore_coreset_grows_like_a_fit_on_all_references():
    # the continued greedy rule against a fresh one, on the references alone (the copies' share: test_corruptions)
    before = _make("patchcore", coreset_ratio=0.25, reference_jitter=0).fit(A)
    size = len(before.memory_bank_)
    taught = before.add_references(B)
    scratch = _make("patchcore", coreset_ratio=0.25, reference_jitter=0).fit(A + B)
    assert len(taught.memory_bank_) == len(scratch.memory_bank_) == coreset_size(7 * 64, 0.25) > size
    every = torch.cat([taught._patches(A), taught._patches(B)])
    assert coverage_radius(every, taught.memory_bank_) <= 1.25 * coverage_radius(every, scratch.memory_bank_)
    images, labels = _tests()
    s_taught, s_scratch = taught.predict(images).scores, scratch.predict(images).scores
    np.testing.assert_allclose(s_taught, s_scratch, rtol=0.15)
    assert auroc(labels, s_taught) >= auroc(labels, s_scratch)


def test_patchcore_teaching_with_the_approximate_search_keeps_exact_image_scores():
    params = {"n_probe": 1, "probe_min": 0, "probe_dim": 4}
    det = _make("patchcore", coreset_ratio=0.5, **params).fit(A)
    det.predict(A[:1])  # the indexes exist, so teaching extends them
    built = det.probe_index_.built_size
    det.add_references(B[:1])
    assert det.probe_index_.built_size == built and len(det.memory_bank_) > built  # extended, not rebuilt
    images, _ = _tests()
    det.config.reference_jitter = 0  # _patches of the test images themselves, without copies
    patches = det._patches(images).view(len(images), -1, det.memory_bank_.shape[1])  # (B, h*w, C)
    exact = torch.stack([knn(p, det.memory_bank_, k=1, indices=False)[0].max() for p in patches])
    np.testing.assert_allclose(det.predict(images).scores, exact.numpy(), rtol=1e-4)


@pytest.fixture(scope="module")
def clad_plus(tiny_clip_dir):
    params = {**TINY, "text_encoder": f"clip:{tiny_clip_dir}", "epochs": 1, "n_train_images": 8, "memory_min": 256,
              "memory_weight": 1.0}
    return params, clad.create_detector("clad_plus", **params).fit(A)


def test_clad_plus_memory_learns_and_language_half_stays(clad_plus):
    params, fitted = clad_plus
    det = clad.create_detector("clad_plus", **params).adopt(fitted)  # a copy to teach (teaching replaces tensors)
    heads = {k: v.clone() for k, v in det.model_.heads.state_dict().items()}
    lang = (det.text_embeddings_.clone(), det.sigma_.clone(), det.scale_lang_.clone())
    det.add_references(B)
    assert len(det.memory_bank_) > len(fitted.memory_bank_)
    assert all(torch.equal(v, det.model_.heads.state_dict()[k]) for k, v in heads.items())
    assert all(map(torch.equal, lang, (det.text_embeddings_, det.sigma_, det.scale_lang_)))
    assert not torch.equal(det.scale_mem_, fitted.scale_mem_)
    # memory_weight=1: the map is the memory's; a fit on A + B trains the language half again, which is unused
    scratch = clad.create_detector("clad_plus", **params).fit(A + B)
    images, labels = _tests()
    s_taught, s_scratch = det.predict(images).scores, scratch.predict(images).scores
    np.testing.assert_allclose(s_taught, s_scratch, rtol=0.25)
    assert auroc(labels, s_taught) >= auroc(labels, s_scratch)


# -- saving, the threshold, errors -------------------------------------------------------------------------------

FOUR = ["padim", "patch_knn", "patchcore", "clad_plus"]


def _fitted(name: str, clip_dir) -> clad.Detector:
    extra = {"text_encoder": f"clip:{clip_dir}", "epochs": 1, "n_train_images": 8} if name == "clad_plus" else {}
    return _make(name, **extra).fit(A)


@pytest.mark.parametrize("name", FOUR)
def test_taught_model_saves_loads_and_is_taught_again_alike(name, tiny_clip_dir, tmp_path):
    det = _fitted(name, tiny_clip_dir).add_references(B[:2])
    loaded = clad.load_detector(det.save(tmp_path / "m"))  # the checksums (format 2, fit_sha256) pass
    images, _ = _tests()
    np.testing.assert_allclose(loaded.predict(images).scores, det.predict(images).scores, rtol=1e-5)
    assert loaded.threshold_ == pytest.approx(det.threshold_) and loaded.n_references_ == 5
    det.add_references(B[2:])
    loaded.add_references(B[2:])
    np.testing.assert_allclose(loaded.predict(images).scores, det.predict(images).scores, rtol=1e-4)
    assert loaded.threshold_ == pytest.approx(det.threshold_, rel=1e-4)


def test_editing_what_teaching_saved_fails_the_integrity_check(tmp_path):
    saved = _make("patch_knn").fit(A).add_references(B).save(tmp_path / "m")
    doc = json.loads((saved / "config.json").read_text())
    assert doc["meta"]["teaching"] == {"n_references": 7} and doc["meta"]["bank_size"] == 7 * 64
    doc["meta"]["teaching"]["n_references"] = 3
    (saved / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="fit_sha256"):
        clad.load_detector(saved)


def test_threshold_follows_the_references_unless_the_user_set_it():
    det = _make("padim").fit(A)
    before = det.threshold_
    assert det.add_references(B).threshold_ != before and det.threshold_source_ == "references"
    det = _make("padim").fit(A).set_threshold(2.5)
    assert det.add_references(B).threshold_ == 2.5 and det.threshold_source_ == "user"


@pytest.mark.parametrize("name", ["spade", "clad"])
def test_detectors_without_the_capability_refuse(name, tiny_clip_dir):
    extra = {"text_encoder": f"clip:{tiny_clip_dir}"} if name == "clad" else {}
    det = _make(name, **extra)
    assert not det.can_add_references
    with pytest.raises(TeachingError, match="can_add_references is False"):
        det.add_references(B)


def test_unfitted_empty_or_old_models_refuse():
    with pytest.raises(TeachingError, match="not fitted"):
        _make("patchcore").add_references(B)
    det = _make("patchcore").fit(A)
    with pytest.raises(TeachingError, match="at least one image"):
        det.add_references([])
    det.references_ = None  # as a model saved before teaching loads
    with pytest.raises(TeachingError, match="saved without what teaching needs"):
        det.add_references(B)


def test_model_saved_before_teaching_loads_but_refuses_teaching(tmp_path):
    from safetensors.torch import load_file, save_file

    saved = _make("padim").fit(A).save(tmp_path / "m")
    tensors = {k: v for k, v in load_file(saved / "model.safetensors").items()
               if not k.startswith(("teaching.", "moments."))}
    save_file(tensors, str(saved / "model.safetensors"))
    doc = json.loads((saved / "config.json").read_text())
    for key in ("teaching", "moments_n"):
        del doc["meta"][key]
    doc["tensors"] = {k: v for k, v in doc["tensors"].items() if k in tensors}
    doc["sha256"] = __import__("hashlib").sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    doc["fit_sha256"] = _fit_digest(doc["params"], doc["meta"])
    (saved / "config.json").write_text(json.dumps(doc))
    old = clad.load_detector(saved)
    assert old.predict(A[:1]).scores.shape == (1,)
    with pytest.raises(TeachingError, match="saved without what teaching needs"):
        old.add_references(B)


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_bad_images_raise_predicts_errors_and_change_nothing(name, tmp_path):
    det = _make(name).fit(A)
    state, threshold = {k: v.clone() for k, v in det._get_state()[0].items()}, det.threshold_
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match="nope.png") as raised:
        det.predict([missing])
    with pytest.raises(type(raised.value), match="nope.png"):
        det.add_references([B[0], missing])
    with pytest.raises(type(raised.value)):
        det.add_references([np.zeros((4, 4, 5), np.uint8)])
    assert all(torch.equal(v, det._get_state()[0][k]) for k, v in state.items()) and det.threshold_ == threshold


def test_an_error_while_teaching_leaves_the_detector_as_it_was(monkeypatch):
    det = _make("patchcore").fit(A)
    memory, refs, n = det.memory_bank_, det.references_, det.n_references_

    def fail(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(det, "_calibrate_threshold", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        det.add_references(B)
    assert det.memory_bank_ is memory and det.references_ is refs and det.n_references_ == n


def test_threshold_sample_of_references_is_bounded_and_independent_of_the_split():
    many = [texture((40, 40), s) for s in range(30)]
    once = _make("patch_knn").fit(many)
    taught = _make("patch_knn").fit(many[:5]).add_references(many[5:12]).add_references(many[12:])
    assert once.references_.shape == (16, 64, 64, 3) and once.n_references_ == 30
    assert torch.equal(once.references_, taught.references_)
