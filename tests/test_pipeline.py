"""The streaming predict flow: sources, the bounded prefetch thread, sinks, and equality with ``predict``."""
from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import clad
from clad.errors import DatasetError, ImageLoadError
from clad.pipeline import (BaseSink, Entry, ErrorsCSV, ExplanationsJSON, HTMLReport, MapsNpy, Pipeline,
                           PredictionsCSV, Prefetcher, Unusable, from_dataset, from_folder, from_manifest, from_paths,
                           open_source)
from clad.pipeline.flow import _Decoder
from clad.types import AnomalyResult, Item
from clad.viz import save_png
from conftest import plant_square, texture


class Collect(BaseSink):
    """Keeps everything it is given."""

    def __init__(self):
        self.predictions, self.errors, self.closed = [], [], None

    def write(self, batch):
        self.predictions += batch

    def write_error(self, path, error):
        self.errors.append((path, error))

    def close(self, summary):
        self.closed = summary


class MeanDetector:
    """A stand-in detector: score = mean pixel, map = mean over channels; counts its calls."""

    threshold_ = None

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, []

    def predict(self, images, batch_size=16):
        self.calls.append(len(images))
        time.sleep(self.delay)
        maps = [im.mean(2).astype(np.float32) for im in images]
        return AnomalyResult(np.array([m.mean() for m in maps], np.float32), maps)


class Counted(Entry):
    """An entry that counts its loads (and can fail with any error)."""

    def __init__(self, i: int, counter: list, error: Exception | None = None):
        super().__init__(f"img{i}.png", f"img{i}.png")
        object.__setattr__(self, "i", i)
        object.__setattr__(self, "counter", counter)
        object.__setattr__(self, "error", error)

    def load(self):
        self.counter.append(self.i)
        if self.error is not None:
            raise self.error
        return Item(np.full((8, 8, 3), self.i % 256, np.uint8), self.path, self.name)


def _tree(root: Path) -> list[Path]:
    files = [root / "b.png", root / "sub" / "a.png", root / "sub" / "deeper" / "c.jpg"]
    for k, f in enumerate(files):
        save_png(texture((32, 40), k), f)
    (root / "notes.txt").write_text("not an image")
    save_png(texture((8, 8), 9), root / ".hidden.png")
    return files


def _no_prefetch_thread_alive() -> bool:
    return not any(t.name == "clad-prefetch" and t.is_alive() for t in threading.enumerate())


# -- sources ------------------------------------------------------------------------------------------------
def test_folder_source_is_recursive_sorted_and_names_mirror_the_tree(tmp_path):
    _tree(tmp_path)
    entries = from_folder(tmp_path)
    assert [e.name for e in entries] == ["b.png", "notes.txt", "sub/a.png", "sub/deeper/c.jpg"]  # .hidden.png: left out
    assert isinstance(entries[1], Unusable) and entries[1].reason.startswith("unsupported format (.txt;")
    assert entries[2].load().image.shape == (32, 40, 3)
    assert [e.name for e in from_folder(tmp_path / "b.png")] == ["b.png"]
    with pytest.raises(DatasetError, match="nowhere"):
        from_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        from_folder(tmp_path / "empty")


def test_list_source_keeps_order_and_names_relative_to_the_common_folder(tmp_path):
    files = _tree(tmp_path)
    entries = from_paths([files[2], files[0]])
    assert [e.name for e in entries] == ["sub/deeper/c.jpg", "b.png"] and entries[0].path == str(files[2])
    assert [e.name for e in from_paths(files[1:], root=tmp_path)] == ["sub/a.png", "sub/deeper/c.jpg"]
    with pytest.raises(DatasetError, match="not inside"):
        from_paths([files[0]], root=tmp_path / "sub")


