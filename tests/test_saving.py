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


# -- what config.json records, and what loading checks --------------------------------------------------------


def _edit(saved, **changes):
    doc = json.loads((saved / "config.json").read_text())
    doc.update(changes)
    (saved / "config.json").write_text(json.dumps(doc))
    return doc


def test_config_records_tensors_and_checksums(saved):
    import hashlib

    doc = json.loads((saved / "config.json").read_text())
    assert doc["format_version"] == 2
    assert doc["sha256"] == hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest()
    assert set(doc["tensors"]) == {"memory_bank", "teaching.references"}  # the second for add_references
    assert doc["tensors"]["teaching.references"]["dtype"] == "uint8"
    assert doc["tensors"]["memory_bank"]["dtype"] == "float32" and len(doc["tensors"]["memory_bank"]["shape"]) == 2


def test_state_of_another_model_is_refused(saved, tmp_path):
    # the same tensor name, another shape: PatchCore keeps a coreset of the bank PatchKNN keeps whole
    other = clad.create_detector("patchcore", backbone="tiny_cnn", image_size=64)
    other = other.fit([texture((64, 64), s) for s in range(2)]).save(tmp_path / "pc")
    (saved / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"model.safetensors: does not match config.json: tensor 'memory_bank' is"):
        clad.load_detector(saved)


def test_state_with_other_tensor_names_is_refused(saved):
    from safetensors.torch import save_file
    import torch

    save_file({"heads.g_v.0.weight": torch.zeros(2), "memory_bank": torch.zeros(2)}, str(saved / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"holds 'heads.g_v.0.weight', not listed there"):
        clad.load_detector(saved)


def _overwrite_with_nan(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "model.safetensors"))
    tensors["memory_bank"][0, 0] = float("nan")
    save_file(tensors, str(saved / "model.safetensors"))


def test_changed_state_is_refused_by_its_sha256(saved):
    _overwrite_with_nan(saved)
    with pytest.raises(ConfigError, match="model.safetensors: sha256 differs"):
        clad.load_detector(saved)


def test_non_finite_tensor_is_refused_even_with_matching_checksums(saved):
    import hashlib

    _overwrite_with_nan(saved)
    _edit(saved, sha256=hashlib.sha256((saved / "model.safetensors").read_bytes()).hexdigest())
    with pytest.raises(ConfigError, match="model.safetensors: tensor 'memory_bank' holds NaN or inf"):
        clad.load_detector(saved)


def test_edited_tensor_list_is_refused(saved):
    doc = json.loads((saved / "config.json").read_text())
    doc["tensors"]["memory_bank"]["shape"][0] += 1
    (saved / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="tensor 'memory_bank' is"):
        clad.load_detector(saved)


@pytest.mark.parametrize("key", ["sha256", "tensors", "fit_sha256"])
def test_missing_checksum_key_is_refused(saved, key):
    doc = json.loads((saved / "config.json").read_text())
    del doc[key]
    (saved / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=f"config.json: missing key '{key}'"):
        clad.load_detector(saved)


