"""A self-contained HTML report (opens offline) with PNG heatmaps, contours, histograms and ROC curve."""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

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


def _draw_box(image: np.ndarray, box, colour=(255, 220, 0), width: int = 2) -> np.ndarray:
    """Outline of an (x0, y0, x1, y1) end-exclusive box on a copy of an (H, W, 3) image."""
    out = image.copy()
    h, w = out.shape[:2]
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, int(box[2])), min(h, int(box[3]))
    if x1 <= x0 or y1 <= y0:
        return out
    out[y0 : min(y1, y0 + width), x0:x1] = colour
    out[max(y0, y1 - width) : y1, x0:x1] = colour
    out[y0:y1, x0 : min(x1, x0 + width)] = colour
    out[y0:y1, max(x0, x1 - width) : x1] = colour
    return out


def _normal_crop(reference: np.ndarray, box) -> np.ndarray:
    """The reference around a matched patch (three times its size, at least 64 px), the patch outlined."""
    h, w = reference.shape[:2]
    x0, y0, x1, y1 = (int(b) for b in box)
    half = max(32, (x1 - x0) * 3 // 2, (y1 - y0) * 3 // 2)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    l, t = max(0, min(cx - half, w - 2 * half)), max(0, min(cy - half, h - 2 * half))
    r, b = min(w, l + 2 * half), min(h, t + 2 * half)
    crop = _draw_box(reference, box, colour=(0, 200, 255))[t:b, l:r]
    side = max(crop.shape[:2])
    if side < 160:  # small crops are shown enlarged, pixels kept sharp
        scale = 160 / side
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.NEAREST))
    return crop


