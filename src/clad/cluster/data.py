"""Batch scoring on Ray Data: the batches of ``clad predict --engine ray``.

    ray = connect(address, num_cpus)
    stream = score_on_ray(ray, model_files(model, "torch"), "torch", entries, batch_size=16)
    Pipeline(None, sinks).deliver(stream, total=len(entries))

The entries of a source (``clad.pipeline.sources``: a folder, a CSV manifest, one image) become a dataset of rows
(path, name); Ray tasks decode them in parallel (``Entry.load``: a file that cannot be used travels on as a row
holding its error, which reaches errors.csv as with the local engine); ``map_batches`` scores them with ``Scorer``,
a callable class whose actors each load the model once, in a pool of one actor per CPU of the cluster. The driver
reads the results back in order (``iter_batches``) and turns them into ``Prediction`` batches for the pipeline's
sinks, so the outputs, the run folder, ``--resume`` and Ctrl-C are those of the local engine.

The model travels as bytes (its folder's files, or the ONNX file and its ``.data``, read by the driver and put in
the object store once): workers need no path to it. The images do not travel: each worker reads its files by
their path, so the input must be readable at the same path on every node (a shared or copied folder; a local
cluster always can). A backbone's pretrained weights are read from each node's own cache.

Memory stays bounded whatever the size of the input: Ray Data runs the stages streaming, with backpressure (a
stage waits while the output waiting for the next one fills its share of the object store), decoding at most
``cluster CPUs`` tasks of ``batch_size`` images at a time, and the driver holds one batch of maps at a time while
the sinks write it (plus ``prefetch_batches=1`` more); a block is at most ``batch_size`` images or maps. Measured
on magnetic tile (2 CPUs): the driver's peak RSS was 489 MB for 64 images and 632 MB for all 1,344, whose float32
maps alone are 571 MB (benchmarks/README.md, "Batch scoring on Ray").
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from clad.errors import CladError, ConfigError
from clad.pipeline.sources import Entry, Unusable
from clad.types import Item, Prediction

NO_LABEL = -1  # the label column of a model without a threshold


def model_files(model: str | Path, runtime: str = "torch") -> dict[str, bytes]:
    """The bytes of a saved model, by file name: the config and tensors of a ``clad fit`` folder (torch), or an
    exported ONNX file and its ``.data`` beside it (onnxruntime)."""
    from clad.detectors.base import CONFIG_FILE, STATE_FILE

    model = Path(model)
    if runtime == "onnxruntime":
        files = [model] + [f for f in [model.with_name(f"{model.name}.data")] if f.is_file()]
    else:
        files = [model / CONFIG_FILE, model / STATE_FILE]
    return {f.name: f.read_bytes() for f in files}


def load_model(files: dict[str, bytes], runtime: str, threads: int = 1):
    """A detector (torch) or an ``OnnxDetector`` from the bytes of ``model_files``, loaded through a temporary
    folder that is removed once it is read."""
    folder = Path(tempfile.mkdtemp(prefix="clad-model-"))
    try:
        for name, data in files.items():
            (folder / name).write_bytes(data)
        if runtime == "onnxruntime":
            from clad.export import OnnxDetector

            onnx = next(n for n in files if not n.endswith(".data"))
            return OnnxDetector(folder / onnx, threads=threads)
        from clad.detectors.base import load_detector

        return load_detector(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Scorer:
    """Scores batches of decoded rows in a Ray actor (``map_batches``), with the model loaded once per actor.

    model: ``[ObjectRef]`` of the ``model_files`` bytes (in a list, so that Ray hands the reference, not the value,
    and the actor gets it from the object store); threshold: the decision threshold to use instead of the model's
    (None: the model's). A batch's rows that hold an error pass through with it.
    """

    def __init__(self, model: list, runtime: str, threshold: float | None, threads: int = 1):
        import ray
        import torch

        torch.set_num_threads(threads)
        self.detector = load_model(ray.get(model[0]), runtime, threads)
        if threshold is not None:
            self.detector.set_threshold(threshold)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        good = [i for i in range(n) if not batch["error"][i]]
        scores, normalized = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        labels = np.full(n, NO_LABEL, np.int8)
        maps = [np.zeros((0, 0), np.float32)] * n
        if good:
            result = self.detector.predict([batch["image"][i] for i in good], batch_size=len(good))
            for j, i in enumerate(good):
                scores[i], maps[i] = result.scores[j], np.asarray(result.anomaly_maps[j], np.float32)
                if result.labels is not None:
                    labels[i] = bool(result.labels[j])
                if result.normalized_scores is not None:
                    normalized[i] = result.normalized_scores[j]
        out = np.empty(n, object)
        out[:] = maps
        return {"path": batch["path"], "name": batch["name"], "error": batch["error"], "score": scores,
                "score_normalized": normalized, "label": labels, "map": out}


def _decode(row: dict) -> dict:
    """A row (path as given, its absolute path, name, reason) decoded: its image, or its error (an empty image).

    Workers read the absolute path (their working folder is not the driver's); errors name the path as given, as
    the local engine's do."""
    path, where, name, reason = str(row["path"]), str(row["where"]), str(row["name"]), str(row["reason"])
    entry = Unusable(where, name, reason) if reason else Entry(where, name)
    try:
        image, error = entry.load().image, ""
    except CladError as e:
        image, error = np.zeros((0, 0, 3), np.uint8), str(e).replace(where, path)
    return {"path": path, "name": name, "image": image, "error": error}


def score_on_ray(ray, files: dict[str, bytes], runtime: str, entries: Sequence[Entry], batch_size: int = 16,
                 threshold: float | None = None, actors: int | None = None) -> Iterator:
    """The batches of ``entries`` scored on the connected Ray cluster, in the order of ``entries``: a generator of
    (predictions, [(path, error)]) for ``Pipeline.deliver`` (closing it stops the dataset).

    files: ``model_files``; threshold: as ``Scorer``; actors: scoring actors (default: the cluster's CPUs), each
    with one CPU and one torch thread.
    """
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    from clad.cluster import cluster_cpus

    for e in entries:
        if type(e) not in (Entry, Unusable):
            raise ConfigError(f"{e.path}: --engine ray scores image files (a folder, a CSV manifest, an image), "
                              f"not {type(e).__name__}")
    if not entries:
        return iter(())
    blocks = math.ceil(len(entries) / batch_size)
    cpus = min(cluster_cpus(ray), blocks)  # no more tasks or actors than there are batches
    actors = min(actors or cpus, blocks)
    rows = [{"path": e.path, "where": os.path.abspath(e.path), "name": e.name, "reason": getattr(e, "reason", "")}
            for e in entries]
    context = DataContext.get_current()
    context.execution_options.preserve_order = True  # predictions.csv in the order of the source, as locally
    context.enable_progress_bars = False  # the pipeline's own bar counts the images
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plan and progress, in the driver's output
    model = [ray.put(files)]
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    # decoding takes no CPU of the scheduler's: the scoring actors hold every CPU; the tasks run beside them
    ds = ds.map(_decode, num_cpus=0, compute=TaskPoolStrategy(size=cpus))
    ds = ds.map_batches(Scorer, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                        compute=ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs=dict(model=model, runtime=runtime, threshold=threshold))
    return _predictions(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))


def _predictions(batches) -> Iterator[tuple[list[Prediction], list[tuple[str, str]]]]:
    """Rows of scored batches as (predictions, failures); closing it closes ``batches`` (Ray Data's iterator
    then stops the dataset's execution)."""
    batches = iter(batches)
    try:
        for b in batches:
            predictions, failures = [], []
            for i in range(len(b["path"])):
                path, error = str(b["path"][i]), str(b["error"][i])
                if error:
                    failures.append((path, error))
                    continue
                label, normalized = int(b["label"][i]), float(b["score_normalized"][i])
                predictions.append(Prediction(
                    Item(image=None, path=path, name=str(b["name"][i])), float(b["score"][i]), b["map"][i],
                    None if label == NO_LABEL else bool(label), None, None if math.isnan(normalized) else normalized))
            yield predictions, failures
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
