"""Synthetic anomalies made on normal references, each with its mask and the name of its kind.

CLAD needs anomalous examples to learn from, and the paper does not say where they come from. These are drawn on
the k normal references only (never on test images): cut-paste patches, Perlin-noise blended textures, drawn
scratches, cracks, holes, stains and local deformations. Deterministic for a given ``numpy.random.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from clad.vocabulary import SYNTHETIC_KINDS as KINDS  # the kinds drawn here, and their descriptions


@dataclass
class SyntheticAnomaly:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool
    kind: str


def perlin(shape: tuple[int, int], res: int, rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise in [-1, 1]-ish, ``res`` lattice cells along the shorter side."""
    h, w = shape
    ry, rx = max(1, res), max(1, int(round(res * w / h)))
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], -1)
    yy, xx = np.mgrid[0:h, 0:w]
    fy, fx = yy * ry / h, xx * rx / w
    iy, ix = fy.astype(int), fx.astype(int)
    dy, dx = fy - iy, fx - ix

    def dot(oy, ox):
        g = grad[iy + oy, ix + ox]
        return g[..., 0] * (dx - ox) + g[..., 1] * (dy - oy)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # noqa: E731
    u, v = fade(dx), fade(dy)
    top = dot(0, 0) * (1 - u) + dot(0, 1) * u
    bottom = dot(1, 0) * (1 - u) + dot(1, 1) * u
    return (top * (1 - v) + bottom * v) * np.sqrt(2)


def _blob_mask(shape, rng, min_frac=0.02, max_frac=0.12) -> np.ndarray:
    """A Perlin-shaped blob covering roughly min_frac..max_frac of the image, inside a random ellipse."""
    h, w = shape
    for _ in range(20):
        noise = perlin(shape, int(rng.integers(2, 6)), rng)
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        ay, ax = rng.uniform(0.08, 0.25) * h, rng.uniform(0.08, 0.25) * w
        yy, xx = np.mgrid[0:h, 0:w]
        ell = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2
        mask = (noise > rng.uniform(-0.1, 0.3)) & (ell < 1.0)
        frac = mask.mean()
        if min_frac <= frac <= max_frac:
            return mask
        if frac > 0.003:
            last = mask
    return last if "last" in locals() else ell < 1.0


def _soft(mask: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return np.clip(ndimage.gaussian_filter(mask.astype(np.float32), sigma), 0, 1)[..., None]


def _blend(image, other, mask, opacity: float) -> np.ndarray:
    a = _soft(mask) * opacity
    return np.clip(image * (1 - a) + other * a, 0, 255).astype(np.uint8)


def _polyline_mask(shape, points, width) -> np.ndarray:
    h, w = shape
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in points], fill=255, width=int(width), joint="curve")
    return np.asarray(canvas) > 0