def write_report(
    out: str | Path,
    samples: Sequence[Sample],
    result: AnomalyResult,
    title: str = "clad report",
    metrics: dict | None = None,
    pixel_threshold: float | None = None,
    sentences: Sequence[str] | None = None,
    explanations: Sequence | None = None,
    references: Sequence[np.ndarray] | None = None,
) -> Path:
    """Write ``out/index.html`` plus one folder of PNGs; returns the HTML path.

    The thresholded-region contour uses ``pixel_threshold``, else each explanation's own pixel threshold, else the
    metrics' pixel F1-max threshold, else the result's own threshold. Colours share one scale across the report so
    heatmaps compare between images. ``explanations`` (``clad.explain.Explanation``, default
    ``result.explanations``) add their sentence and the boxes of their regions (yellow); with ``references`` (the
    detector's normal references) the closest normal patch of the strongest region is shown too. Samples whose
    ``label`` is None (unlabelled images) get no ground-truth cell; histogram split and ROC need labels.
    """
    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(result.scores)
    known = [s.label is not None for s in samples]
    labels = np.array([s.label for s in samples]) if samples and all(known) else None
    all_vals = np.concatenate([m.ravel()[:: max(1, m.size // 4096)] for m in result.anomaly_maps])
    vmin, vmax = float(np.percentile(all_vals, 1)), float(np.percentile(all_vals, 99.9))
    explanations = explanations if explanations is not None else result.explanations
    fixed = pixel_threshold
    if fixed is None and not explanations and metrics:
        fixed = metrics.get("pixel_f1_threshold")
    if (fixed is None or not np.isfinite(fixed)) and not explanations:
        fixed = result.threshold
    if fixed is not None and not np.isfinite(fixed):
        fixed = None
    sentences = sentences or (explanations and [getattr(e, "sentence", str(e)) for e in explanations])
    show_normal = bool(references) and bool(explanations)
    show_truth = any(known)

    rows = []
    order = np.argsort(-scores)
    for rank, i in enumerate(order):
        s, amap = samples[i], result.anomaly_maps[i]
        e = explanations[i] if explanations else None
        thr = fixed if fixed is not None else getattr(e, "pixel_threshold", None)
        stem = f"{rank:04d}"
        ov = overlay(s.image, amap, vmin, vmax)
        if thr is not None:
            ov = draw_contour(ov, amap >= thr, colour=(255, 255, 255), width=2)
        for region in getattr(e, "regions", []) or []:
            ov = _draw_box(ov, region.bbox)
        save_png(s.image, img_dir / f"{stem}_image.png")
        save_png(ov, img_dir / f"{stem}_overlay.png")
        cells = [f'<img src="images/{stem}_image.png" alt="input">',
                 f'<img src="images/{stem}_overlay.png" alt="anomaly map">']
        if not show_truth:
            pass
        elif s.mask is not None and s.mask.any():
            gt = draw_contour(s.image, s.mask, colour=(0, 255, 0), width=2)
            save_png(gt, img_dir / f"{stem}_truth.png")
            cells.append(f'<img src="images/{stem}_truth.png" alt="ground truth">')
        else:
            cells.append('<div class="none">no defect in ground truth</div>' if s.label == 0 else "<div class='none'>no mask</div>")
        if show_normal:
            match = e.regions[0].nearest_normal if e is not None and e.regions else None
            if match is not None and 0 <= match.reference < len(references):
                save_png(_normal_crop(references[match.reference], match.box), img_dir / f"{stem}_normal.png")
                cells.append(f'<img src="images/{stem}_normal.png" alt="closest normal">'
                             f'<div class="cap">reference {match.reference}</div>')
            else:
                cells.append('<div class="none">no region</div>')
        decision = ""
        if result.labels is not None:
            decision = " &middot; <b>anomalous</b>" if result.labels[i] else " &middot; normal"
        text = html.escape(sentences[i]) if sentences else ""
        kind = f"<div>{html.escape(s.defect_type)}</div>" if s.label is not None else ""
        rows.append(
            f"<tr><td class='meta'><div class='path'>{html.escape('/'.join(Path(s.path).parts[-2:]))}</div>"
            f"{kind}<div>score {scores[i]:.4g}{decision}</div>"
            f"<div class='why'>{text}</div></td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        )
    heads = ["image", "input", "anomaly map"] + (["ground truth"] if show_truth else []) + (["closest normal"] if show_normal else [])
    if fixed is not None:
        contour = f"white contour: map &ge; {fixed:.4g}"
    elif explanations:
        contour = "white contour: map &ge; each explanation's pixel threshold; yellow boxes: its regions"
    else:
        contour = "no contour (no pixel threshold)"

    plots = _summary_plots(out, labels, scores, result.threshold)
    metric_rows = ""
    if metrics:
        keys = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "iou", "fit_seconds", "predict_ms_per_image"]
        metric_rows = "".join(
            f"<tr><th>{k}</th><td>{metrics[k]:.4f}</td></tr>" for k in keys if isinstance(metrics.get(k), float)
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}} img{{max-width:220px;max-height:220px;display:block}}
table{{border-collapse:collapse}} td,th{{padding:4px 8px;vertical-align:top;border-bottom:1px solid #ddd;text-align:left}}
.meta{{max-width:260px;font-size:13px}} .path{{font-weight:bold}} .why{{margin-top:6px;color:#444}}
.none{{width:220px;color:#999;font-size:12px}} .cap{{color:#666;font-size:12px}} .plots img{{max-width:480px;display:inline-block;margin-right:1em}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(samples)} images, sorted by anomaly score. Heatmap colours share one scale ({vmin:.3g} to {vmax:.3g});
{contour}{'; green contour: ground truth' if show_truth else ''}{'; blue box: the matched normal patch' if show_normal else ''}.</p>
<table>{metric_rows}</table>
<div class="plots">{''.join(f'<img src="{p}" alt="{p[:-4]}">' for p in plots)}</div>
<table><tr>{''.join(f'<th>{h}</th>' for h in heads)}</tr>{''.join(rows)}</table>
</body></html>"""
    path = out / "index.html"
    path.write_text(page)
    return path
