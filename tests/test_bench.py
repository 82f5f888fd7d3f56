"""``clad bench``: spec parsing, aggregation by hand, cached/resumable runs, failures, and the rating round trip."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from clad import bench
from clad.bench import aggregate, fmt_stat, measure, runner
from clad.specs import parse_detector_specs, with_aux
from clad.cli import main

KNN = "patch_knn[backbone=tiny_cnn;image_size=64]@knn"
BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from clad.data import make_synthetic_mvtec

    root = tmp_path_factory.mktemp("bench_data")
    make_synthetic_mvtec(root, category="tile", n_train=3, n_test_good=2, n_test_defect=3, size=64, seed=0)
    return root


def test_aux_sets_clad_params_and_changes_only_those_cache_keys(tmp_path):
    specs = parse_detector_specs("clad,patchcore")
    auxed = with_aux(specs, f"mvtec:{tmp_path}/other")
    assert auxed[0].params == {"aux": f"mvtec:{tmp_path}/other"} and auxed[1] == specs[1]
    with pytest.raises(ValueError, match="none of the detectors"):
        with_aux(parse_detector_specs("patchcore"), f"mvtec:{tmp_path}")

    def key(spec):
        return bench.Run(f"mvtec:{tmp_path}", "bottle", spec, 1, 0).key(256)

    # Without aux, the aux fields change nothing, so runs cached before they existed keep their keys.
    resolved = bench.Run(f"mvtec:{tmp_path}", "bottle", specs[0], 1, 0).settings()["resolved_params"]
    assert "aux" not in resolved and "aux_images" not in resolved and "epochs" in resolved
    resolved = bench.Run(f"mvtec:{tmp_path}", "bottle", auxed[0], 1, 0).settings()["resolved_params"]
    assert resolved["aux"] == f"mvtec:{tmp_path}/other" and resolved["aux_images"] == 32
    assert key(auxed[0]) != key(specs[0])


def test_cache_keys_of_runs_cached_by_earlier_versions_do_not_move():
    """A run's file name and key, pinned: a change here would make every bench rerun its cached runs."""
    doc = {"dataset": "mvtec:/data/mvtec_ad", "category": "bottle", "detector": "patchcore", "params": {"seed": 0},
           "resolved_params": None, "shots": "1", "seed": 0, "clad_version": "0.3.0"}
    assert bench.cache_key(doc, 256) == "2130497bf3ce2885"
    run = bench.Run("mvtec:/data/mvtec_ad", "bottle", parse_detector_specs(KNN)[0], 1, 0)
    assert run.settings()["resolved_params"] == {"backbone": "tiny_cnn", "layers": ["stage2", "stage3"],
                                                 "image_size": 64, "max_bank": 100000, "sigma": 4.0, "seed": 0}
    assert (run.key(256), run.key(None)) == ("52ff2bf9c07c95e7", "90a8028cce740547")
    assert run.filename(256) == "bottle-patch_knn-shots1-seed0-52ff2bf9c07c95e7.json"


# ------------------------------------------------------------------------------------------ aggregation


def _rec(category, label, seed, value, status="ok", dataset="mvtec:/d", shots="1"):
    return {"status": status, "settings": {"dataset": dataset, "category": category, "label": label,
                                           "shots": shots, "seed": seed},
            "metrics": {"image_auroc": value} if status == "ok" else {}}


