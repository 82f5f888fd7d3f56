"""Pictures of anomaly maps: heatmap overlays and contours (PIL + matplotlib colormaps)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage


def heatmap(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 colour image, scaled to [vmin, vmax]."""
    span = max(vmax - vmin, 1e-12)
    norm = np.clip((amap - vmin) / span, 0.0, 1.0)
    return (colormaps[cmap](norm)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.45) -> np.ndarray:
    """Blend the heatmap of ``amap`` over an (H, W, 3) uint8 image of the same size."""
    heat = heatmap(amap, vmin, vmax).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + heat * alpha).round().astype(np.uint8)


def draw_contour(image: np.ndarray, mask: np.ndarray, colour=(255, 255, 255), width: int = 1) -> np.ndarray:
    """Draw the outline of a boolean mask onto a copy of an (H, W, 3) image."""
    if not mask.any():
        return image.copy()
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    out = image.copy()
    out[edge] = colour
    return out


def save_png(array: np.ndarray, path: str | Path, max_side: int | None = 512) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.BILINEAR)
    img.save(path)
    return path
