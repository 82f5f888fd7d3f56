"""``--shots 0``: zero-shot WinCLIP fits on no reference image in ``clad fit``, ``clad eval`` and ``clad bench``;
a detector that needs references says so."""
from __future__ import annotations

import json

import numpy as np
import pytest

import clad
from clad import bench
from clad.cli import main
from clad.errors import SpecError
from clad.specs import detector_params, parse_shot


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from clad.data import make_synthetic_mvtec

    root = tmp_path_factory.mktemp("data")
    return make_synthetic_mvtec(root, category="tile", n_train=3, n_test_good=2, n_test_defect=2, size=32, seed=0)


def test_parse_and_params():
    assert parse_shot("0") == 0 and parse_shot("all") is None
    with pytest.raises(SpecError, match="must be >= 0"):
        parse_shot("-1")
    assert detector_params("winclip", {}, shots=0)["few_shot"] is False
    assert "few_shot" not in detector_params("winclip", {}, shots=1)
    with pytest.raises(SpecError, match="'patchcore' needs reference images"):
        detector_params("patchcore", {}, shots=0)
    with pytest.raises(SpecError, match="few_shot=True"):
        detector_params("winclip", {"few_shot": True}, shots=0)


def test_zero_shot_fit_on_no_image(tiny_clip_dir):
    det = clad.create_detector("winclip", backbone=f"clip:{tiny_clip_dir}", category="tile", few_shot=False)
    assert det.fits_without_references and not clad.create_detector("winclip", backbone="clip:x").fits_without_references
    res = det.fit([]).predict([np.full((40, 40, 3), 128, np.uint8)])
    assert det.threshold_ is None and res.scores.shape == (1,) and res.anomaly_maps[0].shape == (40, 40)
    with pytest.raises(ValueError, match="at least one normal image"):
        clad.create_detector("winclip", backbone=f"clip:{tiny_clip_dir}").fit([])  # WinCLIP+ needs references


def test_cli_fit_and_eval_with_shots_0(synth, tiny_clip_dir, tmp_path, capsys):
    common = ["--data", f"mvtec:{synth}", "--category", "tile", "--shots", "0", "--detector", "winclip",
              "--backbone", f"clip:{tiny_clip_dir}"]
    assert main(["fit", *common, "--out", str(tmp_path / "model")]) == 0
    assert "on 0 reference image(s)" in capsys.readouterr().out
    assert clad.load_detector(tmp_path / "model").config.few_shot is False
    assert main(["eval", *common, "--out", str(tmp_path / "r.json")]) == 0
    assert "shots=0" in capsys.readouterr().out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["shots"] == "0" and res["n_references"] == 0 and res["n_test"] == 4
    assert main(["eval", *common[:6], "--detector", "patch_knn", "--backbone", "tiny_cnn"]) == 2
    assert "needs reference images" in capsys.readouterr().err


def test_bench_with_shots_0(synth, tiny_clip_dir, tmp_path):
    summary = bench.run_bench(tmp_path / "bench", f"mvtec:{synth}", categories="tile", shots="0", runs=1,
                              detectors=f"winclip[backbone=clip:{tiny_clip_dir}]", plots=False, progress=False)
    res = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert res["settings"]["shots"] == ["0"] and summary
