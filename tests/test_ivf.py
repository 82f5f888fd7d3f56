"""ProjectedIVF (the approximate search in principal components) and PatchCore's predict split over threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import clad
from clad.detectors.patchcore import exact_top
from clad.ops.ivf import ProjectedIVF
from clad.ops.knn import knn
from conftest import plant_square, texture
from test_baselines import clustered


@pytest.fixture(scope="module")
def bank_and_queries():
    bank = clustered(3000, 24, 10, seed=41)
    query = torch.cat([clustered(900, 24, 10, seed=42), torch.randn(100, 24) * 4])
    return bank, query


def _exact(bank, query):
    d, i = knn(query, bank, k=1)
    return d[:, 0], i[:, 0]


def test_nearest_returns_true_distances_to_real_rows_never_below_the_exact_ones(bank_and_queries):
    bank, query = bank_and_queries
    index = ProjectedIVF(bank, dim=6)
    exact, _ = _exact(bank, query)
    for n_probe in (1, 3):
        dist, rows = index.nearest(query, n_probe)
        torch.testing.assert_close(dist, (query - bank[rows]).norm(dim=1), rtol=1e-4, atol=1e-4)
        assert (dist >= exact - 1e-4).all()
        assert (dist > exact + 1e-3).any()  # approximate: some are farther (so the test can tell)
        only, none = index.nearest(query, n_probe, indices=False)
        assert none is None and torch.equal(only, dist)
    # more clusters probed: never farther
    assert (index.nearest(query, 3)[0] <= index.nearest(query, 1)[0] + 1e-5).all()


def test_nearest_is_exact_with_every_channel_and_every_cluster(bank_and_queries):
    bank, query = bank_and_queries
    index = ProjectedIVF(bank, dim=bank.shape[1], n_clusters=8)
    dist, rows = index.nearest(query, n_probe=8)
    exact, want = _exact(bank, query)
    torch.testing.assert_close(dist, exact, rtol=1e-4, atol=1e-4)
    assert (rows == want).float().mean() > 0.99  # ties aside


def test_nearest_does_not_depend_on_the_thread_split(bank_and_queries):
    bank, _ = bank_and_queries
    query = clustered(5000, 24, 10, seed=43)  # enough queries to be split
    index = ProjectedIVF(bank, dim=8)
    d1, r1 = index.nearest(query, 1, workers=1)
    d3, r3 = index.nearest(query, 1, workers=3)
    assert torch.equal(r1, r3)
    torch.testing.assert_close(d1, d3)


def test_exact_equals_the_brute_force_search(bank_and_queries):
    bank, query = bank_and_queries
    index = ProjectedIVF(bank, dim=6)
    exact, _ = _exact(bank, query)
    bound, _ = index.nearest(query, 1)  # any upper bound: tight, loose or far too loose
    for scale in (1.0, 1.5, 10.0):
        d, r = index.exact(query, bound * scale)
        torch.testing.assert_close(d, exact, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close((query - bank[r]).norm(dim=1), exact, rtol=1e-4, atol=1e-4)
    # a bound below the true distance (never passed by exact_top) still gives the exact answer
    d, _ = index.exact(query[:20], exact[:20] * 0.5)
    torch.testing.assert_close(d, exact[:20], rtol=1e-4, atol=1e-4)


def test_closer_is_never_farther_than_nearest(bank_and_queries):
    bank, query = bank_and_queries
    index = ProjectedIVF(bank, dim=6)
    near, _ = index.nearest(query, 1)
    wide, rows = index.closer(query)
    assert (wide <= near + 1e-5).all() and (wide < near - 1e-3).any()
    torch.testing.assert_close(wide, (query - bank[rows]).norm(dim=1), rtol=1e-4, atol=1e-4)


def test_exact_top_with_projected_index_gives_the_exact_maxima_and_rows():
    bank = clustered(4000, 16, 12, seed=31)
    feats = torch.cat([clustered(6 * 400, 16, 12, seed=32), torch.randn(60, 16) * 3]).view(6, 410, 16)
    index = ProjectedIVF(bank, dim=4)
    exact, rows = _exact(bank, feats.view(-1, 16))
    exact, rows = exact.view(6, 410), rows.view(6, 410)
    approx, near = (t.view(6, 410).clone() for t in index.nearest(feats.view(-1, 16), 1))
    assert (approx.amax(1) > exact.amax(1) + 1e-3).any()  # the probe alone overestimates some maxima
    searched = {}
    for tighten in (0, 16):
        dist, got = approx.clone(), near.clone()
        searched[tighten] = exact_top(index, feats, dist, got, start=1, tighten=tighten)
        torch.testing.assert_close(dist.amax(1), exact.amax(1), rtol=1e-5, atol=1e-4)
        top = dist.argmax(1)
        assert torch.equal(got[torch.arange(6), top], rows[torch.arange(6), top])
        assert (dist >= exact - 1e-4).all()
    assert searched[16] < searched[0] < approx.numel()  # the wider search first leaves fewer exact searches


def test_projected_index_is_deterministic_and_keeps_its_dim():
    bank = clustered(2000, 12, 6, seed=5)
    a, b = ProjectedIVF(bank, dim=5), ProjectedIVF(bank, dim=5)
    q = clustered(300, 12, 6, seed=6)
    assert torch.equal(a.nearest(q)[1], b.nearest(q)[1])
    assert ProjectedIVF(bank, dim=64).dim == 12  # never more than the channels


# ----------------------------------------------------------------------------- PatchCore with the index


def _images():
    train = [texture((64, 64), s) for s in range(6)]
    test = [texture((64, 64), 9), plant_square(texture((64, 64), 9), 20, 12, 10)[0], texture((64, 64), 11),
            plant_square(texture((64, 64), 12), 8, 30, 12)[0], texture((64, 64), 13)]
    return train, test


@pytest.mark.parametrize("probe_dim", [None, 4])
def test_patchcore_probed_search_gives_the_exact_image_scores(probe_dim):
    train, test = _images()
    kw = dict(backbone="tiny_cnn", image_size=64, coreset_ratio=1.0)
    want = clad.create_detector("patchcore", **kw).fit(train).predict(test)
    det = clad.create_detector("patchcore", n_probe=1, probe_min=16, probe_dim=probe_dim, **kw).fit(train)
    got = det.predict(test)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=2e-5)  # float rounding of small distances
    assert isinstance(det._search_index(), ProjectedIVF) == (probe_dim is not None)
    for g, w in zip(got.anomaly_maps, want.anomaly_maps):
        assert g.shape == w.shape and (g >= w - 1e-4).all()  # the map keeps upper bounds below the top


@pytest.mark.parametrize("n_probe", [0, 1])
def test_patchcore_predict_split_over_threads_equals_one_call(n_probe):
    train, test = _images()
    kw = dict(backbone="tiny_cnn", image_size=64, coreset_ratio=0.5, n_probe=n_probe, probe_min=16)
    det = clad.create_detector("patchcore", **kw).fit(train)
    det.config.workers = 1
    one = det.predict(test, batch_size=5)
    det.config.workers = 3
    split = det.predict(test, batch_size=5)
    np.testing.assert_allclose(split.scores, one.scores, rtol=1e-5, atol=1e-6)
    for a, b in zip(split.anomaly_maps, one.anomaly_maps):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_patchcore_split_predict_leaves_torch_threads_as_they_were():
    train, test = _images()
    det = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64, coreset_ratio=0.5, workers=2)
    det.fit(train)
    before = torch.get_num_threads()
    det.predict(test, batch_size=5)
    assert torch.get_num_threads() == before
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # a thread started afterwards
    t.start()
    t.join()
    assert seen == [before]


def test_patchcore_rejects_bad_workers_and_probe_dim():
    with pytest.raises(ValueError, match="workers"):
        clad.create_detector("patchcore", workers=0)
    with pytest.raises(ValueError, match="probe_dim"):
        clad.create_detector("patchcore", probe_dim=0)