def test_aggregate_mean_over_categories_then_mean_std_over_seeds():
    # category x: 0.8, 0.9, 0.7; category y: 0.6, 0.7, 0.9 -> per seed 0.7, 0.8, 0.8
    recs = [_rec("x", "a", s, v) for s, v in enumerate([0.8, 0.9, 0.7])]
    recs += [_rec("y", "a", s, v) for s, v in enumerate([0.6, 0.7, 0.9])]
    st = aggregate(recs, "image_auroc")[("mvtec:/d", "a", "1")]
    assert st.values == pytest.approx({0: 0.7, 1: 0.8, 2: 0.8})
    assert st.mean == pytest.approx(2.3 / 3)
    assert st.std == pytest.approx(math.sqrt(((0.7 - 2.3 / 3) ** 2 + 2 * (0.8 - 2.3 / 3) ** 2) / 2))  # ddof=1
    assert (st.n, st.n_seeds) == (3, 3)
    assert fmt_stat(st, "image_auroc") == "76.7 ± 5.8"

    # a failed run (or a NaN) leaves its seed out instead of averaging fewer categories
    recs_b = [_rec("x", "b", 0, 0.5), _rec("y", "b", 0, 0.7), _rec("x", "b", 1, 0.9), _rec("y", "b", 1, None, "failed"),
              _rec("x", "b", 2, 0.6), _rec("y", "b", 2, float("nan"))]
    st = aggregate(recs + recs_b, "image_auroc")[("mvtec:/d", "b", "1")]
    assert (st.mean, st.n, st.n_seeds) == (pytest.approx(0.6), 1, 3)
    assert math.isnan(st.std)
    assert fmt_stat(st, "image_auroc") == "60.0 (1/3 runs)"

    per_cat = aggregate(recs, "image_auroc", ("dataset", "category", "label", "shots"))
    st = per_cat[("mvtec:/d", "y", "a", "1")]
    assert st.mean == pytest.approx(0.7 + 0.1 / 3)
    assert st.std == pytest.approx(0.152752523, abs=1e-8)  # std(ddof=1) of 0.6, 0.7, 0.9, by hand


# ------------------------------------------------------------------------------------------------ bench


