"""A run folder: the outputs of one streaming run (``clad predict --out``), held by one writer, with the record of
what made them, and the resumption of a run that was interrupted.

    with RunFolder(out, identity={"model_sha256": ..., "threshold": ...}, resume=True) as run:
        sinks = [MapsNpy(run.folder / "maps", merge=run.resume), PredictionsCSV(..., append=run.resume), run.record()]
        Pipeline(detector, sinks).run(run.todo(source))
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

from clad.errors import OutputError
from clad.pipeline.outputs import output_lock
from clad.pipeline.sinks import RUN_FORMAT, RunRecord
from clad.pipeline.sources import Entry

RECORD = "run.json"


def read_done(path: str | Path) -> list[str]:
    """The ``path`` column of a predictions CSV (empty when there is no file): the images a run finished."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if "path" not in (reader.fieldnames or []):
            raise OutputError(f"{path}: no 'path' column, so it cannot be resumed")
        return [row["path"] for row in reader]


class RunFolder:
    """The output folder of a run, held with ``outputs.output_lock`` for as long as the ``with`` block lasts.

    identity: what must match for a run to be resumed (e.g. the model's digest, the input, the settings); info:
    more to record. ``previous`` is the record (``run.json``) found there, if any. With ``resume``, ``done`` holds
    the paths the previous run finished (the ``path`` column of ``done_file``, made absolute from the working
    folder it ran in) and ``todo`` leaves them out; a folder without a record, or whose record has another
    identity, is refused (OutputError). defaults: the value of an identity key in a record written before that
    key existed (e.g. {"maps": "npy"}), so that such a run still resumes.
    """

    def __init__(self, folder: str | Path, identity: dict, info: dict | None = None, resume: bool = False,
                 done_file: str = "predictions.csv", what: str = "--out", defaults: dict | None = None):
        self.folder, self.resume, self.done_file, self.what = Path(folder), resume, done_file, what
        self.defaults = dict(defaults or {})
        self.identity = json.loads(json.dumps(identity))  # as it reads back from run.json (tuples -> lists)
        self.info = dict(info or {}, cwd=os.getcwd())  # what relative paths in the outputs are relative to
        self.previous: dict | None = None
        self.done: set[str] = set()

    def __enter__(self) -> "RunFolder":
        self._lock = output_lock(self.folder, "folder", self.what)
        self.folder = self._lock.__enter__()
        try:
            self._open()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def _open(self) -> None:
        try:
            doc = json.loads((self.folder / RECORD).read_text())
            self.previous = doc if isinstance(doc, dict) and doc.get("format") == RUN_FORMAT else None
        except (OSError, ValueError):
            self.previous = None
        if not self.resume:
            return
        if self.previous is None:
            raise OutputError(f"--resume: {self.folder} holds no run to resume (no readable {RECORD})")
        for key, value in self.identity.items():
            old = self.previous.get(key, self.defaults.get(key))
            if old != value:
                if key.endswith("sha256"):  # a digest: its first digits tell them apart
                    old, value = f"{str(old)[:12]}...", f"{str(value)[:12]}..."
                raise OutputError(f"--resume: the run in {self.folder} was made with {key} {old!r}, this one has "
                                  f"{value!r}; run with the same, or without --resume to start afresh")
        cwd = self.previous.get("cwd") or os.getcwd()
        self.done = {os.path.normpath(os.path.join(cwd, p)) for p in read_done(self.folder / self.done_file)}

    @property
    def interrupted_before(self) -> bool:
        """Whether the folder holds the outputs of an interrupted run."""
        return self.previous is not None and self.previous.get("status") == "incomplete"

    def todo(self, entries: Sequence[Entry]) -> list[Entry]:
        """The entries not done yet."""
        return [e for e in entries if os.path.abspath(e.path) not in self.done]

    def record(self) -> RunRecord:
        """The sink writing this run's ``run.json`` (put it last); a resumed run adds the counts of the previous."""
        return RunRecord(self.folder / RECORD, {**self.identity, **self.info},
                         before=self.previous if self.resume else None)
