"""Sinks: where a stream's predictions and failures go, one batch at a time.

Every sink has ``open()``, ``write(batch)`` (a list of ``Prediction``), ``write_error(path, error)`` and
``close(summary)`` (``summary.error`` is set when the run stopped early). A new output (a database, Parquet) is a
new sink; the flow does not change. File sinks create their file through ``FileSink._create`` and finish it in
``FileSink.close``: the one place where writing to a temporary name and renaming it at close belongs.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Protocol, Sequence

import numpy as np

from clad.types import Prediction


class Sink(Protocol):
    """What the flow calls: ``open`` before the first batch, ``write`` per batch of predictions, ``write_error``
    per file that could not be used, ``close`` once at the end with the run's ``Summary``."""

    def open(self) -> None: ...

    def write(self, batch: Sequence[Prediction]) -> None: ...

    def write_error(self, path: str, error: str) -> None: ...

    def close(self, summary) -> None: ...


class BaseSink:
    """A sink that ignores everything: subclasses override what they need."""

    def open(self) -> None:
        pass

    def write(self, batch: Sequence[Prediction]) -> None:
        pass

    def write_error(self, path: str, error: str) -> None:
        pass

    def close(self, summary) -> None:
        pass


class FileSink(BaseSink):
    """A sink that writes one text file at ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fh: IO | None = None

    def _create(self) -> IO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "w", newline="")
        return self.fh

    def close(self, summary) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class PredictionsCSV(FileSink):
    """``path,score[,score_normalized,label]`` per image (scores to 6 significant digits; with ``labels``, i.e.
    when the detector has a threshold, the score on the scale where the threshold is 0.5, empty for a model saved
    without that scale, and the label "anomalous"/"normal"). Flushed after each batch: what is done stays done."""

    def __init__(self, path: str | Path, labels: bool = False):
        super().__init__(path)
        self.labels = labels

    def open(self) -> None:
        self.writer = csv.writer(self._create())
        self.writer.writerow(["path", "score"] + (["score_normalized", "label"] if self.labels else []))

    def write(self, batch: Sequence[Prediction]) -> None:
        for p in batch:
            row = [p.path, f"{p.score:.6g}"]
            if self.labels:
                normalized = "" if p.score_normalized is None else f"{p.score_normalized:.6g}"
                row += [normalized, "anomalous" if p.label else "normal"]
            self.writer.writerow(row)
        self.fh.flush()


class ErrorsCSV(FileSink):
    """``path,error`` per file that could not be used."""

    def open(self) -> None:
        self.writer = csv.writer(self._create())
        self.writer.writerow(["path", "error"])

    def write_error(self, path: str, error: str) -> None:
        self.writer.writerow([path, error])
        self.fh.flush()


class ErrorLog(BaseSink):
    """``skipped: <error>`` on a stream (default stderr) per file that could not be used."""

    def __init__(self, stream: IO | None = None):
        self.stream = stream

    def write_error(self, path: str, error: str) -> None:
        print(f"skipped: {error}", file=self.stream or sys.stderr)


class MapsNpy(BaseSink):
    """Each anomaly map as float32 ``.npy`` under ``folder``, mirroring the source's tree (``item.name``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, batch: Sequence[Prediction]) -> None:
        for p in batch:
            name = PurePosixPath(p.item.name)
            if name.is_absolute() or ".." in name.parts or not name.parts:
                raise ValueError(f"{p.path}: its name {p.item.name!r} is not a relative path inside the source")
            target = (self.folder / name).with_suffix(".npy")
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, p.anomaly_map.astype(np.float32))


class ExplanationsJSON(FileSink):
    """A JSON list of each image's explanation (``Explanation.to_dict``), written as the images come.

    The text is that of ``json.dumps(list, indent=2)``; images without an explanation are left out.
    """

    def open(self) -> None:
        self._create().write("[")
        self.n = 0

    def write(self, batch: Sequence[Prediction]) -> None:
        for p in batch:
            if p.explanation is None:
                continue
            text = json.dumps(p.explanation.to_dict(), indent=2).replace("\n", "\n  ")
            self.fh.write(("\n  " if self.n == 0 else ",\n  ") + text)
            self.n += 1
        self.fh.flush()

    def close(self, summary) -> None:
        if self.fh is not None:
            self.fh.write("\n]" if self.n else "]")
        super().close(summary)


class HTMLReport(BaseSink):
    """The HTML report (``clad.report.ReportWriter``): each image's pictures as it comes, index.html at close.

    metrics: a dict, or a function called at close that returns one (e.g. the metrics another sink computed).
    ``page`` is the written index.html (None when no image came, or the run stopped early).
    """

    def __init__(self, folder: str | Path, title: str = "clad report", threshold: float | None = None,
                 pixel_threshold: float | None = None, references: Sequence[np.ndarray] | None = None,
                 metrics: dict | Callable[[], dict] | None = None):
        self.folder, self.title, self.threshold = Path(folder), title, threshold
        self.pixel_threshold, self.references, self.metrics = pixel_threshold, references, metrics
        self.page: Path | None = None

    def open(self) -> None:
        from clad.report import ReportWriter

        self.writer = ReportWriter(self.folder, self.title, threshold=self.threshold,
                                   pixel_threshold=self.pixel_threshold, references=self.references)

    def write(self, batch: Sequence[Prediction]) -> None:
        for p in batch:
            self.writer.add(p)

    def close(self, summary) -> None:
        if summary.error is not None or not len(self.writer):
            self.writer.discard()
            return
        metrics = self.metrics() if callable(self.metrics) else self.metrics
        self.page = self.writer.close(metrics=metrics)
