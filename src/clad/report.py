"""A self-contained HTML report (opens offline) with PNG heatmaps, contours, histograms and ROC curve.

``ReportWriter`` takes the images one at a time (``clad.pipeline``'s report sink feeds it), ``write_report`` a
whole list at once; both write the same files.
"""
from __future__ import annotations

import html
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from clad.types import AnomalyResult, Item, Prediction, Sample  # noqa: E402
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


def plot_coverage(path: str | Path, curves: dict[str, list[dict]], chance: float,
                  at_threshold: dict | None = None) -> Path:
    """A small PNG of type-naming top-1 accuracy against coverage (``clad.explain.quality.coverage_curve``), one
    line per ranking in ``curves`` (label -> curve), the chance level dashed, and the learnt threshold's point."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(4.2, 3.2), dpi=100)
    for (label, curve), colour in zip(curves.items(), ("tab:red", "tab:blue", "tab:green")):
        ax.plot([100 * c["coverage"] for c in curve], [c["top1"] for c in curve], "o-", ms=3, color=colour, label=label)
    ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance {chance:.2f}")
    if at_threshold and at_threshold.get("n_images"):
        ax.plot([100 * at_threshold["coverage"]], [at_threshold["top1"]], "k*", ms=10, label="learnt threshold")
    ax.set_xlim(0, 102)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage: most confident images (%)")
    ax.set_ylabel("defect type top-1")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _naming_plot(out: Path, records) -> list[str]:
    """The coverage curve of the defective images whose defect type is among the types the explanations rank."""
    from clad.explain.quality import coverage_curve

    named = [r for r in records if r.label and getattr(r.explanation, "ranking", None)]
    types = {t.name for r in named for t in r.explanation.ranking} | {r.defect_type for r in named}
    named = [r for r in named if r.defect_type in types and r.defect_type != "good"]
    if not named or len(types) < 2:
        return []
    exps, truth = [r.explanation for r in named], [r.defect_type for r in named]
    answered = [i for i, e in enumerate(exps) if not e.type_uncertain]
    at = {"coverage": len(answered) / len(exps), "n_images": len(answered),
          "top1": sum(exps[i].named_type == truth[i] for i in answered) / max(1, len(answered))}
    plot_coverage(out / "naming.png", {"explanations": coverage_curve(exps, truth)}, 1.0 / len(types),
                  at if exps[0].confidence_threshold is not None else None)
    return ["naming.png"]


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


# The colour scale is taken from a sample of every map (about 4096 values each); past this many values the sample
# is thinned (every other value kept), so a report of any length keeps a bounded sample.
SCALE_SAMPLE_MAX = 1 << 22


@dataclass
class _Record:
    """What the report keeps in memory of one image until index.html is written."""

    index: int
    path: str
    score: float
    decision: bool | None
    sentence: str | None
    explanation: object | None
    label: int | None
    defect_type: str | None
    has_truth: bool
    normal_reference: int | None
    sample: np.ndarray  # the map values for the colour scale


class ReportWriter:
    """Writes ``out/index.html`` plus one folder of PNGs from images given one at a time (``add``), then ``close``.

    Each image's input, ground-truth and closest-normal pictures are written as it comes; its heatmap overlay
    needs the colour scale of all the maps and its file name the rank of its score among all, so the input and the
    map wait in a staging folder inside ``out`` (removed at close) and only a small record stays in memory.
    threshold: the decision threshold on the scores (drawn on the histogram). See ``write_report`` for the rest.
    """

    def __init__(self, out: str | Path, title: str = "clad report", threshold: float | None = None,
                 pixel_threshold: float | None = None, references: Sequence[np.ndarray] | None = None):
        self.out, self.title, self.threshold = Path(out), title, threshold
        self.pixel_threshold, self.references = pixel_threshold, references
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out))
        self.records: list[_Record] = []
        self.stride, self.n_sampled = 1, 0

    def __len__(self) -> int:
        return len(self.records)

    def add(self, p: Prediction, sentence: str | None = None) -> None:
        """One image with its prediction; ``sentence`` defaults to its explanation's."""
        item, amap, e, i = p.item, p.anomaly_map, p.explanation, len(self.records)
        if sentence is None and e is not None:
            sentence = getattr(e, "sentence", str(e))
        Image.fromarray(item.image).save(self.stage / f"{i}.png", compress_level=1)  # lossless, for the overlay
        np.save(self.stage / f"{i}.npy", amap)
        save_png(item.image, self.stage / f"{i}_image.png")
        has_truth = item.mask is not None and bool(item.mask.any())
        if has_truth:
            save_png(draw_contour(item.image, item.mask, colour=(0, 255, 0), width=2), self.stage / f"{i}_truth.png")
        normal = None
        if self.references and e is not None:
            match = e.regions[0].nearest_normal if e.regions else None
            if match is not None and 0 <= match.reference < len(self.references):
                save_png(_normal_crop(self.references[match.reference], match.box), self.stage / f"{i}_normal.png")
                normal = match.reference
        sample = amap.ravel()[:: max(1, amap.size // 4096)][:: self.stride].copy()
        self.records.append(_Record(i, item.path, p.score, p.label, sentence, e, item.label, item.defect_type,
                                    has_truth, normal, sample))
        self.n_sampled += len(sample)
        while self.n_sampled > SCALE_SAMPLE_MAX:
            self.stride *= 2
            for r in self.records:
                r.sample = r.sample[::2].copy()
            self.n_sampled = sum(len(r.sample) for r in self.records)

    def discard(self) -> None:
        """Remove the staging folder without writing the page."""
        shutil.rmtree(self.stage, ignore_errors=True)

    def close(self, metrics: dict | None = None) -> Path:
        """Draw the overlays, write index.html and the summary plots; returns the HTML path."""
        try:
            return self._write(metrics)
        finally:
            self.discard()

    def _write(self, metrics: dict | None) -> Path:
        records, out = self.records, self.out
        if not records:
            raise ValueError("the report has no image")
        img_dir = out / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        scores = np.asarray([r.score for r in records], dtype=np.float32)
        known = [r.label is not None for r in records]
        labels = np.array([r.label for r in records]) if all(known) else None
        all_vals = np.concatenate([r.sample for r in records])
        vmin, vmax = float(np.percentile(all_vals, 1)), float(np.percentile(all_vals, 99.9))
        explained = any(r.explanation is not None for r in records)
        fixed = self.pixel_threshold
        if fixed is None and not explained and metrics:
            fixed = metrics.get("pixel_f1_threshold")
        if (fixed is None or not np.isfinite(fixed)) and not explained:
            fixed = self.threshold
        if fixed is not None and not np.isfinite(fixed):
            fixed = None
        show_normal = bool(self.references) and explained
        show_truth = any(known)

        rows = []
        order = np.argsort(-scores)
        for rank, i in enumerate(order):
            r = records[i]
            e = r.explanation
            thr = fixed if fixed is not None else getattr(e, "pixel_threshold", None)
            stem = f"{rank:04d}"
            image = np.asarray(Image.open(self.stage / f"{i}.png"))
            amap = np.load(self.stage / f"{i}.npy")
            ov = overlay(image, amap, vmin, vmax)
            if thr is not None:
                ov = draw_contour(ov, amap >= thr, colour=(255, 255, 255), width=2)
            for region in getattr(e, "regions", []) or []:
                ov = _draw_box(ov, region.bbox)
            os.replace(self.stage / f"{i}_image.png", img_dir / f"{stem}_image.png")
            save_png(ov, img_dir / f"{stem}_overlay.png")
            cells = [f'<img src="images/{stem}_image.png" alt="input">',
                     f'<img src="images/{stem}_overlay.png" alt="anomaly map">']
            if not show_truth:
                pass
            elif r.has_truth:
                os.replace(self.stage / f"{i}_truth.png", img_dir / f"{stem}_truth.png")
                cells.append(f'<img src="images/{stem}_truth.png" alt="ground truth">')
            else:
                cells.append('<div class="none">no defect in ground truth</div>' if r.label == 0 else "<div class='none'>no mask</div>")
            if show_normal:
                if r.normal_reference is not None:
                    os.replace(self.stage / f"{i}_normal.png", img_dir / f"{stem}_normal.png")
                    cells.append(f'<img src="images/{stem}_normal.png" alt="closest normal">'
                                 f'<div class="cap">reference {r.normal_reference}</div>')
                else:
                    cells.append('<div class="none">no region</div>')
            decision = ""
            if r.decision is not None:
                decision = " &middot; <b>anomalous</b>" if r.decision else " &middot; normal"
            text = html.escape(r.sentence) if r.sentence else ""
            kind = f"<div>{html.escape(r.defect_type or '')}</div>" if r.label is not None else ""
            rows.append(
                f"<tr><td class='meta'><div class='path'>{html.escape('/'.join(Path(r.path).parts[-2:]))}</div>"
                f"{kind}<div>score {scores[i]:.4g}{decision}</div>"
                f"<div class='why'>{text}</div></td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
            )
        heads = ["image", "input", "anomaly map"] + (["ground truth"] if show_truth else []) + (["closest normal"] if show_normal else [])
        if fixed is not None:
            contour = f"white contour: map &ge; {fixed:.4g}"
        elif explained:
            contour = "white contour: map &ge; each explanation's pixel threshold; yellow boxes: its regions"
        else:
            contour = "no contour (no pixel threshold)"

        plots = _summary_plots(out, labels, scores, self.threshold) + (_naming_plot(out, records) if explained else [])
        metric_rows = ""
        if metrics:
            keys = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "iou", "fit_seconds", "predict_ms_per_image"]
            metric_rows = "".join(
                f"<tr><th>{k}</th><td>{metrics[k]:.4f}</td></tr>" for k in keys if isinstance(metrics.get(k), float)
            )
        title = self.title
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}} img{{max-width:220px;max-height:220px;display:block}}
table{{border-collapse:collapse}} td,th{{padding:4px 8px;vertical-align:top;border-bottom:1px solid #ddd;text-align:left}}
.meta{{max-width:260px;font-size:13px}} .path{{font-weight:bold}} .why{{margin-top:6px;color:#444}}
.none{{width:220px;color:#999;font-size:12px}} .cap{{color:#666;font-size:12px}} .plots img{{max-width:480px;display:inline-block;margin-right:1em}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(records)} images, sorted by anomaly score. Heatmap colours share one scale ({vmin:.3g} to {vmax:.3g});
{contour}{'; green contour: ground truth' if show_truth else ''}{'; blue box: the matched normal patch' if show_normal else ''}.</p>
<table>{metric_rows}</table>
<div class="plots">{''.join(f'<img src="{p}" alt="{p[:-4]}">' for p in plots)}</div>
<table><tr>{''.join(f'<th>{h}</th>' for h in heads)}</tr>{''.join(rows)}</table>
</body></html>"""
        path = out / "index.html"
        path.write_text(page)
        return path


def write_report(
    out: str | Path,
    samples: Sequence[Sample | Item],
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
    ``label`` is None (``Item`` of unlabelled images) get no ground-truth cell; histogram split and ROC need labels.
    """
    explanations = explanations if explanations is not None else result.explanations
    writer = ReportWriter(out, title, threshold=result.threshold, pixel_threshold=pixel_threshold, references=references)
    try:
        for i, s in enumerate(samples):
            item = Item(s.image, s.path, s.path, label=s.label, mask=s.mask, defect_type=s.defect_type)
            decision = None if result.labels is None else bool(result.labels[i])
            e = explanations[i] if explanations else None
            sentence = sentences[i] if sentences else None
            writer.add(Prediction(item, result.scores[i], result.anomaly_maps[i], decision, e), sentence)
    except BaseException:
        writer.discard()
        raise
    return writer.close(metrics)
