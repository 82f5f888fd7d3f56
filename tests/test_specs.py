"""The one parser: ``key=value`` parameters, shots, dataset and detector specs, and a detector's run parameters."""
from __future__ import annotations

import pytest

from clad.errors import CladError
from clad.specs import (DetectorSpec, detector_params, parse_data_specs, parse_detector_spec, parse_detector_specs,
                        parse_params, parse_shot, parse_shots, split_data_spec)

KNN = "patch_knn[backbone=tiny_cnn;image_size=64]@knn"


def test_detector_spec_syntax():
    assert parse_detector_spec("patchcore") == DetectorSpec("patchcore", {}, "patchcore")
    assert parse_detector_spec("patchcore").is_plain
    s = parse_detector_spec("clad[finetune_stages=0;finetune_text_layers=0]@clad-no-finetune")
    assert s == DetectorSpec("clad", {"finetune_stages": 0, "finetune_text_layers": 0}, "clad-no-finetune")
    assert not s.is_plain
    s = parse_detector_spec('clad[loss=supervised; lr=1e-4; memory=true; layers=["stage1","stage3"]]')
    assert s.params == {"loss": "supervised", "lr": 1e-4, "memory": True, "layers": ["stage1", "stage3"]}
    assert s.label == 'clad[loss=supervised;lr=1e-4;memory=true;layers=["stage1","stage3"]]'  # no label: the spec
    specs = parse_detector_specs(f'clad,{KNN},patch_knn[layers=["stage2","stage3"]]@k2')  # commas inside [] stay
    assert [d.label for d in specs] == ["clad", "knn", "k2"]
    assert specs[1].params == {"backbone": "tiny_cnn", "image_size": 64}
    assert specs[2].params == {"layers": ["stage2", "stage3"]}
    for bad in ("clad[loss]", "clad[=1]", "9clad", "clad[a=1;a=2]", "clad@x@y"):
        with pytest.raises(ValueError):
            parse_detector_spec(bad)
    with pytest.raises(ValueError, match="used twice"):
        parse_detector_specs("clad,clad")


def test_data_and_shots_syntax(tmp_path):
    specs = parse_data_specs(f"mvtec:{tmp_path}/m,folder:{tmp_path}/g,{tmp_path}/d,visa:{tmp_path}/v")
    assert specs == [f"mvtec:{tmp_path}/m", f"folder:{tmp_path}/g,{tmp_path}/d", f"visa:{tmp_path}/v"]
    with pytest.raises(ValueError):
        parse_data_specs("imagenet:/x")
    assert parse_shots("1,2,4,all") == [1, 2, 4, None]
    assert parse_shots("0") == [0]  # zero-shot (tests/test_zero_shot.py)
    with pytest.raises(ValueError):
        parse_shots("-1")


def test_params_and_single_shot():
    assert parse_params(["k=3", "name=x", 'layers=["a","b"]', "t=0.5"]) == {"k": 3, "name": "x", "layers": ["a", "b"], "t": 0.5}
    assert parse_params(None) == {}
    for bad in (["k"], ["=1"], ["k=1", "k=2"], ["a b=1"]):
        with pytest.raises(CladError, match="--param"):
            parse_params(bad)
    assert parse_shot("4") == 4 and parse_shot("all") is None and parse_shot(None) is None
    assert parse_shot("0") == 0  # zero-shot
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(CladError, match="--shots"):
            parse_shot(bad)


def test_split_data_spec():
    assert split_data_spec("folder:/g, /d") == ("folder", ["/g", "/d"])
    assert split_data_spec("MVTec:/root") == ("mvtec", ["/root"])
    for bad in ("imagenet:/x", "mvtec:", "/just/a/path"):
        with pytest.raises(CladError, match="unknown dataset spec"):
            split_data_spec(bad)


def test_detector_params_fill_only_what_the_config_has():
    p = detector_params("clad", {}, seed=3, category="bottle", aux="mvtec:/x")
    assert p == {"seed": 3, "category": "bottle", "aux": "mvtec:/x"}
    assert detector_params("clad", {"seed": 7}, seed=3)["seed"] == 7  # the spec wins over the run
    assert "category" not in detector_params("patchcore", {}, seed=1, category="bottle")
    with pytest.raises(CladError, match="auxiliary"):
        detector_params("patchcore", {}, aux="mvtec:/x")