def test_manifest_paths_resolve_against_its_folder(tmp_path, monkeypatch):
    files = _tree(tmp_path / "data")
    manifest = tmp_path / "data" / "list.csv"
    manifest.write_text(f"id,path\n1,sub/a.png\n2,{files[0]}\n3,missing.png\n")
    monkeypatch.chdir(tmp_path)  # relative entries must not depend on the working folder
    entries = open_source(manifest)
    assert [e.name for e in entries] == ["sub/a.png", "b.png", "missing.png"]
    assert entries[0].load().image.shape == (32, 40, 3)
    with pytest.raises(ImageLoadError, match="missing.png"):
        entries[2].load()
    bad = tmp_path / "bad.csv"
    bad.write_text("file\na.png\n")
    with pytest.raises(DatasetError, match="bad.csv.*no 'path' column"):
        from_manifest(bad)
    bad.write_text("path\na.png\n\n , \n")
    with pytest.raises(DatasetError, match="line 4: empty path"):
        from_manifest(bad)


def test_dataset_source_yields_labels_and_masks(tmp_path):
    from clad.data import MVTecAD, make_synthetic_mvtec

    root = make_synthetic_mvtec(tmp_path, category="tile", n_train=2, n_test_good=1, n_test_defect=2, size=32, seed=0)
    test = MVTecAD(root, "tile", "test")
    items = [e.load() for e in from_dataset(test)]
    assert [it.label for it in items] == list(test.labels) and all(it.mask.shape == (32, 32) for it in items)
    assert {it.defect_type for it in items} == set(test.defect_types)


# -- the flow -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_corrupt_file_goes_to_the_errors_and_the_stream_goes_on(tmp_path, prefetch):
    files = _tree(tmp_path)
    (tmp_path / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    sink = Collect()
    summary = Pipeline(MeanDetector(), [sink], batch_size=2, prefetch=prefetch).run(from_folder(tmp_path))
    assert (summary.n_scored, summary.n_skipped) == (3, 2) and summary.error is None and sink.closed is summary
    assert [p.path for p in sink.predictions] == [str(files[0]), str(files[1]), str(files[2])]
    assert [e[0].rsplit("/", 1)[1] for e in sink.errors] == ["notes.txt", "broken.png"]
    assert "broken.png: cannot read image" in sink.errors[1][1]


def test_batches_are_full_batches_of_good_images():
    counter = []
    entries = [Counted(i, counter, ImageLoadError(f"img{i}: bad") if i in (1, 2) else None) for i in range(9)]
    det = MeanDetector()
    Pipeline(det, [Collect()], batch_size=3, prefetch=1).run(entries)
    assert det.calls == [3, 3, 1]


def test_prefetch_is_bounded():
    """The thread decodes at most ``prefetch`` batches ahead (+ the one it holds), however slow the forward."""
    counter, seen = [], []
    entries = [Counted(i, counter) for i in range(60)]

    class Watch(Collect):
        def write(self, batch):
            seen.append(len(counter) - (len(seen) + 1) * 4)  # decoded but not yet predicted
            super().write(batch)

    Pipeline(MeanDetector(delay=0.02), [Watch()], batch_size=4, prefetch=2).run(entries)
    assert max(seen) <= (2 + 1) * 4 and max(seen) > 0  # it did run ahead, within bounds
    assert _no_prefetch_thread_alive()


def test_prefetch_stops_on_an_error_of_a_sink():
    counter = []
    entries = [Counted(i, counter) for i in range(200)]

    class Fails(Collect):
        def write(self, batch):
            raise RuntimeError("disk full")

    sink = Fails()
    with pytest.raises(RuntimeError, match="disk full"):
        Pipeline(MeanDetector(), [sink], batch_size=4, prefetch=2).run(entries)
    assert _no_prefetch_thread_alive() and len(counter) < 200
    assert isinstance(sink.closed.error, RuntimeError)  # closed, told why


def test_an_error_while_decoding_that_is_not_a_bad_file_stops_the_run():
    counter = []
    entries = [Counted(i, counter, MemoryError("out of memory") if i == 5 else None) for i in range(100)]
    with pytest.raises(MemoryError):
        Pipeline(MeanDetector(), [Collect()], batch_size=4, prefetch=2).run(entries)
    assert _no_prefetch_thread_alive() and len(counter) == 6


def test_prefetcher_closed_early_stops_decoding():
    counter = []
    prefetcher = Prefetcher(_Decoder([Counted(i, counter) for i in range(500)], 4), depth=1)
    for items, failures in prefetcher:
        assert len(items) == 4 and not failures
        break
    prefetcher.close()
    assert _no_prefetch_thread_alive() and len(counter) <= 3 * 4


def test_flow_equals_predict_on_the_same_images(tmp_path, normal_images):
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal_images)
    images = [texture((64, 64), 30 + k) for k in range(4)] + [plant_square(texture((48, 80), 40), 5, 5, 10)[0]]
    paths = [save_png(im, tmp_path / f"{k}.png") for k, im in enumerate(images)]
    det.set_threshold(0.5)
    sink = Collect()
    summary = Pipeline(det, [sink], batch_size=2, prefetch=2).run(from_paths(paths))
    expected = det.predict(images, batch_size=2)
    assert summary.n_scored == 5 and summary.predict_seconds > 0
    np.testing.assert_array_equal([p.score for p in sink.predictions], expected.scores)
    for p, m, label in zip(sink.predictions, expected.anomaly_maps, expected.labels):
        np.testing.assert_array_equal(p.anomaly_map, m)
        assert p.label == bool(label)


