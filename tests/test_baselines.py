"""PatchCore, PaDiM and SPADE, and the coreset maths they use: invariants on tiny synthetic data (tiny_cnn, CPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import clad
from clad.detectors.padim import shrunk_covariance
from clad.detectors.patchcore import coreset_size, exact_top
from clad.ops.coreset import KCenterIndex, _kcenter_plain, coverage_radius, greedy_coreset
from clad.ops.knn import knn, row_min
from conftest import plant_square, texture

BASELINES = ["patchcore", "padim", "spade"]
TINY = {"backbone": "tiny_cnn", "image_size": 64}


def clustered(n: int, dim: int, n_clusters: int, seed: int) -> torch.Tensor:
    """(n, dim) points around ``n_clusters`` well separated centres, with uneven cluster sizes."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=gen) * 6
    weights = torch.linspace(1, 10, n_clusters)
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    return centres[labels] + torch.randn(n, dim, generator=gen)


# ------------------------------------------------------------------------------------------------ coreset


@pytest.mark.parametrize("n_points", [600, 6000])  # below / above the size where blocks prune the updates
@pytest.mark.parametrize("shape", ["clustered", "noise"])  # blocks prune most updates / almost none (fine textures)
def test_coreset_equals_textbook_greedy(n_points, shape):
    gen = torch.Generator().manual_seed(1)
    x = clustered(n_points, 16, 12, seed=1) if shape == "clustered" else torch.randn(n_points, 24, generator=gen)
    sel = greedy_coreset(x, 200, projection_dim=None, seed=5)
    assert torch.equal(sel, _kcenter_plain(x, 200, start=int(sel[0])))
    assert len(set(sel.tolist())) == 200


def test_coreset_rounds_with_few_candidates_still_equal_textbook_greedy():
    """Many short rounds (16 candidates each): every round must stop before a point outside could be farther."""
    from clad.ops.coreset import _blocks, _kcenter_blocks

    x = clustered(3000, 8, 6, seed=4)
    order, block_of, offsets, sizes, means, radii = _blocks(x, 40, torch.Generator().manual_seed(0))
    z = x[order].contiguous()
    sel = _kcenter_blocks(z, 300, 0, block_of, offsets, sizes, means, radii, n_candidates=16)
    assert torch.equal(sel, _kcenter_plain(z, 300, start=0))


def test_coreset_is_deterministic_with_seed():
    x = clustered(5000, 32, 8, seed=2)
    a = greedy_coreset(x, 100, projection_dim=8, seed=3)
    b = greedy_coreset(x, 100, projection_dim=8, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy_coreset(x, 100, projection_dim=8, seed=4))  # another start point


def test_coreset_covers_better_than_random_subset():
    x = clustered(5000, 16, 20, seed=3)
    for n in (20, 200):
        sel = greedy_coreset(x, n, projection_dim=None, seed=0)
        rand = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
        assert coverage_radius(x, x[sel]) <= coverage_radius(x, x[rand])
    assert coverage_radius(x, x[greedy_coreset(x, len(x))]) < 0.05  # every row kept: 0 up to float rounding


def test_coreset_with_duplicate_points_never_repeats_an_index():
    x = torch.cat([torch.zeros(3000, 4), torch.ones(3000, 4)])
    sel = greedy_coreset(x, 50, projection_dim=None)
    assert len(set(sel.tolist())) == 50


@pytest.mark.parametrize("k", [1, 3])
def test_knn_over_many_blocks_matches_one_dense_distance_matrix(k):
    """Small blocks split both the queries and the bank: the merge across bank blocks must keep the true k nearest."""
    gen = torch.Generator().manual_seed(11)
    bank, query = torch.randn(2500, 8, generator=gen), torch.randn(700, 8, generator=gen)
    d, i = knn(query, bank, k=k, max_block=64 * 1024)  # bank blocks of 64 rows, query blocks of 1024
    ref_d, ref_i = torch.cdist(query.double(), bank.double()).topk(k, dim=1, largest=False)
    torch.testing.assert_close(d.double(), ref_d, atol=1e-4, rtol=1e-5)
    assert (i == ref_i).float().mean() > 0.999


