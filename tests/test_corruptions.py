"""``clad.data.corruptions``: shapes and dtypes kept, identity at severity 0, seeded, masks follow the geometry."""
from __future__ import annotations

import numpy as np
import pytest

from clad.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupt_samples, parse_corruptions
from clad.types import Sample

GEOMETRIC = ("rotate", "translate")


@pytest.fixture
def image_and_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)  # blur 1: std 0.36 px
    mask = np.zeros((120, 160), bool)
    mask[40:70, 50:90] = True
    return image, mask


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("severity", SEVERITIES)
def test_shapes_and_dtypes_are_kept_and_the_image_changes(image_and_mask, name, severity):
    image, mask = image_and_mask
    out, out_mask = corrupt(image, mask, name, severity, seed=3)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out_mask.shape == mask.shape and out_mask.dtype == bool
    assert not np.array_equal(out, image)
    if name not in GEOMETRIC:
        assert out_mask is mask  # photometric: the defect stays where it was


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_zero_and_none_are_the_identity(image_and_mask, name):
    image, mask = image_and_mask
    assert all(a is b for a, b in zip(corrupt(image, mask, name, 0, seed=1), (image, mask)))
    assert all(a is b for a, b in zip(corrupt(image, mask, "none", 2, seed=1), (image, mask)))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_same_result(image_and_mask, name):
    image, mask = image_and_mask
    a, b = corrupt(image, mask, name, 2, seed=7), corrupt(image, mask, name, 2, seed=7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_noise_differs_between_seeds_and_grows_with_severity(image_and_mask):
    image, _ = image_and_mask
    seed0, seed1 = (corrupt(image, None, "gaussian_noise", 1, seed)[0] for seed in (0, 1))
    assert not np.array_equal(seed0, seed1)
    err = [np.abs(corrupt(image, None, "gaussian_noise", s, 0)[0].astype(int) - image).mean() for s in SEVERITIES]
    assert err[0] < err[1] < err[2]


def test_mask_follows_a_translation_and_its_uncovered_part_is_normal():
    # a bright square with its mask: after the move the bright pixels must be where the moved mask is
    image = np.zeros((60, 60, 3), np.uint8)
    mask = np.zeros((60, 60), bool)
    mask[20:30, 20:30] = True
    image[mask] = 255
    out, out_mask = corrupt(image, mask, "translate", 3, seed=5)
    ys, xs = np.nonzero(out_mask)
    moved = (ys.min() - 20, xs.min() - 20)
    assert moved != (0, 0) and out_mask.sum() == pytest.approx(100, abs=25)
    assert out[out_mask].mean() > 200 and out[~out_mask].mean() < 60  # the bright square moved with its mask
    # a mask touching the border: the part shifted in from outside is normal
    edge = np.zeros((60, 60), bool)
    edge[:, :5] = True
    _, shifted = corrupt(image, edge, "translate", 3, seed=5)
    assert shifted.sum() <= edge.sum()


def test_mask_follows_a_rotation():
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[28:36, 44:60] = True  # right of the centre: a rotation moves it up or down
    image[mask] = 255
    out, out_mask = corrupt(image, mask, "rotate", 3, seed=2)
    assert not np.array_equal(out_mask, mask) and abs(int(out_mask.sum()) - 128) < 30
    assert out[out_mask].mean() > 200


def test_geometric_border_is_reflected_not_black():
    image = np.full((32, 32, 3), 180, np.uint8)
    out, _ = corrupt(image, None, "translate", 3, seed=0)
    assert out.min() == 180  # no black fill where the image moved away


def test_samples_are_corrupted_by_path_whatever_their_order(image_and_mask):
    image, mask = image_and_mask
    samples = [Sample(image, 1, mask, "a.png", "x"), Sample(image, 1, mask, "b.png", "x")]
    fwd = corrupt_samples(samples, "gaussian_noise", 1, seed=0)
    back = corrupt_samples(samples[::-1], "gaussian_noise", 1, seed=0)
    assert np.array_equal(fwd[0].image, back[1].image) and not np.array_equal(fwd[0].image, fwd[1].image)
    assert fwd[0].path == "a.png" and fwd[0].defect_type == "x" and samples[0].image is image  # inputs untouched


def test_parse_corruptions():
    assert parse_corruptions("gaussian_noise:1,3,blur,jpeg:2") == [
        ("gaussian_noise", 1), ("gaussian_noise", 3), ("blur", 1), ("blur", 2), ("blur", 3), ("jpeg", 2)]
    assert len(parse_corruptions("all")) == len(CORRUPTIONS) * 3
    for bad, word in (("fog", "fog"), ("blur:4", "'4'"), ("2", "follows no")):
        with pytest.raises(ValueError, match=word):
            parse_corruptions(bad)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(np.zeros((4, 4, 3), np.uint8), None, "fog", 1)


def test_jittered_copies_are_seeded_and_join_patchcore_memory(image_and_mask):
    from clad.data.corruptions import jittered_copies
    from clad.detectors.patchcore import coreset_size
    from clad.registry import create_detector

    images = [image_and_mask[0], image_and_mask[0][::-1].copy()]
    a, b = jittered_copies(images, 2, 0), jittered_copies(images, 2, 0)
    assert len(a) == 4 and all(x.shape == images[0].shape and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], a[1])
    assert all(np.array_equal(x, y) for x, y in zip(a[2:], jittered_copies(images[1:], 2, 0, first=1)))  # per image
    assert jittered_copies(images, 0, 0) == []
    tiny = {"backbone": "tiny_cnn", "image_size": 32}
    plain = create_detector("patchcore", **tiny, reference_jitter=0).fit(images)
    assert create_detector("patchcore").config.reference_jitter == 1  # on by default
    own = plain._patches(images)[:, None, :]  # every patch of the references themselves
    # coreset_of="bank" (the default): the copies are patches like any other, the memory grows with them
    grown = create_detector("patchcore", **tiny, reference_jitter=2).fit(images)
    assert grown.bank_size_ == 3 * plain.bank_size_
    assert len(grown.memory_bank_) == coreset_size(3 * plain.bank_size_, grown.config.coreset_ratio)
    assert (grown.memory_bank_[None] - own).abs().amax(-1).amin(0).gt(1e-4).any()  # some rows are the copies'
    # coreset_of="references": the memory keeps coreset_ratio of the references' own patches, shared with the copies
    shared = create_detector("patchcore", **tiny, reference_jitter=2, coreset_of="references").fit(images)
    assert shared.bank_size_ == plain.bank_size_ and len(shared.memory_bank_) == len(plain.memory_bank_)
    assert (shared.memory_bank_[None] - own).abs().amax(-1).amin(0).gt(1e-4).any()
    # teaching counts the new references' patches as the fit did: two more references add as many rows as a fit
    # on all four would keep
    more = [np.ascontiguousarray(x[:, ::-1]) for x in images]
    for det in (plain, grown, shared):
        det.add_references(more)
    assert grown.bank_size_ == 3 * plain.bank_size_
    assert len(grown.memory_bank_) == coreset_size(grown.bank_size_, grown.config.coreset_ratio)
    assert shared.bank_size_ == plain.bank_size_ and len(shared.memory_bank_) == len(plain.memory_bank_)
    with pytest.raises(ValueError, match="coreset_of"):
        create_detector("patchcore", coreset_of="copies")


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_median_baseline_moves_each_image_by_one_constant(image_and_mask, name):
    """median_baseline subtracts one number per image (its median patch distance) from the map and the score:
    the ranking of the patches inside an image is unchanged, and an image's map and score move alike."""
    from clad.registry import create_detector

    rng = np.random.default_rng(1)
    refs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    tests = [image_and_mask[0], rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)]
    det = create_detector(name, backbone="tiny_cnn", image_size=32, sigma=0.0).fit(refs)
    plain = det.predict(tests)
    det.config.median_baseline = True
    moved = det.predict(tests)
    for i in range(len(tests)):
        shift = plain.anomaly_maps[i] - moved.anomaly_maps[i]  # (H, W), one value everywhere
        assert shift.max() - shift.min() < 1e-4 and shift.mean() > 0
        assert moved.scores[i] == pytest.approx(plain.scores[i] - shift.mean(), abs=1e-4)
