"""Labelled image datasets: MVTec AD, VisA and a user's own folders, all one lazy ``Sequence[Sample]``.

Building a dataset only lists files; ``dataset[i]`` decodes image i and its mask. The cheap attributes
``paths``, ``labels``, ``defect_types`` and ``mask_paths`` never decode an image.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from clad.data.io import is_image_file, load_image, load_mask
from clad.errors import DatasetError
from clad.registry import datasets as dataset_schemes
from clad.specs import split_data_spec
from clad.types import Sample

SPLITS = ("train", "test")
VISA_CSV = Path("split_csv") / "1cls.csv"


def few_shot_paths(paths: Sequence[str | Path], n_shots: int | None, seed: int = 0) -> list[str]:
    """Draw ``n_shots`` of ``paths`` reproducibly: the same seed gives the same images, whatever the listing order.

    The paths are sorted, permuted by ``numpy.random.default_rng(seed)`` and the first ``n_shots`` kept (returned
    sorted), so for one seed a larger draw contains every smaller one. ``n_shots=None`` keeps them all, 0 none
    (zero-shot: a detector that fits without references).
    """
    ordered = sorted(str(p) for p in paths)
    if n_shots is None:
        return ordered
    if isinstance(n_shots, bool) or not isinstance(n_shots, (int, np.integer)) or n_shots < 0:
        raise DatasetError(f"n_shots must be 0 (zero-shot), a positive integer or None, got {n_shots!r}")
    if n_shots > len(ordered):
        raise DatasetError(f"n_shots={n_shots} but only {len(ordered)} image(s) are available")
    order = np.random.default_rng(seed).permutation(len(ordered))[: int(n_shots)]
    return [ordered[i] for i in sorted(order)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")


def _list_images(folder: Path) -> list[Path]:
    """Sorted image files directly inside ``folder``; an error naming it when it is missing or has none."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise DatasetError(f"{folder}: no images found")
    return files


def _few_shots(paths: list[Path], n_shots: int | None, seed: int, folder: Path) -> list[Path]:
    try:
        return [Path(p) for p in few_shot_paths(paths, n_shots, seed)]
    except DatasetError as e:
        raise DatasetError(f"{folder}: {e}") from None


class ImageDataset(Sequence):
    """A lazily loaded list of labelled images; the base of every dataset here.

    paths: image files. labels: (N,) int64, 0 good / 1 anomalous. defect_types: "good" or the defect name.
    mask_paths: the mask file of each image, None where it has none (good images: an all-False mask).
    """

    def __init__(self, name: str, category: str, paths, labels, defect_types, mask_paths, missing_masks=None):
        self.name = name
        self.category = category
        self.paths: list[str] = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.defect_types: list[str] = list(defect_types)
        self.mask_paths: list[str | None] = [None if m is None else str(m) for m in mask_paths]
        # index -> message, for anomalous images whose required mask is absent (raised when the image is loaded,
        # so one bad entry is reported per sample instead of making the whole set unusable)
        self._missing_masks: dict[int, str] = dict(missing_masks or {})
        n = len(self.paths)
        if not (len(self.labels) == len(self.defect_types) == len(self.mask_paths) == n):
            raise ValueError("paths, labels, defect_types and mask_paths must have the same length")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        if i in self._missing_masks:
            raise DatasetError(self._missing_masks[i])
        image = load_image(self.paths[i])  # (H, W, 3) uint8
        mask_path = self.mask_paths[i]
        if mask_path is None:
            mask = np.zeros(image.shape[:2], dtype=bool)
        else:
            mask = load_mask(mask_path, image.shape[:2])  # (H, W) bool, size-checked against the image
        return Sample(image=image, label=int(self.labels[i]), mask=mask, path=self.paths[i],
                      defect_type=self.defect_types[i])

    @property
    def n_anomalous(self) -> int:
        return int(self.labels.sum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, anomalous={self.n_anomalous})"


class MVTecAD(ImageDataset):
    """MVTec AD layout: ``root/category/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``.

    split="train" lists train/good, of which ``n_shots`` (None = all) are drawn with ``seed``; split="test"
    lists every test/<defect> folder (test/good is label 0). Any dataset in this layout works (e.g. magnetic tile).
    """

    def __init__(self, root: str | Path, category: str, split: str = "test", n_shots: int | None = None,
                 seed: int = 0):
        _check_split(split)
        if n_shots is not None and split != "train":
            raise DatasetError("n_shots draws reference images, so it needs split='train'")
        self.root = Path(root)
        base = self.root / category
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: no such folder (MVTec AD root)")
        if not base.is_dir():
            raise DatasetError(f"{base}: no such category folder")
        split_dir = base / split
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir}: no such folder")
        self.split, self.n_shots, self.seed = split, n_shots, seed

        paths, labels, types, masks, missing = [], [], [], [], {}
        if split == "train":
            paths = _few_shots(_list_images(split_dir / "good"), n_shots, seed, split_dir / "good")
            labels, types, masks = [0] * len(paths), ["good"] * len(paths), [None] * len(paths)
        else:
            defects = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not defects:
                raise DatasetError(f"{split_dir}: no defect folders (expected at least test/good)")
            for defect in defects:
                files = _list_images(split_dir / defect)
                for f in files:
                    if defect == "good":
                        mask = None
                    else:
                        mask = _find_mask(base / "ground_truth" / defect, f.stem)
                        if mask is None:
                            expected = base / "ground_truth" / defect / f"{f.stem}_mask.png"
                            missing[len(paths)] = f"{f}: its mask {expected} is missing"
                    paths.append(f)
                    labels.append(int(defect != "good"))
                    types.append(defect)
                    masks.append(mask)
        super().__init__(f"mvtec/{category}/{split}", category, paths, labels, types, masks, missing)