def test_kcenter_index_is_exact():
    bank = clustered(3000, 24, 10, seed=4)
    query = torch.cat([clustered(500, 24, 10, seed=5), torch.randn(100, 24) * 20])
    d, i = KCenterIndex(bank).nearest(query)
    d_ref, i_ref = knn(query, bank, k=1)
    torch.testing.assert_close(d, d_ref[:, 0], atol=1e-3, rtol=1e-4)
    assert (i == i_ref[:, 0]).float().mean() > 0.999


@pytest.mark.parametrize("n_clusters", [3, 40])
def test_kcenter_index_is_exact_with_many_queries_per_cluster(monkeypatch, n_clusters):
    """Thousands of queries share each cluster, and small blocks split them into several distance blocks."""
    monkeypatch.setattr("clad.ops.coreset._BLOCK", 50_000)
    bank = clustered(2000, 16, 8, seed=8)
    query = torch.cat([clustered(3000, 16, 8, seed=9), torch.randn(200, 16) * 10])
    d, i = KCenterIndex(bank, n_clusters=n_clusters).nearest(query, workers=1)
    d_ref, _ = knn(query, bank, k=1)
    torch.testing.assert_close(d, d_ref[:, 0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close((query - bank[i]).norm(dim=1), d_ref[:, 0], atol=1e-3, rtol=1e-4)


def test_kcenter_index_decides_once_between_pruning_and_brute_force(monkeypatch):
    monkeypatch.setattr(KCenterIndex, "decide_min", 500)
    bank = clustered(3000, 24, 10, seed=12)
    query = clustered(900, 24, 10, seed=13)
    index = KCenterIndex(bank)
    index.nearest(query[:499])
    assert index.search is None  # too few queries to time
    index.nearest(query[:10], n_probe=1)
    assert index.search is None  # approximate searches never decide
    d, i = index.nearest(query)
    assert index.search in ("brute", "pruned")
    d_ref, _ = knn(query, bank, k=1)
    for choice in ("brute", "pruned"):
        index.search = choice
        d, i = index.nearest(query)
        torch.testing.assert_close(d, d_ref[:, 0], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close((query - bank[i]).norm(dim=1), d_ref[:, 0], atol=1e-3, rtol=1e-4)


def test_kcenter_index_split_over_threads_gives_the_same_answer():
    bank = clustered(3000, 24, 10, seed=6)
    query = clustered(4100, 24, 10, seed=7)  # above the 2048 queries from which the search is split
    index = KCenterIndex(bank)
    for n_probe in (0, 1):
        d1, i1 = index.nearest(query, n_probe, workers=1)
        d3, i3 = index.nearest(query, n_probe, workers=3)
        torch.testing.assert_close(d3, d1)
        assert torch.equal(i3, i1)
    torch.testing.assert_close(index.nearest(query, workers=2)[0], knn(query, bank, k=1)[0][:, 0], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("n_patches,ratio,expected", [(1000, 0.1, 100), (1001, 0.1, 101), (10, 0.01, 1), (7, 1.0, 7)])
def test_coreset_size_rounds_up(n_patches, ratio, expected):
    assert coreset_size(n_patches, ratio) == expected == min(n_patches, max(1, math.ceil(ratio * n_patches - 1e-9)))


def test_patchcore_keeps_ratio_of_memory_bank():
    images = [texture((64, 64), s) for s in range(3)]  # 3 images x 8 x 8 patches at stride 8, and as many copies
    det = clad.create_detector("patchcore", coreset_ratio=0.25, **TINY).fit(images)
    assert det.bank_size_ == 2 * 3 * 8 * 8
    assert len(det.memory_bank_) == coreset_size(384, 0.25) == 96


# ------------------------------------------------------------------------------------------------- PaDiM


@pytest.mark.parametrize("n", [1, 2, 5, 40])
def test_ledoit_wolf_matches_sklearn(n):
    from sklearn.covariance import ledoit_wolf

    x = (torch.randn(n, 3, 6, dtype=torch.float64) * torch.linspace(0.5, 3, 6, dtype=torch.float64) + 4)
    y = x - x[0]  # the moments are of features shifted by a reference, as in PaDiM.fit
    a = (y * y).sum(2)
    cov = shrunk_covariance(n, y.sum(0), torch.einsum("bpi,bpj->pij", y, y), (a * a).sum(0), (a[:, :, None] * y).sum(0), a.sum(0))
    for p in range(3):
        expected = ledoit_wolf(x[:, p].numpy())[0] if n > 1 else np.zeros((6, 6))
        np.testing.assert_allclose(cov[p].numpy(), expected, atol=1e-10)


def test_padim_covariance_positive_definite_with_one_shot():
    det = clad.create_detector("padim", **TINY, reference_jitter=0).fit([texture((64, 64), 0)])  # one sample
    assert det.precision_.shape == (64, 56, 56)  # 8 x 8 positions; tiny_cnn stages 1-3 have 8 + 16 + 32 < 100 channels
    assert torch.linalg.eigvalsh(det.precision_.double()).min() > 0
    res = det.predict([texture((64, 64), 0), texture((64, 64), 1)])
    assert res.scores[0] < 1e-3 < res.scores[1]  # the one reference image sits at its own mean


# --------------------------------------------------------------------------------------- all three detectors


@pytest.mark.parametrize("name", BASELINES)
def test_identical_images_score_zero(name):
    image = texture((64, 64), 0)
    # A 10 % coreset of 3 x 64 patches cannot hold all 64 distinct patches of the image: keep the whole bank; and
    # no jittered copies (they would move PaDiM's mean off the image and share PatchCore's memory with it).
    extra = {"coreset_ratio": 1.0, "reference_jitter": 0} if name == "patchcore" else {}
    extra = {"reference_jitter": 0} if name == "padim" else extra
    det = clad.create_detector(name, **TINY, **extra).fit([image] * 3)
    outlier, _ = plant_square(image, 20, 20, 16)
    res = det.predict([image, outlier])
    assert res.scores[0] <= 1e-3 * res.scores[1]
    assert res.anomaly_maps[0].max() <= 1e-3 * res.anomaly_maps[1].max()


@pytest.mark.parametrize("name", BASELINES)
def test_constant_images_score_zero(name):
    gray = np.full((128, 128, 3), 128, np.uint8)
    # Default settings, 10 % coreset included: 4 x 16 x 16 patches hold 36 distinct ones (the border effects),
    # few enough for the 103-item coreset to keep every one.
    # No jittered copies: their noise would make thousands of distinct patches compete for the coreset's rows.
    plain = {"reference_jitter": 0} if name in ("patchcore", "padim") else {}
    det = clad.create_detector(name, backbone="tiny_cnn", image_size=128, **plain).fit([gray] * 4)
    outlier, _ = plant_square(gray, 50, 50, 16)
    res = det.predict([gray, outlier])
    assert res.scores[0] <= 1e-3 * res.scores[1]


@pytest.mark.parametrize("name", BASELINES)
def test_planted_defect_is_found(name):
    refs = [texture((96, 96), s) for s in range(6)]
    normals = [texture((96, 96), s) for s in range(10, 13)]
    defect, mask = plant_square(texture((96, 96), 20), 40, 24, 20)
    det = clad.create_detector(name, backbone="tiny_cnn", image_size=96).fit(refs)
    res = det.predict(normals + [defect])
    assert res.scores[-1] > res.scores[:-1].max()
    peak = np.unravel_index(np.argmax(res.anomaly_maps[-1]), mask.shape)
    assert mask[peak]


@pytest.mark.parametrize("name", BASELINES)
def test_images_of_different_sizes_in_one_call(name):
    det = clad.create_detector(name, **TINY).fit([texture((64, 64), s) for s in range(2)])
    tests = [texture((48, 80), 3), texture((120, 90), 4), texture((64, 64), 5)]
    res = det.predict(tests, batch_size=3)
    assert [m.shape for m in res.anomaly_maps] == [t.shape[:2] for t in tests]


def test_reweighting_scales_scores_into_unit_interval():
    refs = [texture((64, 64), s) for s in range(4)]
    defect, _ = plant_square(texture((64, 64), 9), 16, 16, 14)
    tests = [texture((64, 64), 8), defect]
    plain = clad.create_detector("patchcore", **TINY).fit(refs).predict(tests)
    weighted = clad.create_detector("patchcore", reweight=True, reweight_neighbours=3, **TINY).fit(refs).predict(tests)
    factor = weighted.scores / plain.scores
    assert np.all((factor >= 0) & (factor <= 1)) and not np.allclose(factor, 1)
    for a, b in zip(plain.anomaly_maps, weighted.anomaly_maps):  # maps are not re-weighted
        np.testing.assert_array_equal(a, b)


def test_spade_uses_at_most_the_references_it_has():
    det = clad.create_detector("spade", n_neighbour_images=50, k=3, **TINY).fit([texture((64, 64), s) for s in range(2)])
    res = det.predict([texture((64, 64), 5)])
    assert np.isfinite(res.scores).all() and res.anomaly_maps[0].shape == (64, 64)


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (200, 130)])
def test_smooth_maps_equals_upsample_blur_resize(shape):
    from clad.ops.smoothing import gaussian_blur, maps_to_images, resize_map, smooth_maps, smooth_working

    patch = torch.rand(2, 8, 6, generator=torch.Generator().manual_seed(0))
    working = gaussian_blur(resize_map(patch, (64, 64)), 4.0)
    expected = maps_to_images(working, [shape, shape])
    for got, want in zip(smooth_maps(patch, 64, 4.0, [shape, shape]), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    torch.testing.assert_close(smooth_working(patch, 64, 4.0), working, atol=1e-5, rtol=0)


def test_row_min_matches_torch_min_with_and_without_indices():
    gen = torch.Generator().manual_seed(21)
    d = torch.randn(300, 57, generator=gen)
    d[5, 10] = d[5, 40] = d[5].min() - 1.0  # a tie: the first index wins, as in torch.min
    v, i = row_min(d)
    ref_v, ref_i = d.min(1)
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i) and i[5] == 10
    v2, i2 = row_min(d, index=False)
    assert torch.equal(v2, ref_v) and i2 is None
    assert torch.equal(row_min(d, gil=False)[1], ref_i)


def test_distances_without_indices_are_the_same():
    """``indices=False`` skips the row argmins; the distances must not change (brute force, pruned, probed)."""
    bank = clustered(2500, 16, 8, seed=22)
    query = torch.cat([clustered(2600, 16, 8, seed=23), torch.randn(100, 16) * 10])
    d, i = knn(query, bank, k=1, max_block=64 * 1024)
    d2, i2 = knn(query, bank, k=1, max_block=64 * 1024, indices=False)
    assert i2 is None
    torch.testing.assert_close(d2, d)
    d3, i3 = knn(query, bank, k=1, max_block=64 * 1024, bank_sq=(bank * bank).sum(1))  # norms given
    torch.testing.assert_close(d3, d)
    assert torch.equal(i3, i)
    index = KCenterIndex(bank)
    for n_probe in (0, 1, 2):
        for workers in (1, 2):
            dist, rows = index.nearest(query, n_probe, workers=workers)
            only, none = index.nearest(query, n_probe, workers=workers, indices=False)
            assert none is None
            torch.testing.assert_close(only, dist)
    index.search = "brute"
    torch.testing.assert_close(index.nearest(query, indices=False)[0], d[:, 0], atol=1e-3, rtol=1e-4)


def test_patchcore_decides_its_search_at_fit_from_left_out_patches(monkeypatch):
    """With enough patches left out of the coreset, fit builds the index and times both exact searches on them."""
    monkeypatch.setattr(KCenterIndex, "decide_min", 256)
    images = [texture((64, 64), s) for s in range(4)]  # 4 x 8 x 8 = 256 bank patches at stride 8
    tiny = {"backbone": "tiny_cnn", "image_size": 64, "reference_jitter": 0}  # no copies: the counts below hold
    det = clad.create_detector("patchcore", **tiny, coreset_ratio=0.25)
    det.fit(images + [texture((64, 64), s) for s in range(4, 8)])  # 512 patches, 128 kept, 384 left out
    assert det.index_ is not None and det.index_.search in ("brute", "pruned")
    small = clad.create_detector("patchcore", **tiny, coreset_ratio=0.9)
    small.fit(images)  # 26 left out: too few to time, so the first large exact search decides, as before
    assert small.index_ is None


def test_patchcore_searches_small_memories_exactly_whatever_n_probe():
    images = [texture((64, 64), s) for s in range(3)]
    det = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64, coreset_ratio=0.5, n_probe=1)
    det.fit(images)
    assert det._n_probe() == 0  # 96 rows < probe_min
    exact = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64, coreset_ratio=0.5).fit(images)
    test = [texture((64, 64), 9), plant_square(texture((64, 64), 9), 20, 12, 10)[0]]
    np.testing.assert_allclose(det.predict(test).scores, exact.predict(test).scores, rtol=1e-5)
    det.config.probe_min = 16
    assert det._n_probe() == 1


