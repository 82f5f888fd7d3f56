"""A self-contained HTML report (opens offline) with PNG heatmaps, contours, histograms and ROC curve."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clad.types import AnomalyResult, Sample  # noqa: E402
from clad.viz import draw_contour, overlay, save_png  # noqa: E402


def _summary_plots(out: Path, labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> list[str]:
    files = []
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    bins = np.linspace(scores.min(), scores.max() + 1e-9, 30)
    if labels is not None and labels.any() and (~labels.astype(bool)).any():
        ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal", color="tab:blue")
        ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomalous", color="tab:red")
        ax.legend()
    else:
        ax.hist(scores, bins=bins, color="tab:gray")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1)
    ax.set_xlabel("image anomaly score")
    ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(out / "histogram.png")
    plt.close(fig)
    files.append("histogram.png")
    if labels is not None and labels.any() and (~labels.astype(bool)).any():
        from sklearn.metrics import roc_auc_score, roc_curve

        fpr, tpr, _ = roc_curve(labels, scores)
        fig, ax = plt.subplots(figsize=(3.6, 3.4), dpi=100)
        ax.plot(fpr, tpr, color="tab:red", label=f"AUROC {roc_auc_score(labels, scores):.3f}")
        ax.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "roc.png")
        plt.close(fig)
        files.append("roc.png")
    return files


def write_report(
    out: str | Path,
    samples: Sequence[Sample],
    result: AnomalyResult,
    title: str = "clad report",
    metrics: dict | None = None,
    pixel_threshold: float | None = None,
    sentences: Sequence[str] | None = None,
) -> Path:
    """Write ``out/index.html`` plus one folder of PNGs; returns the HTML path.

    The thresholded-region contour uses ``pixel_threshold``, else the metrics' pixel F1-max threshold, else the
    result's own threshold. Colours share one scale across the report so heatmaps compare between images.
    """
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(result.scores)
    labels = np.array([s.label for s in samples]) if samples and samples[0].label is not None else None
    all_vals = np.concatenate([m.ravel()[:: max(1, m.size // 4096)] for m in result.anomaly_maps])
    vmin, vmax = float(np.percentile(all_vals, 1)), float(np.percentile(all_vals, 99.9))
    if pixel_threshold is None and metrics:
        pixel_threshold = metrics.get("pixel_f1_threshold")
    if pixel_threshold is None or not np.isfinite(pixel_threshold):
        pixel_threshold = result.threshold
    sentences = sentences or (result.explanations and [getattr(e, "sentence", str(e)) for e in result.explanations])

    rows = []
    order = np.argsort(-scores)
    for rank, i in enumerate(order):
        s, amap = samples[i], result.anomaly_maps[i]
        stem = f"{rank:04d}"
        ov = overlay(s.image, amap, vmin, vmax)
        if pixel_threshold is not None:
            ov = draw_contour(ov, amap >= pixel_threshold, colour=(255, 255, 255), width=2)
        save_png(s.image, img_dir / f"{stem}_image.png")
        save_png(ov, img_dir / f"{stem}_overlay.png")
        cells = [f'<img src="images/{stem}_image.png">', f'<img src="images/{stem}_overlay.png">']
        if s.mask is not None and s.mask.any():
            gt = draw_contour(s.image, s.mask, colour=(0, 255, 0), width=2)
            save_png(gt, img_dir / f"{stem}_truth.png")
            cells.append(f'<img src="images/{stem}_truth.png">')
        else:
            cells.append('<div class="none">no defect in ground truth</div>' if s.label == 0 else "<div class='none'>no mask</div>")
        decision = ""
        if result.labels is not None:
            decision = " &middot; <b>anomalous</b>" if result.labels[i] else " &middot; normal"
        text = html.escape(sentences[i]) if sentences else ""
        rows.append(
            f"<tr><td class='meta'><div class='path'>{html.escape(Path(s.path).name)}</div>"
            f"<div>{html.escape(s.defect_type)}</div><div>score {scores[i]:.4g}{decision}</div>"
            f"<div class='why'>{text}</div></td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        )

    plots = _summary_plots(out, labels, scores, result.threshold)
    metric_rows = ""
    if metrics:
        keys = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "iou", "fit_seconds", "predict_ms_per_image"]
        metric_rows = "".join(
            f"<tr><th>{k}</th><td>{metrics[k]:.4f}</td></tr>" for k in keys if isinstance(metrics.get(k), float)
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}} img{{max-width:220px;display:block}}
table{{border-collapse:collapse}} td,th{{padding:4px 8px;vertical-align:top;border-bottom:1px solid #ddd;text-align:left}}
.meta{{max-width:260px;font-size:13px}} .path{{font-weight:bold}} .why{{margin-top:6px;color:#444}}
.none{{width:220px;color:#999;font-size:12px}} .plots img{{max-width:480px;display:inline-block;margin-right:1em}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(samples)} images, sorted by anomaly score. Heatmap colours share one scale ({vmin:.3g} to {vmax:.3g});
white contour: map &ge; {pixel_threshold if pixel_threshold is not None else float('nan'):.4g}; green contour: ground truth.</p>
<table>{metric_rows}</table>
<div class="plots">{''.join(f'<img src="{p}">' for p in plots)}</div>
<table><tr><th>image</th><th>input</th><th>anomaly map</th><th>ground truth</th></tr>{''.join(rows)}</table>
</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