@pytest.mark.parametrize("threshold", ["high", True, [1], "NaN", "Infinity"])
def test_bad_threshold_is_refused(saved, threshold):
    text = (saved / "config.json").read_text()
    doc = json.loads(text)
    doc["threshold"] = threshold
    text = json.dumps(doc)
    if threshold in ("NaN", "Infinity"):  # the JSON extensions Python's json reads as floats
        text = text.replace(f'"threshold": "{threshold}"', f'"threshold": {threshold}')
    (saved / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json: threshold must be a finite number or null"):
        clad.load_detector(saved)


def test_threshold_may_be_edited(saved):
    _edit(saved, threshold=3)
    det = clad.load_detector(saved)
    assert det.threshold_ == 3.0 and isinstance(det.threshold_, float)


@pytest.mark.parametrize("change", [{"backbone": "efficientnet_lite0"}, {"image_size": 96}, {"seed": 1}])
def test_changed_params_are_refused(saved, change):
    doc = json.loads((saved / "config.json").read_text())
    _edit(saved, params={**doc["params"], **change})
    with pytest.raises(ConfigError, match="config.json: params or meta differ from those the model was fitted with"):
        clad.load_detector(saved)


def test_param_of_wrong_type_in_config_is_refused(saved):
    doc = json.loads((saved / "config.json").read_text())
    _edit(saved, params={**doc["params"], "image_size": "big"})
    with pytest.raises(ConfigError, match=r"config.json: .*parameter 'image_size' must be int, got 'big'"):
        clad.load_detector(saved)


@pytest.mark.parametrize("version", [0, 3, "2", True, None])
def test_unknown_format_version_is_refused(saved, version):
    _edit(saved, format_version=version)
    with pytest.raises(ConfigError, match="format_version"):
        clad.load_detector(saved)


def test_format_1_model_still_loads_with_a_warning(saved):
    """A model saved before config.json recorded the tensors and checksums (format 1) loads, unverified."""
    images = [texture((64, 64), 9)]
    before = clad.load_detector(saved).predict(images)
    (saved / "config.json").write_text(json.dumps(_as_format_1(saved)))
    with pytest.warns(UserWarning, match="format-1 model, saved without checksums"):
        det = clad.load_detector(saved)
    assert det.predict(images).scores.tolist() == before.scores.tolist()
    _overwrite_with_nan(saved)  # without a checksum, the finite check still holds
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="tensor 'memory_bank' holds NaN or inf"):
        clad.load_detector(saved)


# -- parameters are validated when the detector is created ----------------------------------------------------


@pytest.mark.parametrize("name, params, match", [
    ("spade", {"k": "notanumber"}, "parameter 'k' must be int, got 'notanumber'"),
    ("spade", {"k": True}, "parameter 'k' must be int"),  # bool is not an int here
    ("spade", {"k": 0}, r"parameter 'k' must be >= 1, got 0"),
    ("spade", {"sigma": float("nan")}, "parameter 'sigma' must be float"),
    ("patchcore", {"coreset_ratio": 0.0}, r"parameter 'coreset_ratio' must be in \(0, 1\], got 0.0"),
    ("patchcore", {"coreset_ratio": 1.5}, r"must be in \(0, 1\]"),
    ("patchcore", {"layers": "stage2"}, r"parameter 'layers' must be tuple\[str, \.\.\.\]"),
    ("patchcore", {"layers": ["stage2", 3]}, "parameter 'layers'"),
    ("patchcore", {"embed_dim": 0}, "parameter 'embed_dim' must be >= 1"),
    ("patchcore", {"reweight_neighbours": 1}, "parameter 'reweight_neighbours' must be >= 2"),
    ("padim", {"eps": 0}, r"parameter 'eps' must be >= 1e-06"),
    ("padim", {"eps": 5e-324}, r"parameter 'eps' must be >= 1e-06"),  # accepted once, then the fit crashed
    ("padim", {"image_size": 4}, "parameter 'image_size' must be >= 8"),
    ("patch_knn", {"max_bank": 2.5}, "parameter 'max_bank' must be int"),
])
def test_bad_parameter_fails_at_creation_naming_the_key(name, params, match):
    with pytest.raises(ConfigError, match=match):
        clad.create_detector(name, **params)


def test_valid_parameters_are_accepted_as_given():
    det = clad.create_detector("patchcore", sigma=2, layers=["stage2"], embed_dim=None, workers=None, coreset_ratio=1)
    assert det.config.sigma == 2 and det.config.layers == ("stage2",) and det.config.coreset_ratio == 1