def scratch(image, rng):
    h, w = image.shape[:2]
    start = rng.uniform(0.1, 0.9, 2) * (w, h)
    angle, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.5) * min(h, w)
    bend = rng.normal(0, 0.15)
    pts = [start + t * length * np.array([np.cos(angle + bend * t), np.sin(angle + bend * t)]) for t in np.linspace(0, 1, 12)]
    mask = _polyline_mask(image.shape[:2], pts, max(1, rng.integers(1, 4) * min(h, w) // 256 + 1))
    tone = rng.choice([rng.uniform(0, 60), rng.uniform(200, 255)])
    return _blend(image, np.full_like(image, tone), mask, rng.uniform(0.6, 1.0)), mask


def crack(image, rng):
    h, w = image.shape[:2]
    p = rng.uniform(0.2, 0.8, 2) * (w, h)
    angle = rng.uniform(0, 2 * np.pi)
    pts = [p.copy()]
    step = min(h, w) / 40
    for _ in range(int(rng.integers(15, 40))):
        angle += rng.normal(0, 0.6)
        p = p + step * np.array([np.cos(angle), np.sin(angle)])
        pts.append(p.copy())
    mask = _polyline_mask(image.shape[:2], pts, max(2, min(h, w) // 100))
    dark = image.astype(np.float32) * rng.uniform(0.1, 0.4)
    return _blend(image, dark, mask, 1.0), mask


def hole(image, rng):
    h, w = image.shape[:2]
    cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
    ry, rx = rng.uniform(0.02, 0.08) * h, rng.uniform(0.02, 0.08) * w
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1.0
    inner = np.full_like(image, rng.uniform(0, 50))
    return _blend(image, inner, mask, rng.uniform(0.85, 1.0)), mask


def stain(image, rng):
    mask = _blob_mask(image.shape[:2], rng, 0.01, 0.08)
    colour = rng.uniform(0, 255, 3)
    return _blend(image, np.broadcast_to(colour, image.shape), mask, rng.uniform(0.4, 0.9)), mask


def cut_paste(image, rng):
    h, w = image.shape[:2]
    ph, pw = int(rng.uniform(0.08, 0.25) * h), int(rng.uniform(0.08, 0.25) * w)
    sy, sx = rng.integers(0, h - ph), rng.integers(0, w - pw)
    patch = image[sy : sy + ph, sx : sx + pw].copy()
    patch = np.rot90(patch, int(rng.integers(1, 4))) if ph == pw else patch[::-1, ::-1]
    patch = np.clip(patch.astype(np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30), 0, 255)
    ty, tx = rng.integers(0, h - patch.shape[0]), rng.integers(0, w - patch.shape[1])
    out = image.copy()
    out[ty : ty + patch.shape[0], tx : tx + patch.shape[1]] = patch.astype(np.uint8)
    mask = np.zeros((h, w), bool)
    mask[ty : ty + patch.shape[0], tx : tx + patch.shape[1]] = True
    return out, mask


def texture(image, rng):
    """DRAEM-style: a Perlin-shaped region blended with a foreign texture made from the image itself."""
    mask = _blob_mask(image.shape[:2], rng, 0.02, 0.15)
    src = np.asarray(Image.fromarray(image).rotate(float(rng.uniform(0, 360))).filter(ImageFilter.DETAIL))
    src = src[:, :, rng.permutation(3)].astype(np.float32)
    src = np.clip((src - src.mean()) * rng.uniform(1.2, 2.5) + rng.uniform(60, 200), 0, 255)
    return _blend(image, src, mask, rng.uniform(0.5, 1.0)), mask


def deformation(image, rng):
    h, w = image.shape[:2]
    mask = _blob_mask((h, w), rng, 0.02, 0.1)
    amp = rng.uniform(0.02, 0.05) * min(h, w)
    dy = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), min(h, w) / 20) * amp * 20
    dx = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), min(h, w) / 20) * amp * 20
    soft = _soft(mask, 3)[..., 0]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    coords = [yy + dy * soft, xx + dx * soft]
    warped = np.stack([ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
    changed = np.abs(warped.astype(np.int16) - image.astype(np.int16)).max(-1) > 12
    return warped, mask & changed


def missing_part(image, rng):
    """A region replaced by a flat background-like colour, as if material were missing."""
    mask = _blob_mask(image.shape[:2], rng, 0.02, 0.1)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    colour = np.median(border, axis=0)
    return _blend(image, np.broadcast_to(colour, image.shape), mask, 1.0), mask


MAKERS: dict[str, Callable] = {
    "scratch": scratch,
    "crack": crack,
    "hole": hole,
    "stain": stain,
    "cut_paste": cut_paste,
    "texture": texture,
    "deformation": deformation,
    "missing_part": missing_part,
}


def make_anomaly(image: np.ndarray, rng: np.random.Generator, kinds=KINDS, min_pixels: int = 12) -> SyntheticAnomaly:
    """Draw one synthetic anomaly of a random kind on a copy of ``image``; retries until the mask is non-trivial."""
    for _ in range(10):
        kind = str(rng.choice(list(kinds)))
        out, mask = MAKERS[kind](image, rng)
        if mask.sum() >= min_pixels:
            return SyntheticAnomaly(out, mask, kind)
    return SyntheticAnomaly(out, mask, kind)
