"""Outputs are never lost or mixed: one writer per output, files and folders replaced whole, a crash leaves the
previous results, Ctrl-C and SIGTERM keep what was finished and ``--resume`` completes it; sources say why they
skip a file; map names are unique and lead back to their image."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import clad
from clad.cli import main
from clad.errors import Interrupted, OutputError
from clad.pipeline import (BaseSink, HTMLReport, MapsNpy, Pipeline, PredictionsCSV, Staging, from_folder,
                           output_lock, stop_on_signals, uninterrupted)
from clad.types import AnomalyResult, Item, Prediction
from clad.viz import save_png
from conftest import REPO, texture

N_IMAGES = 120


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    normal = [texture((64, 64), k) for k in range(3)]
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal)
    return det.save(tmp_path_factory.mktemp("m") / "model")


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """A few hundred tiny images in three folders."""
    root = tmp_path_factory.mktemp("many")
    for k in range(N_IMAGES):
        save_png(texture((24, 24), k), root / f"d{k % 3}" / f"i{k:03d}.png")
    return root


def _rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _maps(out: Path) -> set[str]:
    return {p.relative_to(out / "maps").as_posix()[: -len(".npy")] for p in (out / "maps").rglob("*.npy")}


def _leftovers(out: Path) -> list[str]:
    """Temporary files, staging folders and the lock file, which a run must not leave behind."""
    return sorted(p.name for p in [*out.rglob(".*"), *out.parent.glob(f".{out.name}*")])


def _predict(model: Path, inputs: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "clad.cli", "predict", "--model", str(model), "--input", str(inputs), "--out", str(out),
           "--batch-size", "8", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _rows_written(out: Path, pid: int) -> int:
    """Rows in the run's unfinished predictions file (header included)."""
    tmp = out / f".predictions.csv.{pid}.tmp"
    try:
        return tmp.read_text().count("\n")
    except OSError:
        return 0


