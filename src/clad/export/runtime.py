"""``clad predict --runtime onnxruntime``: a model exported by ``clad export`` run by onnxruntime, behind a
detector's ``predict``, so that the pipeline's sources, sinks and outputs are those of the torch runtime.

Around the graph, in Python and with the same code as the torch detectors: decoding and resizing to the graph's
input (``clad.backbones.base.resized``), and each map's resize from the feature grid to its image's own resolution
(``clad.ops.smoothing.smooth_maps`` on the graph's ``patch_maps``), which a fixed-size graph cannot do.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clad.backbones.base import resized
from clad.data.io import load_batch
from clad.detectors.base import apply_threshold
from clad.errors import ConfigError
from clad.export.exporter import FORMAT, FORMAT_VERSION, INPUT, METADATA_KEY, require
from clad.ops.smoothing import smooth_maps
from clad.types import AnomalyResult, ImageLike


def file_digest(path: str | Path) -> str:
    """sha256 of an exported file and of its ``.data`` beside it, if any: the model's identity in ``run.json``."""
    path = Path(path)
    h = hashlib.sha256()
    for f in (path, path.with_name(f"{path.name}.data")):
        if f.is_file():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


class OnnxDetector:
    """An exported model in an onnxruntime ``InferenceSession``, with a detector's ``predict``, ``name``,
    ``threshold_``, ``threshold_scale_`` and ``set_threshold``.

    path: a file written by ``clad.export.export_onnx``; threads: onnxruntime's intra-op threads (None: torch's
    thread count, which is the number of cores unless set).
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = require("onnxruntime", "--runtime onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (--runtime onnxruntime runs a file written by "
                              "`clad export --model DIR --format onnx --out FILE`)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own kinds: not a model, missing external data, ...
            raise ConfigError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {e})") from e
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            doc = json.loads(meta) if meta else {}
        except ValueError:
            doc = {}
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{path}: not a model written by `clad export` (format {FORMAT} version "
                              f"{FORMAT_VERSION}): its metadata has no {METADATA_KEY!r} entry of that format")
        self.path, self.meta = path, doc
        self.name, self.image_size, self.map_sigma = doc["detector"], int(doc["image_size"]), float(doc["map_sigma"])
        self.threshold_, self.threshold_scale_ = doc.get("threshold"), doc.get("threshold_scale")
        self.threshold_source_ = doc.get("threshold_source")
        self.digest = file_digest(path)

    def set_threshold(self, threshold: float | None) -> "OnnxDetector":
        """Decide with ``threshold`` instead (None: no decision), as ``Detector.set_threshold``."""
        self.threshold_ = None if threshold is None else float(threshold)
        self.threshold_source_ = None if threshold is None else "user"
        return self

    def run(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
        """The graph on ``images``: (scores (B,), patch maps (B, h, w), the images' (H, W))."""
        arrays, shapes = load_batch(images)
        x = np.ascontiguousarray(resized(arrays, self.image_size).numpy())  # (B, 3, S, S) uint8
        scores, patch = self.session.run(["scores", "patch_maps"], {INPUT: x})
        return scores, patch, shapes

    def predict(self, images: Sequence[ImageLike], batch_size: int = 16, progress: bool = False) -> AnomalyResult:
        """Scores (B,) and one map per image at its own resolution, as ``Detector.predict``."""
        images = list(images)
        parts = []
        for start in range(0, len(images), batch_size):
            scores, patch, shapes = self.run(images[start : start + batch_size])
            maps = smooth_maps(torch.from_numpy(patch), self.image_size, self.map_sigma, shapes)
            parts.append(AnomalyResult(np.asarray(scores, np.float32), [np.asarray(m, np.float32) for m in maps]))
        return apply_threshold(AnomalyResult.concat(parts), self.threshold_, self.threshold_scale_)

    def __repr__(self) -> str:
        return f"OnnxDetector({str(self.path)!r}, detector={self.name!r})"