# -- sinks --------------------------------------------------------------------------------------------------
def test_file_sinks_write_predictions_errors_and_mirrored_maps(tmp_path):
    files = _tree(tmp_path / "in")
    (tmp_path / "in" / "sub" / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    sinks = [PredictionsCSV(out / "predictions.csv"), ErrorsCSV(out / "errors.csv"), MapsNpy(out / "maps")]
    Pipeline(MeanDetector(), sinks, batch_size=2).run(from_folder(tmp_path / "in"))
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["path"] for r in rows] == [str(f) for f in files] and set(rows[0]) == {"path", "score"}
    errors = list(csv.DictReader(open(out / "errors.csv")))
    assert len(errors) == 2 and "unsupported format" in errors[0]["error"] and "empty file" in errors[1]["error"]
    amap = np.load(out / "maps" / "sub" / "deeper" / "c.jpg.npy")
    assert amap.shape == (32, 40) and amap.dtype == np.float32


def test_maps_refuse_a_name_outside_their_folder(tmp_path):
    from clad.types import Prediction

    sink = MapsNpy(tmp_path / "maps")
    sink.open()
    with pytest.raises(ValueError, match="not a relative path"):
        sink.write([Prediction(Item(np.zeros((2, 2, 3), np.uint8), "x.png", "../x.png"), 0.0, np.zeros((2, 2)))])


def test_explanations_are_streamed_as_one_json_list(tmp_path):
    class Said:
        def __init__(self, k):
            self.k = k

        def to_dict(self):
            return {"path": f"{self.k}.png", "regions": [{"bbox": [0, 1, 2, 3]}], "sentence": 'say "hi"\n'}

    class Explains:
        def explain(self, images, result, paths):
            return [Said(p) for p in paths]

    counter = []
    for n in (0, 5):
        sink = ExplanationsJSON(tmp_path / f"e{n}.json")
        Pipeline(MeanDetector(), [sink], batch_size=2, explainer=Explains()).run([Counted(i, counter) for i in range(n)])
        expected = [Said(f"img{i}.png").to_dict() for i in range(n)]
        assert (tmp_path / f"e{n}.json").read_text() == json.dumps(expected, indent=2)


