"""A model folder served by several processes at once (Ray Serve replicas, two stations): each ``ModelSlot`` below
stands for one process. A version change made by one is served by the others from their next batch
(``refresh``), and changes made at the same time by two are serialised into one chain of versions."""
from __future__ import annotations

import threading

import pytest

from conftest import texture


@pytest.fixture
def model_dir(tmp_path):
    import clad

    normal = [texture((64, 64), s) for s in range(4)]
    return clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal).save(tmp_path / "knn")


def replica(folder):
    from clad.serve.versions import ModelSlot

    slot = ModelSlot(folder)
    slot.load()
    return slot


def test_a_threshold_change_and_a_rollback_by_one_process_are_served_by_the_other(model_dir):
    a, b = replica(model_dir), replica(model_dir)
    image = [texture((64, 64), 9)]
    assert not b.refresh()  # nothing changed: one stat, no reload
    v2 = a.set_threshold(1e6)
    assert b.active.version.version == 1  # until it looks
    assert b.refresh() and b.active.version.version == v2.version == 2
    assert b.active.detector.threshold_ == 1e6 and b.active.detector.predict(image).labels.tolist() == [False]
    assert not b.refresh()
    b.rollback(1)
    assert a.refresh() and a.active.version.version == 1
    assert a.active.detector.threshold_ == a.initial.threshold_ != 1e6


def test_changes_made_at_once_by_two_processes_form_one_chain(model_dir):
    a, b = replica(model_dir), replica(model_dir)
    barrier = threading.Barrier(2)
    made = {}

    def change(slot, key, threshold):
        barrier.wait()
        made[key] = slot.set_threshold(threshold)

    threads = [threading.Thread(target=change, args=(a, "a", 5.0)), threading.Thread(target=change, args=(b, "b", 7.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    first, second = sorted(made.values(), key=lambda v: v.version)
    assert (first.version, second.version) == (2, 3)
    assert (first.parent, second.parent) == (1, 2)  # the later one saw the earlier one: no lost change
    for slot in (a, b):
        slot.refresh()
        assert slot.active.version.version == 3 and slot.active.detector.threshold_ == second.threshold
    assert a.lineage() == [3, 2, 1]
