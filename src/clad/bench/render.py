"""The bench's outputs: ``report.md`` (the paper's tables beside ours), ``results.json`` and ``plots/*.png``.

Every column comes from the declaration of the metrics (``clad.metrics_catalog``); the published numbers from
``paper.json``. ``report_from_results`` renders a report again from a results.json alone.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from clad import metrics_catalog
from clad.bench.aggregate import aggregate, build_tables, finite, fmt_stat, fmt_value
from clad.bench.files import write_json
from clad.bench.paper import published
from clad.bench.plan import dataset_kind, n_planned_runs
from clad.specs import DetectorSpec, dataset_name, shots_order

RESULTS_FORMAT = "clad-bench-results"

AGGREGATION_TEXT = (
    "Every figure in the tables below is aggregated the same way. For one dataset, detector and number of shots, "
    "each seed r (run r: seed r draws the reference images and seeds the detector) gives one value per category; "
    "the seed's value is the mean over the categories, computed only when every category's run of that seed "
    "succeeded with a finite value (otherwise the seed is left out and the cell says `(k/N runs)`). The cell is "
    "then mean ± sample standard deviation (ddof = 1) over the seeds that count. AUROC, AUPRO and F1-max are shown "
    "in percent. Per-category tables are mean ± std over the seeds of that category alone."
)
IOU_TEXT = (
    "IoU is |M ∩ G| / |M ∪ G| over all test pixels of a category (good and defective images together), where G is "
    "the ground-truth mask and M the anomaly map thresholded at the pixel F1-max threshold of that run (the "
    "threshold that maximises pixel F1 on the same test maps, so an oracle threshold chosen per category and "
    "run); mean IoU is the same per defective image, averaged. Maps and masks are compared at the pixel evaluation "
    "size (longer side {pes} px)."
)
SPEED_TEXT = (
    "fit (s): wall time of `fit` on the references; a detector that differs from another of the same seed only in "
    "inference parameters (`clad_plus` beside `clad`) takes that detector's fit (`Detector.adopt`, recorded as "
    "`fit_shared_with` in results.json) and shows its fit time, the time it would take alone. predict: wall time "
    "of `predict` over the test set (batch {bs}), per image, image decoding excluded. backbone forward: the bare "
    "backbone (`create_backbone(config.backbone)`), preprocess + forward of all its feature maps at the detector's "
    "image size, batch {bs}, under "
    "`torch.inference_mode`, over the same test images, once per (dataset, category, backbone, image size) after "
    "one untimed warm-up batch; predict / backbone is the ratio of the two (1.0 = as fast as the bare backbone). "
    "Peak RSS growth: the highest resident set size of the process while inside `fit` or `predict` (sampled every "
    "5 ms from /proc/self/statm by a background thread) minus the resident size just before `fit`; it covers "
    "the model, memory bank, activations and any torch CPU allocation, but not memory that the process had "
    "already allocated and freed earlier (reused without growth), so later runs of one process can read lower. "
    "CUDA peak allocated is `torch.cuda.max_memory_allocated` over the run (only with a GPU). All on the machine "
    "named at the top, with the other processes that were running on it."
)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_published(pair) -> str:
    """A published (mean, std) pair as ``mean ± std``, one decimal each."""
    return f"{pair[0]:.1f} ± {pair[1]:.1f}"


def _rows(tables: dict, raw: dict, name: str, dataset: str | None = None) -> list[tuple[dict, dict]]:
    """(row, {metric: Stat}) of ``build_tables``' table ``name``; only ``dataset``'s rows when it is given."""
    return [(r, st) for r, (_, st) in zip(tables[name], raw[name]) if dataset is None or r["dataset"] == dataset]


def _labels(metrics) -> list[str]:
    return [m.label for m in metrics]


def _ablation_labels(det_specs: Sequence[DetectorSpec]) -> list[str]:
    """CLAD and CLAD+ (full) first, then every ``clad`` / ``clad_plus`` variant with parameters or its own label."""
    family = ("clad", "clad_plus")
    full = [d.label for d in det_specs if d.name in family and d.is_plain]
    variants = [d.label for d in det_specs if d.name in family and not d.is_plain]
    return full + variants if variants else []


# ------------------------------------------------------------------------------------------------ report.md


def render_report(records: Sequence[dict], settings: dict, env: dict, det_specs: Sequence[DetectorSpec],
                  plots: dict, n_planned: int, interrupted: bool) -> tuple[str, dict]:
    """The markdown report and the tables it shows: the paper's from the clean test sets, and the robustness
    table from the corrupted ones (``--corruptions``)."""
    all_records, records = records, [r for r in records if "corruption" not in r["settings"]]
    tables = build_tables(records, det_specs)
    raw = tables.pop("_raw")
    failed = [r for r in records if r.get("status") != "ok"]
    datasets = list(dict.fromkeys(r["settings"]["dataset"] for r in records))
    md = _head(all_records, settings, env, n_planned, interrupted)  # the run counts: corrupted runs too
    md += _table1(tables, raw, datasets)
    md += _table2(tables, raw, det_specs)
    md += _table3()
    md += _table4(tables, raw, det_specs, settings.get("pixel_eval_size"))
    md += _speed(tables, raw, records, settings.get("batch_size"))
    md += _per_category(tables, raw, datasets, failed)
    if settings.get("corruptions"):
        tables["robustness"] = robustness_rows(all_records)
        md += _robustness(tables["robustness"], settings["corruptions"])
    md += _plots(plots) if plots else []
    md += _failures([r for r in all_records if r.get("status") != "ok"])
    return "\n".join(md), tables


def _head(records, settings, env, n_planned, interrupted) -> list[str]:
    n_ok = sum(r.get("status") == "ok" for r in records)
    n_failed = len(records) - n_ok
    md = ["# clad bench report", ""]
    md.append(f"clad {env.get('clad')}, torch {env.get('torch')}, Python {env.get('python')}, "
              f"{env.get('platform')}, {env.get('cpu_count')} CPU(s)"
              + (f", GPU {env['cuda']}" if env.get("cuda") else ", no GPU") + f", torch threads {env.get('torch_threads')}.")
    if settings.get("command"):
        md.append(f"\nCommand: `{' '.join(settings['command'])}`")
    md.append(f"\nRuns: {n_ok} ok, {n_failed} failed, {n_planned - len(records)} not run, of {n_planned} planned"
              + (" — **the bench was interrupted; rerun the same command to finish it**." if interrupted else ".")
              + f" Seeds {settings.get('seeds')}. Every figure with its settings is in `results.json`; each run's "
              "record (settings, figures, scores, environment, error) is in `runs/`.")
    cats = settings.get("categories", {})
    md.append("\nCategories run: " + "; ".join(f"{k}: {', '.join(str(c) for c in v) or '—'}" for k, v in cats.items())
              + ". **The paper's numbers cover all 15 MVTec AD / 12 VisA categories; ours cover only the categories "
              "run above**, so the two columns are comparable only when every category was run.")
    return md + ["", "## How the numbers are aggregated", "", AGGREGATION_TEXT, ""]


def _table1(tables, raw, datasets) -> list[str]:
    paper, cols = published(), metrics_catalog.in_table("table1")
    md = ["## Table 1: detection and localisation", ""]
    for ds in datasets:
        rows = []
        for r, st in _rows(tables, raw, "table1", ds):
            pub = r["published_1shot"] if r["shots"] == "1" else None
            pub_text = f"{fmt_published(pub['image_auroc'])} / {fmt_published(pub['pixel_auroc'])}" if pub else "—"
            rows.append([r["label"], r["shots"], *(fmt_stat(st[m.key], m.key) for m in cols), pub_text])
        md += [f"### {dataset_name(ds)}", "", f"`{ds}`", "",
               md_table(["detector", "shots", *_labels(cols), f"image / pixel AUROC, {paper['note']}"], rows), ""]
    if {dataset_kind(d) for d in datasets} & {"mvtec", "visa"}:
        pub_rows = [[paper["names"][n], *(f"{fmt_published(paper['table1'][k][n][0])} / "
                                          f"{fmt_published(paper['table1'][k][n][1])}" for k in ("mvtec", "visa"))]
                    for n in paper["names"]]
        md += [f"All of the paper's Table 1 ({paper['note']}; image / pixel AUROC, all categories), for reference; "
               "published numbers sit beside our rows only for the registry detector with its defaults "
               "(no parameters, no label) at 1 shot:", "",
               md_table(["method", "MVTec AD", "VisA"], pub_rows), ""]
    return md


def _table2(tables, raw, det_specs) -> list[str]:
    paper = published()
    md = ["## Table 2: ablations", ""]
    ab = _ablation_labels(det_specs)
    if not ab:
        return md + ["No ablation was run. Add `clad` variants to `--detectors`, e.g. "
                     "`clad,clad[loss=supervised]@clad-no-contrastive,clad[finetune_stages=0;finetune_text_layers=0]"
                     "@clad-no-finetune`.", ""]
    plain = {d.label for d in det_specs if d.is_plain}
    full = {"clad": "CLAD (full)", "clad_plus": "CLAD+ (full)"}
    cols = [metrics_catalog.metric(k) for k in ("image_auroc", "pixel_auroc")]  # the paper's Table 2 columns
    rows = []
    for r, st in _rows(tables, raw, "table1"):
        if r["label"] not in ab:
            continue
        spec = next(d for d in det_specs if d.label == r["label"])
        pub = paper["table2"].get(r["label"]) if dataset_kind(r["dataset"]) == "mvtec" and r["shots"] == "1" else None
        rows.append([dataset_name(r["dataset"]), full.get(r["label"], r["label"]) if r["label"] in plain else r["label"],
                     json.dumps(spec.params) if spec.params else "defaults", r["shots"],
                     *(fmt_stat(st[m.key], m.key) for m in cols),
                     f"{pub[0]}: {fmt_published(pub[1])} / {fmt_published(pub[2])}" if pub else "—"])
    return md + [md_table(["dataset", "variant", "parameters", "shots", *_labels(cols),
                           f"image / pixel AUROC, {paper['note']} (MVTec AD)"], rows), "",
                 "Published ablation numbers sit beside the labels "
                 + ", ".join(f"`{k}` ({v[0]})" for k, v in paper["table2"].items()) + "; other labels have none.", ""]


def _table3() -> list[str]:
    paper = published()
    return ["## Table 3: human rating of the maps", "",
            "Made separately: `clad bench --rating-sheet DIR ...` writes blind overlays and a sheet; each rater fills "
            "the `rating` column (1-5); `clad bench --ratings A.csv,B.csv --key DIR/key.json` makes the table. "
            f"{paper['note'].capitalize()}: "
            + ", ".join(f"{paper['names'][k]} {v}" for k, v in paper["table3"].items()) + ".", ""]


def _table4(tables, raw, det_specs, pes) -> list[str]:
    paper, cols = published(), metrics_catalog.in_table("table4")
    plain = {d.label for d in det_specs if d.is_plain}
    md = ["## Table 4: IoU of the thresholded maps", "", IOU_TEXT.format(pes=pes), ""]
    rows = []
    for r, st in _rows(tables, raw, "table1"):
        pub = paper["table4"].get(r["label"]) if (r["label"] in plain and r["shots"] == "1"
                                                   and dataset_kind(r["dataset"]) == "mvtec") else None
        rows.append([dataset_name(r["dataset"]), r["label"], r["shots"], *(fmt_stat(st[m.key], m.key) for m in cols),
                     f"{pub:.2f}" if pub is not None else "—"])
    return md + [md_table(["dataset", "detector", "shots", *_labels(cols), f"IoU, {paper['note']}"], rows), "",
                 "Published IoU: " + ", ".join(f"{paper['names'][k]} {v:.2f}" for k, v in paper["table4"].items())
                 + " (shown beside our MVTec AD rows).", ""]


def _speed(tables, raw, records, bs) -> list[str]:
    cols = [m for m in metrics_catalog.in_table("speed") if not m.only_when_measured
            or any(finite(r.get("metrics", {}).get(m.key)) for r in records)]  # no GPU: no CUDA column
    rows = []
    for r, st in _rows(tables, raw, "speed"):
        spec_rec = next((x for x in records if x["settings"]["label"] == r["label"] and x.get("status") == "ok"
                         and x["settings"]["dataset"] == r["dataset"]), None)
        bb = f"{spec_rec.get('backbone')} @ {spec_rec.get('image_size')}" if spec_rec else "—"
        rows.append([dataset_name(r["dataset"]), r["label"], r["shots"], bb, *(fmt_stat(st[m.key], m.key) for m in cols)])
    return ["## Speed and memory", "", SPEED_TEXT.format(bs=bs), "",
            md_table(["dataset", "detector", "shots", "backbone @ size", *_labels(cols)], rows), ""]


def _per_category(tables, raw, datasets, failed) -> list[str]:
    cols = metrics_catalog.per_category()
    md = ["## Per-category results", ""]
    for ds in datasets:
        rows = []
        for r, st in _rows(tables, raw, "per_category", ds):
            n_fail = sum(1 for x in failed if (x["settings"]["dataset"], str(x["settings"]["category"]),
                                                x["settings"]["label"], x["settings"]["shots"]) ==
                         (ds, str(r["category"]), r["label"], r["shots"]))
            rows.append([r["category"], r["label"], r["shots"], *(fmt_stat(st[m.key], m.key) for m in cols),
                         f"**{n_fail} failed**" if n_fail else ""])
        md += [f"### {dataset_name(ds)}", "",
               md_table(["category", "detector", "shots", *_labels(cols), "failed"], rows), ""]
    return md


ROBUSTNESS_TEXT = (
    "Each detector is fitted once per cell on clean references; its test split is then also evaluated under each "
    "corruption of `clad.data.corruptions` (test images only; geometric ones move the masks too). A cell is the "
    "drop in AUROC points (clean minus corrupted; positive = worse), image / pixel, averaged over the severities "
    "run and the seeds; \"mean\" averages every corrupted set. Clean AUROC is in percent."
)


def robustness_rows(records: Sequence[dict]) -> list[dict]:
    """Per (dataset, category, detector, shots): the clean image / pixel AUROC (mean over seeds, percent) and,
    per corruption name and per severity, the mean drop in AUROC points against the clean run of the same seed.
    Runs without a clean run of their seed are left out."""
    ok = [r for r in records if r.get("status") == "ok"]
    cells: dict[tuple, dict] = {}
    for r in ok:
        st = r["settings"]
        cell = cells.setdefault((st["dataset"], st["category"], st["label"], st["shots"]), {"clean": {}, "runs": []})
        if "corruption" in st:
            cell["runs"].append(r)
        else:
            cell["clean"][st["seed"]] = r["metrics"]
    rows = []
    for (ds, cat, label, shots), cell in cells.items():
        drops: dict[str, dict[str, list]] = {}  # group ("blur", "severity 2", "mean") -> metric -> drops
        for r in cell["runs"]:
            clean = cell["clean"].get(r["settings"]["seed"])
            if clean is None:
                continue
            name, severity = r["settings"]["corruption"].split(":")
            for group in (name, f"severity {severity}", "mean"):
                for m in ("image_auroc", "pixel_auroc"):
                    if finite(clean.get(m)) and finite(r["metrics"].get(m)):
                        drops.setdefault(group, {}).setdefault(m, []).append(100 * (clean[m] - r["metrics"][m]))
        rows.append({
            "dataset": ds, "category": cat, "label": label, "shots": shots,
            "clean": {m: (float(np.mean([c[m] for c in cell["clean"].values()])) * 100
                          if cell["clean"] and all(finite(c.get(m)) for c in cell["clean"].values()) else None)
                      for m in ("image_auroc", "pixel_auroc")},
            "drop": {g: {m: float(np.mean(v)) for m, v in d.items()} for g, d in drops.items()},
        })
    return rows


def _robustness(rows: Sequence[dict], corruptions: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(c.split(":")[0] for c in corruptions))
    severities = sorted({c.split(":")[1] for c in corruptions})

    def pair(d: dict | None) -> str:
        if not d:
            return "—"
        return " / ".join("—" if d.get(m) is None else f"{d[m]:.1f}" for m in ("image_auroc", "pixel_auroc"))

    by_name = [[r["category"], r["label"], r["shots"], pair(r["clean"]), *(pair(r["drop"].get(n)) for n in names),
                pair(r["drop"].get("mean"))] for r in rows]
    by_severity = [[r["category"], r["label"], r["shots"], pair(r["clean"]),
                    *(pair(r["drop"].get(f"severity {s}")) for s in severities), pair(r["drop"].get("mean"))]
                   for r in rows]
    return ["## Robustness: AUROC drop under corruptions", "", ROBUSTNESS_TEXT, "",
            md_table(["category", "detector", "shots", "clean AUROC", *names, "mean"], by_name), "",
            "The same drops by severity (mean over the corruptions):", "",
            md_table(["category", "detector", "shots", "clean AUROC", *(f"severity {s}" for s in severities),
                      "mean"], by_severity), ""]


def _plots(plots: dict) -> list[str]:
    md = ["## Plots", ""]
    for (ds, cat), files in plots.items():
        links = " · ".join(f"[{Path(f).stem.split('__')[-1]}]({f})" for f in files)
        md.append(f"- {dataset_name(ds)} / {cat}: {links}")
    md.append("")
    for (ds, cat), files in plots.items():
        md += [f"![{dataset_name(ds)} {cat}]({files[0]})", ""]
    return md


def _failures(failed: Sequence[dict]) -> list[str]:
    md = ["## Failed runs", ""]
    if not failed:
        return md + ["None.", ""]
    rows = [[f"{dataset_name(x['settings']['dataset'])}/{x['settings']['category']} {x['settings']['label']} "
             f"shots={x['settings']['shots']} seed={x['settings']['seed']}",
             (x.get("error") or "").splitlines()[0].replace("|", "\\|")[:300], f"[json]({x['file']})"]
            for x in failed]
    return md + [md_table(["run", "error", "record"], rows), "",
                 "A failed run is retried by the next invocation of the same command.", ""]


# -------------------------------------------------------------------------------------------------- plots


def write_plots(out: Path, records: Sequence[dict], det_specs: Sequence[DetectorSpec]) -> dict:
    """Per (dataset, category): AUROC bars with std error bars, and image ROC curves (lowest ok seed) per shots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    order = {d.label: i for i, d in enumerate(det_specs)}
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    by = ("dataset", "category", "label", "shots")
    img, pix = aggregate(records, "image_auroc", by), aggregate(records, "pixel_auroc", by)
    files: dict[tuple, list[str]] = {}
    for ds, cat in dict.fromkeys((r["settings"]["dataset"], r["settings"]["category"]) for r in records):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset_name(ds)}__{cat}")
        groups = sorted({g[2:] for g in img if g[:2] == (ds, cat)},
                        key=lambda x: (order.get(x[0], 99), shots_order(x[1])))
        if not groups:
            continue
        names = [lab if len({s for _, s in groups}) == 1 else f"{lab}\n{s}-shot" for lab, s in groups]
        x = np.arange(len(groups))
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(groups) + 1.5), 3.4), dpi=100)
        for off, agg, name, colour in ((-0.2, img, "image AUROC", "tab:blue"), (0.2, pix, "pixel AUROC", "tab:orange")):
            st = [agg.get((ds, cat, *g)) for g in groups]
            means = [100 * s.mean if s and s.n else np.nan for s in st]
            errs = [100 * s.std if s and s.n > 1 else 0.0 for s in st]
            ax.bar(x + off, means, 0.4, yerr=errs, capsize=3, label=name, color=colour)
        for xi, g in zip(x, groups):
            st = img.get((ds, cat, *g))
            if st is None or st.n == 0:
                ax.text(xi, 3, "no finished run", rotation=90, ha="center", va="bottom", fontsize=7, color="tab:red")
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel("AUROC (%)")
        ax.set_ylim(0, 100)
        name = f"plots/{slug}__auroc.png"
        _save(fig, ax, f"{dataset_name(ds)} / {cat} (mean ± std over seeds)", 8, out / name)
        files[(ds, cat)] = [name]
        for shots in dict.fromkeys(s for _, s in groups):
            fig, ax = plt.subplots(figsize=(3.8, 3.6), dpi=100)
            drawn = False
            for lab in dict.fromkeys(lab for lab, s in groups if s == shots):
                runs = sorted((r for r in records if r.get("status") == "ok" and r.get("predictions")
                               and (r["settings"]["dataset"], r["settings"]["category"], r["settings"]["label"],
                                    r["settings"]["shots"]) == (ds, cat, lab, shots)),
                              key=lambda r: r["settings"]["seed"])
                if not runs:
                    continue
                p = runs[0]["predictions"]
                y = np.asarray(p["labels"])
                if y.min() == y.max():
                    continue
                fpr, tpr, _ = roc_curve(y, np.asarray(p["scores"], dtype=np.float64))
                auc = runs[0]["metrics"].get("image_auroc")
                ax.plot(fpr, tpr, label=f"{lab} (seed {runs[0]['settings']['seed']}, {fmt_value(auc, 'image_auroc')})")
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            name = f"plots/{slug}__roc_{shots}shot.png"
            _save(fig, ax, f"{cat}, {shots}-shot, image ROC", 7, out / name)
            files[(ds, cat)].append(name)
    return files


