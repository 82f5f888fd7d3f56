"""``clip:HUB_ID``: the Hugging Face cache first, then the hub unless HF_HUB_OFFLINE, else one clear error."""
from __future__ import annotations

import pytest

import clad.backbones.clip as clip_mod
from clad.backbones.clip import build_random_clip
from clad.errors import ModelNotFoundError
from clad.registry import create_backbone

COMMIT = "0" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding a tiny CLIP as ``tiny-org/tiny-clip`` (the layout huggingface_hub writes)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-clip"
    build_random_clip(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at call time by both libraries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_hub_id_loads_from_the_cache(hub_cache):
    bb = create_backbone("clip:tiny-org/tiny-clip")
    assert bb.patch_size == 4 and bb.encode_text(["a photo of a bottle."]).shape == (1, 16)


def test_hub_id_missing_offline_says_what_to_do(hub_cache):
    with pytest.raises(ModelNotFoundError) as e:
        create_backbone("clip:tiny-org/absent-clip")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "huggingface-cli download tiny-org/absent-clip --local-dir DIR" in msg
    assert "clip:DIR" in msg and "\n" not in msg


def test_hub_id_unreachable_hub_says_what_to_do(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    tried = []
    real = clip_mod._from_pretrained

    def no_network(where, local_only):
        tried.append(local_only)
        if not local_only:  # stands for a machine without network: nothing is sent anywhere
            raise OSError("Connection refused\nmore detail")
        return real(where, local_only)

    monkeypatch.setattr(clip_mod, "_from_pretrained", no_network)
    with pytest.raises(ModelNotFoundError, match=r"not in the Hugging Face cache, and the hub did not give it "
                                                 r"\(Connection refused\); on a machine with access run"):
        create_backbone("clip:tiny-org/absent-clip")
    assert tried == [True, False]  # the cache first, then the hub
    tried.clear()
    create_backbone("clip:tiny-org/tiny-clip")
    assert tried == [True]  # in the cache: the hub is never asked
