"""The command line's error contract, walked over a table of bad invocations and bad files: each gives exactly one
line ``clad: error: ...`` naming the problem, exit code 2, and no traceback."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import clad
from clad.cli import main
from clad.pipeline import output_lock
from clad.viz import save_png
from conftest import texture

TINY = ["--detector", "patch_knn", "--backbone", "tiny_cnn", "--param", "image_size=64"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, str]:
    """A workspace of good and bad files; its paths by name, for the table's ``{name}`` fields."""
    from clad.data import make_synthetic_mvtec

    root = tmp_path_factory.mktemp("ws")
    p = {"root": root}
    p["syn"] = make_synthetic_mvtec(root / "syn", category="tile", n_train=3, n_test_good=1, n_test_defect=1, size=64)
    for split in ("test", "train"):  # syn_bad_test: every test image corrupt; syn_bad: every image
        p[f"syn_bad_{split}" if split == "test" else "syn_bad"] = bad = root / f"syn_bad_{split}"
        for f in p["syn"].rglob("*"):
            target = bad / f.relative_to(p["syn"])
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif "ground_truth" in f.parts or (split == "test" and "train" in f.parts):
                target.write_bytes(f.read_bytes())
            else:
                target.write_bytes(b"not an image")
    normal = [texture((64, 64), k) for k in range(3)]
    p["model"] = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal).save(root / "model")
    p["model2"] = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64, sigma=2.0).fit(normal).save(
        root / "model2")
    for k in range(3):
        save_png(texture((48, 48), 10 + k), root / "imgs" / f"i{k}.png")
    (root / "empty").mkdir()
    (root / "gifs").mkdir()
    from PIL import Image

    Image.fromarray(texture((16, 16), 1)).save(root / "gifs" / "a.gif")
    p["gif"] = root / "gifs" / "a.gif"
    (root / "corrupt").mkdir()
    for k in range(3):
        (root / "corrupt" / f"c{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    os.symlink(root / "nowhere.png", root / "dangling.png")
    p["dangling"] = root / "dangling.png"
    (root / "nopath.csv").write_text("file\nimgs/i0.png\n")
    (root / "nolines.csv").write_text("path\n")
    (root / "afile.txt").write_text("not a folder")
    # damaged models: each a copy of the good one with one thing wrong
    good_config = (p["model"] / "config.json").read_text()
    damage = {
        "not_json": lambda d: (d / "config.json").write_text("{ not json"),
        "not_clad": lambda d: (d / "config.json").write_text(json.dumps({"hello": 1})),
        "no_state": lambda d: (d / "model.safetensors").unlink(),
        "cut_state": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:40]),
        "no_config": lambda d: (d / "config.json").unlink(),
        "unknown_detector": lambda d: (d / "config.json").write_text(
            good_config.replace('"detector": "patch_knn"', '"detector": "no_such_detector"')),
    }
    for name, spoil in damage.items():
        d = root / f"bad_{name}"
        d.mkdir()
        for f in p["model"].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        spoil(d)
        p[f"bad_{name}"] = d
    # a finished run in "done/", made by model: resuming it with model2 is refused
    assert main(["predict", "--model", str(p["model"]), "--input", str(root / "imgs"), "--out", str(root / "done")]) == 0
    p.update({n.replace(".", "_"): root / n for n in (
        "imgs", "empty", "gifs", "corrupt", "nopath.csv", "nolines.csv", "afile.txt", "done")})
    return {k: str(v) for k, v in p.items()}


PREDICT = ["predict", "--model", "{model}", "--input", "{imgs}", "--out", "{fresh}"]
EVAL = ["eval", "--data", "mvtec:{syn}", "--category", "tile", *TINY]
BENCH = ["bench", "--data", "mvtec:{syn}", "--out", "{root}/bench", "--detectors", "patch_knn"]

