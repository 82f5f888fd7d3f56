"""Datasets (MVTec AD, VisA, image folders), a synthetic MVTec-layout set, and robust image/mask reading."""
from clad.data.datasets import (
    DatasetScheme,
    ImageDataset,
    ImageFolder,
    MVTecAD,
    VisA,
    few_shot_paths,
    list_categories,
    open_dataset,
    resolve_dataset_spec,
)
from clad.data.io import as_rgb, load_image, load_mask
from clad.data.synthetic import make_synthetic_mvtec, synthetic_images

__all__ = [
    "DatasetScheme",
    "ImageDataset",
    "ImageFolder",
    "MVTecAD",
    "VisA",
    "as_rgb",
    "few_shot_paths",
    "list_categories",
    "load_image",
    "load_mask",
    "make_synthetic_mvtec",
    "open_dataset",
    "resolve_dataset_spec",
    "synthetic_images",
]