def _save(fig, ax, title: str, legend_size: int, path: Path) -> None:
    """Title and legend on, then the figure to ``path`` (and out of matplotlib's memory)."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the files


def write_outputs(out: Path, records: Sequence[dict], settings: dict, env: dict, det_specs: Sequence[DetectorSpec],
                  n_planned: int, plots: bool = True, interrupted: bool = False) -> dict:
    """results.json, report.md and plots/*.png from the run records."""
    clean = [r for r in records if "corruption" not in r["settings"]]
    plot_files = write_plots(out, clean, det_specs) if plots and clean else {}
    md, tables = render_report(records, settings, env, det_specs, plot_files, n_planned, interrupted)
    (out / "report.md").write_text(md)
    paper = published()
    doc = {
        "format": RESULTS_FORMAT,
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings,
        "environment": env,
        "aggregation": AGGREGATION_TEXT,
        "iou_threshold_rule": IOU_TEXT.format(pes=settings.get("pixel_eval_size")),
        "speed_and_memory": SPEED_TEXT.format(bs=settings.get("batch_size")),
        "tables": tables,
        "published": {"note": paper["note"] + "; all 15 MVTec AD / 12 VisA categories; AUROC in percent",
                      **{t: paper[t] for t in ("table1", "table2", "table3", "table4")}},
        "plots": {f"{dataset_name(k[0])}/{k[1]}": v for k, v in plot_files.items()},
        "runs": records,
    }
    write_json(out / "results.json", doc)
    return {"results": str(out / "results.json"), "report": str(out / "report.md"),
            "plots": [f for v in plot_files.values() for f in v]}


def report_from_results(folder: str | Path, interrupted: bool = False) -> str:
    """report.md rendered again from ``folder``'s results.json alone (its runs, settings, environment, plots).

    Whether the bench was interrupted is not recorded in results.json: say so with ``interrupted``.
    """
    doc = json.loads((Path(folder) / "results.json").read_text())
    records, settings = doc["runs"], doc["settings"]
    where = {f"{dataset_name(r['settings']['dataset'])}/{r['settings']['category']}":
             (r["settings"]["dataset"], r["settings"]["category"]) for r in records}
    plots = {where[k]: v for k, v in doc.get("plots", {}).items()}
    specs = [DetectorSpec(**d) for d in settings["detectors"]]
    md, _ = render_report(records, settings, doc["environment"], specs, plots, n_planned_runs(settings), interrupted)
    return md
