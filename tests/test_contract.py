"""One contract test run over every registered detector (cf. timm's test_models.py)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import clad
from clad.errors import ConfigError
from conftest import plant_square, texture

# Tiny settings per detector; a detector absent here runs with these defaults.
DEFAULT_PARAMS = {"backbone": "tiny_cnn", "image_size": 64}



def params_for(name: str, request) -> dict:
    cls = clad.registry.detector_class(name)
    fields = set(cls.Config.__dataclass_fields__)
    params = {k: v for k, v in DEFAULT_PARAMS.items() if k in fields}
    extra = getattr(request.module, "EXTRA_PARAMS", {}).get(name)
    if extra is not None:
        params.update(extra(request) if callable(extra) else extra)
    return params


def tiny_clip_params(request) -> dict:
    path = request.getfixturevalue("tiny_clip_dir")
    return {"backbone": f"clip:{path}"}


def clad_params(request) -> dict:
    path = request.getfixturevalue("tiny_clip_dir")
    return {"backbone": "tiny_cnn", "image_size": 64, "text_encoder": f"clip:{path}", "epochs": 2}


EXTRA_PARAMS = {"winclip": tiny_clip_params, "clad": clad_params, "clad_plus": clad_params}


@pytest.fixture(params=clad.list_detectors())
def detector_name(request):
    return request.param


def _images():
    refs = [texture((64, 64), s) for s in range(3)]
    odd, _ = plant_square(texture((48, 80), 9), 10, 30, 12)  # another size and a defect
    tests = [texture((64, 64), 7), odd, texture((70, 50), 8)]
    return refs, tests


def test_fit_predict_shapes(detector_name, request):
    refs, tests = _images()
    det = clad.create_detector(detector_name, **params_for(detector_name, request))
    assert det.fit(refs) is det
    res = det.predict(tests)
    assert isinstance(res, clad.AnomalyResult)
    assert res.scores.shape == (len(tests),) and res.scores.dtype == np.float32
    assert [m.shape for m in res.anomaly_maps] == [t.shape[:2] for t in tests]
    assert all(m.dtype == np.float32 and np.isfinite(m).all() for m in res.anomaly_maps)
    assert np.isfinite(res.scores).all()


def test_deterministic_with_seed(detector_name, request):
    refs, tests = _images()
    p = params_for(detector_name, request)
    a = clad.create_detector(detector_name, **p).fit(refs).predict(tests)
    b = clad.create_detector(detector_name, **p).fit(refs).predict(tests)
    np.testing.assert_array_equal(a.scores, b.scores)
    for ma, mb in zip(a.anomaly_maps, b.anomaly_maps):
        np.testing.assert_array_equal(ma, mb)


def test_save_load_round_trip(detector_name, request, tmp_path):
    refs, tests = _images()
    det = clad.create_detector(detector_name, **params_for(detector_name, request)).fit(refs)
    # fit sets a label-free threshold from the references; it is saved with its source and scale
    doc = json.loads((det.save(tmp_path / "fitted") / "config.json").read_text())
    assert math.isfinite(doc["threshold"]) and doc["threshold_source"] == "references" and doc["threshold_scale"] > 0
    fitted = clad.load_detector(tmp_path / "fitted").predict(tests)
    assert fitted.threshold == doc["threshold"] and (fitted.labels == (fitted.scores > doc["threshold"])).all()
    assert ((fitted.normalized_scores > 0.5) == fitted.labels).all()
    det.set_threshold(0.5)
    before = det.predict(tests)
    det.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    loaded = clad.load_detector(tmp_path / "model")
    after = loaded.predict(tests)
    np.testing.assert_array_equal(before.scores, after.scores)
    for ma, mb in zip(before.anomaly_maps, after.anomaly_maps):
        np.testing.assert_array_equal(ma, mb)
    assert after.threshold == 0.5 and (after.labels == (after.scores > 0.5)).all()
    assert loaded.threshold_source_ == "user"


def test_unknown_parameter_names_the_key(detector_name):
    with pytest.raises(ConfigError, match="no_such_knob"):
        clad.create_detector(detector_name, no_such_knob=1)


def test_predict_before_fit_is_an_error(detector_name, request):
    det = clad.create_detector(detector_name, **params_for(detector_name, request))
    with pytest.raises(RuntimeError, match="fit"):
        det.predict([texture((64, 64), 0)])
