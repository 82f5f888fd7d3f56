"""The one feature contract every visual backbone follows.

A backbone is a torch module that turns a preprocessed batch (B, 3, H, W) into named multi-scale feature maps,
and owns the preprocessing (resize + normalisation) that belongs to its weights.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clad.data.io import as_rgb
from clad.types import ImageLike


@dataclass(frozen=True)
class FeatureInfo:
    """One named feature map: its channels and its stride (reduction) w.r.t. the input."""

    name: str
    channels: int
    stride: int


class Backbone(nn.Module):
    """Base of visual backbones: subclasses set ``feature_info``, ``mean``, ``std`` and implement ``forward``.

    ``forward(x, layers)`` returns ``{name: (B, C, H/stride, W/stride)}`` for the requested layers and stops
    as early as it can. ``pooled(x)`` returns one global embedding per image (B, D).
    """

    spec: str = ""
    feature_info: list[FeatureInfo] = []
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    default_size: int = 256

    def info(self, name: str) -> FeatureInfo:
        for fi in self.feature_info:
            if fi.name == name:
                return fi
        raise KeyError(f"backbone {self.spec!r} has no feature {name!r}; it has {[f.name for f in self.feature_info]}")

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def preprocess(self, images: Sequence[ImageLike], size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Images of any size -> normalised float tensor (B, 3, size, size) on the backbone's device; ``size`` may
        be a (height, width)."""
        x = resized(images, size or self.default_size).to(self.device)  # (B, 3, S, S) uint8, channels-last
        # (x / 255 - mean) / std as one pass, x * (1 / (255 std)) - mean / std, straight from uint8 (about 3x
        # faster than converting first).
        scale, shift = (t.to(x.device) for t in self.normalization())
        return torch.addcmul(shift, x, scale)

    def normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (1, 3, 1, 1) float32: ``preprocess`` normalises uint8 pixels x as x * scale + shift,
        i.e. (x / 255 - mean) / std."""
        std = torch.tensor(self.std, dtype=torch.float64) * 255.0
        scale = (1.0 / std).float().view(1, 3, 1, 1)
        shift = (-torch.tensor(self.mean, dtype=torch.float64) * 255.0 / std).float().view(1, 3, 1, 1)
        return scale, shift

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) global embedding: average of the deepest feature map."""
        last = self.feature_info[-1].name
        return self.forward(x, [last])[last].mean(dim=(2, 3))


def resized(images: Sequence[ImageLike], size: int | tuple[int, int]) -> torch.Tensor:
    """Images of any size -> uint8 (B, 3, size, size) (or (B, 3, height, width)), channels-last strides: the pixels ``preprocess`` normalises
    (decoded as RGB, resized bilinearly with antialiasing)."""
    return _resize_batch(_decode(images), size)


def _decode(images: Sequence[ImageLike]) -> list[np.ndarray]:
    """``as_rgb`` of each image; files are decoded over torch's thread count (decoding releases the GIL), arrays
    in place (threads would only add their start-up)."""
    workers = min(len(images), torch.get_num_threads())
    if workers <= 1 or not any(isinstance(im, (str, Path)) for im in images):
        return [as_rgb(im) for im in images]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(as_rgb, images))


def _resize_batch(arrays: list[np.ndarray], size: int | tuple[int, int]) -> torch.Tensor:
    """RGB arrays (H, W, 3) uint8 -> (B, 3, size, size) uint8 in channels-last strides, bilinear with
    antialiasing (Pillow's filter; torch's uint8 kernel, within 2 levels of Pillow's own)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    by_shape: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    parts = []
    for shape, idx in by_shape.items():
        x = torch.from_numpy(np.stack([arrays[i] for i in idx])).permute(0, 3, 1, 2)
        if shape[:2] != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        parts.append(x.contiguous(memory_format=torch.channels_last))
    if len(parts) == 1:
        return parts[0]
    order = torch.tensor([i for idx in by_shape.values() for i in idx]).argsort()
    return torch.cat(parts).index_select(0, order).contiguous(memory_format=torch.channels_last)
