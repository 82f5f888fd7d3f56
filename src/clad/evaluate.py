"""Fit a detector on a few normal references, predict a labelled test set, and measure it."""
from __future__ import annotations

import dataclasses
import platform
import time
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from clad import metrics
from clad.detectors.base import Detector
from clad.errors import CladError


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

    Pixel metrics are computed on maps and masks downscaled (map bilinear, mask nearest) so that the longer side
    is at most ``pixel_eval_size`` (None = native resolution); the setting is recorded in the result.
    Times exclude image decoding: fit_seconds covers the whole fit, predict_ms_per_image the predict call.
    fitted_from: a fitted detector of the same fit (``Detector.adopt``) whose state ``detector`` takes instead of
    fitting; fit_seconds is then None (the caller knows what the shared fit cost).
    """
    train_samples, train_fail = load_split(train, progress, "loading references")
    test_samples, test_fail = load_split(test, progress, "loading test images")
    if not train_samples:
        raise CladError("no usable reference image: " + "; ".join(f["error"] for f in train_fail))
    refs = [s.image for s in train_samples]

    t0 = time.perf_counter()
    if fitted_from is not None:
        detector.adopt(fitted_from)
        fit_s = None
    else:
        detector.fit(refs)
        fit_s = time.perf_counter() - t0

    images = [s.image for s in test_samples]
    t0 = time.perf_counter()
    result = detector.predict(images, batch_size=batch_size, progress=progress)
    pred_s = time.perf_counter() - t0

    labels = np.array([s.label for s in test_samples], dtype=np.int64)
    masks, maps = [], []
    for s, amap in zip(test_samples, result.anomaly_maps):
        m, a = _resize_for_eval(s.mask, amap, pixel_eval_size)
        masks.append(m)
        maps.append(a)
    scores = result.scores
    out = metrics.evaluate(labels, scores, masks, maps, iou_threshold=None)
    out.update(
        n_references=len(refs),
        n_test=len(test_samples),
        n_test_anomalous=int(labels.sum()),
        fit_seconds=fit_s,
        predict_ms_per_image=1000.0 * pred_s / max(1, len(images)),
        pixel_eval_size=pixel_eval_size,
        failures=train_fail + test_fail,
        detector=detector.name,
        params=dataclasses.asdict(detector.config),
    )
    if keep_predictions:
        out["_predictions"] = {"samples": test_samples, "result": result}
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
