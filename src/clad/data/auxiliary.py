"""Auxiliary training data: labelled real defects of other categories of a dataset, for CLAD's ``aux`` option."""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from clad.data.datasets import list_categories, open_dataset, resolve_dataset_spec
from clad.errors import DatasetError


def load_aux(spec: str, exclude_category: str | None, n: int, seed: int, size: int):
    """Up to ``n`` labelled defective images of a dataset spec ("mvtec:ROOT", "visa:ROOT", "folder:GOOD,DEFECT,MASKS"),
    drawn seeded and round-robin over its categories and defect types, never from ``exclude_category``.

    Returns (images (size, size, 3) uint8, masks (size, size) bool, defect types). An unreadable image or mask is
    skipped with a warning naming it.
    """
    if resolve_dataset_spec(spec)[1].categories is None:  # e.g. folder: one set, no categories
        sets = [open_dataset(spec, None, "test")]
    else:
        if not exclude_category:
            raise DatasetError(f"aux={spec!r}: set the evaluated category (config 'category'), so that its own "
                             "images are never used for training")
        cats = [c for c in list_categories(spec) if c != exclude_category]
        if not cats:
            raise DatasetError(f"aux={spec!r}: no category other than {exclude_category!r} to train on")
        sets = [open_dataset(spec, c, "test") for c in cats]
    rng = np.random.default_rng(seed)
    groups = []  # one seeded queue of defective images per (category, defect type)
    for ds in sets:
        for t in sorted({d for d, y in zip(ds.defect_types, ds.labels) if y}):
            idx = [i for i, (d, y) in enumerate(zip(ds.defect_types, ds.labels)) if y and d == t]
            groups.append([(ds, int(i)) for i in rng.permutation(idx)])
    if not groups:
        raise DatasetError(f"aux={spec!r}: no labelled defective images found")
    picks = []
    for r in range(max(len(g) for g in groups)):
        picks += [g[r] for g in groups if r < len(g)]
    images, masks, types = [], [], []
    for ds, i in picks:
        if len(images) == n:
            break
        try:
            sample = ds[i]
        except Exception as exc:  # a bad file costs one example, not the training run
            warnings.warn(f"aux: skipping {ds.paths[i]}: {exc}", stacklevel=2)
            continue
        images.append(np.asarray(Image.fromarray(sample.image).resize((size, size), Image.BILINEAR)))
        masks.append(np.asarray(Image.fromarray(sample.mask).resize((size, size), Image.NEAREST)))
        types.append(sample.defect_type)
    return images, masks, types
