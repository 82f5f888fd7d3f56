"""Map formats (``clad predict --maps``), ``read_map``, and predictions.parquet: for both engines, tested here on
the local one (tests/test_ray_predict.py compares the engines)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import clad
from clad.cli import main
from clad.errors import ImageLoadError, OutputError
from clad.pipeline import read_map, write_map
from clad.pipeline.maps import PNG_LEVELS
from conftest import texture


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    normal = [texture((64, 64), k) for k in range(3)]
    clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal).save(folder / "m")
    return folder / "m"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("in")
    (folder / "sub").mkdir()
    for k, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        Image.fromarray(texture((40 + 8 * k, 56), 10 + k)).save(folder / name)
    return folder


def _map(seed: int, shape=(37, 53)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.gamma(2.0, 0.7, shape) + 0.1).astype(np.float32)


@pytest.mark.parametrize("seed", range(3))
def test_float16_and_png16_round_trip_within_their_stated_error(tmp_path, seed):
    amap = _map(seed)
    exact = read_map(write_map(tmp_path / "m", amap, "npy"))
    assert exact.dtype == np.float32 and np.array_equal(exact, amap)
    half = read_map(write_map(tmp_path / "h", amap, "float16"))
    assert half.dtype == np.float32 and np.all(np.abs(half - amap) <= 2.0**-11 * np.abs(amap))
    png = read_map(write_map(tmp_path / "p", amap, "png16"))
    span = float(amap.max() - amap.min())
    assert png.shape == amap.shape and np.abs(png - amap).max() <= span / (2 * PNG_LEVELS) + 1e-6 * amap.max()
    assert png.min() == amap.min() and png.max() == amap.max()  # the range is stored exactly


def test_png16_of_a_constant_map_and_bad_files(tmp_path):
    flat = np.full((5, 7), 0.25, np.float32)
    assert np.array_equal(read_map(write_map(tmp_path / "flat", flat, "png16")), flat)
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "plain.png")  # a 16-bit PNG, no value range
    with pytest.raises(ImageLoadError, match="clad-map"):
        read_map(tmp_path / "plain.png")
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ImageLoadError, match="2-D"):
        read_map(tmp_path / "cube.npy")
    with pytest.raises(ImageLoadError, match="expected .npy or .png"):
        read_map(tmp_path / "x.tiff")
    with pytest.raises(OutputError, match="float16"):
        write_map(tmp_path / "big", np.full((2, 2), 1e6, np.float32), "float16")


def _rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("fmt, suffix", [("float16", ".npy"), ("png16", ".png")])
def test_predict_writes_each_format_and_read_map_gives_the_float32_maps_back(model, inputs, tmp_path, fmt, suffix):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(ref)]) == 0
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--maps", fmt]) == 0
    assert _rows(out) == _rows(ref)
    names = sorted(p.relative_to(out / "maps").as_posix() for p in (out / "maps").rglob("*") if p.is_file())
    assert names == [f"{n}{suffix}" for n in ["a.png", "b.jpg", "sub/c.png"]]
    for name in ["a.png", "b.jpg", "sub/c.png"]:
        exact, small = read_map(ref / "maps" / f"{name}.npy"), read_map(out / "maps" / f"{name}{suffix}")
        bound = 2.0**-11 * np.abs(exact) if fmt == "float16" else (exact.max() - exact.min()) / PNG_LEVELS
        assert small.shape == exact.shape and np.all(np.abs(small - exact) <= bound + 1e-7)
    assert json.loads((out / "run.json").read_text())["maps"] == fmt


def test_maps_none_writes_no_maps_folder_and_removes_a_previous_one(model, inputs, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out)]) == 0
    assert (out / "maps").is_dir()
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--maps", "none"]) == 0
    assert not (out / "maps").exists() and len(_rows(out)) == 3


def test_a_resume_with_another_maps_format_is_refused(model, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--maps", "float16"]) == 0
    capsys.readouterr()
    code = main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--maps", "png16",
                 "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "maps 'float16'" in err and "'png16'" in err
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--maps", "float16",
                 "--resume"]) == 0


def test_a_run_recorded_before_maps_formats_resumes_with_npy(model, inputs, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out)]) == 0
    doc = json.loads((out / "run.json").read_text())
    del doc["maps"]  # as written before --maps existed
    (out / "run.json").write_text(json.dumps(doc))
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--resume"]) == 0
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--resume",
                 "--maps", "png16"]) == 2


def test_predictions_parquet_holds_the_csv_rows_typed(model, inputs, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--threshold",
                 "0.6"]) == 0
    table = pq.read_table(out / "predictions.parquet")
    rows = _rows(out)
    assert table.column_names == ["path", "score", "score_normalized", "label"]
    assert str(table.schema.field("score").type) == "double" and str(table.schema.field("label").type) == "string"
    assert table.column("path").to_pylist() == [r["path"] for r in rows]
    assert table.column("score").to_pylist() == [float(r["score"]) for r in rows]
    assert table.column("score_normalized").to_pylist() == [float(r["score_normalized"]) if r["score_normalized"]
                                                            else None for r in rows]
    assert table.column("label").to_pylist() == [r["label"] for r in rows]


def test_parquet_follows_the_csv_through_a_resume(model, inputs, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(inputs / "sub"), "--out", str(out)]) == 0
    assert pq.read_table(out / "predictions.parquet").num_rows == 1
    # an interrupted run keeps what it finished: here the record says so, and the CSV holds one row of three
    run = json.loads((out / "run.json").read_text())
    run.update(status="incomplete", input=str(inputs))
    (out / "run.json").write_text(json.dumps(run))
    assert main(["predict", "--model", str(model), "--input", str(inputs), "--out", str(out), "--resume"]) == 0
    table = pq.read_table(out / "predictions.parquet")
    assert table.column("path").to_pylist() == [r["path"] for r in _rows(out)] and table.num_rows == 3


def test_parquet_of_a_csv_with_empty_normalised_scores_holds_nulls(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from clad.pipeline import write_parquet

    (tmp_path / "p.csv").write_text("path,score,score_normalized,label\na.png,0.5,,normal\nb.png,2,0.75,anomalous\n")
    table = pq.read_table(write_parquet(tmp_path / "p.csv", tmp_path / "p.parquet"))
    assert table.to_pydict() == {"path": ["a.png", "b.png"], "score": [0.5, 2.0], "score_normalized": [None, 0.75],
                                 "label": ["normal", "anomalous"]}