# (id, argv with {workspace} fields, a fragment of the one error line). A fragment in /slashes/ is a regex.
CASES = [
    # argument syntax and ranges (argparse)
    ("no command", [], "required: command"),
    ("unknown command", ["nope"], "invalid choice: 'nope'"),
    ("predict without arguments", ["predict"], "required: --model, --input, --out"),
    ("unknown option", [*PREDICT, "--colour", "red"], "unrecognized arguments: --colour"),
    ("batch size 0", [*PREDICT, "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    ("batch size -1", [*PREDICT, "--batch-size", "-1"], "--batch-size: must be >= 1, got -1"),
    ("batch size not a number", [*PREDICT, "--batch-size", "many"], "--batch-size: expected an integer >= 1"),
    ("batch size fractional", [*PREDICT, "--batch-size", "1.5"], "expected an integer >= 1, got '1.5'"),
    ("threshold nan", [*PREDICT, "--threshold", "nan"], "--threshold: must be a finite number, got 'nan'"),
    ("threshold inf", [*PREDICT, "--threshold", "inf"], "--threshold: must be a finite number"),
    ("threshold not a number", [*PREDICT, "--threshold", "high"], "--threshold: expected a number, got 'high'"),
    ("pixel threshold -inf", [*PREDICT, "--pixel-threshold=-inf"], "--pixel-threshold: must be a finite"),
    ("fit threshold nan", ["fit", "--data", "mvtec:{syn}", "--category", "tile", "--threshold", "NaN", "--out",
                           "{root}/m"], "--threshold: must be a finite number"),
    ("pixel eval size -1", [*EVAL, "--pixel-eval-size", "-1"], "--pixel-eval-size: must be >= 0"),
    ("seed -1", [*EVAL, "--seed", "-1"], "--seed: must be >= 0, got -1"),
    ("catalogue shots 0", [*EVAL, "--catalogue-shots", "0"], "--catalogue-shots: must be >= 1"),
    ("bench runs 0", [*BENCH, "--runs", "0"], "--runs: must be >= 1"),
    ("bench n-images x", [*BENCH, "--n-images", "x"], "--n-images: expected an integer"),
    ("bench rating scale", [*BENCH, "--rating-scale", "loud"], "invalid choice: 'loud'"),
    # datasets, shots, detectors and their parameters
    ("mvtec without category", ["eval", "--data", "mvtec:{syn}", *TINY], "a category is needed (--category)"),
    ("unknown data scheme", ["eval", "--data", "foo:{syn}", "--category", "x"], "unknown dataset spec 'foo:"),
    ("data without scheme", ["eval", "--data", "{syn}", "--category", "x"], "unknown dataset spec"),
    ("missing dataset root", ["eval", "--data", "mvtec:{root}/nowhere", "--category", "x"], "nowhere: no such folder"),
    ("unknown category", ["eval", "--data", "mvtec:{syn}", "--category", "nope", *TINY], "no such category folder"),
    ("visa without csv", ["eval", "--data", "visa:{syn}", "--category", "x"], "1cls.csv: no such file"),
    ("folder spec with 4 parts", ["eval", "--data", "folder:a,b,c,d"], "expected folder:GOOD_DIR"),
    ("shots not a number", [*EVAL, "--shots", "zero"], "--shots: expected 0 (zero-shot), a positive integer or 'all'"),
    ("shots 0 for a detector that needs references", [*EVAL, "--shots", "0"], "--shots 0: detector 'patch_knn' needs reference images"),
    ("negative shots", [*EVAL, "--shots", "-1"], "--shots: must be >= 0 (0: zero-shot), got -1"),
    ("more shots than images", [*EVAL, "--shots", "100"], "n_shots=100 but only 3 image(s)"),
    ("unknown detector", ["eval", "--data", "mvtec:{syn}", "--category", "tile", "--detector", "nope"],
     "unknown detector 'nope'; available:"),
    ("unknown backbone", [*EVAL, "--backbone", "nope"], "unknown backbone 'nope'; available:"),
    ("param without =", [*EVAL, "--param", "k"], "--param: expected key=value, got 'k'"),
    ("param twice", [*EVAL, "--param", "image_size=32"], "parameter 'image_size' given twice"),
    ("unknown param", [*EVAL, "--param", "nope=1"], "unknown parameter(s) ['nope']"),
    ("param out of range", ["eval", "--data", "mvtec:{syn}", "--category", "tile", "--detector", "patchcore",
                            "--backbone", "tiny_cnn", "--param", "coreset_ratio=7"], "coreset_ratio"),
    ("aux on a detector without it", [*EVAL, "--aux", "mvtec:{syn}"], "does not train on auxiliary data"),
    ("every test image corrupt", ["eval", "--data", "mvtec:{syn_bad_test}", "--category", "tile", *TINY],
     "no test image could be read"),
    ("every reference corrupt", ["fit", "--data", "mvtec:{syn_bad}", "--category", "tile", *TINY, "--out", "{fresh}"],
     "no reference image could be read (3 skipped)"),
    # model files
    ("no model folder", ["predict", "--model", "{root}/nomodel", "--input", "{imgs}", "--out", "{fresh}"],
     "nomodel: no such model folder"),
    ("model without config", [*PREDICT[:2], "{bad_no_config}", *PREDICT[3:]], "config.json: missing"),
    ("config not JSON", [*PREDICT[:2], "{bad_not_json}", *PREDICT[3:]], "config.json: not valid JSON"),
    ("config of something else", [*PREDICT[:2], "{bad_not_clad}", *PREDICT[3:]], "config.json: not a clad model"),
    ("config names no detector we know", [*PREDICT[:2], "{bad_unknown_detector}", *PREDICT[3:]],
     "unknown detector 'no_such_detector'"),
    ("model without tensors", [*PREDICT[:2], "{bad_no_state}", *PREDICT[3:]], "model.safetensors"),
    ("model with cut tensors", [*PREDICT[:2], "{bad_cut_state}", *PREDICT[3:]], "model.safetensors"),
    # inputs
    ("missing input", [*PREDICT[:4], "{root}/nowhere", *PREDICT[5:]], "nowhere: no such file or folder"),
    ("empty input folder", [*PREDICT[:4], "{empty}", *PREDICT[5:]], "no images found"),
    ("only GIFs", [*PREDICT[:4], "{gifs}", *PREDICT[5:]], "/no images found .*a.gif: unsupported format/"),
    ("a GIF", [*PREDICT[:4], "{gif}", *PREDICT[5:]], "a.gif: unsupported format (.gif;"),
    ("a dangling link", [*PREDICT[:4], "{dangling}", *PREDICT[5:]], "dangling symbolic link"),
    ("every image corrupt", [*PREDICT[:4], "{corrupt}", *PREDICT[5:]], "no image could be scored; the reasons"),
    ("manifest without path column", [*PREDICT[:4], "{nopath_csv}", *PREDICT[5:]], "no 'path' column"),
    ("manifest listing nothing", [*PREDICT[:4], "{nolines_csv}", *PREDICT[5:]], "lists no images"),
    ("catalogue missing", [*PREDICT, "--explain", "--catalogue", "{root}/nocat"], "nocat: no such folder"),
    # outputs
    ("predict --out a file", [*PREDICT[:6], "{afile_txt}"], "afile.txt: is a file; a folder is needed"),
    ("predict --out under a file", [*PREDICT[:6], "{afile_txt}/sub"], "a file is in the way"),
    ("eval --out a folder", [*EVAL, "--out", "{empty}"], "empty: is a folder; a file name is needed"),
    ("fit --out a file", ["fit", "--data", "mvtec:{syn}", "--category", "tile", *TINY, "--out", "{afile_txt}"],
     "afile.txt: is a file"),
    ("report --out a file", ["report", "--data", "mvtec:{syn}", "--category", "tile", "--out", "{afile_txt}"],
     "afile.txt: is a file"),
    ("bench rating sheet a file", [*BENCH[:3], "--rating-sheet", "{afile_txt}"], "--rating-sheet"),
    ("resume without a run", [*PREDICT, "--resume"], "holds no run to resume"),
    ("resume with another model", ["predict", "--model", "{model2}", "--input", "{imgs}", "--out", "{done}",
                                   "--resume"], "was made with model_sha256"),
    ("resume with a report", [*PREDICT[:6], "{done}", "--resume", "--report", "{root}/rep"], "--resume cannot add"),
    ("resume with another threshold", [*PREDICT[:6], "{done}", "--resume", "--threshold", "1"],
     "this one has 1.0; run with the same"),
    # bench
    ("bench without data", ["bench", "--out", "{root}/bench"], "--data is needed"),
    ("bench without out", BENCH[:3], "--out DIR is needed"),
    ("bench ratings without key", ["bench", "--ratings", "a.csv"], "--ratings needs --key"),
    ("bench label twice", [*BENCH[:5], "--detectors", "patch_knn@x,padim@x"], "label(s) ['x'] used twice"),
    ("bench unknown category", [*BENCH, "--categories", "nope"], "--categories"),
    ("bench unknown detector", [*BENCH[:5], "--detectors", "nope"], "unknown detector 'nope'"),
    ("bench no shots", [*BENCH, "--shots", ""], "--shots: no value given"),
]


def _stderr_lines(text: str) -> list[str]:
    """Non-empty lines of stderr, progress bars (``desc:  40%|...``, drawn with carriage returns) left out."""
    lines = [s.strip() for s in re.split(r"[\r\n]", text)]
    return [s for s in lines if s and not re.match(r"^[\w ]+:\s+\d+%\|", s)]


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    return code, _stderr_lines(capsys.readouterr().err)


def test_the_table_is_long_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_exit_code_2(ws, argv, fragment, capsys, tmp_path):
    code, lines = run([a.format(**ws, fresh=tmp_path / "out") for a in argv], capsys)
    errors = [s for s in lines if s.startswith("clad: error:")]
    assert code == 2, lines
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in s for s in lines)
    others = [s for s in lines[:-1] if not s.startswith("skipped")]  # the files a run skipped, each named
    assert not others, lines
    if fragment.startswith("/"):
        assert re.search(fragment.strip("/"), errors[0]), errors[0]
    else:
        assert fragment in errors[0], errors[0]


def test_an_out_held_by_another_run_is_refused_with_its_pid(ws, capsys, tmp_path):
    with output_lock(tmp_path / "held"):
        code, lines = run([*[a.format(**ws) for a in PREDICT[:6]], str(tmp_path / "held")], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("clad: error: --out ") and f"another clad run is writing there (pid {os.getpid()}" in lines[0]


def test_a_bug_shows_its_traceback_and_says_it_is_one(ws, capsys, monkeypatch, tmp_path):
    import clad.pipeline

    def broken(spec):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(clad.pipeline, "open_source", broken)
    code, lines = run([a.format(**ws, fresh=tmp_path / "out") for a in PREDICT], capsys)
    assert code == 1 and "Traceback (most recent call last):" in lines and "ZeroDivisionError: division by zero" in lines
    assert lines[-1].startswith("clad: internal error (a bug): please report it")
