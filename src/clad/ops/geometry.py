"""How an image of any shape becomes the backbone's input: squeezed to a square, or kept in shape, whole or in tiles.

Three ways, chosen by a detector's ``resize`` (and ``zoom``, ``tile``) settings:

- ``squeeze``: every image resized to ``size`` x ``size`` whatever its shape (what clad did before; a 6:1 tile
  is stretched sixfold along one axis).
- ``keep``: the aspect ratio is kept, and every image is resized by one factor, learnt from the references at
  fit: ``size`` over the median of their sqrt(H * W), times ``zoom``. A reference of median area then works at
  about ``size`` x ``size`` pixels, and a part seen at one distance by one camera keeps one scale in every image,
  whatever its crop. Each side is rounded to a multiple of ``STEP`` (the coarsest stride the patch features use),
  so an image is stretched by at most STEP / 2 pixels per side. Images of one working shape are batched together.
- ``keep`` with ``tile``: as ``keep``, and a working image with a side longer than ``tile`` is cut into
  overlapping tiles of at most ``tile`` x ``tile``; each tile goes through the backbone on its own and the patch
  features are stitched, each patch taken from the tile whose centre it is nearest (tiles overlap by ``OVERLAP``
  pixels, so no kept patch lies within OVERLAP / 2 of a cut). With ``zoom`` > 1 this is the high-resolution mode for
  small defects on large images: memory per backbone call is bounded by the tile, not the image.

Maps are always returned at each input image's own size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

RESIZE_MODES = ("squeeze", "keep")
STEP = 16  # working sides are multiples of this: the stride of stage3, the coarsest layer the detectors use
OVERLAP = 64  # pixels shared by neighbouring tiles (8 patches of stride 8)


def reference_scale(shapes: Sequence[tuple[int, int]], size: int, zoom: float = 1.0) -> float:
    """The one factor ``keep`` resizes every image by: ``size`` / median sqrt(H * W) of the references, x zoom."""
    if not len(shapes):
        raise ValueError("reference_scale needs at least one reference shape")
    side = float(np.median([math.sqrt(h * w) for h, w in shapes]))
    return zoom * size / side


def working_shape(h: int, w: int, scale: float) -> tuple[int, int]:
    """An (H, W) image's working shape at ``scale``: each side scaled and rounded to a multiple of STEP (at least
    2 * STEP, so that every layer has a grid)."""
    return tuple(max(2 * STEP, STEP * round(side * scale / STEP)) for side in (h, w))


def cuts(length: int, tile: int, stride: int) -> list[tuple[int, int, int]]:
    """Overlapping tiles along one axis of ``length`` pixels: (start, keep_from, keep_to) per tile, in pixels.

    Tiles are ``tile`` long (at least 2 * OVERLAP; one tile of ``length`` when it fits), start on multiples of ``stride`` (the patch grid)
    and overlap by at least OVERLAP; the last one ends at ``length``. Tile i's patches are kept over
    [keep_from, keep_to): the ranges cut the axis at the middle of each overlap, on the patch grid, so every
    pixel is kept from exactly one tile.
    """
    if length <= tile:
        return [(0, 0, length)]
    if tile < 2 * OVERLAP:
        raise ValueError(f"tiles must be at least {2 * OVERLAP} pixels, got {tile}")
    step = max(stride, (tile - OVERLAP) // stride * stride)
    starts = list(range(0, length - tile, step)) + [length - tile]
    bounds = [0] + [((a + tile + b) // 2) // stride * stride for a, b in zip(starts, starts[1:])] + [length]
    return [(s, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]


@dataclass(frozen=True)
class Geometry:
    """How images become backbone input: ``mode`` ("squeeze" or "keep"), the working ``size`` of squeeze, the
    ``scale`` of keep (``reference_scale``) and its ``tile`` (None: whole images)."""

    mode: str = "squeeze"
    size: int = 256
    scale: float | None = None
    tile: int | None = None

    def __post_init__(self):
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.mode!r}")
        if self.mode == "keep" and self.scale is None:
            raise ValueError("resize 'keep' needs the scale learnt from the references (fit first)")
        if self.tile is not None and self.tile % STEP:
            raise ValueError(f"tile must be a multiple of {STEP}, got {self.tile}")

    def shape(self, h: int, w: int) -> tuple[int, int]:
        """The working (H, W) of an (h, w) image."""
        if self.mode == "squeeze":
            return self.size, self.size
        return working_shape(h, w, self.scale)

    def groups(self, shapes: Sequence[tuple[int, int]]) -> list[tuple[list[int], tuple[int, int]]]:
        """The images' indices grouped by working shape, in order of first appearance: [(indices, (H, W))]."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(shapes):
            out.setdefault(self.shape(h, w), []).append(i)
        return [(idx, hw) for hw, idx in out.items()]

    def features(self, x: torch.Tensor, extract: Callable[[torch.Tensor], torch.Tensor], stride: int) -> torch.Tensor:
        """Patch features (B, C, H / stride, W / stride) of a preprocessed batch x (B, 3, H, W) by ``extract``:
        in one call, or tile by tile and stitched (``tile``)."""
        H, W = x.shape[-2:]
        if self.tile is None or (H <= self.tile and W <= self.tile):
            return extract(x)
        rows, cols = cuts(H, self.tile, stride), cuts(W, self.tile, stride)
        th, tw = min(H, self.tile), min(W, self.tile)
        crops = torch.stack([x[:, :, r : r + th, c : c + tw] for r, _, _ in rows for c, _, _ in cols], 1)
        f = extract(crops.flatten(0, 1).contiguous(memory_format=torch.channels_last))  # (B * T, C, th/s, tw/s)
        f = f.view(len(x), len(rows) * len(cols), *f.shape[1:])
        out = f.new_empty(len(x), f.shape[2], H // stride, W // stride)
        t = 0
        for r, r0, r1 in rows:
            for c, c0, c1 in cols:
                out[:, :, r0 // stride : r1 // stride, c0 // stride : c1 // stride] = \
                    f[:, t, :, (r0 - r) // stride : (r1 - r) // stride, (c0 - c) // stride : (c1 - c) // stride]
                t += 1
        return out
