"""ONNX export and the onnxruntime runtime: the same scores and maps as torch on tiny models, the pipeline's outputs
through ``clad predict --runtime onnxruntime``, and one clear error for what cannot be exported or run.

Skipped when onnx or onnxruntime is missing (``pip install 'clad[onnx]'``), except in CI (``CI`` set), where
they must be installed and these tests run.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import sys

import numpy as np
import pytest
import torch

import clad
from clad.cli import main
from clad.errors import ConfigError, DependencyError
from conftest import plant_square, texture

RTOL = 1e-4  # the parity: image scores and maps within 1e-4 relative of torch
TINY = {"backbone": "tiny_cnn", "image_size": 64}


def _need(package: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{package} is not installed (pip install 'clad[onnx]'); CI installs it and runs these tests")


@pytest.fixture
def ort():
    _need("onnx")
    return _need("onnxruntime")


def _images():
    refs = [texture((64, 64), s) for s in range(3)]
    odd, _ = plant_square(texture((48, 80), 9), 10, 30, 12)
    return refs, [texture((64, 64), 7), odd, texture((70, 50), 8)]  # sizes unlike the graph's input


_FITTED: dict = {}


def _fitted(name: str, clip_dir=None, **params):
    """A detector fitted on ``_images``' references (once per module: exporting and predicting change nothing)."""
    if name.startswith("clad"):
        params = {"text_encoder": f"clip:{clip_dir}", "epochs": 1, "n_train_images": 8, **params}
    key = json.dumps([name, params], sort_keys=True)
    if key not in _FITTED:
        _FITTED[key] = clad.create_detector(name, **{**TINY, **params}).fit(_images()[0])
    return _FITTED[key]


