"""WinCLIP / WinCLIP+: window masks, harmonic aggregation, prompts, and the detector on a tiny random CLIP."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clad
from clad.backbones.clip import build_random_clip
from clad.data.io import load_batch
from clad.errors import ConfigError
from clad.detectors.winclip import (
    anomaly_probability,
    harmonic_aggregation,
    harmonic_mean,
    visual_score,
    window_masks,
)
from clad.ops.prompts import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    object_name_for,
    prompt_ensemble,
    state_prompts,
)
from clad.vocabulary import defect_prompts
from conftest import plant_square, texture


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return build_random_clip(tmp_path_factory.mktemp("tiny_clip"))  # 32 px, patch 4 -> 8x8 grid


@pytest.fixture(scope="module")
def refs() -> list[np.ndarray]:
    return [texture((64, 64), s) for s in range(3)]


@pytest.fixture(scope="module")
def few_shot(tiny_clip_dir, refs):
    return clad.create_detector("winclip", backbone=f"clip:{tiny_clip_dir}", category="metal_nut").fit(refs)


# -- maths ------------------------------------------------------------------------------------------------------
def test_window_masks_on_a_4x4_grid():
    m = window_masks((4, 4), 2)
    assert m.shape == (9, 16) and m.dtype == torch.bool
    assert (m.sum(1) == 4).all()
    assert m[0].nonzero()[:, 0].tolist() == [0, 1, 4, 5] and m[8].nonzero()[:, 0].tolist() == [10, 11, 14, 15]
    # corners are covered by one window, edges by two, the inner four patches by four
    assert m.sum(0).view(4, 4).tolist() == [[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]]
    m3 = window_masks((4, 4), 3)
    assert m3.shape == (4, 16) and (m3.sum(1) == 9).all()
    with pytest.raises(ValueError, match="does not fit"):
        window_masks((4, 4), 5)


def test_harmonic_aggregation_by_hand():
    # 3x3 grid, four 2x2 windows with scores 1, 3/4, 1/2, 1/4 (row-major)
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    got = harmonic_aggregation(scores, window_masks((3, 3), 2)).view(3, 3)
    hm = lambda *v: len(v) / sum(1 / x for x in v)  # noqa: E731
    want = torch.tensor([
        [1.0, hm(1, 0.75), 0.75],
        [hm(1, 0.5), hm(1, 0.75, 0.5, 0.25), hm(0.75, 0.25)],
        [0.5, hm(0.5, 0.25), 0.25],
    ])
    torch.testing.assert_close(got, want)
    assert abs(want[1, 1].item() - 0.48) < 1e-6
    # a zero window score drives the patches it covers to 0, with no NaN
    z = harmonic_aggregation(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), window_masks((3, 3), 2))
    assert torch.isfinite(z).all() and z[0, 0] < 1e-9 and z[0, 2] == 1.0
    torch.testing.assert_close(harmonic_mean(torch.tensor([[1.0], [0.25]])), torch.tensor([0.4]))


def test_probability_and_visual_score():
    protos = torch.eye(4)[:2]  # normal = e0, anomalous = e1
    p = anomaly_probability(torch.stack([torch.eye(4)[1], torch.eye(4)[0], torch.eye(4)[2]]), protos, 0.07)
    e = float(np.exp(1 / 0.07))
    torch.testing.assert_close(p, torch.tensor([e / (e + 1), 1 / (e + 1), 0.5]))
    memory = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), dim=1)
    q = F.normalize(torch.tensor([[[1.0, 0, 0], [-1.0, 0, 0], [0, 0, 1.0]]]), dim=-1)  # (1, 3, 3)
    torch.testing.assert_close(visual_score(q, memory), torch.tensor([[0.0, 0.5, 0.5]]), atol=1e-6, rtol=0)


# -- prompts ----------------------------------------------------------------------------------------------------
def test_state_prompts_compose_states_and_templates():
    normal, anomalous = state_prompts("metal nut")
    assert len(TEMPLATES) == 22 and len(normal) == 7 * 22 and len(anomalous) == 5 * 22
    assert len(NORMAL_STATES) == 7 and len(ANOMALOUS_STATES) == 5
    assert "a cropped photo of the flawless metal nut." in normal
    assert "a photo of a metal nut with defect for anomaly detection." in anomalous
    assert not any("{}" in p for p in normal + anomalous)


def test_prompt_ensemble_is_the_normalised_mean():
    gen = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}

    def encode(texts):
        return torch.stack([table.setdefault(t, torch.randn(8, generator=gen) * 3) for t in texts])

    n, a = prompt_ensemble(encode, "bottle")
    normal, anomalous = state_prompts("bottle")
    want_n = F.normalize(F.normalize(encode(normal), dim=1).mean(0), dim=0)
    torch.testing.assert_close(n, want_n)
    assert n.shape == a.shape == (8,) and abs(a.norm().item() - 1) < 1e-6


def test_object_names_and_defect_prompts():
    assert object_name_for("metal_nut") == "metal nut" and object_name_for("magnetic_tile") == "magnetic tile"
    assert object_name_for("pcb1") == "printed circuit board" and object_name_for("bottle") == "bottle"
    got = defect_prompts("cable", ["scratch", "missing part"])
    assert got == {
        "scratch": ["a photo of a cable with a scratch."],
        "missing part": ["a photo of a cable with a missing part."],
    }
    with pytest.raises(KeyError, match="unknown defect kind 'rust'"):
        defect_prompts("cable", ["rust"])


# -- detector ---------------------------------------------------------------------------------------------------
def test_needs_a_clip_backbone():
    with pytest.raises(ConfigError, match="needs a CLIP backbone"):
        clad.create_detector("winclip", backbone="tiny_cnn")


def test_planted_defect_tops_the_few_shot_map(few_shot):
    defective, mask = plant_square(texture((64, 64), 11), 20, 36, 16)
    res = few_shot.predict([defective, texture((64, 64), 12)])
    m = res.anomaly_maps[0]
    assert m.shape == (64, 64)
    assert mask.flat[m.argmax()], "the map's maximum is outside the planted square"
    assert res.scores[0] > res.scores[1]
    assert few_shot.object_name_ == "metal nut"


def test_a_reference_scores_zero_on_the_visual_branch(few_shot, refs):
    arrays, _ = load_batch(refs[:1])
    out = few_shot.score_maps(*few_shot._encode(arrays))
    assert out["visual"].abs().max() < 1e-3  # its own patches and windows are in memory
    torch.testing.assert_close(out["map"], (out["language"] + out["visual"]) / 2)


def test_zero_shot_fit_only_encodes_prompts(tiny_clip_dir, refs, tmp_path):
    det = clad.create_detector("winclip", backbone=f"clip:{tiny_clip_dir}", few_shot=False).fit(refs[:1])
    assert not hasattr(det, "patch_memory_") and det.text_prototypes_.shape == (2, 16)
    imgs = [texture((64, 64), 5), texture((48, 80), 6)]
    res = det.predict(imgs)
    bb = det.backbone_
    want = anomaly_probability(bb.pooled(bb.preprocess(imgs)), det.text_prototypes_, 0.07)
    np.testing.assert_allclose(res.scores, want.numpy(), rtol=1e-5)
    assert [m.shape for m in res.anomaly_maps] == [(64, 64), (48, 80)]
    det.save(tmp_path / "zs")
    again = clad.load_detector(tmp_path / "zs").predict(imgs)
    np.testing.assert_array_equal(again.scores, res.scores)


def test_save_load_round_trip(few_shot, tmp_path):
    tests = [plant_square(texture((64, 64), 13), 4, 4, 12)[0], texture((50, 70), 14)]
    before = few_shot.predict(tests)
    few_shot.save(tmp_path / "m")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert keys == {"text_prototypes", "patch_memory", "window_memory.2", "window_memory.3"}  # no CLIP weights
    loaded = clad.load_detector(tmp_path / "m")
    after = loaded.predict(tests)
    np.testing.assert_array_equal(before.scores, after.scores)
    for a, b in zip(before.anomaly_maps, after.anomaly_maps):
        np.testing.assert_array_equal(a, b)
    assert loaded.object_name_ == "metal nut"


def test_deterministic(tiny_clip_dir, refs, few_shot):
    other = clad.create_detector("winclip", backbone=f"clip:{tiny_clip_dir}", category="metal_nut").fit(refs)
    img = [texture((64, 64), 15)]
    np.testing.assert_array_equal(other.predict(img).anomaly_maps[0], few_shot.predict(img).anomaly_maps[0])


def test_window_larger_than_grid_is_an_error(tiny_clip_dir, refs):
    det = clad.create_detector("winclip", backbone=f"clip:{tiny_clip_dir}", window_sizes=(2, 9))
    with pytest.raises(ValueError, match="window size 9 does not fit the 8x8"):
        det.fit(refs[:1])
