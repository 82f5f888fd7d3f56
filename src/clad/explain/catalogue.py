"""A defect catalogue: a few annotated examples per defect type, which make the type names visual.

Folder layout read by ``Catalogue.from_folder(root)``::

    root/<defect type>/<image>               1-3 examples per type (any number >= 1 is accepted)
    root/<defect type>/masks/<stem>.png      its mask (or masks/<stem>_mask.png) ...
    root/<defect type>/<stem>_mask.png       ... or beside the image

A mask is defective where > 0 and must have the image's size. Files named ``*_mask.*`` are masks, never
examples; a type folder's hidden files and subfolders other than ``masks/`` are ignored. An example without a
mask is an error that names the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from clad.data.io import is_image_file, load_image, load_mask
from clad.errors import DatasetError
from clad.types import Sample


@dataclass
class Example:
    """One catalogue example. image: (H, W, 3) uint8; mask: (H, W) bool, True on the defect."""

    defect_type: str
    image: np.ndarray
    mask: np.ndarray
    path: str = ""


class Catalogue:
    """Annotated defect examples grouped by type; ``defect_types`` lists the types in sorted order."""

    def __init__(self, examples: Iterable[Example]):
        self.examples: list[Example] = list(examples)
        for e in self.examples:
            if e.mask.shape != e.image.shape[:2]:
                raise ValueError(f"{e.path or e.defect_type}: mask {e.mask.shape} does not match image {e.image.shape[:2]}")
            if not e.mask.any():
                raise ValueError(f"{e.path or e.defect_type}: the mask marks no defective pixel")
        if not self.examples:
            raise ValueError("a catalogue needs at least one example")

    @property
    def defect_types(self) -> list[str]:
        return sorted({e.defect_type for e in self.examples})

    def of_type(self, defect_type: str) -> list[Example]:
        return [e for e in self.examples if e.defect_type == defect_type]

    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        counts = ", ".join(f"{t}: {len(self.of_type(t))}" for t in self.defect_types)
        return f"Catalogue({counts})"

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> "Catalogue":
        """Examples from labelled samples (their ``defect_type`` and ``mask``); good samples are skipped."""
        return cls(Example(s.defect_type, s.image, np.asarray(s.mask, bool), s.path)
                   for s in samples if s.label and s.defect_type != "good")

    @classmethod
    def from_folder(cls, root: str | Path) -> "Catalogue":
        """Read a folder per defect type (layout in the module docstring)."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: no such folder (defect catalogue)")
        examples = []
        for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            images = [p for p in sorted(folder.iterdir()) if is_image_file(p) and not p.stem.endswith("_mask")]
            if not images:
                raise DatasetError(f"{folder}: no example images")
            for p in images:
                image = load_image(p)
                examples.append(Example(folder.name, image, load_mask(_mask_of(p), image.shape[:2]), str(p)))
        if not examples:
            raise DatasetError(f"{root}: no defect type folders")
        return cls(examples)


def _mask_of(image: Path) -> Path:
    folder, stem = image.parent, image.stem
    candidates = [folder / "masks" / f"{stem}{s}" for s in (".png", "_mask.png")]
    candidates += sorted(folder.glob(f"{stem}_mask.*"))
    for c in candidates:
        if c.is_file():
            return c
    raise DatasetError(f"{image}: no mask (looked for masks/{stem}.png, masks/{stem}_mask.png, {stem}_mask.png)")
