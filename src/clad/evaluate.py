"""Fit a detector on a few normal references, predict a labelled test set, and measure it."""
from __future__ import annotations

import dataclasses
import platform
import time
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import precision_score, recall_score
from tqdm.auto import tqdm

from clad import metrics
from clad.detectors.base import Detector
from clad.errors import CladError
from clad.pipeline import BaseSink, Pipeline, from_dataset
from clad.types import AnomalyResult, Sample


def _resize_for_eval(mask: np.ndarray, amap: np.ndarray, max_side: int | None):
    """Downscale mask (nearest) and map (bilinear) together so that the longer side is <= max_side."""
    h, w = mask.shape
    if not max_side or max(h, w) <= max_side:
        return mask, amap
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    a = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    return m, a


def load_split(dataset, progress: bool = True, desc: str = "loading") -> tuple[list, list[dict]]:
    """Decode every sample; a sample that fails is recorded (path + error) and skipped, never fatal."""
    samples, failures = [], []
    for i in tqdm(range(len(dataset)), desc=desc, disable=not progress, leave=False):
        try:
            samples.append(dataset[i])
        except CladError as e:
            failures.append({"path": str(dataset.paths[i]) if hasattr(dataset, "paths") else str(i), "error": str(e)})
    return samples, failures


def threshold_figures(labels: np.ndarray, scores: np.ndarray, threshold: float | None, f1_threshold: float) -> dict:
    """Precision and recall on a labelled split of two decisions: the detector's own (label-free) threshold,
    anomalous where score > threshold as ``predict`` decides, and the F1-max threshold of these very scores,
    anomalous where score >= it as ``metrics.f1_max`` defines it. Undefined (no threshold, no image, nothing
    flagged, no anomalous image) -> nan."""
    out = {"threshold": threshold}
    for key, flagged in (("threshold", None if threshold is None else scores > threshold),
                         ("image_f1", None if np.isnan(f1_threshold) else scores >= f1_threshold)):
        for name, measure in (("precision", precision_score), ("recall", recall_score)):
            value = np.nan if flagged is None or not len(labels) else measure(labels, flagged, zero_division=np.nan)
            out[f"{key}_{name}"] = float(value)
    return out


def fit_references(detector: Detector, train, progress: bool = True, fitted_from: Detector | None = None):
    """Decode ``train`` and fit ``detector`` on it (or adopt ``fitted_from``'s fit, see ``evaluate``).

    Returns (reference images, fit seconds or None when adopted, failures: [{"path", "error"}]).
    """
    train_samples, failures = load_split(train, progress, "loading references")
    if not train_samples and not failures and detector.fits_without_references:  # zero-shot: --shots 0
        t0 = time.perf_counter()
        detector.fit([])
        return [], time.perf_counter() - t0, failures
    if not train_samples:
        raise CladError("no usable reference image: " + "; ".join(f["error"] for f in failures))
    refs = [s.image for s in train_samples]
    t0 = time.perf_counter()
    if fitted_from is not None:
        detector.adopt(fitted_from)
        return refs, None, failures
    detector.fit(refs)
    return refs, time.perf_counter() - t0, failures


class EvalSink(BaseSink):
    """The sink of a labelled stream that the metrics need: labels, scores, and each mask and map downscaled to
    ``pixel_eval_size`` (see ``evaluate``); the decoded images are not kept unless ``keep`` (then every sample and
    its full map are, for explanations and reports). ``metrics`` and ``predict_ms_per_image`` are set at close."""

    def __init__(self, pixel_eval_size: int | None = 256, keep: bool = False):
        self.pixel_eval_size, self.keep = pixel_eval_size, keep
        self.labels, self.scores, self.masks, self.maps, self.failures = [], [], [], [], []
        self.samples, self.full_maps = [], []
        self.metrics: dict | None = None
        self.predict_ms_per_image: float | None = None

    def write(self, batch) -> None:
        for p in batch:
            it = p.item
            if it.label is None or it.mask is None:
                raise CladError(f"{it.path}: evaluation needs a labelled source (label and mask)")
            self.labels.append(it.label)
            self.scores.append(p.score)
            m, a = _resize_for_eval(it.mask, p.anomaly_map, self.pixel_eval_size)
            self.masks.append(m)
            self.maps.append(a)
            if self.keep:
                self.samples.append(Sample(it.image, it.label, it.mask, it.path, it.defect_type))
                self.full_maps.append(p.anomaly_map)

    def write_error(self, path: str, error: str) -> None:
        self.failures.append({"path": path, "error": error})

    def close(self, summary) -> None:
        if summary.error is not None:
            return
        self.metrics = metrics.evaluate(np.array(self.labels, dtype=np.int64), np.asarray(self.scores, np.float32),
                                        self.masks, self.maps, iou_threshold=None)
        self.predict_ms_per_image = 1000.0 * summary.predict_seconds / max(1, len(self.labels))

    def predictions(self, threshold: float | None = None) -> dict:
        """The kept samples and their result (full maps): {"samples": [Sample], "result": AnomalyResult}."""
        result = AnomalyResult(np.asarray(self.scores, np.float32), self.full_maps, threshold)
        if threshold is not None:
            result.labels = result.scores > threshold
        return {"samples": self.samples, "result": result}


def evaluate(
    detector: Detector,
    train,
    test,
    batch_size: int = 16,
    pixel_eval_size: int | None = 256,
    progress: bool = True,
    keep_predictions: bool = False,
    fitted_from: Detector | None = None,
) -> dict:
    """Fit on ``train`` (its images are the normal references), predict ``test``, return every metric.

    ``test`` (a labelled dataset, or a list of samples) streams through ``clad.pipeline.Pipeline``: its images are
    decoded a few batches ahead and let go after their batch, unless ``keep_predictions`` (then the result holds
    "_predictions": every sample and its full-size map). Pixel metrics are computed on maps and masks downscaled
    (map bilinear, mask nearest) so that the longer side is at most ``pixel_eval_size`` (None = native resolution);
    the setting is recorded in the result. Times exclude image decoding: fit_seconds covers the whole fit,
    predict_ms_per_image the predict calls.
    fitted_from: a fitted detector of the same fit (``Detector.adopt``) whose state ``detector`` takes instead of
    fitting; fit_seconds is then None (the caller knows what the shared fit cost).
    """
    refs, fit_s, train_fail = fit_references(detector, train, progress, fitted_from)
    scored = EvalSink(pixel_eval_size, keep=keep_predictions)
    Pipeline(detector, [scored], batch_size=batch_size, progress=progress).run(from_dataset(test))
    out = scored.metrics
    out.update(threshold_figures(np.array(scored.labels, np.int64), np.asarray(scored.scores, np.float32),
                                 detector.threshold_, out["image_f1_threshold"]))
    out.update(
        threshold_source=detector.threshold_source_,
        n_references=len(refs),
        n_test=len(scored.labels),
        n_test_anomalous=int(sum(scored.labels)),
        fit_seconds=fit_s,
        predict_ms_per_image=scored.predict_ms_per_image,
        pixel_eval_size=pixel_eval_size,
        failures=train_fail + scored.failures,
        detector=detector.name,
        params=dataclasses.asdict(detector.config),
        fit_report=detector.fit_report(),
    )
    if keep_predictions:
        out["_predictions"] = scored.predictions(detector.threshold_)
    return out


def environment() -> dict:
    """Versions and machine, recorded beside every figure."""
    import sklearn

    import clad

    return {
        "clad": clad.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


def metric_table(rows: Sequence[tuple[str, float]]) -> str:
    return "\n".join(f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}" for k, v in rows)