def test_streamed_report_equals_write_report(tmp_path, normal_images):
    """The report sink, fed batch by batch, writes the same files as write_report given everything at once."""
    from clad.data import MVTecAD, make_synthetic_mvtec
    from clad.explain import explain
    from clad.report import write_report

    root = make_synthetic_mvtec(tmp_path / "d", category="tile", n_train=2, n_test_good=2, n_test_defect=3, size=64, seed=0)
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal_images)
    test = MVTecAD(root, "tile", "test")
    samples = [test[i] for i in range(len(test))]
    result = det.predict([s.image for s in samples], batch_size=2)  # the flow's batches: the same numbers
    said = explain(det, [s.image for s in samples], result, references=normal_images, pixel_threshold=0.5)
    write_report(tmp_path / "whole", samples, result, title="t", explanations=said, references=normal_images)

    class Fixed:  # the same explanations, handed out batch by batch
        def explain(self, images, result, paths):
            return [said[[s.path for s in samples].index(p)] for p in paths]

    sink = HTMLReport(tmp_path / "streamed", title="t", threshold=det.threshold_, references=normal_images)
    Pipeline(det, [sink], batch_size=2, explainer=Fixed()).run(from_dataset(test))
    whole = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    streamed = sorted(p.relative_to(tmp_path / "streamed") for p in (tmp_path / "streamed").rglob("*") if p.is_file())
    assert whole == streamed and sink.page == tmp_path / "streamed" / "index.html"
    for rel in whole:
        assert (tmp_path / "whole" / rel).read_bytes() == (tmp_path / "streamed" / rel).read_bytes(), rel


def test_report_keeps_a_bounded_colour_scale_sample(tmp_path, monkeypatch):
    import clad.report
    from clad.types import Prediction

    monkeypatch.setattr(clad.report, "SCALE_SAMPLE_MAX", 10_000)
    writer = clad.report.ReportWriter(tmp_path / "rep")
    for k in range(6):
        amap = np.random.default_rng(k).random((64, 64)).astype(np.float32)  # 4096 sampled values each
        writer.add(Prediction(Item(texture((64, 64), k), f"{k}.png", f"{k}.png"), float(k), amap))
        assert writer.n_sampled <= 10_000
    page = writer.close()
    assert page.is_file() and not list((tmp_path / "rep").glob(".staging-*"))


# -- evaluate and the command line ---------------------------------------------------------------------------
def test_evaluate_streams_and_gives_the_metrics_of_the_whole_split(tmp_path):
    from clad import metrics
    from clad.data import MVTecAD, make_synthetic_mvtec
    from clad.evaluate import _resize_for_eval, evaluate, load_split

    root = make_synthetic_mvtec(tmp_path, category="tile", n_train=3, n_test_good=2, n_test_defect=4, size=96, seed=1)
    train, test = MVTecAD(root, "tile", "train"), MVTecAD(root, "tile", "test")
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64)
    res = evaluate(det, train, test, batch_size=3, pixel_eval_size=64, progress=False)
    samples, _ = load_split(test, progress=False)
    result = det.predict([s.image for s in samples], batch_size=3)
    pairs = [_resize_for_eval(s.mask, m, 64) for s, m in zip(samples, result.anomaly_maps)]
    expected = metrics.evaluate([s.label for s in samples], result.scores, [p[0] for p in pairs], [p[1] for p in pairs],
                                iou_threshold=None)
    for key, value in expected.items():
        assert res[key] == value or (np.isnan(value) and np.isnan(res[key])), key
    assert res["n_test"] == len(test) and "_predictions" not in res
    kept = evaluate(det, train, test, batch_size=3, pixel_eval_size=64, progress=False, keep_predictions=True)
    pred = kept["_predictions"]
    assert [s.path for s in pred["samples"]] == test.paths and pred["samples"][0].image.shape == (96, 96, 3)
    np.testing.assert_array_equal(pred["result"].scores, result.scores)


def test_predict_reads_a_manifest_from_the_command_line(tmp_path):
    from clad.cli import main

    normal = [texture((64, 64), k) for k in range(3)]
    clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal).save(tmp_path / "model")
    files = _tree(tmp_path / "in")
    manifest = tmp_path / "in" / "list.csv"
    manifest.write_text("path\nsub/a.png\nb.png\n")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tmp_path / "model"), "--input", str(manifest), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["path"] for r in rows] == [str(files[1]), str(files[0])]
    assert (out / "maps" / "sub" / "a.png.npy").is_file() and (out / "maps" / "b.png.npy").is_file()
