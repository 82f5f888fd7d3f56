"""Shape and resolution (clad.ops.geometry): squeeze, keep, tiles; PatchCore with each."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clad
from clad.errors import ConfigError
from clad.ops.geometry import OVERLAP, STEP, Geometry, cuts, reference_scale, working_shape
from conftest import plant_square, texture


@pytest.mark.parametrize("length,tile", [(64, 128), (128, 128), (144, 128), (256, 128), (496, 192), (1024, 256), (208, 160)])
def test_cuts_keep_every_pixel_once_away_from_the_cuts(length, tile):
    parts = cuts(length, tile, stride=8)
    owner = np.zeros(length, int)
    for start, lo, hi in parts:
        assert start % 8 == 0 and lo % 8 == 0 and start <= lo < hi <= start + min(tile, length) <= length
        owner[lo:hi] += 1
        if lo > 0:  # a cut inside the image: the kept patches are half an overlap away from the tile's edges
            assert lo - start >= OVERLAP // 2
        if hi < length:
            assert start + tile - hi >= OVERLAP // 2
    assert (owner == 1).all()
    assert parts[-1][0] + min(tile, length) == length


def test_working_shape_keeps_the_aspect_on_multiples_of_step():
    for h, w in [(100, 600), (317, 211), (20, 20), (1600, 800)]:
        H, W = working_shape(h, w, 0.8)
        assert H % STEP == 0 and W % STEP == 0 and min(H, W) >= 2 * STEP
        if min(h, w) * 0.8 >= 4 * STEP:
            assert abs(H / W - h / w) / (h / w) < 0.15
    assert reference_scale([(100, 100), (300, 300), (200, 200)], 256) == pytest.approx(256 / 200)
    assert reference_scale([(100, 400)], 256, zoom=2.0) == pytest.approx(2 * 256 / 200)


def test_tiled_features_equal_whole_ones_for_a_local_extractor():
    """Stitching is exact where the extractor's receptive field is smaller than half an overlap."""
    x = torch.randn(2, 3, 192, 320)
    extract = lambda t: F.avg_pool2d(t, 8)  # noqa: E731  stride 8, receptive field 8
    whole = Geometry("keep", 256, 1.0).features(x, extract, 8)
    tiled = Geometry("keep", 256, 1.0, tile=128).features(x, extract, 8)
    assert tiled.shape == whole.shape == (2, 3, 24, 40)
    torch.testing.assert_close(tiled, whole)


def test_groups_follow_the_working_shape():
    g = Geometry("keep", 256, 0.5)
    groups = g.groups([(100, 300), (300, 100), (101, 299), (64, 64)])
    assert [idx for idx, _ in groups] == [[0, 2], [1], [3]]
    assert Geometry("squeeze", 128).groups([(10, 20), (30, 5)]) == [([0, 1], (128, 128))]
    with pytest.raises(ValueError, match="scale"):
        Geometry("keep", 256)


def _refs():
    return [texture((96, 288), s) for s in range(3)] + [texture((288, 96), 9)]


def test_patchcore_keep_maps_at_the_input_shape_and_survives_saving(tmp_path):
    det = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64, resize="keep").fit(_refs())
    assert det.scale_ == pytest.approx(64 / np.sqrt(96 * 288))
    bad, mask = plant_square(texture((96, 288), 20), 40, 120, 16)
    tests = [texture((96, 288), 21), bad, texture((50, 300), 22)]
    res = det.predict(tests)
    assert [m.shape for m in res.anomaly_maps] == [(96, 288), (96, 288), (50, 300)]
    assert res.scores[1] > res.scores[0]
    assert res.anomaly_maps[1][mask].mean() > res.anomaly_maps[1][~mask].mean()
    cams = det.gradcam(tests)  # per working shape too
    assert [c.shape for c in cams] == [(96, 288), (96, 288), (50, 300)] and all(np.isfinite(c).all() for c in cams)
    again = clad.load_detector(det.save(tmp_path / "m")).predict(tests)
    np.testing.assert_allclose(again.scores, res.scores, rtol=1e-5)
    assert again.threshold == pytest.approx(res.threshold)


def test_keep_on_square_images_of_the_working_size_is_squeeze():
    refs = [texture((64, 64), s) for s in range(3)]
    tests = [texture((64, 64), 7), plant_square(texture((64, 64), 8), 20, 20, 8)[0]]
    a = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64).fit(refs)
    b = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64, resize="keep").fit(refs)
    ra, rb = a.predict(tests), b.predict(tests)
    np.testing.assert_allclose(rb.scores, ra.scores, rtol=1e-6)
    np.testing.assert_allclose(rb.anomaly_maps[1], ra.anomaly_maps[1], rtol=1e-5, atol=1e-6)
    assert b.threshold_ == pytest.approx(a.threshold_)


def test_tile_at_least_the_image_changes_nothing_and_smaller_tiles_score():
    refs, tests = _refs(), [texture((96, 288), 30)]
    whole = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64, resize="keep", zoom=2.0).fit(refs)
    big = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64, resize="keep", zoom=2.0,
                               tile=512).fit(refs)
    np.testing.assert_allclose(big.predict(tests).scores, whole.predict(tests).scores, rtol=1e-6)
    tiled = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64, resize="keep", zoom=2.0,
                                 tile=128).fit(refs)
    res = tiled.predict(tests)
    assert np.isfinite(res.scores).all() and res.anomaly_maps[0].shape == (96, 288)


@pytest.mark.parametrize("params,match", [({"resize": "crop"}, "resize"), ({"resize": "keep", "tile": 200}, "multiple"),
                                          ({"resize": "keep", "tile": 64}, "tile"),
                                          ({"zoom": 2.0}, "resize=keep"), ({"resize": "keep", "zoom": 0}, "zoom"),
                                          ({"resize": "keep", "zoom": 0.01}, "zoom")])
def test_bad_shape_settings_are_refused(params, match):
    with pytest.raises(ConfigError, match=match):
        clad.create_detector("patchcore", backbone="tiny_cnn", **params)


def test_keep_is_not_exported():
    from clad.export.exporter import export_problem

    det = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64, resize="keep").fit(_refs())
    assert "resize='squeeze'" in export_problem(det)