def _find_mask(folder: Path, stem: str) -> Path | None:
    """``<stem>_mask.png`` (the MVTec name) or ``<stem>.png`` in ``folder``, else None."""
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (folder / name).is_file():
            return folder / name
    return None


class VisA(ImageDataset):
    """VisA layout: ``root/split_csv/1cls.csv`` (object,split,label,image,mask; paths relative to root).

    label is "normal" or "anomaly"; anomalies get defect type "anomaly" and their mask (defective where > 0).
    split="train" lists the object's normal train images, of which ``n_shots`` are drawn with ``seed``.
    """

    def __init__(self, root: str | Path, category: str, split: str = "test", n_shots: int | None = None,
                 seed: int = 0):
        _check_split(split)
        if n_shots is not None and split != "train":
            raise DatasetError("n_shots draws reference images, so it needs split='train'")
        self.root = Path(root)
        self.split, self.n_shots, self.seed = split, n_shots, seed
        rows = _read_visa_csv(self.root)
        objects = sorted({r["object"] for r in rows})
        if category not in objects:
            raise DatasetError(f"{self.root / VISA_CSV}: no object {category!r}; objects: {', '.join(objects)}")
        rows = [r for r in rows if r["object"] == category and r["split"] == split]
        if split == "train":
            rows = [r for r in rows if r["label"] == "normal"]
        if not rows:
            raise DatasetError(f"{self.root / VISA_CSV}: no {split} images for object {category!r}")

        paths, labels, types, masks, missing = [], [], [], [], {}
        if split == "train":
            paths = _few_shots([self.root / r["image"] for r in rows], n_shots, seed, self.root / category)
            labels, types, masks = [0] * len(paths), ["good"] * len(paths), [None] * len(paths)
        else:
            for r in sorted(rows, key=lambda r: r["image"]):
                image = self.root / r["image"]
                anomalous = r["label"] == "anomaly"
                mask = self.root / r["mask"] if anomalous and r["mask"] else None
                if anomalous and (mask is None or not mask.is_file()):
                    where = f"its mask {mask} is missing" if mask is not None else "the csv gives it no mask"
                    missing[len(paths)] = f"{image}: {where}"
                    mask = None
                paths.append(image)
                labels.append(int(anomalous))
                types.append("anomaly" if anomalous else "good")
                masks.append(mask)
        super().__init__(f"visa/{category}/{split}", category, paths, labels, types, masks, missing)


