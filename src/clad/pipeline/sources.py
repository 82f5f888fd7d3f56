"""Sources: what a stream reads, listed cheaply; each ``Entry`` decodes its image only when ``load`` is called.

A source is any iterable of entries (``len`` is used for progress when it has one): a folder searched
recursively, a list of paths, a CSV manifest with a ``path`` column, a labelled dataset.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from clad.data.io import IMAGE_SUFFIXES, is_image_file, load_image
from clad.errors import DatasetError
from clad.types import Item


@dataclass(frozen=True)
class Entry:
    """One image file of a source, not yet decoded. name: its path relative to the source's root."""

    path: str
    name: str

    def load(self) -> Item:
        """Decode the image; raises ImageLoadError naming the file when it cannot."""
        return Item(image=load_image(self.path), path=self.path, name=self.name)


@dataclass(frozen=True)
class LabelledEntry(Entry):
    """Sample ``index`` of a labelled dataset (a ``Sequence[Sample]``: ``clad.data`` datasets, a list)."""

    dataset: Sequence = field(default=(), compare=False, repr=False)
    index: int = 0

    def load(self) -> Item:
        s = self.dataset[self.index]  # decodes image and mask; raises CladError naming the file
        return Item(image=s.image, path=s.path, name=self.name, label=s.label, mask=s.mask, defect_type=s.defect_type)


def from_folder(path: str | Path) -> list[Entry]:
    """Every image under ``path``, searched recursively and sorted (a single image file is a source of one)."""
    path = Path(path)
    if path.is_file():
        return [Entry(str(path), path.name)]
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if is_image_file(p))
    if not files:
        raise DatasetError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return [Entry(str(f), f.relative_to(path).as_posix()) for f in files]


def from_paths(paths: Sequence[str | Path], root: str | Path | None = None) -> list[Entry]:
    """The given image paths, in order; names are relative to ``root`` (default: the folder common to all)."""
    if not len(paths):
        raise DatasetError("no image paths given")
    return [Entry(str(p), name) for p, name in zip(paths, _names(paths, root))]


def _names(paths: Sequence[str | Path], root: str | Path | None) -> list[str]:
    """Each path relative to ``root`` (default: the folder common to all), as a POSIX path."""
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.abspath(root) if root is not None else os.path.commonpath([os.path.dirname(p) for p in absolute])
    names = []
    for p, a in zip(paths, absolute):
        rel = os.path.relpath(a, root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise DatasetError(f"{p}: not inside {root}")
        names.append(Path(rel).as_posix())
    return names


def from_manifest(manifest: str | Path) -> list[Entry]:
    """The images listed in the ``path`` column of a CSV file; relative paths are relative to the CSV's folder.

    Names (for mirrored outputs) are the paths as written when every image lies under the CSV's folder.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise DatasetError(f"{manifest}: no such file (CSV manifest)")
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise DatasetError(f"{manifest}: no 'path' column (columns: {', '.join(columns) or 'none'})")
        reader.fieldnames = columns
        paths = []
        for row in reader:
            value = (row.get("path") or "").strip()
            if not value:
                raise DatasetError(f"{manifest}, line {reader.line_num}: empty path")
            paths.append(manifest.parent / value)  # an absolute value replaces the folder
    if not paths:
        raise DatasetError(f"{manifest}: lists no images")
    folder = os.path.abspath(manifest.parent)
    inside = all(os.path.abspath(p).startswith(folder + os.sep) for p in paths)
    return from_paths(paths, root=folder if inside else None)


def from_dataset(dataset: Sequence) -> list[LabelledEntry]:
    """The samples of a labelled dataset, decoded lazily; its ``paths`` (when it has them) name failures."""
    paths = getattr(dataset, "paths", None)
    if paths is None:
        return [LabelledEntry(str(i), str(i), dataset, i) for i in range(len(dataset))]
    names = _names(paths, None) if len(paths) else []
    return [LabelledEntry(str(p), name, dataset, i) for i, (p, name) in enumerate(zip(paths, names))]


def open_source(spec: str | Path) -> list[Entry]:
    """A command line's input: a CSV manifest (``.csv``), an image, or a folder searched recursively."""
    path = Path(spec)
    if path.is_file() and path.suffix.lower() == ".csv":
        return from_manifest(path)
    return from_folder(path)
