"""A served model and its versions, kept in its own folder beside the files of ``clad fit``:

    MODEL_DIR/config.json, model.safetensors     version 1, as fitted (never modified)
    MODEL_DIR/.versions/NNNN/                    version NNNN >= 2: a saved detector + version.json
    MODEL_DIR/.versions/0001/version.json        version 1's record, written with the first other version
    MODEL_DIR/.versions/active.json              {"version": N}: the one served
    MODEL_DIR/.references/<sha256>.png           normal images known to the model (the closest normal patch)

A version is built under a temporary name in ``.versions`` and renamed into place whole, and ``active.json`` is
replaced by a rename, so a crash leaves either the old state or the new one. Hidden names keep all this out of
``clad predict``'s model identity (``folder_digest``). Version changes (threshold, teach, rollback) are serialised
by the slot's lock and, between processes serving the same folder (Ray Serve replicas, two stations), by an
exclusive ``flock`` on ``.versions/.lock``; the served ``Active`` is replaced whole, so a batch in flight finishes
on the one it took. A process notices another's change by ``active.json`` changing (one ``stat`` per batch,
``refresh``) and serves the new active version from then on.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clad.serve.db import iso

VERSIONS = ".versions"
REFERENCES = ".references"
ACTIVE_FILE = "active.json"
VERSION_FILE = "version.json"
LOCK_FILE = ".lock"


@dataclass
class Version:
    version: int
    created: str
    reason: str  # "initial" | "threshold" | "teach"
    parent: int | None
    threshold: float | None
    threshold_source: str | None
    n_references: int | None

    def to_json(self, active: int) -> dict:
        return {"version": self.version, "created": self.created, "reason": self.reason, "parent": self.parent,
                "threshold": self.threshold, "n_references": self.n_references, "active": self.version == active}


@dataclass
class Active:
    """What a batch runs on: one version's detector and its explainer (the closest-normal explainer and the
    reference images it points into are built on first use)."""

    version: Version
    detector: object
    explainer: object
    nearest: object | None = None
    references: list = field(default_factory=list)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_json(path: Path, doc: dict) -> None:
    """``doc`` to ``path`` through a synced temporary file renamed over it."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def warm(detector) -> None:
    """One prediction on a grey image: builds the backbone and fills the caches before the first request."""
    detector.predict([np.full((256, 256, 3), 128, np.uint8)], batch_size=1)