def _read_visa_csv(root: Path) -> list[dict[str, str]]:
    path = root / VISA_CSV
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (VisA root)")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (the VisA split file)")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"object", "split", "label", "image", "mask"}
        header = {h.strip() for h in (reader.fieldnames or [])}
        if not need <= header:
            raise DatasetError(f"{path}: missing column(s) {', '.join(sorted(need - header))}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    for n, r in enumerate(rows, start=2):
        if r["label"] not in ("normal", "anomaly"):
            raise DatasetError(f"{path}, line {n}: label must be 'normal' or 'anomaly', got {r['label']!r}")
        if r["split"] not in SPLITS:
            raise DatasetError(f"{path}, line {n}: split must be 'train' or 'test', got {r['split']!r}")
    return rows


class ImageFolder(ImageDataset):
    """A user's own folders: images in ``good_dir`` are good (label 0), images in ``defect_dir`` anomalous.

    defect_dir's subfolders are defect types (images directly in it have type "defect"). Masks are looked up in
    ``mask_dir`` by stem (``<stem>.png`` or ``<stem>_mask.png``, in the same subfolder as the image); without a
    mask_dir a defective image gets an all-False mask, with one a missing mask is an error naming the image.
    ``n_shots``/``seed`` draw that many of the good images (reference sets, so only without defect_dir).
    """

    def __init__(self, good_dir: str | Path, defect_dir: str | Path | None = None,
                 mask_dir: str | Path | None = None, n_shots: int | None = None, seed: int = 0,
                 category: str | None = None):
        if n_shots is not None and defect_dir is not None:
            raise DatasetError("n_shots draws reference images, so it cannot be combined with defect_dir")
        good_dir = Path(good_dir)
        self.good_dir, self.n_shots, self.seed = good_dir, n_shots, seed
        self.defect_dir = None if defect_dir is None else Path(defect_dir)
        self.mask_dir = None if mask_dir is None else Path(mask_dir)
        if self.mask_dir is not None and not self.mask_dir.is_dir():
            raise DatasetError(f"{self.mask_dir}: no such folder (mask folder)")

        paths = _few_shots(_list_images(good_dir), n_shots, seed, good_dir)
        labels, types, masks, missing = [0] * len(paths), ["good"] * len(paths), [None] * len(paths), {}
        if self.defect_dir is not None:
            for f, defect, sub in self._defect_images():
                mask = None
                if self.mask_dir is not None:
                    mask = _find_mask(self.mask_dir / sub, f.stem)
                    if mask is None:
                        expected = self.mask_dir / sub / f"{f.stem}.png"
                        missing[len(paths)] = f"{f}: no mask {expected} (or {f.stem}_mask.png) in the mask folder"
                paths.append(f)
                labels.append(1)
                types.append(defect)
                masks.append(mask)
        category = category or good_dir.resolve().name
        super().__init__(f"folder/{category}", category, paths, labels, types, masks, missing)

    def _defect_images(self) -> list[tuple[Path, str, str]]:
        """(image, defect type, subfolder relative to defect_dir) for every defective image."""
        root = self.defect_dir
        if not root.is_dir():
            raise DatasetError(f"{root}: no such folder")
        found = [(f, "defect", "") for f in sorted(root.iterdir()) if is_image_file(f)]
        for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            found += [(f, sub.name, sub.name) for f in sorted(sub.iterdir()) if is_image_file(f)]
        if not found:
            raise DatasetError(f"{root}: no images found (directly or in its subfolders)")
        return found


@dataclass(frozen=True)
class DatasetScheme:
    """How a ``SCHEME:LOCATION`` dataset spec opens: what the ``clad.datasets`` registry holds per scheme.

    open(location, category, split, n_shots=, seed=) -> ImageDataset. categories(location) -> the category
    names, or None for a scheme without categories (then ``category`` is optional).
    """

    open: Callable[..., ImageDataset]
    categories: Callable[[str], list[str]] | None = None


def _mvtec_categories(location: str) -> list[str]:
    """Subfolders of an MVTec AD root that hold train/good."""
    root = Path(location)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (MVTec AD root)")
    return sorted(d.name for d in root.iterdir() if (d / "train" / "good").is_dir())


def _visa_categories(location: str) -> list[str]:
    """Objects named in a VisA root's split csv."""
    return sorted({r["object"] for r in _read_visa_csv(Path(location))})


def _open_folder(location: str, category: str | None, split: str, n_shots: int | None = None,
                 seed: int = 0) -> ImageFolder:
    """``GOOD[,DEFECT[,MASKS]]``: split="train" is the good images (``n_shots`` of them), "test" good + defect."""
    parts = [p.strip() for p in location.split(",")]
    if len(parts) > 3 or not all(parts):
        raise DatasetError(f"folder spec {'folder:' + location!r}: expected folder:GOOD_DIR[,DEFECT_DIR[,MASK_DIR]]")
    good, defect, masks = (parts + [None, None])[:3]
    if split == "train":
        return ImageFolder(good, n_shots=n_shots, seed=seed, category=category)
    if n_shots is not None:
        raise DatasetError("n_shots draws reference images, so it needs split='train'")
    return ImageFolder(good, defect, masks, category=category)


MVTEC = DatasetScheme(MVTecAD, _mvtec_categories)
VISA = DatasetScheme(VisA, _visa_categories)
FOLDER = DatasetScheme(_open_folder)


def resolve_dataset_spec(spec: str) -> tuple[str, DatasetScheme, str]:
    """``"mvtec:ROOT"`` -> ("mvtec", its registered DatasetScheme, "ROOT")."""
    name, parts = split_data_spec(spec)
    return name, dataset_schemes.get(name), ",".join(parts)


def open_dataset(spec: str, category: str | None, split: str, n_shots: int | None = None,
                 seed: int = 0) -> ImageDataset:
    """Open a dataset from a command-line spec: "mvtec:ROOT", "visa:ROOT", "folder:GOOD[,DEFECT[,MASKS]]" or the
    scheme of a registered plugin. A scheme with categories needs ``category``.
    """
    name, scheme, location = resolve_dataset_spec(spec)
    _check_split(split)
    if scheme.categories is not None and not category:
        raise DatasetError(f"{name}: a category is needed (--category); available: "
                           f"{', '.join(scheme.categories(location))}")
    return scheme.open(location, category, split, n_shots=n_shots, seed=seed)


def list_categories(spec: str) -> list[str]:
    """Categories of a "mvtec:ROOT" (subfolders holding train/good) or "visa:ROOT" (objects in its csv) spec."""
    name, scheme, location = resolve_dataset_spec(spec)
    if scheme.categories is None:
        raise DatasetError(f"{name}: datasets have no categories")
    return scheme.categories(location)
