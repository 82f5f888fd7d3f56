"""The HTML report: written offline, references only files it wrote, carries the explanation sentences."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

import clad
from clad.cli import main
from clad.explain import explain
from clad.report import write_report
from clad.types import Sample
from conftest import plant_square, texture

TINY = ["--detector", "patch_knn", "--backbone", "tiny_cnn", "--param", "image_size=64"]


def _check_page(page: Path, sentences: list[str]) -> str:
    text = page.read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert refs, "the report shows no picture"
    for ref in refs:
        assert not re.match(r"[a-z]+:|/", ref), f"{ref} is not a relative path"
        assert (page.parent / ref).is_file(), f"{ref} does not exist"
    for s in sentences:
        assert html.escape(s) in text
    return text


def test_report_with_labels_explanations_and_closest_normal(tmp_path, normal_images):
    det = clad.create_detector("patch_knn", backbone="tiny_cnn", image_size=64).fit(normal_images)
    bad, mask = plant_square(texture((64, 64), 20), 8, 40, 12)
    samples = [
        Sample(bad, 1, mask, "x/bad.png", "crack"),
        Sample(texture((64, 64), 21), 0, np.zeros((64, 64), bool), "x/good.png", "good"),
        Sample(texture((64, 64), 22), 0, np.zeros((64, 64), bool), "x/good2.png", "good"),
    ]
    result = det.predict([s.image for s in samples])
    out = explain(det, [s.image for s in samples], result, references=normal_images, pixel_threshold=float(np.median(result.scores)))
    page = write_report(tmp_path / "rep", samples, result, explanations=out, references=normal_images)
    text = _check_page(page, [e.sentence for e in out])
    assert "roc.png" in text and "histogram.png" in text and "ground truth" in text
    assert ("closest normal" in text) == any(e.regions for e in out)


def test_predict_explain_and_report_from_the_command_line(tmp_path):
    from clad.data import make_synthetic_mvtec

    root = make_synthetic_mvtec(tmp_path / "data", category="tile", n_train=3, n_test_good=2, n_test_defect=3, size=64, seed=0)
    model = tmp_path / "model"
    assert main(["fit", "--data", f"mvtec:{root}", "--category", "tile", "--shots", "2", *TINY, "--out", str(model)]) == 0
    out, rep = tmp_path / "pred", tmp_path / "rep"
    args = ["predict", "--model", str(model), "--input", str(root / "tile" / "test"), "--out", str(out), "--batch-size", "2"]
    assert main(args + ["--explain", "--report", str(rep)]) == 0
    entries = json.loads((out / "explanations.json").read_text())
    assert len(entries) == 5 and all(e["sentence"] and e["path"] for e in entries)
    assert {Path(e["path"]).name for e in entries} == {p.name for p in (root / "tile" / "test").rglob("*.png")}
    text = _check_page(rep / "index.html", [e["sentence"] for e in entries])
    assert "roc.png" not in text  # no labels, no ROC


def test_eval_explain_reports_naming_accuracy_with_chance(tmp_path, capsys):
    from clad.data import make_synthetic_mvtec

    root = make_synthetic_mvtec(tmp_path / "data", category="tile", n_train=6, n_test_good=2, n_test_defect=9, size=64, seed=0)
    out = tmp_path / "r.json"
    args = ["eval", "--data", f"mvtec:{root}", "--category", "tile", "--shots", "2", *TINY, "--out", str(out)]
    assert main(args + ["--explain", "--catalogue-shots", "1"]) == 0
    text = capsys.readouterr().out
    assert "top-1" in text and "chance 0.333" in text
    res = json.loads(out.read_text())["explain"]
    assert res["types"] == ["hole", "scratch", "stain"] and res["descriptions"] is None  # no text side in patch_knn
    assert res["catalogue"]["n_images"] == 6 and 0.0 <= res["catalogue"]["top1"] <= res["catalogue"]["top3"] <= 1.0


def test_report_command_writes_a_page_with_ground_truth(tmp_path):
    from clad.data import make_synthetic_mvtec

    root = make_synthetic_mvtec(tmp_path / "data", category="tile", n_train=6, n_test_good=2, n_test_defect=3, size=64, seed=0)
    rep = tmp_path / "rep"
    assert main(["report", "--data", f"mvtec:{root}", "--category", "tile", "--shots", "2", *TINY, "--out", str(rep)]) == 0
    text = _check_page(rep / "index.html", [])
    assert text.count("_truth.png") == 3 and "roc.png" in text