class ModelSlot:
    """One served model (``name`` = its folder's name) and its versions."""

    def __init__(self, folder: str | Path):
        from clad.detectors.base import load_detector

        self.folder = Path(os.path.abspath(folder))
        self.name = self.folder.name
        self.lock = threading.Lock()
        self.versions_dir = self.folder / VERSIONS
        self.references_dir = self.folder / REFERENCES
        self.initial = load_detector(self.folder)  # checks the folder: a bad one fails before the server starts
        self.active: Active | None = None
        self._seen: tuple | None = None  # active.json's identity when the served version was last checked

    # -- versions on disk -----------------------------------------------------------------------------------
    def _version_folder(self, n: int) -> Path:
        return self.folder if n == 1 else self.versions_dir / f"{n:04d}"

    def _initial_version(self) -> Version:
        det = self.initial
        created = iso(_mtime(self.folder / "config.json"))
        return Version(1, created, "initial", None, det.threshold_, det.threshold_source_,
                       getattr(det, "n_references_", None))

    def versions(self) -> list[Version]:
        found = {1: self._initial_version()}
        if self.versions_dir.is_dir():
            for d in self.versions_dir.iterdir():
                if d.name.isdigit() and (d / VERSION_FILE).is_file():
                    doc = json.loads((d / VERSION_FILE).read_text())
                    found[int(d.name)] = Version(**{k: doc.get(k) for k in Version.__dataclass_fields__})
        return [found[k] for k in sorted(found)]

    def version(self, n: int) -> Version | None:
        return next((v for v in self.versions() if v.version == n), None)

    def _active_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.versions_dir / ACTIVE_FILE)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def active_number(self) -> int:
        path = self.versions_dir / ACTIVE_FILE
        if path.is_file():
            n = int(json.loads(path.read_text())["version"])
            if n == 1 or (self._version_folder(n) / VERSION_FILE).is_file():
                return n
        return 1

    def lineage(self, n: int | None = None) -> list[int]:
        """``n`` (default: the active version) and its ancestors."""
        by_number = {v.version: v for v in self.versions()}
        n, seen = (self.active_number() if n is None else n), []
        while n is not None and n in by_number and n not in seen:
            seen.append(n)
            n = by_number[n].parent
        return seen

    def set_initial_references(self, n: int) -> None:
        """Record version 1's number of references (``clad serve --demo`` knows it; a fitted folder does not)."""
        folder = self.versions_dir / "0001"
        folder.mkdir(parents=True, exist_ok=True)
        v = self._initial_version()
        v.n_references = n
        _write_json(folder / VERSION_FILE, v.__dict__)

    def _write_version(self, det, reason: str, parent: int, n_references: int | None) -> Version:
        """Save ``det`` as the next version: built under a temporary name, renamed into place whole."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        first = self.versions_dir / "0001" / VERSION_FILE
        if not first.is_file():
            first.parent.mkdir(exist_ok=True)
            _write_json(first, self._initial_version().__dict__)
        while True:
            n = max(v.version for v in self.versions()) + 1
            v = Version(n, iso(_now()), reason, parent, det.threshold_, det.threshold_source_, n_references)
            tmp = self.versions_dir / f".{n:04d}.{secrets.token_hex(4)}.building"
            try:
                det.save(tmp)
                _write_json(tmp / VERSION_FILE, v.__dict__)
                try:
                    os.rename(tmp, self._version_folder(n))  # fails if another writer took n
                except OSError:
                    if self._version_folder(n).exists():
                        continue
                    raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            _fsync_dir(self.versions_dir)
            return v

    # -- serving --------------------------------------------------------------------------------------------
    def load(self, n: int | None = None) -> Active:
        """Load version ``n`` (default: the active one), warm it and serve it."""
        with self.lock:
            stamp = self._active_stamp()
            n = self.active_number() if n is None else n
            active = self._serve(self.version(n), self._detector(n))
            self._seen = stamp
            return active

    def _detector(self, n: int):
        from clad.detectors.base import load_detector

        return self.initial if n == 1 else load_detector(self._version_folder(n))

    def _serve(self, version: Version, det, warm_up: bool = True) -> Active:
        from clad.explain import Explainer

        if warm_up:  # not for a copy sharing the served backbone: two threads would run one module at once
            warm(det)
        # Without references the explainer needs no forward of its own (clad.explain: space "none"); the regions'
        # pixel threshold is the detector's own when its score is the map's maximum, else each image's (explained
        # one by one, so that an image's regions never depend on the batch it came in).
        active = Active(version, det, Explainer(det).fit())
        self.active = active
        return active

    def _activate(self, version: Version, det, warm_up: bool = True) -> Active:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.versions_dir / ACTIVE_FILE, {"version": version.version, "since": iso(_now())})
        self._seen = self._active_stamp()
        return self._serve(version, det, warm_up)

    def refresh(self, blocking: bool = True) -> bool:
        """Serve the active version on disk when another process changed it (``active.json`` changed since this
        one last looked); returns whether it changed. ``blocking`` False: skip it while this process is changing
        the version itself (the inference thread never waits for a teach)."""
        if self.active is None or self._active_stamp() == self._seen:
            return False
        if not self.lock.acquire(blocking=blocking):
            return False
        try:
            return self._refresh()
        finally:
            self.lock.release()

    def _refresh(self) -> bool:
        """``refresh`` with ``self.lock`` held."""
        stamp = self._active_stamp()
        if self.active is None or stamp == self._seen:
            return False
        n, cur = self.active_number(), self.active
        self._seen = stamp
        if n == cur.version.version:
            return False
        v = self.version(n)
        if v.reason == "threshold" and v.parent == cur.version.version:  # as set_threshold made it: no reload
            det = copy.copy(cur.detector)
            det.set_threshold(v.threshold)
            self._serve(v, det, warm_up=False)
        else:
            self._serve(v, self._detector(n))
        return True

    @contextlib.contextmanager
    def _changing(self):
        """The slot's lock, the folder's lock between processes, and the newest active version served: a change
        is always made on top of the latest one, whichever process made that."""
        import fcntl

        with self.lock:
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            with open(self.versions_dir / LOCK_FILE, "a") as fh:  # closing it releases the flock
                fcntl.flock(fh, fcntl.LOCK_EX)
                self._refresh()
                yield

    def set_threshold(self, threshold: float) -> Version:
        with self._changing():
            cur = self.active
            det = copy.copy(cur.detector)  # shares the fitted tensors and the backbone: only the threshold differs
            det.set_threshold(threshold)
            v = self._write_version(det, "threshold", cur.version.version, cur.version.n_references)
            self._activate(v, det, warm_up=False)
            return v

    def teach(self, images: list[np.ndarray], pngs: dict[str, bytes]) -> tuple[Version, float]:
        """Add normal ``images`` to a fresh copy of the active version's detector (``add_references``, which
        recalibrates the label-free threshold; a threshold an operator set is kept), save it as a new version and
        serve it. ``pngs``: the images' files by sha256, added to the model's references. Returns the version and
        the seconds ``add_references`` took."""
        from clad.detectors.base import load_detector

        with self._changing():
            cur = self.active
            det = load_detector(self._version_folder(cur.version.version))
            t0 = time.perf_counter()
            det = det.add_references(images)  # keeps a threshold an operator set
            seconds = time.perf_counter() - t0
            self.add_references(pngs)
            before = cur.version.n_references
            n_refs = getattr(det, "n_references_", None) or (None if before is None else before + len(images))
            v = self._write_version(det, "teach", cur.version.version, n_refs)
            self._activate(v, det)
            return v, seconds

    def rollback(self, n: int) -> Version:
        with self._changing():
            v = self.version(n)
            self._activate(v, self._detector(n))
            return v

    # -- references (the closest normal patch) ----------------------------------------------------------------
    def add_references(self, pngs: dict[str, bytes]) -> None:
        self.references_dir.mkdir(parents=True, exist_ok=True)
        for digest, data in pngs.items():
            path = self.references_dir / f"{digest}.png"
            if not path.exists():
                tmp = self.references_dir / f".{digest}.{secrets.token_hex(4)}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, path)

    def reference_images(self) -> list[np.ndarray]:
        from clad.data.io import load_image

        if not self.references_dir.is_dir():
            return []
        return [load_image(p) for p in sorted(self.references_dir.glob("*.png"))]


def _now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


def _mtime(path: Path):
    import datetime as dt

    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)
