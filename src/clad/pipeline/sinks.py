"""Sinks: where a stream's predictions and failures go, one batch at a time.

Every sink has ``open()``, ``write(batch)`` (a list of ``Prediction``), ``write_error(path, error)`` and
``close(summary)`` (``summary.error`` is set when the run stopped early). A new output (a database, Parquet) is a
new sink; the flow does not change.

Outputs appear whole or not at all: a file sink writes under a temporary name (``FileSink._create``) renamed over
its file at close (``FileSink.close``), a folder sink builds its folder in a staging folder moved into place at
close (``outputs.Staging``). They are kept when the run ended or was interrupted (``Summary.kept``: what was
finished), and dropped when it stopped on an error, which leaves the previous outputs as they were.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path, PurePosixPath
from typing import IO, Callable, Protocol, Sequence

import numpy as np

from clad.errors import DatasetError, OutputError
from clad.pipeline.maps import check_format, write_map
from clad.pipeline.outputs import Staging, atomic_write, replace_file, temporary_name
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
    """A sink that writes one text file at ``path``, through a temporary file renamed over it at close when the
    run's outputs are kept. append: start from the previous file's content (a resumed run); ``appended`` says
    whether there was one."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path, self.append = Path(path), append
        self.fh: IO | None = None
        self.appended = False

    def _create(self, copy: bool | None = None) -> IO:
        """Open the temporary file; copy (default: ``append``): start it with the previous file's content."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_name(self.path)
        self.appended = (self.append if copy is None else copy) and self.path.is_file()
        if self.appended:
            shutil.copyfile(self.path, self.tmp)
        self.fh = open(self.tmp, "a" if self.appended else "w", newline="")
        return self.fh

    def _finish(self) -> None:
        """The last words of a file that is kept (e.g. a closing bracket)."""

    def close(self, summary) -> None:
        if self.fh is None:
            return
        try:
            try:
                if summary.kept:
                    self._finish()
            finally:
                self.fh.close()
                self.fh = None
            if summary.kept:
                replace_file(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


class PredictionsCSV(FileSink):
    """``path,score[,score_normalized,label]`` per image (scores to 6 significant digits; with ``labels``, i.e.
    when the detector has a threshold, the score on the scale where the threshold is 0.5, empty for a model saved
    without that scale, and the label "anomalous"/"normal"). Flushed after each batch; put it after the sinks whose
    outputs its rows stand for (maps, explanations), so that a row means its image is done (``read_done``)."""

    def __init__(self, path: str | Path, labels: bool = False, append: bool = False):
        super().__init__(path, append)
        self.labels = labels

    def open(self) -> None:
        self.writer = csv.writer(self._create())
        if not self.appended:
            self.writer.writerow(["path", "score"] + (["score_normalized", "label"] if self.labels else []))

    def write(self, batch: Sequence[Prediction]) -> None:
        for p in batch:
            row = [p.path, f"{p.score:.6g}"]
            if self.labels:
                normalized = "" if p.score_normalized is None else f"{p.score_normalized:.6g}"
                row += [normalized, "anomalous" if p.label else "normal"]
            self.writer.writerow(row)
        self.fh.flush()


class PredictionsParquet(BaseSink):
    """``predictions.parquet``: the rows of the predictions CSV at ``csv_path``, typed (path and label strings,
    scores float64, an empty normalised score null), written from the final CSV when the run closes, through a
    temporary file renamed over it: so it always holds what the CSV holds, after an interruption and a resume too.
    Put it after the ``PredictionsCSV`` it reads. Needs pyarrow (``parquet_available``)."""

    def __init__(self, path: str | Path, csv_path: str | Path):
        self.path, self.csv_path = Path(path), Path(csv_path)

    def close(self, summary) -> None:
        if summary.kept and self.csv_path.is_file():
            write_parquet(self.csv_path, self.path)


def parquet_available() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def write_parquet(csv_path: Path, path: Path) -> Path:
    """The predictions CSV ``csv_path`` as Parquet at ``path`` (atomically), its score columns as float64."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None) or []
        columns = list(zip(*reader)) or [()] * len(header)
    arrays = []
    for name, values in zip(header, columns):
        if name.startswith("score"):
            arrays.append(pa.array([float(v) if v != "" else None for v in values], pa.float64()))
        else:
            arrays.append(pa.array(list(values), pa.string()))
    tmp = temporary_name(path)
    try:
        pq.write_table(pa.Table.from_arrays(arrays, names=header), tmp)
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
    """Each anomaly map as ``<folder>/<item.name><suffix>``: the image's path relative to the source's root,
    extension included (``maps/sub/img.tiff.npy``), so every image has its own map and the name leads back to it.

    format: ``clad.pipeline.maps.MAP_FORMATS``: "npy" float32 ``.npy`` (default), "float16" ``.npy``, "png16"
    16-bit ``.png`` with its value range (``read_map`` reads each back), "none" no folder (a previous one is
    removed at close, as any output this run does not make). The folder is built in a staging folder and replaces
    the previous one at close; merge (a resumed run): the new maps join the previous folder's instead.
    """

    def __init__(self, folder: str | Path, merge: bool = False, format: str = "npy"):
        self.folder, self.merge, self.format = Path(folder), merge, check_format(format)

    def open(self) -> None:
        self.staging = Staging(self.folder.parent, self.folder.name)
        self.root = self.staging.open() / self.folder.name
        if self.format != "none":
            self.root.mkdir()

    def write(self, batch: Sequence[Prediction]) -> None:
        if self.format == "none":
            return
        for p in batch:
            name = PurePosixPath(p.item.name)
            if name.is_absolute() or ".." in name.parts or not name.parts:
                raise DatasetError(f"{p.path}: its name {p.item.name!r} is not a relative path inside the source")
            target = self.root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            write_map(target, p.anomaly_map, self.format)

    def close(self, summary) -> None:
        if not summary.kept:
            self.staging.discard()
        elif self.merge and self.folder.is_dir():
            if self.format == "none":
                self.staging.discard()
            else:
                self.staging.merge(self.folder.name)
        else:
            self.staging.publish([self.folder.name])


