"""Sources: what a stream reads, listed cheaply; each ``Entry`` decodes its image only when ``load`` is called.

A source is any iterable of entries (``len`` is used for progress when it has one): a folder searched
recursively, a list of paths, a CSV manifest with a ``path`` column, a labelled dataset. Nothing is dropped
silently: a file that cannot be used (an unsupported format, a dangling symbolic link, a symbolic link loop, a
folder that cannot be listed, a path listed twice) is an ``Unusable`` entry, reported as skipped with its reason.
"""
from __future__ import annotations

import csv
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

from clad.data.io import IMAGE_SUFFIXES, load_image
from clad.errors import DatasetError, ImageLoadError
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


@dataclass(frozen=True)
class Unusable(Entry):
    """A file of a source that cannot be used; ``load`` raises ImageLoadError with the reason."""

    reason: str = ""

    def load(self) -> Item:
        raise ImageLoadError(f"{self.path}: {self.reason}")


SUPPORTED = ", ".join(sorted(IMAGE_SUFFIXES))


def _link_problem(path: str) -> str | None:
    """Why the symbolic link ``path`` cannot be followed, or None when it can (or is no link)."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"dangling symbolic link (to {os.readlink(path)}, which does not exist)"
    return None


def _walk(root: str) -> list[Entry]:
    """Every non-hidden file under ``root``, following symbolic links but never into a folder already listed."""
    entries: list[Entry] = []

    def skip(path: str, reason: str) -> None:
        entries.append(Unusable(path, Path(os.path.relpath(path, root)).as_posix(), reason))

    def on_error(e: OSError) -> None:
        skip(e.filename, f"cannot list this folder ({e.strerror or e})")

    st = os.stat(root)
    listed = {(st.st_dev, st.st_ino): root}  # (device, inode) of each folder listed -> its path
    for folder, dirs, files in os.walk(root, followlinks=True, onerror=on_error):
        keep = []
        for d in sorted(dirs):
            full = os.path.join(folder, d)
            if d.startswith("."):
                continue
            try:
                st = os.stat(full)
            except OSError:
                skip(full, _link_problem(full) or "cannot be read")
                continue
            seen = listed.get((st.st_dev, st.st_ino))
            if seen is not None:
                target = os.path.realpath(full)
                if (os.path.realpath(folder) + os.sep).startswith(target.rstrip(os.sep) + os.sep):
                    skip(full, f"symbolic link loop (to {target}, a folder above it)")
                else:
                    skip(full, f"a folder already listed (as {seen})")
                continue
            listed[(st.st_dev, st.st_ino)] = full
            keep.append(d)
        dirs[:] = keep
        for f in files:
            full = os.path.join(folder, f)
            if f.startswith("."):
                continue
            name = Path(os.path.relpath(full, root)).as_posix()
            problem = _link_problem(full)
            if problem:
                skip(full, problem)
            elif not os.path.isfile(full):
                skip(full, "not a regular file")
            elif Path(f).suffix.lower() not in IMAGE_SUFFIXES:
                skip(full, f"unsupported format ({Path(f).suffix.lower() or 'no extension'}; supported: {SUPPORTED})")
            else:
                entries.append(Entry(full, name))
    return sorted(entries, key=lambda e: PurePosixPath(e.name).parts)


def from_folder(path: str | Path) -> list[Entry]:
    """Every image under ``path``, searched recursively and sorted (a single image file is a source of one).

    Symbolic links are followed, to files and folders, but a folder is never listed twice (so a link loop ends).
    Hidden files and folders (a name starting with '.') are left out; every other file that is not a supported
    image is an ``Unusable`` entry saying why.
    """
    path = Path(path)
    problem = _link_problem(str(path))
    if problem:
        raise DatasetError(f"{path}: {problem}")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(f"{path}: unsupported format ({path.suffix.lower() or 'no extension'}; "
                               f"supported: {SUPPORTED})")
        return [Entry(str(path), path.name)]
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or folder")
    entries = _walk(str(path))
    if not any(type(e) is Entry for e in entries):
        skipped = [e for e in entries if isinstance(e, Unusable)]
        why = f"; {len(skipped)} other file(s), e.g. {skipped[0].name}: {skipped[0].reason}" if skipped else ""
        raise DatasetError(f"{path}: no images found (looked for {SUPPORTED}){why}")
    return entries


def from_paths(paths: Sequence[str | Path], root: str | Path | None = None) -> list[Entry]:
    """The given image paths, in order; names are relative to ``root`` (default: the folder common to all).

    A path given again (the same file, by the same absolute path) is an ``Unusable`` entry: it is done once.
    """
    if not len(paths):
        raise DatasetError("no image paths given")
    entries, first = [], {}
    for p, name in zip(paths, _names(paths, root)):
        seen = first.setdefault(os.path.abspath(p), len(entries) + 1)
        if seen != len(entries) + 1:
            entries.append(Unusable(str(p), name, f"listed twice (first as entry {seen})"))
        else:
            entries.append(Entry(str(p), name))
    return entries


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
