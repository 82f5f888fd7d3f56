"""``clad predict --engine ray``: the same outputs as the local engine, resume, a clear error for a cluster that
cannot be reached. Ray is started once for the module (2 CPUs, on 127.0.0.1) and shut down after it; the module
skips when ray is not installed (CI installs it: the cluster extra)."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[cluster]')")

import clad  # noqa: E402
from clad.cli import main  # noqa: E402
from clad.pipeline import read_map  # noqa: E402
from conftest import REPO, plant_square, texture  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    from clad.cluster import connect

    ray = connect(None, 2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "m"
    normal = [texture((64, 64), k) for k in range(3)]
    clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal).set_threshold(0.6).save(folder)
    return folder


def _images(folder: Path, seeds, sizes=None) -> None:
    from PIL import Image

    for k in seeds:
        image = texture((40 + 8 * (k % 4), 56), k)
        if k % 3 == 0:
            image = plant_square(image, 5, 5, 12)[0]
        name = f"sub/{k}.png" if k % 2 else f"{k}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)


def _rows(out: Path, name: str = "predictions.csv") -> list[dict]:
    with open(out / name, newline="") as fh:
        return list(csv.DictReader(fh))


def test_ray_and_local_engines_write_the_same_outputs(ray_cluster, model, tmp_path):
    inputs = tmp_path / "in"
    _images(inputs, range(7))
    (inputs / "sub" / "broken.png").write_bytes(b"not a png")
    local, ray = tmp_path / "local", tmp_path / "ray"
    common = ["predict", "--model", str(model), "--input", str(inputs), "--batch-size", "3"]
    assert main(common + ["--out", str(local)]) == 0
    assert main(common + ["--out", str(ray), "--engine", "ray"]) == 0
    a, b = _rows(local), _rows(ray)
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 7
    for x, y in zip(a, b):
        assert abs(float(x["score"]) - float(y["score"])) <= 1e-6 * abs(float(x["score"]))
        assert x["label"] == y["label"] and x["score_normalized"] == y["score_normalized"]
    assert _rows(local, "errors.csv") == _rows(ray, "errors.csv") and len(_rows(ray, "errors.csv")) == 1
    for f in (local / "maps").rglob("*.npy"):
        np.testing.assert_allclose(read_map(ray / "maps" / f.relative_to(local / "maps")), read_map(f), rtol=1e-6,
                                   atol=1e-7)
    assert len(list((ray / "maps").rglob("*.npy"))) == 7
    assert json.loads((ray / "run.json").read_text())["engine"] == "ray"
    if (local / "predictions.parquet").is_file():
        assert (ray / "predictions.parquet").is_file()


def test_ctrl_c_keeps_what_ray_scored_and_resume_with_ray_scores_the_rest(ray_cluster, model, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    _images(inputs, range(24))
    command = ["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--engine", "ray",
               "--maps", "png16", "--batch-size", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "clad.cli", *command, "--num-cpus", "1"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    unfinished, t0 = out / f".predictions.csv.{proc.pid}.tmp", time.monotonic()
    while not (unfinished.is_file() and unfinished.read_text().count("\n") > 4):  # header + 2 batches
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 300, "timed out"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    rows = _rows(out)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"clad: interrupted (SIGINT); {len(rows)} image(s) scored")
    assert 4 <= len(rows) < 24 and json.loads((out / "run.json").read_text())["status"] == "incomplete"
    assert main(command + ["--resume"]) == 0
    said = capsys.readouterr().out
    assert f"predict: {24 - len(rows)} image(s) scored" in said and f"{len(rows)} done before" in said
    after = _rows(out)
    assert after[: len(rows)] == rows and len(after) == len({r["path"] for r in after}) == 24
    assert len(list((out / "maps").rglob("*.png"))) == 24 and json.loads((out / "run.json").read_text())["scored"] == 24


def test_ray_runs_an_onnx_export_in_its_actors(ray_cluster, model, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'clad[onnx]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'clad[onnx]')")
    from clad.detectors.base import load_detector
    from clad.export import export_onnx

    exported = export_onnx(load_detector(model), tmp_path / "m.onnx")
    inputs = tmp_path / "in"
    _images(inputs, range(3))
    common = ["predict", "--model", str(exported), "--runtime", "onnxruntime", "--input", str(inputs)]
    assert main(common + ["--out", str(tmp_path / "local")]) == 0
    assert main(common + ["--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert [r["path"] for r in a] == [r["path"] for r in b] and [r["label"] for r in a] == [r["label"] for r in b]
    np.testing.assert_allclose([float(r["score"]) for r in b], [float(r["score"]) for r in a], rtol=1e-6)


def test_an_unreachable_address_is_one_clear_error(model, tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "clad.cli", "predict", "--model", str(model), "--input",
                          str(tmp_path), "--out", str(tmp_path / "out"), "--engine", "ray", "--address",
                          f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith("clad: error: cannot connect to the Ray cluster at") and str(port) in lines[0]


def test_ray_options_need_the_ray_engine(model, tmp_path, capsys):
    assert main(["predict", "--model", str(model), "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--num-cpus", "2"]) == 2
    assert "--engine ray" in capsys.readouterr().err
    assert main(["predict", "--model", str(model), "--input", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--engine", "ray", "--explain"]) == 2
    assert "local engine" in capsys.readouterr().err
