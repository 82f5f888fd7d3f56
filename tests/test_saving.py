"""Saved models: JSON config + safetensors only, and clear errors for every malformed file."""
from __future__ import annotations

import json

import pytest

import clad
from clad.errors import ConfigError
from conftest import texture


@pytest.fixture
def saved(tmp_path):
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64)
    det.fit([texture((64, 64), s) for s in range(2)])
    return det.save(tmp_path / "m")


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such model folder"):
        clad.load_detector(tmp_path / "nope")


def test_missing_state_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="model.safetensors: missing"):
        clad.load_detector(saved)


def test_config_not_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        clad.load_detector(saved)


def test_config_wrong_format(saved):
    (saved / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="not a clad model file"):
        clad.load_detector(saved)


def test_config_unknown_detector(saved):
    doc = json.loads((saved / "config.json").read_text())
    doc["detector"] = "nonexistent"
    (saved / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="unknown detector 'nonexistent'"):
        clad.load_detector(saved)


def test_config_unknown_param_names_key(saved):
    doc = json.loads((saved / "config.json").read_text())
    doc["params"]["typo_param"] = 3
    (saved / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="typo_param"):
        clad.load_detector(saved)


def test_corrupt_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConfigError, match="model.safetensors: not a valid safetensors file"):
        clad.load_detector(saved)


def test_state_that_does_not_match(saved):
    from safetensors.torch import save_file
    import torch

    save_file({"something_else": torch.zeros(2)}, str(saved / "model.safetensors"))
    with pytest.raises(ConfigError, match="does not match"):
        clad.load_detector(saved)


def test_pickle_is_never_loaded(saved, monkeypatch):
    import pickle

    import torch

    def forbidden(*a, **k):
        raise AssertionError("pickle must not run when loading a model")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    clad.load_detector(saved)