def test_cli_fit_with_a_bad_parameter_is_one_line(tmp_path, capsys):
    from PIL import Image

    from clad.cli import main

    (tmp_path / "good").mkdir()
    for s in range(2):
        Image.fromarray(texture((32, 32), s)).save(tmp_path / "good" / f"{s}.png")
    code = main(["fit", "--data", f"folder:{tmp_path / 'good'}", "--detector", "spade", "--param", "k=notanumber",
                 "--out", str(tmp_path / "m")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clad: error")]
    assert code == 2 and errors == ["clad: error: detector 'spade': parameter 'k' must be int, got 'notanumber'"]
    assert not (tmp_path / "m").exists()


# -- saving: atomic, refusing what cannot be loaded, ordinary permissions --------------------------------------


def test_save_refuses_a_non_finite_threshold(saved, tmp_path):
    det = clad.load_detector(saved).set_threshold(float("nan"))
    with pytest.raises(ConfigError, match="threshold nan is not finite"):
        det.save(tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_save_replaces_an_old_model_and_leaves_nothing_beside(saved):
    det = clad.load_detector(saved).set_threshold(0.25)
    det.save(saved)
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    assert clad.load_detector(saved).threshold_ == 0.25


def test_failed_save_keeps_the_old_model(saved, monkeypatch):
    import clad.detectors.base as base

    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    det = clad.load_detector(saved).set_threshold(0.25)
    real_rename = base.os.rename

    def crash_on_swap(src, dst):
        if ".saving-" in str(src):
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(base.os, "rename", crash_on_swap)
    with pytest.raises(OSError, match="disk gone"):
        det.save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # the half-written folder is gone


def test_save_refuses_a_folder_with_other_files(saved, tmp_path):
    det = clad.load_detector(saved)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds files that are not part of a saved model"):
        det.save(tmp_path / "results")
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        det.save(tmp_path / "file")


def test_saved_files_get_ordinary_permissions(saved, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = clad.load_detector(saved).save(tmp_path / "perm")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def _as_format_1(saved) -> dict:
    doc = json.loads((saved / "config.json").read_text())
    for key in ("tensors", "sha256", "fit_sha256"):
        del doc[key]
    doc["format_version"] = 1
    return doc


def test_format_1_model_that_fails_with_its_params_is_refused_at_load(saved):
    doc = _as_format_1(saved)
    doc["params"]["layers"] = ["stage3"]  # other channels than the memory's: predict would raise a bare error
    (saved / "config.json").write_text(json.dumps(doc))
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="format-1 model does not work with its params"):
        clad.load_detector(saved)


def test_format_version_lowered_to_1_does_not_skip_the_checks(saved):
    _edit(saved, format_version=1)
    with pytest.raises(ConfigError, match="format_version 1 with the checksums of format 2"):
        clad.load_detector(saved)


def test_save_into_dot(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "m")  # the fixture's model folder, saved into again by its relative name "."
    clad.load_detector(".").set_threshold(1.5).save(".")
    assert clad.load_detector(tmp_path / "m").threshold_ == 1.5


def test_a_layer_the_backbone_lacks_is_one_error_naming_the_file(saved):
    """Found by the model fuzzer: a config naming a layer its backbone lacks, with fit_sha256 made to match (a
    deliberate edit), raised a ValueError from the forward."""
    from clad.detectors.base import _fit_digest

    doc = json.loads((saved / "config.json").read_text())
    doc["params"]["layers"] = ["stage2", "nope"]
    doc["fit_sha256"] = _fit_digest(doc["params"], doc["meta"])
    (saved / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"config.json: detector 'patch_knn': layer\(s\) \['nope'\] not in backbone"):
        clad.load_detector(saved)


def test_a_layer_the_backbone_lacks_is_one_error_at_fit():
    det = clad.create_detector("padim", backbone="tiny_cnn", image_size=32, grid_layer="stage9",
                               layers=["stage1", "stage9"])
    with pytest.raises(ConfigError, match=r"layer\(s\) \['stage9'\] not in backbone 'tiny_cnn'"):
        det.fit([texture((32, 32), 0)])