def test_exact_top_gives_the_exact_maximum_after_a_probed_search():
    """After one probe, each image's largest distance is too large; ``exact_top`` restores the exact one and its
    row, searches only part of the patches, and leaves every other distance an upper bound of the exact one."""
    bank = clustered(4000, 16, 12, seed=31)
    feats = torch.cat([clustered(6 * 400, 16, 12, seed=32), torch.randn(60, 16) * 3]).view(6, 410, 16)
    index = KCenterIndex(bank)
    exact, rows = index.nearest(feats.view(-1, 16), 0)
    exact, rows = exact.view(6, 410), rows.view(6, 410)
    approx, near = (t.view(6, 410).clone() for t in index.nearest(feats.view(-1, 16), 1))
    assert (approx.amax(1) > exact.amax(1) + 1e-3).any()  # the probe alone overestimates some maxima
    searched = exact_top(index, feats, approx, near, start=1)
    assert 6 < searched < approx.numel()  # more than one round, far from every patch
    torch.testing.assert_close(approx.amax(1), exact.amax(1))
    top = approx.argmax(1)
    assert torch.equal(near[torch.arange(6), top], rows[torch.arange(6), top])
    assert (approx >= exact - 1e-4).all()


def test_patchcore_probed_image_scores_are_the_exact_ones():
    """n_probe with ``exact_max`` (the default) gives the exact search's image scores, re-weighted or not; without
    it they may come out larger."""
    images = [texture((64, 64), s) for s in range(6)]
    test = [texture((64, 64), 9), plant_square(texture((64, 64), 9), 20, 12, 10)[0], texture((64, 64), 11)]
    kw = dict(backbone="tiny_cnn", image_size=64, coreset_ratio=1.0)
    loose_any = False
    for reweight in (False, True):
        want = clad.create_detector("patchcore", reweight=reweight, **kw).fit(images).predict(test).scores
        probe = dict(n_probe=1, probe_min=16, reweight=reweight, **kw)
        probed = clad.create_detector("patchcore", **probe).fit(images)
        got = probed.predict(test).scores
        loose = clad.create_detector("patchcore", exact_max=False, **probe).fit(images).predict(test).scores
        np.testing.assert_allclose(got, want, rtol=1e-4)  # float32 distances measured by two routes
        if not reweight:
            assert (loose >= got - 1e-5).all()
            # Grad-CAM differentiates the same score, so it finds the same top patches and rows
            exact_cams = clad.create_detector("patchcore", **kw).fit(images).gradcam(test)
            for cam, ref in zip(probed.gradcam(test), exact_cams):
                np.testing.assert_allclose(cam, ref, rtol=1e-4, atol=1e-6)
        loose_any |= bool((np.abs(loose - got) > 1e-4).any())
    assert loose_any  # the probe alone does miss here, so the test can tell