# -- the command line ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_keeps_the_rows_done_and_resume_completes_them(model, many, tmp_path, sig, capsys):
    out = tmp_path / "out"
    proc = _predict(model, many, out)
    _wait_for(lambda: _rows_written(out, proc.pid) > 2 * 8, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    rows = _rows(out)
    assert last.startswith(f"clad: interrupted ({sig.name}); {len(rows)} image(s) scored are kept in"), last
    assert "Traceback" not in err and 2 * 8 <= len(rows) < N_IMAGES
    names = [str(Path(r["path"]).relative_to(many).as_posix()) for r in rows]
    assert len(set(names)) == len(names) and set(names) <= _maps(out)  # every row has its map
    assert len(_maps(out)) - len(names) <= 8  # at most the batch whose rows were not written yet
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "incomplete" and record["scored"] == len(rows)
    assert _leftovers(out) == []

    assert main(["predict", "--model", str(model), "--input", str(many), "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out  # the model has a threshold: "(n flagged above the threshold t)" comes between
    assert f"{N_IMAGES - len(rows)} image(s) scored" in said and f", 0 skipped, {len(rows)} done before" in said
    rows_after = _rows(out)
    assert rows_after[: len(rows)] == rows and len(rows_after) == N_IMAGES
    # the flagged count of this run, then the whole run's
    flagged_now = sum(r["label"] == "anomalous" for r in rows_after[len(rows):])
    flagged_all = sum(r["label"] == "anomalous" for r in rows_after)
    assert f"scored ({flagged_now} flagged above the threshold" in said, said
    assert f"(the whole run: {N_IMAGES} scored, {flagged_all} flagged)" in said, said
    assert len({r["path"] for r in rows_after}) == N_IMAGES and len(_maps(out)) == N_IMAGES
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete" and record["scored"] == N_IMAGES and _leftovers(out) == []


def test_a_second_run_into_the_same_out_is_refused(model, many, tmp_path, capsys):
    out = tmp_path / "out"
    first = _predict(model, many, out)
    lock = tmp_path / ".out.clad-lock"
    _wait_for(lambda: lock.is_file() and lock.read_text().startswith("pid "), first)
    other = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64, sigma=1.0)
    other.fit([texture((64, 64), 9)]).save(tmp_path / "other")
    code = main(["predict", "--model", str(tmp_path / "other"), "--input", str(many), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"clad: error: --out {out}: another clad run is writing there (pid {first.pid}:")
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    text = (out / "predictions.csv").read_text()
    assert "\0" not in text and len(_rows(out)) == N_IMAGES
    assert json.loads((out / "run.json").read_text())["model"] == str(model) and not lock.exists()


def test_a_crash_leaves_the_previous_results_as_they_were(model, many, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(many / "d0"), "--out", str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []

    def fail_on_the_second_batch(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("a sink broke")
        return write(self, batch)

    write = MapsNpy.write
    monkeypatch.setattr(MapsNpy, "write", fail_on_the_second_batch)
    code = main(["predict", "--model", str(model), "--input", str(many), "--out", str(out), "--batch-size", "4"])
    err = capsys.readouterr().err
    assert code == 1 and "RuntimeError: a sink broke" in err and "internal error (a bug)" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and _leftovers(out) == []


def test_a_new_run_replaces_every_output_of_the_previous_one(model, many, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(many / "d0"), "--out", str(out)]) == 0
    assert main(["predict", "--model", str(model), "--input", str(many / "d1"), "--out", str(out)]) == 0
    assert len(_rows(out)) == len(_maps(out)) == len(list((many / "d1").iterdir()))  # no stale map of d0 or d2


def test_maps_are_named_by_the_path_with_its_extension(model, tmp_path):
    from PIL import Image

    (tmp_path / "in" / "sub").mkdir(parents=True)
    for k, name in enumerate(["img.tiff", "img.webp", "img.png", "sub/img.png"]):
        Image.fromarray(texture((40, 56), k)).save(tmp_path / "in" / name)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "in"), "--out", str(out)]) == 0
    assert _maps(out) == {"img.tiff", "img.webp", "img.png", "sub/img.png"}
    for row in _rows(out):  # the map's name leads back to its image
        name = Path(row["path"]).relative_to(tmp_path / "in").as_posix()
        assert np.load(out / "maps" / f"{name}.npy").shape == (40, 56)


def test_links_loops_and_other_files_are_skipped_with_their_reason(model, tmp_path):
    from PIL import Image

    src = tmp_path / "in"
    save_png(texture((32, 32), 1), src / "a.png")
    save_png(texture((32, 32), 2), tmp_path / "elsewhere" / "b.png")
    os.symlink(tmp_path / "elsewhere" / "b.png", src / "link_to_b.png")  # followed
    os.symlink(tmp_path / "elsewhere", src / "linked_folder")  # followed
    os.symlink(src / "gone.png", src / "dangling.png")
    os.symlink(".", src / "loop")
    os.symlink("self.png", src / "self.png")
    Image.fromarray(texture((16, 16), 3)).save(src / "anim.gif")
    (src / "notes.txt").write_text("x")
    (src / ".hidden.png").write_bytes(b"")  # hidden: not read, as the help says
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(src), "--out", str(out)]) == 0
    assert sorted(Path(r["path"]).name for r in _rows(out)) == ["a.png", "b.png", "link_to_b.png"]
    with open(out / "errors.csv", newline="") as fh:
        errors = {Path(r["path"]).name: r["error"] for r in csv.DictReader(fh)}
    assert set(errors) == {"anim.gif", "dangling.png", "loop", "notes.txt", "self.png"}
    assert "unsupported format (.gif;" in errors["anim.gif"] and "unsupported format (.txt;" in errors["notes.txt"]
    assert "dangling symbolic link" in errors["dangling.png"] and "symbolic link loop" in errors["loop"]
    assert "symbolic link loop" in errors["self.png"]
    record = json.loads((out / "run.json").read_text())
    assert (record["scored"], record["skipped"]) == (3, 5)


def test_a_folder_reached_twice_is_listed_once(tmp_path):
    save_png(texture((8, 8), 1), tmp_path / "in" / "real" / "a.png")
    os.symlink(tmp_path / "in" / "real", tmp_path / "in" / "zz_again")
    entries = from_folder(tmp_path / "in")
    assert [e.name for e in entries] == ["real/a.png", "zz_again"]
    assert "a folder already listed" in entries[1].reason