def test_bench_writes_report_and_second_invocation_uses_the_cache(synth, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    args = dict(data=f"mvtec:{synth}", categories="tile", detectors=KNN, shots="1", runs=2, progress=False)
    first = bench.run_bench(out, **args)
    assert (first["ran"], first["cached"], first["failed"]) == (2, 0, 0)
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    assert len(list((out / "runs").glob("*.json"))) == 2
    assert first["plots"] and all((out / p).is_file() and (out / p).suffix == ".png" for p in first["plots"])
    report = (out / "report.md").read_text()
    for text in ("Table 1", "Table 2", "Table 4", "Speed and memory", "Per-category", "published (paper, 1-shot",
                 "ddof = 1", "pixel F1-max threshold", "15 MVTec AD", "plots/"):
        assert text in report
    doc = json.loads((out / "results.json").read_text())
    run = doc["runs"][0]
    assert run["settings"]["seed"] in (0, 1) and run["settings"]["resolved_params"]["seed"] == run["settings"]["seed"]
    assert run["environment"]["clad"] and run["backbone"] == "tiny_cnn" and run["image_size"] == 64
    assert run["metrics"]["backbone_ms_per_image"] > 0 and run["metrics"]["predict_over_backbone"] > 0
    assert len(run["predictions"]["scores"]) == len(run["predictions"]["labels"]) == 5  # ROC can be redrawn
    row = doc["tables"]["table1"][0]
    assert row["image_auroc"]["n_runs"] == 2
    assert row["image_auroc"]["mean"] == pytest.approx(sum(r["metrics"]["image_auroc"] for r in doc["runs"]) / 2)

    from clad.detectors.patch_knn import PatchKNN

    def no_fit(self, images):
        raise AssertionError("a cached run was fitted again")

    monkeypatch.setattr(PatchKNN, "fit", no_fit)
    capsys.readouterr()
    assert main(["bench", "--data", f"mvtec:{synth}", "--categories", "tile", "--detectors", KNN, "--shots", "1",
                 "--runs", "2", "--out", str(out), "--no-plots"]) == 0
    assert capsys.readouterr().out.count(": cached\n") == 2
    second = bench.run_bench(out, **args)
    assert (second["ran"], second["cached"], second["failed"]) == (0, 2, 0)


def test_backbone_time_is_reused_only_by_the_same_code_and_machine(synth, tmp_path, monkeypatch):
    """The bare backbone's time is cached beside the runs; a new version (or machine) measures it again."""
    out = tmp_path / "bench"
    args = dict(data=f"mvtec:{synth}", categories="tile", detectors=KNN, shots="1", progress=False, plots=False)
    bench.run_bench(out, runs=1, **args)
    (cached,) = (out / "backbone_times").glob("*.json")
    doc = json.loads(cached.read_text())
    cached.write_text(json.dumps(dict(doc, ms_per_image=1e6)))  # a stale time, far off

    def ratio(seed):
        (path,) = (p for p in (out / "runs").glob("*.json") if json.loads(p.read_text())["settings"]["seed"] == seed)
        return json.loads(path.read_text())["metrics"]["predict_over_backbone"]

    bench.run_bench(out, runs=2, **args)
    assert ratio(1) < 1e-3  # same code and machine: the cached time is used
    real = measure.machine
    monkeypatch.setattr(measure, "machine", lambda: dict(real(), clad="9.9.9"))
    bench.run_bench(out, runs=3, **args)
    assert ratio(2) > 1e-2  # another version: measured again
    assert len(list((out / "backbone_times").glob("*.json"))) == 2


def test_interrupted_bench_goes_on_where_it_stopped(synth, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    args = dict(data=f"mvtec:{synth}", categories="tile", detectors=KNN, shots="1", runs=3, progress=False,
                plots=False)
    real, calls = runner.execute_run, []

    def stop_at_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "execute_run", stop_at_second)
    first = bench.run_bench(out, **args)
    assert first["interrupted"] and first["ran"] == 1
    assert "interrupted" in (out / "report.md").read_text()
    monkeypatch.setattr(runner, "execute_run", real)
    second = bench.run_bench(out, **args)
    assert (second["ran"], second["cached"], second["interrupted"]) == (2, 1, False)


def test_a_failing_run_is_recorded_and_the_others_finish(synth, tmp_path):
    out = tmp_path / "bench"
    dets = f"{KNN},patch_knn[backbone=tiny_cnn;image_size=64;bogus=1]@bad"
    assert main(["bench", "--data", f"mvtec:{synth}", "--categories", "tile", "--detectors", dets,
                 "--runs", "1", "--out", str(out), "--no-plots"]) == 1  # 1: some run failed
    doc = json.loads((out / "results.json").read_text())
    by_label = {r["settings"]["label"]: r for r in doc["runs"]}
    assert by_label["knn"]["status"] == "ok"
    bad = by_label["bad"]
    assert bad["status"] == "failed" and "bogus" in bad["error"] and "Traceback" not in bad["error"]
    assert "make_config" in bad["traceback"]
    report = (out / "report.md").read_text()
    assert "**1 failed**" in report and "bogus" in report.split("## Failed runs")[1]
    summary = bench.run_bench(out, f"mvtec:{synth}", "tile", dets, "1", 1, progress=False, plots=False)
    assert (summary["cached"], summary["failed"], summary["ran"]) == (1, 1, 0)  # failures are retried, not cached


def test_clad_and_clad_plus_of_one_seed_share_one_fit(synth, tmp_path, tiny_clip_dir, monkeypatch):
    """Detectors differing only in inference parameters are fitted once per (category, shots, seed)."""
    from clad.detectors.clad import CLAD

    fits = []
    original = CLAD._fit
    monkeypatch.setattr(CLAD, "_fit", lambda self, images: (fits.append(self.name), original(self, images))[1])
    tiny = f"backbone=tiny_cnn;image_size=64;text_encoder=clip:{tiny_clip_dir};epochs=1;n_train_images=8"
    # clad_plus keeps its encoders frozen by default; fine-tuned like clad, it can share clad's fit
    tuned = "finetune_stages=1;finetune_text_layers=1"
    dets = f"clad[{tiny}]@c,clad_plus[{tiny};{tuned}]@p,clad[{tiny};loss=supervised]@sup"
    summary = bench.run_bench(tmp_path / "b", f"mvtec:{synth}", "tile", dets, "1", 2, progress=False, plots=False)
    assert summary["failed"] == 0 and summary["ran"] == 6
    assert fits == ["clad", "clad", "clad", "clad"]  # per seed: clad (shared with clad_plus) and the ablation
    by = {(r["settings"]["label"], r["settings"]["seed"]): r for r in summary["records"]}
    for seed in (0, 1):
        plus, base = by[("p", seed)], by[("c", seed)]
        assert plus["fit_shared_with"] == "c" and base["fit_shared_with"] is None
        assert plus["metrics"]["fit_seconds"] == base["metrics"]["fit_seconds"] > 0
        assert by[("sup", seed)]["fit_shared_with"] is None


def test_rating_sheet_round_trip(synth, tmp_path, capsys):
    sheet_dir = tmp_path / "sheet"
    dets = f'{KNN},patch_knn[backbone=tiny_cnn;image_size=64;layers=["stage1","stage2"]]@knn12'
    assert main(["bench", "--rating-sheet", str(sheet_dir), "--data", f"mvtec:{synth}", "--categories", "tile",
                 "--detectors", dets, "--shots", "1", "--n-images", "2", "--seed", "0"]) == 0
    rows = list(csv.DictReader(open(sheet_dir / "sheet.csv")))
    assert len(rows) == 4 and {r["option"] for r in rows} == {"A", "B"} and all(r["rating"] == "" for r in rows)
    assert all((sheet_dir / r["image"]).is_file() and (sheet_dir / r["ground_truth"]).is_file() for r in rows)
    assert not any("knn" in v for r in rows for v in r.values())  # the sheet does not reveal the detector
    key = json.loads((sheet_dir / "key.json").read_text())["options"]
    assert set(key) == {r["image_id"] for r in rows}

    wanted = {"rater1": {"knn": 5, "knn12": 3}, "rater2": {"knn": 4, "knn12": 1}}
    sheets = []
    for rater, score in wanted.items():
        path = tmp_path / f"{rater}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            for i, r in enumerate(rows):
                blank = rater == "rater2" and i == 0  # one rating left blank
                w.writerow(dict(r, rating="" if blank else score[key[r["image_id"]][r["option"]]]))
        sheets.append(str(path))
    skipped = key[rows[0]["image_id"]][rows[0]["option"]]
    expected = {}
    for lab in ("knn", "knn12"):
        vals = [5 if lab == "knn" else 3] * 2 + [4 if lab == "knn" else 1] * (1 if lab == skipped else 2)
        mean = sum(vals) / len(vals)
        expected[lab] = (mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)), len(vals))

    capsys.readouterr()
    assert main(["bench", "--ratings", ",".join(sheets), "--key", str(sheet_dir / "key.json"),
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Table 3" in printed and (tmp_path / "table3.md").read_text() in printed
    table = bench.import_ratings(sheets, sheet_dir / "key.json")
    assert table["n_blank"] == 1
    for row in table["rows"]:
        mean, std, n = expected[row["detector"]]
        assert row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(std)
        assert (row["n_ratings"], row["n_raters"], row["n_images"]) == (n, 2, 2)

    bad = tmp_path / "bad.csv"
    bad.write_text(f"image_id,option,rating\n{rows[0]['image_id']},A,7\n")
    from clad.errors import ConfigError

    with pytest.raises(ConfigError, match="integer 1-5"):
        bench.import_ratings([str(bad)], sheet_dir / "key.json")


def test_report_puts_published_numbers_beside_plain_detectors_and_lists_ablations():
    specs = parse_detector_specs("clad,clad[loss=supervised]@clad-no-contrastive,patchcore[image_size=128]@pc128")
    recs = []
    for seed in (0, 1):
        for spec, v in zip(specs, (0.9, 0.8, 0.7)):
            r = _rec("bottle", spec.label, seed, v + 0.01 * seed)
            r["settings"]["detector"] = spec.name
            r["metrics"].update(pixel_auroc=v, iou=0.5)
            recs.append(r)
    md, tables = bench.render_report(recs, {"seeds": [0, 1], "pixel_eval_size": 256, "batch_size": 16}, {}, specs,
                                     {}, n_planned=len(recs), interrupted=False)
    table1 = md.split("## Table 1")[1].split("## Table 2")[0]
    assert "| clad | 1 | 90.5 ± 0.7 | 90.0 ± 0.0 |" in table1 and "94.1 ± 1.1 / 95.3 ± 0.1 |" in table1
    assert next(line for line in table1.splitlines() if line.startswith("| pc128")).endswith("| — |")  # not plain
    table2 = md.split("## Table 2")[1].split("## Table 3")[0]
    assert "CLAD (full)" in table2 and "clad-no-contrastive" in table2 and "88.5 ± 2.3 / 91.2 ± 1.0" in table2
    assert "pc128" not in table2
    assert "0.80" in md.split("## Table 4")[1].split("## Speed")[0]
    assert [r["label"] for r in tables["table1"]] == ["clad", "clad-no-contrastive", "pc128"]


def _collect():
    """benchmarks/collect.py, a script, as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("collect", BENCHMARKS / "collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    return collect


def test_collect_rewrites_only_the_generated_part_of_the_readme(tmp_path):
    """benchmarks/collect.py: summary by category/detector/shots, the CLAD+ target line, hand-written text kept."""
    collect = _collect()

    def run(label, seed, auroc):
        metrics = {k: 0.5 for k in ("pixel_auroc", "aupro", "image_f1_max", "iou", "fit_seconds",
                                    "predict_ms_per_image", "predict_over_backbone")}
        metrics["image_auroc"] = auroc
        return {"status": "ok", "settings": {"category": "tile", "label": label, "shots": "1", "seed": seed},
                "metrics": metrics}

    folder = tmp_path / "main"
    folder.mkdir()
    runs = [run("patchcore", 0, 0.6), run("patchcore", 1, 0.8), run("clad_plus", 0, 0.9), run("clad_plus", 1, 0.9)]
    (folder / "results.json").write_text(json.dumps({"runs": runs, "environment": {}, "settings": {}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nkept above\n\n{collect.BEGIN}\nSTALE-TEXT\n{collect.END}\n\nkept below\n")
    collect.main([str(folder), "--readme", str(readme)])
    text = readme.read_text()
    assert "kept above" in text and "kept below" in text and "STALE-TEXT" not in text
    assert "| tile | patchcore | 1 | 2 | 70.0 ± 14.1 |" in text  # mean and sample std over the two seeds
    # errors: PatchCore (0.4 + 0.2) / 2 = 0.3, CLAD+ 0.1: ratio 0.33, target met
    assert "ratio **0.33** (target <= 0.50: **met**)" in text


def test_committed_report_renders_again_from_its_results_json():
    """report.md is a function of results.json: the committed one comes back word for word."""
    folder = BENCHMARKS / "results" / "fullshot"
    assert bench.report_from_results(folder) == (folder / "report.md").read_text()


def test_a_metric_declared_once_reaches_eval_the_bench_and_the_readme(synth, tmp_path, monkeypatch, capsys):
    """One MetricSpec (and the figure computed) is all it takes: eval's printout, results.json, report.md and
    benchmarks/collect.py's summary show it."""
    import clad.metrics
    from clad import metrics_catalog
    from clad.metrics_catalog import MetricSpec

    real = clad.metrics.evaluate
    monkeypatch.setattr(clad.metrics, "evaluate", lambda *a, **k: dict(real(*a, **k), pixel_dice=0.25))
    dice = MetricSpec("pixel_dice", "pixel Dice", 100, 1, table="table1", per_category=True, summary_decimals=1)
    monkeypatch.setattr(metrics_catalog, "METRICS", metrics_catalog.METRICS + (dice,))

    assert main(["eval", "--data", f"mvtec:{synth}", "--category", "tile", "--shots", "1", "--detector", "patch_knn",
                 "--backbone", "tiny_cnn", "--param", "image_size=64"]) == 0
    assert "  pixel Dice             0.2500\n" in capsys.readouterr().out

    out = tmp_path / "bench"
    bench.run_bench(out, f"mvtec:{synth}", "tile", KNN, "1", 1, progress=False, plots=False)
    assert json.loads((out / "results.json").read_text())["tables"]["table1"][0]["pixel_dice"]["mean"] == 0.25
    report = (out / "report.md").read_text()
    table1, per_category = report.split("## Table 1")[1].split("## Table 2")[0], report.split("## Per-category")[1]
    summary = _collect().generate([out], tmp_path)
    for text, header_start, row_start in ((table1, "| detector |", "| knn |"),
                                          (per_category, "| category |", "| tile |"),
                                          (summary, "| category |", "| tile |")):
        lines = text.splitlines()
        header = [c.strip() for c in next(line for line in lines if line.startswith(header_start)).split("|")]
        row = [c.strip() for c in next(line for line in lines if line.startswith(row_start)).split("|")]
        assert row[header.index("pixel Dice")] == "25.0"


def test_corruptions_reuse_one_fit_keep_clean_keys_and_add_a_robustness_table(synth, tmp_path, monkeypatch, capsys):
    from clad.detectors.patch_knn import PatchKNN

    fits = []
    original = PatchKNN._fit
    monkeypatch.setattr(PatchKNN, "_fit", lambda self, images: (fits.append(len(images)), original(self, images))[1])
    out = tmp_path / "bench"
    summary = bench.run_bench(out, f"mvtec:{synth}", "tile", KNN, "1", 1, progress=False, plots=False,
                              corruptions="gaussian_noise:3,rotate:2")
    assert (summary["ran"], summary["failed"], summary["planned"]) == (3, 0, 3)
    assert fits == [1]  # one fit serves the clean and both corrupted test sets
    by = {r["settings"].get("corruption"): r for r in summary["records"]}
    assert set(by) == {None, "gaussian_noise:3", "rotate:2"}
    clean_run = bench.Run(f"mvtec:{synth}", "tile", parse_detector_specs(KNN)[0], 1, 0)
    assert by[None]["key"] == clean_run.key(256)  # a clean run keeps the key it has without --corruptions
    assert by["rotate:2"]["key"] != clean_run.key(256) and "-rotate2-" in by["rotate:2"]["file"]
    assert by["rotate:2"]["fit_shared_with"] == "knn" and by[None]["fit_shared_with"] is None

    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["corruptions"] == ["gaussian_noise:3", "rotate:2"]
    assert doc["tables"]["table1"][0]["image_auroc"]["n_runs"] == 1  # the paper's tables: the clean run only
    (row,) = doc["tables"]["robustness"]
    clean = by[None]["metrics"]
    assert row["clean"]["image_auroc"] == pytest.approx(100 * clean["image_auroc"])
    noisy = by["gaussian_noise:3"]["metrics"]
    assert row["drop"]["gaussian_noise"]["pixel_auroc"] == pytest.approx(
        100 * (clean["pixel_auroc"] - noisy["pixel_auroc"]))
    assert set(row["drop"]) == {"gaussian_noise", "rotate", "severity 2", "severity 3", "mean"}
    report = (out / "report.md").read_text()
    assert "## Robustness" in report and "| gaussian_noise | rotate | mean |" in report
    assert "Runs: 3 ok, 0 failed, 0 not run, of 3 planned" in report  # the corrupted runs are counted
    assert bench.report_from_results(out) == report
    assert main(["bench", "--data", f"mvtec:{synth}", "--detectors", KNN, "--out", str(out), "--corruptions", "fog"]) == 2
    assert "clad: error: --corruptions: unknown corruption 'fog'" in capsys.readouterr().err


def test_reference_jitter_is_left_out_of_the_cache_key_when_off():
    def resolved(spec):
        return bench.Run("mvtec:/d", "bottle", parse_detector_specs(spec)[0], 1, 0).settings()["resolved_params"]

    for name in ("patchcore", "padim"):  # off: the key runs had before the field existed; on (the default): named
        assert "reference_jitter" not in resolved(f"{name}[reference_jitter=0]")
        assert resolved(name)["reference_jitter"] == resolved(f"{name}[reference_jitter=1]")["reference_jitter"] == 1


def test_shape_settings_are_left_out_of_the_cache_key_when_squeezed():
    """resize, zoom and tile change nothing when images are squeezed: runs made before they existed stay valid.
    zoom's condition names resize, which is itself left out: conditions read the whole config."""
    def resolved(spec):
        return bench.Run("mvtec:/d", "bottle", parse_detector_specs(spec)[0], 1, 0).settings()["resolved_params"]

    assert not {"resize", "zoom", "tile"} & set(resolved("patchcore"))
    keep = resolved("patchcore[resize=keep;zoom=2.0;tile=256]")
    assert (keep["resize"], keep["zoom"], keep["tile"]) == ("keep", 2.0, 256)
