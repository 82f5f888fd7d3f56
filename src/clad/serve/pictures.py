"""Pictures the station stores and serves: anomaly maps as 16-bit PNGs, heatmaps, overlays, thumbnails, the
closest normal patch. Colours come from ``clad.viz``."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from clad.pipeline.maps import dequantize16, quantize16
from clad.viz import draw_contour, heatmap, overlay

THUMBNAIL_SIDE = 160


def png(array: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_map(amap: np.ndarray) -> tuple[bytes, float, float]:
    """(H, W) float map -> a 16-bit grey PNG of it quantised between its min and max, and those two values
    (steps of (max - min) / 65535: far below what a heatmap or a region shows)."""
    q, lo, hi = quantize16(np.nan_to_num(np.asarray(amap, np.float32)))  # (H, W)
    return png(q, compress_level=1), lo, hi  # level 6: 3 % smaller, 3x the time (54 against 16 ms on magnetic tile)


def decode_map(data: bytes, lo: float, hi: float) -> np.ndarray:
    """Inverse of ``encode_map``: (H, W) float32."""
    with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
        q = np.asarray(img)
    return dequantize16(q, lo, hi)


def heat_range(threshold: float | None, score_is_map_max: bool) -> tuple[float | None, float | None]:
    """The colour range of a model's maps: 0 to twice the threshold when the threshold is a map threshold (the
    image score is the map's maximum) and positive, so that the threshold is the scale's middle (green), what is
    above it yellow to red, and every image of the model is coloured alike; else None (each map its own range)."""
    if threshold is not None and threshold > 0 and score_is_map_max:
        return 0.0, 2.0 * float(threshold)
    return None, None


def _range(amap: np.ndarray, lo: float | None, hi: float | None) -> tuple[float, float]:
    return (float(amap.min()), float(amap.max())) if lo is None or hi is None else (lo, hi)


def heatmap_png(amap: np.ndarray, lo: float | None, hi: float | None) -> bytes:
    return png(heatmap(amap, *_range(amap, lo, hi)))


def overlay_png(image: np.ndarray, amap: np.ndarray, lo: float | None, hi: float | None, alpha: float = 0.5) -> bytes:
    return png(overlay(image, amap, *_range(amap, lo, hi), alpha=alpha))


def thumbnail_png(image: np.ndarray, side: int = THUMBNAIL_SIDE) -> bytes:
    img = Image.fromarray(image)
    img.thumbnail((side, side), Image.BILINEAR)
    return png(np.asarray(img))


def nearest_png(reference: np.ndarray, box: tuple[int, int, int, int], side: int = THUMBNAIL_SIDE) -> bytes:
    """The reference image around its patch ``box`` (x0, y0, x1, y1): a square of four times the patch (at least
    a quarter of the image's shorter side), the patch outlined, scaled to ``side``."""
    h, w = reference.shape[:2]
    x0, y0, x1, y1 = box
    half = max(2 * max(x1 - x0, y1 - y0), min(h, w) // 8, 4)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left, top = max(0, min(cx - half, w - 2 * half)), max(0, min(cy - half, h - 2 * half))
    right, bottom = min(w, left + 2 * half), min(h, top + 2 * half)
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = True
    marked = draw_contour(reference, mask, colour=(0, 255, 0), width=max(1, (x1 - x0) // 8))
    crop = Image.fromarray(marked[top:bottom, left:right])
    return png(np.asarray(crop.resize((side, side), Image.NEAREST if crop.width < side else Image.BILINEAR)))