class ExplanationsJSON(FileSink):
    """A JSON list of each image's explanation (``Explanation.to_dict``), written as the images come.

    The text is that of ``json.dumps(list, indent=2)``; images without an explanation are left out. append: the
    previous file's explanations come first (a resumed run).
    """

    def open(self) -> None:
        previous = self._previous() if self.append else []
        self._create(copy=False).write("[")  # the previous list is written again, not copied: its "]" ends it
        self.n = 0
        for doc in previous:
            self._put(doc)

    def _previous(self) -> list:
        if not self.path.is_file():
            return []
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise OutputError(f"{self.path}: cannot resume from it ({e})") from None
        if not isinstance(doc, list):
            raise OutputError(f"{self.path}: cannot resume from it (not a JSON list)")
        return doc

    def _put(self, doc: dict) -> None:
        text = json.dumps(doc, indent=2).replace("\n", "\n  ")
        self.fh.write(("\n  " if self.n == 0 else ",\n  ") + text)
        self.n += 1

    def write(self, batch: Sequence[Prediction]) -> None:
        for p in batch:
            if p.explanation is not None:
                self._put(p.explanation.to_dict())
        self.fh.flush()

    def _finish(self) -> None:
        self.fh.write("\n]" if self.n else "]")


class HTMLReport(BaseSink):
    """The HTML report (``clad.report.ReportWriter``): each image's pictures as it comes, index.html at close.

    metrics: a dict, or a function called at close that returns one (e.g. the metrics another sink computed).
    ``page`` is the written index.html (None when no image came, or the run stopped early: the previous report
    stays). The report is built in a staging folder inside ``folder``; at close its files replace the previous
    report's (``REPORT_FILES``, index.html last), other files in ``folder`` are left alone.
    """

    REPORT_FILES = ("images", "histogram.png", "roc.png", "index.html")  # what ReportWriter writes

    def __init__(self, folder: str | Path, title: str = "clad report", threshold: float | None = None,
                 pixel_threshold: float | None = None, references: Sequence[np.ndarray] | None = None,
                 metrics: dict | Callable[[], dict] | None = None):
        self.folder, self.title, self.threshold = Path(folder), title, threshold
        self.pixel_threshold, self.references, self.metrics = pixel_threshold, references, metrics
        self.page: Path | None = None

    def open(self) -> None:
        from clad.report import ReportWriter

        self.staging = Staging(self.folder, "report")
        self.writer = ReportWriter(self.staging.open(), self.title, threshold=self.threshold,
                                   pixel_threshold=self.pixel_threshold, references=self.references)

    def write(self, batch: Sequence[Prediction]) -> None:
        for p in batch:
            self.writer.add(p)

    def close(self, summary) -> None:
        try:
            if summary.error is not None or not len(self.writer):
                self.writer.discard()
                return
            metrics = self.metrics() if callable(self.metrics) else self.metrics
            self.writer.close(metrics=metrics)
            self.staging.publish(self.REPORT_FILES)
            self.page = self.folder / "index.html"
        finally:
            self.staging.discard()


class RunRecord(BaseSink):
    """``run.json`` beside a run's outputs: what made them (``info``: e.g. the model's digest, the input, the
    settings) and how the run ended: "complete", or "incomplete" when it was interrupted (``--resume`` goes on),
    with the images scored, skipped and flagged and the seconds it took (``before``: those of the run it
    resumes, added). Written at close, when the outputs are kept; put it last."""

    def __init__(self, path: str | Path, info: dict, before: dict | None = None):
        self.path, self.info, self.before = Path(path), info, before or {}
        self.doc: dict | None = None

    def close(self, summary) -> None:
        if not summary.kept:
            return
        before = self.before
        self.doc = dict(
            format=RUN_FORMAT, status="incomplete" if summary.interrupted else "complete", **self.info,
            scored=before.get("scored", 0) + summary.n_scored, skipped=summary.n_skipped,
            flagged=before.get("flagged", 0) + summary.n_flagged,
            seconds=round(before.get("seconds", 0.0) + summary.seconds, 3),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        atomic_write(self.path, json.dumps(self.doc, indent=2) + "\n")


RUN_FORMAT = "clad-run"
