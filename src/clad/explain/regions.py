"""Regions of an anomaly map: connected components above a pixel threshold, and where they lie in words.

A region's box is ``(x0, y0, x1, y1)`` in the image's own pixels, end-exclusive like a slice
(``mask[y0:y1, x0:x1]``) and like ``PIL.Image.crop``.

Location words (``location_words``), from the box and the image size:
- a box touching no border: its centre's cell of a 3 x 3 grid: "upper left", "upper centre", "upper right",
  "centre left", "centre", "centre right", "lower left", "lower centre", "lower right";
- touching one border: "along the top edge" (or bottom, left, right), followed by ", left part" /
  ", right part" (top and bottom edges) or ", upper part" / ", lower part" (left and right edges) when the box's
  centre lies in that outer third along the edge;
- two adjacent borders: "in the upper left corner" (upper right, lower left, lower right);
- two opposite borders: "across the full width" / "across the full height", with ", upper part" etc. as above;
- three borders: "across the full width along the top edge" (bottom), "across the full height along the left
  edge" (right); all four: "across the whole image".
A box touches a border when it comes within 1 % of that side's length of it (at least one pixel).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GRID = (
    ("upper left", "upper centre", "upper right"),
    ("centre left", "centre", "centre right"),
    ("lower left", "lower centre", "lower right"),
)
MIN_AREA = 0.001  # regions smaller than this share of the image are dropped


def _third(centre: float, size: int) -> int:
    """0, 1 or 2: the third of ``[0, size)`` that holds ``centre``."""
    return min(2, max(0, int(3 * centre / max(size, 1))))


def location_words(bbox: tuple[int, int, int, int], shape: tuple[int, int]) -> str:
    """Where a box ``(x0, y0, x1, y1)`` lies in an image of ``shape`` (H, W), in words (rules in the module doc)."""
    x0, y0, x1, y1 = bbox
    h, w = shape
    mx, my = max(1, round(0.01 * w)), max(1, round(0.01 * h))
    top, bottom, left, right = y0 < my, y1 > h - my, x0 < mx, x1 > w - mx
    col, row = _third((x0 + x1) / 2, w), _third((y0 + y1) / 2, h)
    along_x = ("left part", "", "right part")[col]  # position along a horizontal edge
    along_y = ("upper part", "", "lower part")[row]  # position along a vertical edge

    def part(text: str, where: str) -> str:
        return f"{text}, {where}" if where else text

    n = top + bottom + left + right
    if n == 0:
        return GRID[row][col]
    if n == 4:
        return "across the whole image"
    if n == 3:
        if left and right:
            return f"across the full width along the {'top' if top else 'bottom'} edge"
        return f"across the full height along the {'left' if left else 'right'} edge"
    if n == 2:
        if left and right:
            return part("across the full width", along_y)
        if top and bottom:
            return part("across the full height", along_x)
        return f"in the {'upper' if top else 'lower'} {'left' if left else 'right'} corner"
    if top or bottom:
        return part(f"along the {'top' if top else 'bottom'} edge", along_x)
    return part(f"along the {'left' if left else 'right'} edge", along_y)


@dataclass
class Component:
    """One connected region of a thresholded map, before it is described."""

    mask: np.ndarray  # (H, W) bool
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), end-exclusive
    area: float  # share of the image's pixels, in [0, 1]
    peak: float  # largest map value inside


def extract_regions(amap: np.ndarray, threshold: float, min_area: float = MIN_AREA) -> list[Component]:
    """Connected components (8-connected) of ``amap >= threshold`` covering at least ``min_area`` of the image.

    amap: (H, W) float. Returns components sorted by peak value, highest first.
    """
    amap = np.asarray(amap, dtype=np.float32)
    labels, n = ndimage.label(amap >= threshold, structure=np.ones((3, 3), bool))
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels == i
        area = float(mask.sum()) / amap.size
        if area < min_area:
            continue
        ys, xs = sl
        out.append(Component(mask, (xs.start, ys.start, xs.stop, ys.stop), area, float(amap[mask].max())))
    out.sort(key=lambda c: -c.peak)
    return out


PEAK_FRACTION = 0.5  # the peak component: map >= median + PEAK_FRACTION * (peak - median)


def peak_component(amap: np.ndarray, fraction: float = PEAK_FRACTION) -> Component:
    """The region around the map's maximum, for an image flagged anomalous whose map has no component above the
    pixel threshold: the connected component (8-connected) holding the maximum of
    ``amap >= median + fraction * (max - median)`` (half-way from the map's median to its peak by default), of
    any size. A flat map gives the whole image."""
    amap = np.asarray(amap, dtype=np.float32)
    peak, median = float(amap.max()), float(np.median(amap))
    labels, _ = ndimage.label(amap >= median + fraction * (peak - median), structure=np.ones((3, 3), bool))
    mask = labels == labels.flat[int(np.argmax(amap))]
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Component(mask, bbox, float(mask.sum()) / amap.size, peak)