def test_resume_from_another_working_folder_skips_what_is_done(model, many, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.chdir(many)
    assert main(["predict", "--model", str(model), "--input", "d0", "--out", str(out)]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", str(model), "--input", str(many / "d0"), "--out", str(out), "--resume"]) == 0
    assert len(_rows(out)) == len(list((many / "d0").iterdir()))


def test_a_path_listed_twice_is_done_once_and_dangling_dataset_images_are_reported(tmp_path):
    from clad.data import ImageFolder
    from clad.errors import ImageLoadError
    from clad.pipeline import Unusable, from_paths

    a = save_png(texture((8, 8), 1), tmp_path / "good" / "a.png")
    entries = from_paths([a, tmp_path / "good" / "b.png", tmp_path / "good" / ".." / "good" / "a.png"])
    assert [type(e) for e in entries] == [type(entries[0])] * 2 + [Unusable]
    assert entries[2].reason == "listed twice (first as entry 1)"
    os.symlink(tmp_path / "gone.png", tmp_path / "good" / "b.png")
    data = ImageFolder(tmp_path / "good")
    assert [Path(p).name for p in data.paths] == ["a.png", "b.png"]
    with pytest.raises(ImageLoadError, match="b.png: dangling symbolic link"):
        data[1]


# -- the pieces ----------------------------------------------------------------------------------------------
class Flat:
    """A stand-in detector: score = mean pixel, map = channel mean."""

    threshold_ = None

    def predict(self, images, batch_size=16):
        maps = [im.mean(2).astype(np.float32) for im in images]
        return AnomalyResult(np.array([m.mean() for m in maps], np.float32), maps)


class Entries(list):
    """Entries that raise ``error`` when the ``at``-th is decoded."""

    def __init__(self, n: int, at: int = -1, error: BaseException | None = None):
        super().__init__(range(n))
        self.at, self.error = at, error

    def __iter__(self):
        for i in range(len(self)):
            if i == self.at:
                raise self.error
            yield _Fixed(f"{i}.png", f"{i}.png")


class _Fixed:
    def __init__(self, path, name):
        self.path, self.name = path, name

    def load(self):
        return Item(np.full((4, 4, 3), len(self.name), np.uint8), self.path, self.name)


@pytest.mark.parametrize("error, kept", [(KeyboardInterrupt(), True), (Interrupted("SIGTERM"), True),
                                         (RuntimeError("bug"), False)])
def test_sinks_keep_what_was_finished_on_an_interruption_and_nothing_on_an_error(tmp_path, error, kept):
    out = tmp_path / "out"
    Pipeline(Flat(), [MapsNpy(out / "maps"), PredictionsCSV(out / "predictions.csv")], batch_size=2,
             prefetch=0).run(Entries(3))
    before = (out / "predictions.csv").read_text()
    with pytest.raises(type(error)):
        Pipeline(Flat(), [MapsNpy(out / "maps"), PredictionsCSV(out / "predictions.csv")], batch_size=2,
                 prefetch=0).run(Entries(9, at=5, error=error))
    text = (out / "predictions.csv").read_text()
    if kept:
        assert text.count("\n") == 1 + 4 and len(_maps(out)) == 4  # the two batches finished
    else:
        assert text == before and len(_maps(out)) == 3
    assert sorted(p.name for p in out.iterdir()) == ["maps", "predictions.csv"]


def test_a_stale_lock_file_does_not_block_and_a_held_one_does(tmp_path):
    (tmp_path / ".out.clad-lock").write_text("pid 1: clad predict (killed long ago)")
    with output_lock(tmp_path / "out") as held:
        assert held == tmp_path / "out" and (tmp_path / ".out.clad-lock").read_text().startswith(f"pid {os.getpid()}")
        with pytest.raises(OutputError, match=f"another clad run is writing there \\(pid {os.getpid()}"):
            with output_lock(tmp_path / "out"):
                pass
    assert not (tmp_path / ".out.clad-lock").exists()


def test_staging_replaces_its_names_and_leaves_the_rest(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "old.png").write_text("old")
    (tmp_path / "roc.png").write_text("old")
    (tmp_path / "mine.txt").write_text("the user's")
    stage = Staging(tmp_path, "report")
    work = stage.open()
    (work / "images").mkdir()
    (work / "images" / "new.png").write_text("new")
    (work / "index.html").write_text("page")
    stage.publish(["images", "roc.png", "index.html"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "index.html", "mine.txt"]
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["new.png"]


def test_a_report_stopped_early_leaves_the_previous_one(tmp_path):
    def files() -> dict:
        return {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "rep").rglob("*") if p.is_file()}

    sink = HTMLReport(tmp_path / "rep")
    Pipeline(Flat(), [sink], batch_size=2, prefetch=0).run(Entries(4))
    assert sink.page == tmp_path / "rep" / "index.html"
    first = files()
    sink = HTMLReport(tmp_path / "rep")
    with pytest.raises(KeyboardInterrupt):
        Pipeline(Flat(), [sink], batch_size=2, prefetch=0).run(Entries(6, at=3, error=KeyboardInterrupt()))
    assert sink.page is None and files() == first


def test_a_signal_waits_for_the_end_of_an_uninterrupted_block():
    order, handler = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="SIGTERM"):
        with stop_on_signals():
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                order.append("the block went on")
            order.append("not reached")
    assert order == ["the block went on"]
    assert signal.getsignal(signal.SIGTERM) is handler


def test_bench_sigterm_keeps_the_finished_runs(tmp_path):
    from clad.data import make_synthetic_mvtec

    root = make_synthetic_mvtec(tmp_path / "d", category="tile", n_train=3, n_test_good=2, n_test_defect=2, size=64)
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "clad.cli", "bench", "--data", f"mvtec:{root}", "--detectors",
           "patch_knn[backbone=tiny_cnn;image_size=64]@knn", "--shots", "1", "--runs", "50", "--out", str(out),
           "--no-plots"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(list((out / "runs").glob("*.json"))) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    runs = sorted((out / "runs").glob("*.json"))
    assert 2 <= len(runs) < 50 and all(json.loads(p.read_text())["status"] == "ok" for p in runs)
    assert "interrupted" in stdout and json.loads((out / "results.json").read_text())
    assert not [p for p in out.rglob(".*")] and not (tmp_path / ".bench.clad-lock").exists()
