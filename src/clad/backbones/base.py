"""The one feature contract every visual backbone follows.

A backbone is a torch module that turns a preprocessed batch (B, 3, H, W) into named multi-scale feature maps,
and owns the preprocessing (resize + normalisation) that belongs to its weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
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

    def preprocess(self, images: Sequence[ImageLike], size: int | None = None) -> torch.Tensor:
        """Images of any size -> normalised float tensor (B, 3, size, size) on the backbone's device."""
        size = size or self.default_size
        batch = np.stack([_resize(as_rgb(im), size) for im in images])  # (B, S, S, 3) uint8
        # (x / 255 - mean) / std as two in-place passes, without temporaries (about 3x faster). The tensor keeps
        # the array's channels-last strides (a permuted view).
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * 255.0
        return x.sub_(mean).div_(std)

    def forward(self, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) global embedding: average of the deepest feature map."""
        last = self.feature_info[-1].name
        return self.forward(x, [last])[last].mean(dim=(2, 3))


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, reducing_gap=None))