def relative_error(got, ref) -> float:
    """Largest |got - ref| over the largest |ref|: of the scores, or of one map."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def assert_parity(ours, theirs):
    assert relative_error(ours.scores, theirs.scores) <= RTOL
    for a, b in zip(ours.anomaly_maps, theirs.anomaly_maps, strict=True):
        assert a.shape == b.shape and a.dtype == np.float32
        assert relative_error(a, b) <= RTOL
    assert (ours.threshold, ours.normalized_scores is None) == (theirs.threshold, theirs.normalized_scores is None)
    if theirs.labels is not None:  # the decisions agree away from the threshold
        clear = np.abs(theirs.scores - theirs.threshold) > 1e-3 * abs(theirs.threshold)
        assert np.array_equal(ours.labels[clear], theirs.labels[clear])


CASES = [("patchcore", {}), ("patch_knn", {}), ("padim", {}), ("clad_plus", {}), ("clad", {}),
         ("patchcore", {"reweight": True, "embed_dim": 16}),  # Eq. 7 and the channel pooling in the graph
         ("clad_plus", {"image_score": "pooled"})]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{'-'.join(p) or 'default'}" for n, p in CASES])
def test_onnxruntime_gives_torch_scores_and_maps(ort, tmp_path, tiny_clip_dir, name, params):
    from clad.export import OnnxDetector, export_onnx

    det = _fitted(name, tiny_clip_dir, **params)
    tests = _images()[1]
    before = det.predict(tests)
    path = export_onnx(det, tmp_path / "m.onnx", block_distances=256)  # the memory in several blocks
    after = det.predict(tests)
    assert np.array_equal(before.scores, after.scores)  # exporting changes nothing in torch
    assert all(np.array_equal(a, b) for a, b in zip(before.anomaly_maps, after.anomaly_maps))
    runtime = OnnxDetector(path)
    assert runtime.name == det.name and runtime.threshold_ == det.threshold_
    assert_parity(runtime.predict(tests, batch_size=2), before)  # batches of 2 and 1: the batch axis is free


@pytest.mark.real_weights
def test_a_loaded_efficientnet_model_exports(ort, tmp_path):
    """The default backbone prepares its fused weights on first use: a model loaded and exported at once works."""
    from clad.export import OnnxDetector, export_onnx

    clad.create_detector("patch_knn", image_size=64).fit(_images()[0]).save(tmp_path / "model")
    det = clad.load_detector(tmp_path / "model")
    runtime = OnnxDetector(export_onnx(det, tmp_path / "m.onnx"))
    assert_parity(runtime.predict(_images()[1]), det.predict(_images()[1]))


def test_graph_maps_are_the_working_size_maps(ort, tmp_path):
    """The ``maps`` output, for runtimes outside clad: the smoothed map at the working size, which is the detector's
    map of an image already at that size."""
    from clad.backbones.base import resized
    from clad.export import OnnxDetector, export_onnx

    det = _fitted("padim")
    images = [texture((64, 64), 11), plant_square(texture((64, 64), 12), 5, 5, 10)[0]]
    ref = det.predict(images)
    session = OnnxDetector(export_onnx(det, tmp_path / "m.onnx")).session
    scores, maps, patch = session.run(None, {"images": np.ascontiguousarray(resized(images, 64).numpy())})
    assert maps.shape == (2, 64, 64) and patch.shape == (2, *det.grid_)
    assert relative_error(scores, ref.scores) <= RTOL
    assert all(relative_error(m, r) <= RTOL for m, r in zip(maps, ref.anomaly_maps))
    assert np.allclose(scores, maps.reshape(2, -1).max(1))  # PaDiM's score: the smoothed map's maximum


def test_the_memory_is_an_initializer_searched_exactly(ort, tmp_path):
    """An approximate PatchCore (n_probe) exports its exact search: the scores are the exact ones either way."""
    onnx = _need("onnx")
    from clad.export import OnnxDetector, export_onnx

    det = _fitted("patchcore", coreset_ratio=1.0, n_probe=1, probe_min=0)
    path = export_onnx(det, tmp_path / "m.onnx", block_distances=1000)
    model = onnx.load(str(path))
    blocks = [t for t in model.graph.initializer if t.name.startswith("search.bank_t")]  # (C, 1000 // 64 rows)
    assert len(blocks) == -(-len(det.memory_bank_) // 15) and blocks[0].dims[1] == 15
    found = np.concatenate([onnx.numpy_helper.to_array(t).T for t in sorted(blocks, key=lambda t: int(t.name[13:]))])
    assert np.array_equal(found, det.memory_bank_.numpy())  # the memory, stored once
    others = [t for t in model.graph.initializer if t.name.startswith("search.") and t not in blocks]
    assert sum(np.prod(t.dims) for t in others) == len(det.memory_bank_)  # and its rows' squared norms
    exact = clad.create_detector("patchcore", **TINY, coreset_ratio=1.0).fit(_images()[0])
    tests = _images()[1]
    assert relative_error(OnnxDetector(path).predict(tests).scores, exact.predict(tests).scores) <= RTOL


def test_tensors_past_the_limit_go_to_external_data_beside_the_file(ort, tmp_path, monkeypatch):
    from clad.export import OnnxDetector, export_onnx, exporter

    det = _fitted("patchcore", coreset_ratio=1.0)
    assert not (export_onnx(det, tmp_path / "small.onnx").with_name("small.onnx.data")).exists()
    (tmp_path / "small.onnx").unlink()
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", det.memory_bank_.numel())  # 1 GB in real life
    path = export_onnx(det, tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    assert data.stat().st_size > det.memory_bank_.numel() * 4 > path.stat().st_size
    assert_parity(OnnxDetector(path).predict(_images()[1]), det.predict(_images()[1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no staging left


def test_what_cannot_be_exported_is_one_clear_error(ort, tmp_path, tiny_clip_dir):
    from clad.export import export_onnx

    det = clad.create_detector("spade", **TINY).fit(_images()[0])
    with pytest.raises(ConfigError, match=r"detector 'spade' cannot be exported to ONNX; these can: patchcore, "
                                          r"patch_knn, padim, clad, clad_plus"):
        export_onnx(det, tmp_path / "m.onnx")
    base = _fitted("clad", tiny_clip_dir)
    det = clad.create_detector("clad", **{**dataclasses.asdict(base.config), "localization": "gradcam"}).adopt(base)
    with pytest.raises(ConfigError, match="localization='gradcam' cannot be exported"):
        export_onnx(det, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_missing_package_is_one_line_with_the_pip_command(tmp_path, monkeypatch):
    from clad.export import OnnxDetector, export_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    monkeypatch.setitem(sys.modules, "onnx", None)
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(DependencyError, match=r"--runtime onnxruntime needs the package 'onnxruntime'.*pip install "
                                              r"onnx onnxruntime"):
        OnnxDetector(tmp_path / "m.onnx")
    with pytest.raises(DependencyError, match=r"ONNX export needs the package 'onnx'"):
        export_onnx(_fitted("patch_knn"), tmp_path / "n.onnx")
    assert main(["predict", "--model", str(tmp_path / "m.onnx"), "--runtime", "onnxruntime", "--input",
                 str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_a_file_that_is_not_a_clad_export_is_refused(ort, tmp_path):
    onnx = _need("onnx")
    from clad.export import OnnxDetector

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="junk.onnx: onnxruntime cannot load it"):
        OnnxDetector(tmp_path / "junk.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    plain = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ConfigError, match="plain.onnx: not a model written by `clad export`"):
        OnnxDetector(tmp_path / "plain.onnx")


# -- the command line -------------------------------------------------------------------------------------------
@pytest.fixture
def synth(tmp_path):
    from clad.data import make_synthetic_mvtec

    return make_synthetic_mvtec(tmp_path / "data", category="tile", n_train=4, n_test_good=2, n_test_defect=3,
                                size=64, seed=0)


def _rows(folder):
    return {r["path"]: r for r in csv.DictReader(open(folder / "predictions.csv"))}


def test_export_then_predict_with_onnxruntime_writes_the_torch_outputs(ort, synth, tmp_path, capsys):
    model, exported = tmp_path / "model", tmp_path / "model.onnx"
    assert main(["fit", "--data", f"mvtec:{synth}", "--category", "tile", "--shots", "2", "--detector", "patchcore",
                 "--backbone", "tiny_cnn", "--param", "image_size=64", "--out", str(model)]) == 0
    assert main(["export", "--model", str(model), "--format", "onnx", "--out", str(exported)]) == 0
    assert "--runtime onnxruntime" in capsys.readouterr().out
    inputs = synth / "tile" / "test"
    for runtime in ("torch", "onnxruntime"):
        source = model if runtime == "torch" else exported
        assert main(["predict", "--model", str(source), "--runtime", runtime, "--input", str(inputs), "--out",
                     str(tmp_path / runtime), "--batch-size", "3"]) == 0
    ours, theirs = _rows(tmp_path / "onnxruntime"), _rows(tmp_path / "torch")
    assert ours.keys() == theirs.keys() and len(ours) == 5
    for path, row in theirs.items():
        assert relative_error(float(ours[path]["score"]), float(row["score"])) <= RTOL
        assert ours[path]["label"] == row["label"]
    for f in (tmp_path / "torch" / "maps").rglob("*.npy"):
        assert relative_error(np.load(tmp_path / "onnxruntime" / "maps" / f.relative_to(tmp_path / "torch" / "maps")),
                              np.load(f)) <= RTOL
    record = json.loads((tmp_path / "onnxruntime" / "run.json").read_text())
    assert record["runtime"] == "onnxruntime" and record["detector"] == "patchcore" and record["scored"] == 5
    assert "runtime" not in json.loads((tmp_path / "torch" / "run.json").read_text())


def test_command_line_mistakes_are_one_line(ort, synth, tmp_path, capsys):
    model, exported = tmp_path / "model", tmp_path / "model.onnx"
    assert main(["fit", "--data", f"mvtec:{synth}", "--category", "tile", "--shots", "1", "--detector", "spade",
                 "--backbone", "tiny_cnn", "--param", "image_size=64", "--out", str(model)]) == 0
    capsys.readouterr()
    inputs, out = str(synth / "tile" / "test"), str(tmp_path / "out")
    cases = [
        (["export", "--model", str(model), "--out", str(exported)], "detector 'spade' cannot be exported to ONNX"),
        (["predict", "--model", str(model), "--runtime", "onnxruntime", "--input", inputs, "--out", out],
         "a model folder; --runtime onnxruntime runs the file"),
        (["predict", "--model", str(tmp_path / "none.onnx"), "--runtime", "onnxruntime", "--input", inputs, "--out",
          out], "none.onnx: no such file"),
        (["predict", "--model", str(model), "--runtime", "onnxruntime", "--explain", "--input", inputs, "--out", out],
         "--explain and --report need the torch runtime"),
    ]
    (tmp_path / "x.onnx").write_bytes(b"x")
    cases.append((["predict", "--model", str(tmp_path / "x.onnx"), "--input", inputs, "--out", out],
                  "a file; the torch runtime loads a model folder"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not exported.exists() and not (tmp_path / "out").exists()


def test_export_keeps_the_training_mode_and_gradients_of_the_model(ort, tmp_path, tiny_clip_dir):
    from clad.export import export_onnx

    det = _fitted("clad", tiny_clip_dir)
    modules = [det.model_.backbone, det.model_.heads, det.model_.tail]
    modes = [m.training for m in modules]
    grads = [p.requires_grad for m in modules for p in m.parameters()]
    export_onnx(det, tmp_path / "m.onnx")
    assert [m.training for m in modules] == modes
    assert [p.requires_grad for m in modules for p in m.parameters()] == grads
    assert torch.is_grad_enabled()
