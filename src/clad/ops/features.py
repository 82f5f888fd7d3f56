"""Shared patch-feature extraction: multi-scale maps -> one grid of patch embeddings."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# A visual backbone as these functions use it: (batch (B, 3, S, S), layer names) -> {name: (B, C, h, w)}.
FeatureExtractor = Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]]


@torch.inference_mode()
def patch_embeddings(
    backbone: FeatureExtractor,
    x: torch.Tensor,
    layers: Sequence[str],
    neighbourhood: int = 3,
) -> torch.Tensor:
    """Preprocessed batch (B, 3, S, S) -> patch embeddings (B, C, h, w) on the grid of the first layer.

    Each layer is averaged over a ``neighbourhood`` x ``neighbourhood`` window (PatchCore's local aggregation),
    upsampled bilinearly to the first layer's grid and concatenated along channels.
    """
    return aggregate(backbone(x, layers), layers, neighbourhood)


def aggregate(feats: dict[str, torch.Tensor], layers: Sequence[str], neighbourhood: int = 3) -> torch.Tensor:
    """The aggregation of ``patch_embeddings`` on given feature maps (differentiable, for Grad-CAM)."""
    grid = feats[layers[0]].shape[-2:]
    out = []
    for name in layers:
        f = feats[name]
        if neighbourhood > 1:
            f = F.avg_pool2d(f, neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
        if f.shape[-2:] != grid:
            f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)  # (B, C, h, w)
