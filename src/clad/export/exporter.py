"""``clad export --format onnx``: a fitted detector's prediction as one ONNX file (``clad.export.graphs``).

The file holds the backbone with its normalisation, the scoring with its fitted tensors as initializers (the memory,
PaDiM's Gaussians, CLAD's heads and normal class embedding) and the map's smoothing, and, as metadata under the key
``clad``, what a runtime needs around it: the detector, the input size, the map's sigma, the threshold.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from clad.errors import ConfigError, DependencyError
from clad.export.graphs import BLOCK_DISTANCES, CLADGraph, Graph, PaDiMGraph, PatchCoreGraph

FORMAT, FORMAT_VERSION = "clad-onnx", 1
METADATA_KEY = "clad"
OPSET = 17  # onnxruntime 1.11 and later run it
INPUT, OUTPUTS = "images", ("scores", "maps", "patch_maps")
# Above this many bytes of tensors the file keeps them in FILE.data beside it: one protobuf is limited to 2 GB.
EXTERNAL_DATA_BYTES = 1 << 30
GRAPHS = {"patchcore": PatchCoreGraph, "patch_knn": PatchCoreGraph, "padim": PaDiMGraph, "clad": CLADGraph,
          "clad_plus": CLADGraph}
INPUT_CONTRACT = ("images: uint8 (B, 3, S, S), RGB, S = image_size, resized from the image by bilinear "
                  "interpolation with antialiasing (clad.backbones.base.resized); the graph normalises it")


def require(package: str, what: str):
    """Import ``package``, or one DependencyError line saying what needs it and how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise DependencyError(f"{what} needs the package {package!r}, which is not installed: "
                              "pip install onnx onnxruntime (or pip install 'clad[onnx]')") from e


def export_problem(det) -> str | None:
    """Why ``det`` cannot be exported to ONNX, or None when it can."""
    if det.name not in GRAPHS:
        return (f"detector {det.name!r} cannot be exported to ONNX; these can: {', '.join(GRAPHS)}")
    if getattr(det.config, "localization", "dense") != "dense":
        return (f"detector {det.name!r} with localization={det.config.localization!r} cannot be exported to ONNX "
                "(Grad-CAM differentiates the model); fit it with localization='dense'")
    if getattr(det.config, "resize", "squeeze") != "squeeze":
        return (f"detector {det.name!r} with resize={det.config.resize!r} cannot be exported to ONNX (the graph takes "
                "square inputs of image_size); fit it with resize='squeeze'")
    return None


def build_graph(det, block_distances: int = BLOCK_DISTANCES) -> Graph:
    """The torch module of ``det``'s prediction from resized pixels (``clad.export.graphs``)."""
    det._check_fitted()
    problem = export_problem(det)
    if problem:
        raise ConfigError(problem)
    cls = GRAPHS[det.name]
    return cls(det) if cls is PaDiMGraph else cls(det, block_distances)


def metadata(det, graph: Graph, source: str | None = None) -> dict:
    """What ``clad.export.runtime`` reads back from the file's metadata."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "detector": det.name,
        "params": json.loads(json.dumps(dataclasses.asdict(det.config), default=str)),
        "image_size": graph.image_size, "grid": list(graph.grid),
        "map_sigma": float(getattr(det.config, "sigma", getattr(det.config, "map_sigma", 0.0))),
        "threshold": det.threshold_, "threshold_source": det.threshold_source_, "threshold_scale": det.threshold_scale_,
        "source_sha256": source, "input": INPUT_CONTRACT,
        "outputs": {"scores": "(B,) image scores", "maps": "(B, S, S) anomaly maps at the working size",
                    "patch_maps": "(B, h, w) anomaly maps on the feature grid, before upsampling and smoothing"},
    }


def export_onnx(det, path: str | Path, external_data: bool | None = None, source: str | None = None,
                block_distances: int = BLOCK_DISTANCES) -> Path:
    """Write ``det``'s prediction as one ONNX graph to ``path``; returns ``path``.

    external_data: keep the tensors in ``<path>.data`` beside the file (None: only when they pass
    ``EXTERNAL_DATA_BYTES``). source: the sha256 of the saved model folder, recorded in the metadata.
    block_distances: memory rows per matrix product times the patches of one image. The file appears whole or not
    at all (written under temporary names, then renamed). The detector's own predictions are not changed.
    """
    onnx = require("onnx", "ONNX export")
    path = Path(os.path.abspath(path))
    graph = build_graph(det, block_distances)
    modes = {m: m.training for m in graph.modules()}
    graph.eval()
    size = graph.image_size
    dummy = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    try:
        with torch.no_grad():
            # Once before tracing: a backbone's inference path prepares its weights on first use (EfficientNet-Lite0
            # folds each batch norm into its convolution), which the trace must find done, as constants.
            graph(dummy)
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter's deprecation notice and its tracer's warnings about shapes: the graph's
            # only dynamic axis is the batch, declared below, and the tests run it at another batch size
            warnings.simplefilter("ignore")
            traced = Path(tmp) / "graph.onnx"
            torch.onnx.export(graph, (dummy,), str(traced), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=list(OUTPUTS),
                              dynamic_axes={n: {0: "batch"} for n in (INPUT, *OUTPUTS)}, do_constant_folding=True)
            model = onnx.load(str(traced))  # with any tensors the exporter put beside it
    finally:
        for m, mode in modes.items():
            m.train(mode)
    model.producer_name, model.doc_string = "clad", f"clad {det.name}: {INPUT_CONTRACT}"
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata(det, graph, source))
    n_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if external_data is None:
        external_data = n_bytes > EXTERNAL_DATA_BYTES
    _write(onnx, model, path, external_data)
    return path


def _write(onnx, model, path: Path, external_data: bool) -> None:
    """Save ``model`` to ``path`` (and ``path.data`` with ``external_data``) through a folder beside it, checked
    before it is renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        if external_data:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        onnx.checker.check_model(str(staged))  # by path: a model with external data may pass 2 GB
        if external_data:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(staged, path)
