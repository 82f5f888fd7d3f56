"""A small synthetic surface-inspection set in the MVTec AD layout, made offline, for tests and ``clad demo``.

Normal images are a woven tile texture (a regular pattern with a little jitter, smooth shading and sensor noise);
defective test images carry one of three defects with an exact mask: a thin dark scratch, a dark hole and a rust
coloured stain. Everything is deterministic from ``seed``.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from clad.errors import DatasetError

DEFECT_TYPES = ("hole", "scratch", "stain")
_MARKER = ".clad_synthetic"  # marks a tree made here, so a rerun may replace it (and nothing else)
_BASE_RGB = np.array([150.0, 140.0, 122.0])
_RUST_RGB = np.array([165.0, 82.0, 34.0])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 noise in about [-1, 1] varying over ``cells`` lattice cells (bicubic upsampling)."""
    grid = rng.normal(0.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    up = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 1.5


def _normal_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8 woven texture: a regular weave, slight misalignment, shading and noise."""
    period = size / 10.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = rng.uniform(-period / 4, period / 4, 2)  # the part sits a little differently each time
    angle = rng.uniform(-0.02, 0.02)
    u = (xx + dx) * np.cos(angle) - (yy + dy) * np.sin(angle)
    v = (xx + dx) * np.sin(angle) + (yy + dy) * np.cos(angle)
    weave = np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)  # (H, W) in [-1, 1]
    grooves = np.cos(2 * np.pi * (u + v) / (period / 2)) ** 8  # fine diagonal ridges, peaked
    shading = _smooth_noise(rng, size, 3)  # slow illumination change
    gray = 22.0 * weave + 10.0 * grooves + 10.0 * shading
    tint = 1.0 + 0.02 * rng.normal(0, 1, 3)  # small colour drift between images
    img = (_BASE_RGB * tint)[None, None, :] + gray[..., None] + rng.normal(0.0, 3.0, (size, size, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _centre(rng: np.random.Generator, size: int) -> tuple[float, float]:
    return tuple(rng.uniform(0.25 * size, 0.75 * size, 2))


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin dark slightly curved line."""
    size = img.shape[0]
    cy, cx = _centre(rng, size)
    length = rng.uniform(0.3, 0.5) * size
    theta = rng.uniform(0, np.pi)
    t = np.linspace(-0.5, 0.5, 64)[:, None]
    bend = rng.uniform(-0.08, 0.08) * length * (1 - 4 * t**2)  # a gentle arc
    pts = np.hstack([cy + t * length * np.sin(theta) + bend * np.cos(theta),
                     cx + t * length * np.cos(theta) - bend * np.sin(theta)])  # (64, 2) y, x
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.full((size, size), np.inf, np.float32)
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):  # distance to the polyline, segment by segment
        d = np.array([y1 - y0, x1 - x0])
        s = np.clip(((yy - y0) * d[0] + (xx - x0) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
        dist = np.minimum(dist, np.hypot(yy - (y0 + s * d[0]), xx - (x0 + s * d[1])))
    mask = dist <= max(1.0, size / 96)
    out = img.astype(np.float32)
    out[mask] *= 0.3
    return np.clip(np.round(out), 0, 255).astype(np.uint8), mask


def _hole(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark disc, darkest at its centre."""
    size = img.shape[0]
    cy, cx = _centre(rng, size)
    radius = rng.uniform(0.04, 0.07) * size
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - cy, xx - cx) / radius
    mask = r <= 1.0
    depth = np.where(mask, 0.12 + 0.2 * r**2, 1.0)[..., None]  # (H, W, 1) brightness factor
    out = img.astype(np.float32) * depth
    return np.clip(np.round(out), 0, 255).astype(np.uint8), mask


def _stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An irregular rust-coloured blob blended into the surface."""
    size = img.shape[0]
    cy, cx = _centre(rng, size)
    radius = rng.uniform(0.08, 0.12) * size
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot((yy - cy) / rng.uniform(0.7, 1.0), (xx - cx) / rng.uniform(0.7, 1.0)) / radius
    wobble = 0.35 * _smooth_noise(rng, size, max(4, size // 16))
    mask = (r + wobble) <= 1.0
    alpha = np.where(mask, 0.75, 0.0)[..., None]
    out = img.astype(np.float32) * (1 - alpha) + _RUST_RGB * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8), mask


_DEFECTS = {"hole": _hole, "scratch": _scratch, "stain": _stain}


def synthetic_images(n: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """``n`` normal (size, size, 3) uint8 images of the synthetic texture, in memory."""
    return [_normal_image(np.random.default_rng([seed, 0, i]), size) for i in range(n)]


def synthetic_defect(kind: str, size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One defective image of ``kind`` (one of DEFECT_TYPES) and its (size, size) bool mask."""
    if kind not in _DEFECTS:
        raise ValueError(f"unknown defect kind {kind!r}; kinds: {', '.join(DEFECT_TYPES)}")
    rng = np.random.default_rng([seed, 2, DEFECT_TYPES.index(kind)])
    return _DEFECTS[kind](_normal_image(rng, size), rng)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def make_synthetic_mvtec(root: str | Path, category: str = "synthetic_tile", n_train: int = 10, n_test_good: int = 4,
                         n_test_defect: int = 6, size: int = 128, seed: int = 0) -> Path:
    """Write ``root/category/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png}`` and return ``root``.

    Defective images cycle through DEFECT_TYPES ("hole", "scratch", "stain"). A category folder made by an earlier
    call is replaced; any other existing non-empty folder is an error, so no user data is overwritten.
    """
    if min(n_train, n_test_good, n_test_defect) < 0 or n_train < 1:
        raise ValueError("n_train must be >= 1 and the test counts >= 0")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    root = Path(root)
    base = root / category
    if base.exists():
        if (base / _MARKER).is_file():
            shutil.rmtree(base)
        elif not base.is_dir() or any(base.iterdir()):
            raise DatasetError(f"{base}: exists and was not made by make_synthetic_mvtec; refusing to overwrite it")
    base.mkdir(parents=True, exist_ok=True)
    (base / _MARKER).write_text("made by clad.data.make_synthetic_mvtec; safe to delete\n")

    for i in range(n_train):
        _save(base / "train" / "good" / f"{i:03d}.png", _normal_image(np.random.default_rng([seed, 0, i]), size))
    for i in range(n_test_good):
        _save(base / "test" / "good" / f"{i:03d}.png", _normal_image(np.random.default_rng([seed, 1, i]), size))
    counts = dict.fromkeys(DEFECT_TYPES, 0)
    for i in range(n_test_defect):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        rng = np.random.default_rng([seed, 2, i])
        image, mask = _DEFECTS[kind](_normal_image(rng, size), rng)
        stem = f"{counts[kind]:03d}"
        counts[kind] += 1
        _save(base / "test" / kind / f"{stem}.png", image)
        _save(base / "ground_truth" / kind / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
    return root
